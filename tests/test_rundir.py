"""RunDir: opening missing, incomplete, corrupt and valid run directories; the atomic publish
routine every writer uses; the one tokenizer-equality check; the tied head stored once."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from arch import build_model
from slmlab.checkpoint import load_tensors, publish, remove_stale, save_model, weights_for_save
from slmlab.config import load_config
from slmlab.errors import CheckpointError, ConfigError, RunDirError
from slmlab.rundir import CONFIG, TOKENIZER, WEIGHTS, RunDir
from slmlab.tokenizer import train_tokenizer

TINY = ["model.vocab_size=300", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
        "model.layers=CA"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["the cat sat on the mat and the dog ran to the sea " * 20], 300)


@pytest.fixture
def run(tmp_path, tok):
    """A finished run directory written through RunDir."""
    cfg = load_config(overrides=TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.objective)
    r = RunDir.create(tmp_path / "run")
    r.write_config(cfg)
    r.write_tokenizer(tok)
    r.write_weights(weights_for_save(model))
    return SimpleNamespace(dir=r, cfg=cfg, model=model)


def test_open_valid_run_loads_config_model_and_tokenizer(run, tok):
    cfg, model, t = RunDir.open(run.dir.path).load()
    assert cfg.model == run.cfg.model and t.to_json() == tok.to_json() and not model.training
    for k, v in run.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    assert model.lm_head.weight is model.embed.weight  # the tied head came back tied


def test_kernels_this_device_cannot_run_load_as_auto_with_a_note(run, capsys):
    """A run trained with model.kernels=flex (CUDA only) still samples and exports on a CPU: it loads
    with auto, the same function, and says so on stderr."""
    import yaml

    path = run.dir.path / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    saved["model"]["kernels"] = "flex"
    path.write_text(yaml.safe_dump(saved))
    cfg, model, _ = RunDir.open(run.dir.path).load("cpu")
    assert cfg.model.kernels == "auto" and all(layer.mixer.backend == "auto" for layer in model.layers
                                               if hasattr(layer.mixer, "backend"))
    assert "model.kernels=flex runs on CUDA" in capsys.readouterr().err


def test_tied_head_is_stored_once(run):
    sd = load_tensors(run.dir.path / WEIGHTS)
    assert "embed.weight" in sd and "lm_head.weight" not in sd


@pytest.mark.parametrize("remove,needle", [(None, "no such directory"), ("file", "a file, not a run directory"),
                                           (CONFIG, "no config.yaml"), (WEIGHTS, "no model.safetensors"),
                                           (TOKENIZER, "no tokenizer.json")])
def test_open_missing_dir_or_file_is_a_one_line_error(run, tmp_path, remove, needle):
    path = tmp_path / "nope" if remove in (None, "file") else run.dir.path
    if remove == "file":
        path.write_text("a corpus, given as --run by mistake")
    elif remove:
        (path / remove).unlink()
    with pytest.raises(RunDirError) as e:
        RunDir.open(path, label="train.teacher=")
    msg = str(e.value)
    assert msg == f"train.teacher={path} is not a finished run ({needle})", msg
    assert isinstance(e.value, CheckpointError) and isinstance(e.value, ConfigError)


def test_open_for_resume_needs_only_a_config(run):
    (run.dir.path / WEIGHTS).unlink()
    RunDir.open(run.dir.path, need=(CONFIG,))
    (run.dir.path / CONFIG).unlink()
    with pytest.raises(RunDirError, match=r"holds no run \(no config.yaml\)"):
        RunDir.open(run.dir.path, need=(CONFIG,), label="--resume: ")


def test_corrupt_weights_name_the_file(run):
    w = run.dir.path / WEIGHTS
    w.write_bytes(w.read_bytes()[:64])
    with pytest.raises(CheckpointError) as e:
        RunDir.open(run.dir.path).load()
    assert str(w) in str(e.value) and "corrupt or truncated" in str(e.value) and "\n" not in str(e.value)


def test_non_finite_weights_are_a_one_line_error(run):
    from safetensors.torch import load_file, save_file

    w = run.dir.path / WEIGHTS
    sd = load_file(w)
    name = sorted(sd)[-1]
    sd[name][0] = float("nan")
    save_file(sd, w)
    with pytest.raises(CheckpointError) as e:
        RunDir.open(run.dir.path).load()
    assert f"holds non-finite weights (NaN or inf), first in {name}" in str(e.value) and "\n" not in str(e.value)


def test_corrupt_config_is_a_one_line_error(run):
    (run.dir.path / CONFIG).write_text("model: {d_model: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        RunDir.open(run.dir.path).load()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["", "train: {steps: 5}\n"])
def test_an_empty_or_cut_config_is_named_not_the_weights(run, text):
    """An empty config.yaml loaded as the defaults, and the error then blamed model.safetensors."""
    (run.dir.path / CONFIG).write_text(text)
    with pytest.raises(ConfigError, match="has no model section"):
        RunDir.open(run.dir.path).load()


def test_tokenizer_mismatch(run, tok):
    run.dir.check_same_tokenizer(tok)  # the run's own tokenizer passes
    other = train_tokenizer(["completely different text about numbers 1 2 3 " * 20], 280)
    with pytest.raises(ConfigError) as e:
        run.dir.check_same_tokenizer(other, "the ids would mean other tokens")
    assert str(e.value) == (f"{run.dir.path} uses a different tokenizer than this run's data; "
                            "the ids would mean other tokens")


def test_create_refuses_an_existing_run_unless_forced(run):
    with pytest.raises(ConfigError, match="already holds a run; pass --force"):
        RunDir.create(run.dir.path)
    (run.dir.path / "summary.json").write_text("{}")
    RunDir.create(run.dir.path, force=True)
    assert not (run.dir.path / WEIGHTS).exists() and not (run.dir.path / "summary.json").exists()


# ---- publish: the one write-then-rename routine ----

def _entries(d):
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_publish_leaves_no_partial_output_when_the_writer_raises(tmp_path, kind):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with publish(target) as tmp:
            if kind == "file":
                tmp.write_text("half")
            else:
                tmp.mkdir()
                (tmp / "a.bin").write_bytes(b"x" * 10)
            raise KeyboardInterrupt
    assert _entries(tmp_path) == []  # neither the target nor a temporary


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_publish_replaces_only_after_success(tmp_path, kind):
    target = tmp_path / "out"

    def write(tmp, text):
        if kind == "file":
            tmp.write_text(text)
        else:
            tmp.mkdir()
            (tmp / "f").write_text(text)

    def read():
        return target.read_text() if kind == "file" else (target / "f").read_text()

    with publish(target) as tmp:
        write(tmp, "old")
    with pytest.raises(RuntimeError):
        with publish(target) as tmp:
            write(tmp, "new")
            raise RuntimeError("writer failed")
    assert read() == "old" and _entries(tmp_path) == ["out"]
    with publish(target) as tmp:
        write(tmp, "new")
    assert read() == "new" and _entries(tmp_path) == ["out"]


def test_publish_keep_existing_lets_the_first_writer_win(tmp_path):
    with publish(tmp_path / "c") as tmp:
        tmp.write_text("first")
    with publish(tmp_path / "c", keep_existing=True) as tmp:
        tmp.write_text("second")
    assert (tmp_path / "c").read_text() == "first" and _entries(tmp_path) == ["c"]


def test_publish_refuses_a_writer_that_wrote_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="nothing was written"):
        with publish(tmp_path / "x"):
            pass
    assert _entries(tmp_path) == []


def test_remove_stale_drops_dead_writers_only(tmp_path):
    dead = tmp_path / ".tmp-step_000004-999999999-abcd1234"  # no such pid
    live = tmp_path / f".tmp-step_000008-{os.getpid()}-abcd1234"
    dead.mkdir()
    live.mkdir()
    remove_stale(tmp_path, "step_*")
    assert _entries(tmp_path) == [live.name]


def test_save_model_round_trips_an_untied_model(tmp_path):
    cfg = load_config(overrides=[*TINY, "model.tie_embeddings=false"])
    model = build_model(cfg.model, cfg.objective)
    save_model(model, tmp_path / "m.safetensors", metadata={"k": "v"})
    sd = load_tensors(tmp_path / "m.safetensors")
    assert "lm_head.weight" in sd and json.dumps(sorted(sd)) == json.dumps(sorted(model.state_dict()))


def test_a_kill_while_old_checkpoints_are_deleted_never_leaves_a_half_checkpoint(tmp_path, monkeypatch):
    """Dropping checkpoints beyond keep_checkpoints dies half-way (after one file went): every
    step_* left is complete."""
    import torch

    from slmlab import checkpoint as ck

    sd = {"w": torch.zeros(2)}
    for step in (1, 2):
        ck.save_checkpoint(tmp_path, step, sd, {"step": step}, keep=2)

    real_rmtree = ck.shutil.rmtree

    def killed_rmtree(path, *a, **k):
        if "step_000001" not in Path(path).name:  # publish's own clean-up of step 3's staging
            return real_rmtree(path, *a, **k)
        (Path(path) / "state.pt").unlink()
        raise SystemExit(137)

    with monkeypatch.context() as m:
        m.setattr(ck.shutil, "rmtree", killed_rmtree)
        with pytest.raises(SystemExit):
            ck.save_checkpoint(tmp_path, 3, sd, {"step": 3}, keep=2)
    for d in ck.checkpoint_dirs(tmp_path):
        assert (d / "state.pt").is_file() and (d / "model.safetensors").is_file(), d
    assert [d.name for d in ck.checkpoint_dirs(tmp_path)] == ["step_000002", "step_000003"]
    # the half-deleted one survives only as a temporary (removed by the next run: test_resume)
    assert [p.name.split("-")[1] for p in (tmp_path / ck.CKPT_DIR).glob(".tmp-*")] == ["step_000001"]
