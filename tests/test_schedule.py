"""The learning-rate schedule (slmlab/phases.py lr_mult): warmup, then wsd or cosine, one rise and
one fall whatever train.steps is."""
from types import SimpleNamespace

import pytest

from slmlab.phases import effective_warmup, lr_mult, warmup_note


def train(**kw):
    return SimpleNamespace(**{"steps": 400, "warmup_steps": 30, "decay_frac": 0.3, "min_lr_frac": 0.0,
                              "schedule": "wsd", **kw})


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
@pytest.mark.parametrize("steps", [1, 2, 5, 20, 31, 40, 400])
def test_the_lr_rises_to_its_peak_once_then_only_falls(schedule, steps):
    """A warmup longer than the room before the decay (the default 30 in a --steps 20 or 40 run) made the
    lr jump down as it ended (wsd) or still rise at the last step (cosine)."""
    t = train(steps=steps, schedule=schedule)
    lrs = [lr_mult(i, t) for i in range(steps)]
    peak = lrs.index(max(lrs))
    assert max(lrs) == 1.0 and all(0 < x <= 1 for x in lrs)
    assert lrs[:peak + 1] == sorted(lrs[:peak + 1]) and lrs[peak:] == sorted(lrs[peak:], reverse=True), lrs
    if steps > 2:
        assert lrs[-1] < 1.0  # it decays before the end


def test_a_warmup_that_fits_is_kept_and_a_capped_one_is_noted():
    assert effective_warmup(train()) == 30 and warmup_note(train()) is None
    assert effective_warmup(train(steps=40)) == 28  # the wsd decay starts at step 28
    assert warmup_note(train(steps=40)) == ("note: train.warmup_steps=30 overruns the 40-step schedule: the lr warms "
                                            "up over 28 steps (where the wsd decay starts)")
    assert effective_warmup(train(steps=20, schedule="cosine")) == 10
    assert effective_warmup(train(warmup_steps=0)) == 0 and lr_mult(0, train(warmup_steps=0)) == 1.0



def test_the_run_prints_the_note_in_its_plan(tmp_path):
    from trainer_helpers import run_train, tiny_overrides, write_corpus

    corpus = write_corpus(tmp_path / "c.txt", lines=300)
    res = run_train(["--data", str(corpus), "--out", str(tmp_path / "r"), *tiny_overrides(tmp_path, steps=4),
                     "train.warmup_steps=30"])
    assert res.returncode == 0, res.stderr
    assert "  note: train.warmup_steps=30 overruns the 4-step schedule: the lr warms up over 2 steps" in res.stdout
