"""eval.py: a pair's score is the full forward's log-likelihood of its continuation (batched, padded,
left-truncated alike), the built-in tasks format their datasets' rows as lm-evaluation-harness does,
a transformers folder scores as our import of it, a trained run beats chance where an untrained one
does not, and bad input is one line, exit 2."""
import json
import math
import sys
import types

import pytest
import torch
from trainer_helpers import ROOT, run_here, tiny_overrides

from slmlab import harness, tasks
from slmlab.config import load_config
from slmlab.errors import ConfigError, DataError
from slmlab.rundir import model_from_config
from slmlab.tokenizer import train_tokenizer

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "my bird sang at dawn", "his fish swam by the reef",
             "our cow ate the green grass", "her fox hid under a log", "an owl hooted all night",
             "the bee flew to a flower"]


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): a random 2-layer conv+attention model with its own small BPE."""
    tok = train_tokenizer([" ".join(SENTENCES)] * 20 + ["the of and to a in is it you that"] * 20, 300)
    cfg = load_config(overrides=["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
                                 "model.layers=CA", "model.vocab_size=300"])
    torch.manual_seed(0)
    return model_from_config(cfg).eval(), tok


def direct(model, ids: list[int], n_cont: int) -> tuple[float, bool]:
    """The continuation's log-likelihood and greedy match from one unbatched forward of `ids`."""
    with torch.no_grad():
        lp = model(torch.tensor([ids[:-1]]))[0].double().log_softmax(-1)
    t = torch.tensor(ids[1:])
    pos = range(len(ids) - 1 - n_cont, len(ids) - 1)
    return sum(lp[p, t[p]].item() for p in pos), all(lp[p].argmax().item() == t[p].item() for p in pos)


def test_pair_scores_equal_the_full_forward_batched_and_alone(tiny):
    model, tok = tiny
    scorer = harness.RunScorer(model, tok, "cpu", max_len=256)
    words = "the cat sat on the mat a dog ran in the park".split()
    long = " ".join(words * 6)
    long = tok.decode(tok.encode(long)[:63])
    # contexts of 0, 1, 7 and 63 tokens; continuations of one and several tokens
    pairs = [("", "the cat"), ("the", " cat"), (" ".join(words[:7]), " in the park"), (long, " sat on")]
    batched = harness.score_pairs(scorer, pairs)
    alone = [harness.score_pairs(scorer, [p], batch_tokens=1)[0] for p in pairs]
    for (c, k), b, a in zip(pairs, batched, alone):
        ids, n = harness.tokenize_pair(scorer, c, k)
        ref_lp, ref_greedy = direct(model, ids, n)
        assert b.tokens == n and not b.truncated
        assert abs(b.logprob - ref_lp) < 1e-4 and b.greedy == ref_greedy, (c, k)
        assert abs(a.logprob - b.logprob) < 1e-4  # padding to the batch's width changes nothing


def test_one_token_choices_after_one_context_share_a_row(tiny):
    model, tok = tiny
    scorer = harness.RunScorer(model, tok, "cpu", max_len=256)
    ones = [w for w in (" the", " a", " cat", " dog", " on", " in") if len(tok.encode(w)) == 1]
    pairs = [("the cat sat on the mat and", w) for w in ones] + [("a dog ran", " in the park")]
    seen = []
    real = scorer.masked_logits
    scorer.masked_logits = lambda idx, mask: seen.append(idx.shape[0]) or real(idx, mask)
    scores = harness.score_pairs(scorer, pairs)
    assert len(ones) >= 3 and sum(seen) == 2  # one row for every one-token choice, one for the longer pair
    for (c, k), s in zip(pairs, scores):
        ids, n = harness.tokenize_pair(scorer, c, k)
        ref_lp, ref_greedy = direct(model, ids, n)
        assert abs(s.logprob - ref_lp) < 1e-4 and s.greedy == ref_greedy


def test_a_document_is_scored_in_windows_that_predict_each_token_once(tiny):
    model, tok = tiny
    scorer = harness.RunScorer(model, tok, "cpu", max_len=16)
    text = " ".join(SENTENCES[:4])
    windows = harness.rolling_windows(scorer, text)
    ids = [tok.start_id] + tok.encode(text)
    assert len(windows) > 2 and sum(n for _, n in windows) == len(ids) - 1
    assert [w[0][0] for w in windows[:-1]] == ids[:len(ids) - 17:16] and all(n == 16 for _, n in windows[:-1])
    last, n = windows[-1]  # the last span, shorter, reads the tokens before it for context
    assert n < 16 and last == ids[-17:], (n, len(ids))
    res = harness.evaluate_items(scorer, [tasks.document(text)])
    nll = -sum(direct(model, w, n)[0] for w, n in windows)
    assert res.metrics["bpb"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)
    assert res.metrics["word_ppl"] == pytest.approx(math.exp(nll / len(text.split())), rel=1e-5)
    assert res.metrics["tokens"] == len(ids) - 1 and res.per_item == {}


def test_a_task_holds_one_kind_of_item_and_text_takes_no_shots(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"text": "some words"}) + "\n" + json.dumps({"context": "a", "continuation": " b"}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: a completion item in a task whose first item is text"):
        tasks.read_items(tasks.resolve(str(path)))
    path.write_text(json.dumps({"text": "some words"}) + "\n" + json.dumps({"text": "more words"}) + "\n")
    with pytest.raises(DataError, match="--fewshot applies to multiple-choice and completion tasks"):
        tasks.read_items(tasks.resolve(str(path)), fewshot=1)
    with pytest.raises(DataError, match="a text item needs a non-empty string 'text'"):
        tasks.generic_item({"text": " "})


def test_a_long_context_loses_tokens_on_the_left(tiny):
    model, tok = tiny
    scorer = harness.RunScorer(model, tok, "cpu", max_len=8)
    c, k = " ".join(SENTENCES[:3]), " the mat"
    ids, n = harness.tokenize_pair(scorer, c, k)
    assert len(ids) > 9
    s = harness.score_pairs(scorer, [(c, k)])[0]
    assert s.truncated and abs(s.logprob - direct(model, ids[-9:], n)[0]) < 1e-4
    with pytest.raises(DataError, match="does not fit the 8-token context"):
        harness.tokenize_pair(scorer, "", " ".join(SENTENCES))


def test_trailing_whitespace_of_a_context_goes_to_the_continuation(tiny):
    scorer = harness.RunScorer(*tiny, "cpu", max_len=64)
    assert harness.tokenize_pair(scorer, "the cat ", "sat") == harness.tokenize_pair(scorer, "the cat", " sat")
    assert harness.tokenize_pair(scorer, "the cat:\n", "sat") == harness.tokenize_pair(scorer, "the cat:", "\nsat")


class _PrependingPieces:
    """A SentencePiece-like encoder: the text gets a leading ▁, spaces become ▁, a piece starts at each ▁
    (an imported Llama-2 tokenizer's normalizer does this): " Paris" alone is ["▁", "▁Paris"]."""
    max_len, start_id = 64, 0

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        import re

        return [self.vocab.setdefault(p, len(self.vocab) + 1) for p in re.findall("▁[^▁]*", "▁" + text.replace(" ", "▁"))]


def test_a_continuation_is_encoded_after_its_context_unless_a_token_spans_the_seam():
    scorer = _PrependingPieces()
    ids, n = harness.tokenize_pair(scorer, "The capital is", " Paris")
    assert len(scorer.encode(" Paris")) == 2 and n == 1 and ids[-1] == scorer.vocab["▁Paris"]  # no stray ▁
    ids, n = harness.tokenize_pair(scorer, "The cap", "ital")  # the whole text's "▁capital" spans the seam
    assert n == 1 and ids == [0, scorer.vocab["▁The"], scorer.vocab["▁cap"], scorer.vocab["▁ital"]]


def test_own_tokenizer_starts_after_eos_as_training_documents_do(tiny):
    _, tok = tiny
    assert tok.start_id == tok.eos_id != tok.bos_id  # data.py joins documents with eos; bos never trains
    ids, _ = harness.tokenize_pair(harness.RunScorer(*tiny, "cpu", max_len=64), "the", " cat")
    assert ids[0] == tok.eos_id


@pytest.fixture(scope="module")
def tiny_diffusion(tiny):
    _, tok = tiny
    cfg = load_config(arch="diffusion", overrides=["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                                                   "model.n_kv_heads=1", "model.vocab_size=300", "model.layers=CA"])
    torch.manual_seed(0)
    return model_from_config(cfg).eval(), tok


def direct_elbo(model, ids: list[int], masks, weights) -> float:
    """The Monte-Carlo estimate recomputed one draw at a time: mean of weight x the masked tokens' -log p."""
    x0 = torch.tensor(ids)
    est = []
    for m, w in zip(masks[:-1], weights):
        with torch.no_grad():
            lp = model.denoise_logits(torch.where(m, model.mask_id, x0)[None])[0].double().log_softmax(-1)
        est.append(w.item() * -sum(lp[i, ids[i]].item() for i in m.nonzero()[:, 0].tolist()))
    return sum(est) / len(est)


def test_a_diffusion_run_scores_the_monte_carlo_elbo_of_its_draws(tiny_diffusion):
    model, tok = tiny_diffusion
    scorer = harness.scorer_for(model, tok, "cpu", max_len=64, samples=5)
    assert isinstance(scorer, harness.DiffusionScorer) and scorer.bound
    pairs = [("the cat sat", " on the mat"), ("a dog", " ran"), ("", "my bird sang at dawn"), ("the cat sat on", " the")]
    together = harness.score_pairs(scorer, pairs)
    for (c, k), s in zip(pairs, together):
        ids, n = harness.tokenize_pair(scorer, c, k)
        masks, weights = scorer.draws(ids, n)
        assert (masks[:, :len(ids) - n] == 0).all() and (masks.sum(1)[:-1] >= 1).all() and masks[-1, -n:].all()
        assert abs(-s.logprob - direct_elbo(model, ids, masks, weights)) < 1e-4, (c, k)
        alone = harness.score_pairs(scorer, [(c, k)], batch_tokens=1)[0]
        assert alone.logprob == pytest.approx(s.logprob, abs=1e-5)  # seeded by the pair: any batch, any order
    # one continuation token: every draw masks it alone with weight 1, so the estimate is exact
    ids, n = harness.tokenize_pair(scorer, *pairs[3])
    with torch.no_grad():
        lp = model.denoise_logits(torch.tensor([ids[:-1] + [model.mask_id]]))[0, -1].double().log_softmax(-1)
    assert n == 1 and together[3].logprob == pytest.approx(lp[ids[-1]].item(), abs=1e-5)
    assert together[3].greedy == (lp.argmax().item() == ids[-1])


@pytest.mark.parametrize("arch,scorer", [("hybrid", harness.RunScorer), ("diffusion", harness.DiffusionScorer)])
def test_a_context_past_learned_positions_is_refused_before_scoring(arch, scorer):
    """The diffusion scorer accepted it and failed mid-scoring on the position table."""
    cfg = load_config(arch=arch, overrides=["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                                            "model.n_kv_heads=1", "model.vocab_size=300", "model.layers=CA",
                                            "model.pos=learned", "model.max_positions=8"])
    model = model_from_config(cfg).eval()
    with pytest.raises(ConfigError, match=r"^--max-len 32 exceeds m's model.max_positions=8 \(model.pos=learned\)$"):
        scorer(model, None, "cpu", max_len=32, name="m")


def test_metrics_of_hand_scored_items(monkeypatch):
    items = [tasks.choice("q", [" a", " bbbb"], 1), tasks.choice("q", [" a", " bbbb"], 0),
             tasks.choice("q", [" a", " b", " c"], 2)]
    # " bbbb" is less likely in total but more likely per byte; " c" wins outright
    lps = [-1.0, -2.0, -1.0, -2.0, -3.0, -3.0, -0.5]
    monkeypatch.setattr(harness, "score_pairs", lambda scorer, pairs, *a: [
        harness.PairScore(x, False, 1, False) for x in lps])
    r = harness.evaluate_items(None, items)
    assert r.per_item == {"acc": [0.0, 1.0, 1.0], "acc_norm": [1.0, 0.0, 1.0]}
    assert r.metrics["acc"] == pytest.approx(2 / 3) and r.metrics["chance"] == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    assert r.metrics["acc_stderr"] == pytest.approx(math.sqrt(2 / 9 / 2))
    # per byte of the choice without the space the format puts before it (lm-eval's length): -10 / 10
    # beats -1.05 / 1; counting the space (-10 / 11 against -1.05 / 2) picked the short choice
    monkeypatch.setattr(harness, "score_pairs", lambda scorer, pairs, *a: [
        harness.PairScore(x, False, 1, False) for x in (-10.0, -1.05)])
    r = harness.evaluate_items(None, [tasks.choice("q", [" abcdefghij", " k"], 0)])
    assert r.per_item == {"acc": [0.0], "acc_norm": [1.0]}
    completions = [tasks.Item(("x",), (" ab",), None), tasks.Item(("y",), (" c",), None)]
    monkeypatch.setattr(harness, "score_pairs", lambda scorer, pairs, *a: [
        harness.PairScore(-2.0, True, 2, False), harness.PairScore(-1.0, False, 1, False)])
    r = harness.evaluate_items(None, completions)
    assert r.metrics["acc"] == 0.5 and r.metrics["ppl"] == pytest.approx(math.exp(1.5))
    assert r.metrics["bpb"] == pytest.approx(3 / math.log(2) / 5)  # 3 nats over " ab" + " c" = 5 bytes


def test_paired_difference():
    assert harness.paired([1, 0, 1, 0], [1, 1, 1, 0]) == pytest.approx((0.25, 0.25))
    assert harness.paired([1, 1], [1, 1]) == (0.0, 0.0)


# ---- built-in formats, on rows with the datasets' own fields ----
def test_builtin_tasks_format_rows_as_lm_eval_does():
    hs = tasks.BUILTIN["hellaswag"].to_item({
        "activity_label": "Home and Garden", "ctx_a": "[header] How to plant a tree [title] Dig a hole.",
        "ctx_b": "then", "endings": ["put the tree in.", "eat [step] the soil."], "label": "0"})
    assert hs == tasks.choice("Home and Garden: How to plant a tree. Dig a hole. Then",
                              [" put the tree in.", " eat the soil."], 0)
    arc = {"question": "What melts ice?", "choices": {"text": ["heat", "cold"], "label": ["1", "2"]}, "answerKey": "1"}
    assert tasks.BUILTIN["arc_easy"].to_item(arc) == tasks.choice("Question: What melts ice?\nAnswer:",
                                                                  [" heat", " cold"], 0)
    with pytest.raises(DataError, match="answer key 'C' is none of the choice labels"):
        tasks.BUILTIN["arc_challenge"].to_item({**arc, "answerKey": "C"})
    wg = tasks.BUILTIN["winogrande"].to_item({"sentence": "Anna gave Beth a gift because _ was kind.",
                                              "option1": "Anna", "option2": "Beth", "answer": "1"})
    assert wg == tasks.Item(("Anna gave Beth a gift because Anna", "Anna gave Beth a gift because Beth"),
                            (" was kind.", " was kind."), 0)
    assert tasks.BUILTIN["lambada"].to_item({"text": "she opened the door and saw her cat"}) == \
        tasks.Item(("she opened the door and saw her",), (" cat",), None)
    assert tasks.BUILTIN["piqa"].to_item({"goal": "Dry a cup", "sol1": "use a towel", "sol2": "use water",
                                          "label": 0}).contexts[0] == "Question: Dry a cup\nAnswer:"
    sciq = tasks.BUILTIN["sciq"].to_item({"support": "", "question": "Q?", "distractor1": "a", "distractor2": "b",
                                          "distractor3": "c", "correct_answer": "d"})
    assert sciq.contexts[0] == "Question: Q?\nAnswer:" and sciq.label == 3 and sciq.continuations[3] == " d"
    obqa = tasks.BUILTIN["openbookqa"].to_item({"question_stem": "The sun is", "answerKey": "B",
                                                "choices": {"text": ["cold", "hot"], "label": ["A", "B"]}})
    assert obqa == tasks.choice("The sun is", [" cold", " hot"], 1)
    mmlu = tasks.BUILTIN["mmlu"].to_item({"question": "2 + 2 = ?", "subject": "math", "choices": ["3", "4", "5", "6"],
                                          "answer": 1})
    assert mmlu == tasks.choice("2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:", [" A", " B", " C", " D"], 1)


def test_wikitext_is_detokenized_and_scored_per_raw_byte_and_word_as_lm_eval_does():
    page = ' = Game = \n The game @-@ play ( of 1 @,@ 000 " fans " ) was good , they said . \n'
    item = tasks.BUILTIN["wikitext"].to_item({"page": page})
    assert item.continuations[0] == ' = Game =\nThe game-play (of 1,000 "fans") was good, they said.\n'
    assert item.units == (len(page.encode()), 24)  # re.split's count: an empty string at each end

    class Scorer:  # one nat per token, a token per character: the nll is the text's length
        start_id, max_len = 0, 10_000

        def encode(self, text):
            return [1] * len(text)

        def score(self, windows, *a):
            return [harness.PairScore(-float(n), False, n, False) for _, n in windows]

    m = harness.evaluate_items(Scorer(), [item]).metrics
    nll = len(item.continuations[0])
    assert m["bpb"] == pytest.approx(nll / math.log(2) / len(page.encode()))
    assert m["word_ppl"] == pytest.approx(math.exp(nll / 24))


def test_fewshot_prefixes_other_solved_items_independently_of_limit(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"context": f"Q{i}:", "choices": [" no", " yes"], "label": i % 2}) + "\n"
                            for i in range(6)))
    task = tasks.resolve(str(path))
    shots, total = tasks.read_items(task, fewshot=2)
    assert total == 6 and len(shots) == 6
    for i, it in enumerate(shots):
        demos = it.contexts[0].split("\n\n")
        assert len(demos) == 3 and demos[-1] == f"Q{i}:" and f"Q{i}:" not in demos[:2]
        assert all(d in (f"Q{j}: {'yes' if j % 2 else 'no'}" for j in range(6)) for d in demos[:2])
        assert it.contexts[0].endswith(f"Q{i}:") and it.contexts[1] == it.contexts[0]
    assert tasks.read_items(task, limit=3, fewshot=2)[0] == shots[:3]  # an item's shots do not depend on --limit
    with pytest.raises(DataError, match="--fewshot 6 needs more than 6 items in the task, it has 6"):
        tasks.read_items(task, fewshot=6)


def test_builtin_task_on_an_offline_copy_and_the_row_named_in_errors(tmp_path):
    rows = [{"text": "one two three"}, {"text": "four five"}]
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n" + json.dumps({"text": "alone"}) + "\n")
    task = tasks.resolve(f"lambada={path}")
    assert task.name == "lambada" and tasks.read_items(task, limit=2) == (
        [tasks.Item(("one two",), (" three",), None), tasks.Item(("four",), (" five",), None)], 3)
    with pytest.raises(DataError, match=rf"^{path}:4: lambada text without a last word"):
        tasks.read_items(task)


@pytest.mark.parametrize("spec,needle", [
    ("hellaswagg", "unknown task 'hellaswagg': built-in tasks are hellaswag, arc_easy"),
    ("nope=x.jsonl", "unknown task 'nope' in 'nope=x.jsonl'"),
    ("piqa=missing.jsonl", "piqa=missing.jsonl: no such file 'missing.jsonl'"),
    ("piqa=hf:a/b@", "malformed data spec 'hf:a/b@': empty split"),
    ("missing.jsonl", "missing.jsonl: no such file"),
])
def test_bad_task_names_are_one_line_errors(spec, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        tasks.resolve(spec)
    assert str(e.value).startswith(needle), str(e.value)


@pytest.mark.parametrize("row,needle", [
    ({"context": "q", "choices": [" a"], "label": 0}, "a multiple-choice item needs at least 2 choices, got 1"),
    ({"context": "q", "choices": [" a", " b"], "label": 2}, "label 2 is not a choice index (0..1)"),
    ({"context": "q", "choices": [" a", " b"], "label": True}, "label True is not a choice index"),
    ({"context": "q", "choices": [" a", " b"], "label": "1"}, "label '1' is not a choice index (0..1)"),
    ({"context": "q", "choices": [" a", 3], "label": 0}, """'choices' must be a list of strings, got [" a", 3]"""),
    # a string is not split into one-character choices or contexts
    ({"context": "q", "choices": "AB", "label": 1}, '\'choices\' must be a list of strings, got "AB"'),
    ({"contexts": "abc", "continuation": " x", "label": 1}, '\'contexts\' must be a list of strings, got "abc"'),
    ({"context": ["q"], "continuation": " x"}, """'context' must be a string, got ["q"]"""),
    ({"context": "q", "continuation": 3}, "'continuation' must be a string, got 3"),
    ({"text": 3}, "a text item needs a non-empty string 'text'"),
    ({"prompt": "q"}, "keys ['prompt'] fit no item format"),
    # the keys of two formats: one would be dropped
    ({"context": "q", "choices": [" a", " b"], "label": 0, "continuation": " c"},
     "keys ['choices', 'context', 'continuation', 'label'] fit no item format"),
    ({"context": "q", "continuation": ""}, "an empty continuation has nothing to score"),
    ([1, 2], "expected a JSON object, got list"),
])
def test_generic_items_are_checked(row, needle, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"context": "q", "continuation": " a"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as e:
        tasks.read_items(tasks.resolve(str(path)))
    assert str(e.value) == f"{path}:2: {needle}" or str(e.value).startswith(f"{path}:2: {needle}"), str(e.value)


def test_generic_items_ignore_other_keys_in_every_format(tmp_path):
    rows = [{"text": "a whole document", "id": 3}, {"context": "q", "continuation": " a", "id": 4},
            {"context": "q", "choices": [" a", " b"], "label": 1, "source": "x"},
            {"contexts": ["q", "r"], "continuation": " a", "label": 0, "id": 5}]
    bare = [{k: v for k, v in r.items() if k not in ("id", "source")} for r in rows]
    assert [tasks.generic_item(r) for r in rows] == [tasks.generic_item(r) for r in bare]
    path = tmp_path / "doc.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    assert tasks.read_items(tasks.resolve(str(path))) == ([tasks.document("a whole document")], 1)


def test_a_task_file_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"context": "q", "continuation": " a"}).encode()
    path.write_bytes(good + b"\r\n" + good + b"\n" + b'{"context": "caf\xe9", "continuation": " a"}\n')
    with pytest.raises(DataError) as e:
        tasks.read_items(tasks.resolve(str(path)))
    assert str(e.value) == f"{path}:3: not UTF-8 (byte 0xe9: invalid continuation byte); save the file as UTF-8"
    text = tmp_path / "latin1.txt"  # a text task (one document), as strict as training data
    text.write_bytes(b"line one\r\nline two\ncaf\xe9\n")
    with pytest.raises(DataError, match="latin1.txt:3: not UTF-8 \\(byte 0xe9"):
        tasks.read_items(tasks.resolve(str(text)))
    text.write_bytes(b"line one\r\ncaf\xc3\xa9\n")
    assert tasks.read_items(tasks.resolve(str(text))) == ([tasks.document("line one\ncaf\u00e9\n")], 1)


def test_builtin_rows_get_the_generic_checks():
    mmlu = {"question": "2 + 2 = ?", "choices": "3456", "answer": 1}
    with pytest.raises(DataError, match="^'choices' must be a list of strings, got \"3456\"$"):
        tasks.BUILTIN["mmlu"].to_item(mmlu)
    with pytest.raises(DataError, match=r"^label 2 is not a choice index \(0..1\)$"):
        tasks.BUILTIN["piqa"].to_item({"goal": "g", "sol1": "a", "sol2": "b", "label": 2})


def test_one_item_has_no_standard_error_and_the_json_stays_strict(monkeypatch):
    monkeypatch.setattr(harness, "score_pairs", lambda scorer, pairs, *a: [
        harness.PairScore(-1.0, False, 1, False), harness.PairScore(-2.0, False, 1, False)])
    one = harness.evaluate_items(None, [tasks.choice("q", [" a", " b"], 0)])
    assert one.metrics["acc"] == 1.0 and one.metrics["acc_stderr"] is None
    doc = [tasks.document("x" * 400)]  # one "word" whose perplexity passes e**709
    scorer = types.SimpleNamespace(start_id=0, max_len=64, encode=lambda text: [1],
                                   score=lambda *a: [harness.PairScore(-800.0, False, 1, False)])
    big = harness.evaluate_text(scorer, doc)
    assert big.metrics["word_ppl"] == math.inf
    results = {"models": ["a", "b"], "tasks": {"t": {
        "items": 1, "of": 1, "results": {"a": {**one.metrics}, "b": {**one.metrics}}, "per_item": {},
        "paired": {"b": {"acc": list(harness.paired([1.0], [1.0]))}}}, "doc": {
        "items": 1, "of": 1, "results": {"a": big.metrics, "b": big.metrics}, "per_item": {}, "paired": {}}}}
    text = harness.to_json(results)
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert back["tasks"]["t"]["paired"]["b"]["acc"] == [0.0, None] and back["tasks"]["doc"]["results"]["a"][
        "word_ppl"] is None
    for shown in (harness.table(results), harness.table(back)):
        assert "| t (1) | acc | 100.0 ± n/a | 100.0 ± n/a | +0.0 ± n/a |" in shown and "nan" not in shown
    assert "| word_ppl | inf | inf |" in harness.table(results) and "| word_ppl | n/a | n/a |" in harness.table(back)


# ---- eval.py end to end ----
def structured_run(tmp, steps: int):
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 200) + "\n")
    rc, _, err = run_here("train", "--arch", "hybrid", "--data", corpus, "--out", tmp / f"run{steps}",
                          *tiny_overrides(tmp, steps=steps, **{"optim.lr": 1e-2, "train.warmup_steps": 1}))
    assert rc == 0, err
    return tmp / f"run{steps}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalruns")
    items = tmp / "tails.jsonl"
    with open(items, "w") as f:  # the right tail of each sentence against another sentence's
        for i, s in enumerate(SENTENCES):
            head, tail = s.split(" ", 2)[:2], s.split(" ", 2)[2]
            other = SENTENCES[(i + 3) % len(SENTENCES)].split(" ", 2)[2]
            f.write(json.dumps({"context": " ".join(head), "choices": [" " + other, " " + tail], "label": 1}) + "\n")
    return structured_run(tmp, 1), structured_run(tmp, 60), items


def test_a_trained_run_beats_chance_and_the_difference_is_paired(runs, tmp_path):
    untrained, trained, items = runs
    out = tmp_path / "ab.json"
    rc, table, err = run_here("eval", "--run", untrained, "--run", trained, "--tasks", items, "--out", out)
    assert rc == 0, err
    res = json.loads(out.read_text())
    r = res["tasks"]["tails"]
    assert r["items"] == r["of"] == 8 and res["models"] == [str(untrained), str(trained)]
    a, b = r["results"][str(untrained)], r["results"][str(trained)]
    assert b["acc"] == 1.0 and b["chance"] == 0.5 and a["acc"] < 1.0, (a, b)
    d, se = r["paired"][str(trained)]["acc"]
    assert d == pytest.approx(b["acc"] - a["acc"]) and se > 0
    assert f"| tails (8) | acc | {100 * a['acc']:.1f} ± " in table and f"{str(trained)} - {str(untrained)}" in table
    assert "tails: 8 of 8 items from" in err


def test_a_text_file_is_a_bits_per_byte_task(runs, tmp_path):
    untrained, trained, _ = runs
    text = tmp_path / "held_out.txt"
    text.write_text("\n".join(SENTENCES[::-1] * 3) + "\n")
    rc, out, err = run_here("eval", "--run", untrained, "--run", trained, "--tasks", text, "--json")
    assert rc == 0, err
    r = json.loads(out)["tasks"]["held_out"]["results"]
    assert r[str(trained)]["bpb"] < 0.5 * r[str(untrained)]["bpb"] and r[str(trained)]["word_ppl"] > 1
    table = harness.table(json.loads(out))
    assert "| held_out (1) | bpb |" in table and "|  | word_ppl |" in table


def test_the_first_items_with_limit_and_the_json_printout(runs):
    _, trained, items = runs
    rc, out, err = run_here("eval", "--run", trained, "--tasks", f"{items}", "--limit", "3", "--json")
    assert rc == 0, err
    r = json.loads(out)["tasks"]["tails"]
    assert (r["items"], r["of"]) == (3, 8) and len(r["per_item"][str(trained)]["acc"]) == 3
    rc, out, err = run_here("eval", "--run", trained, "--tasks", f"{items}", "--limit", "3", "--fewshot", "2")
    assert rc == 0 and "| tails (3 of 8, 2-shot) | acc |" in out and "3 of 8 items from" in err, err
    rc, out, err = run_here("eval", "--run", trained, "--tasks", f"{items}", "--limit", "1", "--json")
    r = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))["tasks"]["tails"]
    assert rc == 0 and r["results"][str(trained)]["acc_stderr"] is None, err


@pytest.mark.parametrize("argv,needle", [
    (["--tasks", "x.jsonl"], "error: give a model to evaluate: --run RUN_DIR or --hf FOLDER"),
    (["--run", "{run}", "--tasks", "hellaswag", "--limit", "0"], "error: --limit must be >= 1, got 0"),
    (["--run", "{run}", "--tasks", "hellaswag", "--fewshot", "-1"], "error: --fewshot must be >= 0, got -1"),
    (["--run", "{run}", "--tasks", "hellaswag", "--force"], "error: --force applies to --out PATH"),
    (["--run", "{run}", "--run", "{run}", "--tasks", "{items}"], "error: a model is given twice: {run}"),
    (["--run", "{run}", "--tasks", "{items},{items}"], "error: --tasks names task 'tails' twice"),
    (["--run", "{run}", "--tasks", " , "], "error: --tasks names no task: give NAME, NAME=SOURCE"),
    (["--run", "{run}", "--tasks", "{items}", "--out", "{items}"], "error: output {items} exists (pass --force"),
    (["--run", "nope", "--tasks", "{items}"], "error: "),
    # every model's files are checked before the first is scored, not after an hour of scoring
    (["--run", "{run}", "--hf", "nowhere", "--tasks", "{items}"], "error: --hf nowhere is not a transformers model"),
])
def test_bad_arguments_are_one_line_exit_2(runs, argv, needle):
    _, trained, items = runs
    argv = [str(trained) if a == "{run}" else a.replace("{items}", str(items)) for a in argv]
    needle = needle.replace("{items}", str(items)).replace("{run}", str(trained))
    rc, _, err = run_here("eval", *argv)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and errors[0].startswith(needle), err
    assert "Traceback" not in err


def test_a_model_that_fails_loses_nothing_the_others_scored(runs, tmp_path):
    """A second run whose weights are corrupt: the first is still scored and written to --out, the
    failed cells say so, no paired difference is made up, and the exit status is 1."""
    import shutil

    _, trained, items = runs
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "r.json"
    rc, table, err = run_here("eval", "--run", trained, "--run", broken, "--tasks", items, "--out", out)
    assert rc == 1, err
    res = json.loads(out.read_text())
    r = res["tasks"]["tails"]
    assert r["results"][str(trained)]["acc"] == 1.0 and "error" in r["results"][str(broken)]
    assert r["paired"] == {} and len(res["errors"]) == 1 and str(broken) in res["errors"][0]
    assert "| tails (8) | acc | 100.0 ± 0.0 | failed |" in table and f"failed: {broken} tails: " in table
    assert f"error: {broken} tails: " in err and "going on with the rest" in err
    assert err.rstrip().endswith("error: 1 model/task score(s) failed (above)")


def test_every_model_scores_in_the_same_precision(tiny, monkeypatch):
    """--dtype: our runs and transformers models enter the same autocast (auto: the trainer's, bf16 on
    CUDA, where an fp32 transformers model once faced a bf16 run). On CPU bf16 scores stay within bf16's
    rounding of fp32."""
    model, tok = tiny
    pairs = [("the cat", " sat on the mat"), ("a dog", " ran in the park")]
    fp32 = harness.score_pairs(harness.scorer_for(model, tok, "cpu", 64, dtype="fp32"), pairs)
    bf16 = harness.score_pairs(harness.scorer_for(model, tok, "cpu", 64, dtype="bf16"), pairs)
    fp16 = harness.score_pairs(harness.scorer_for(model, tok, "cpu", 64, dtype="fp16"), pairs)
    auto = harness.score_pairs(harness.scorer_for(model, tok, "cpu", 64), pairs)
    assert [a.logprob for a in auto] == [a.logprob for a in fp32]  # auto is fp32 on CPU
    for a, b, c in zip(fp32, bf16, fp16):
        assert a.logprob != b.logprob and abs(a.logprob - b.logprob) < 0.05 * abs(a.logprob)
        assert a.logprob != c.logprob and abs(a.logprob - c.logprob) < 0.01 * abs(a.logprob)
    seen = []
    monkeypatch.setattr(harness, "autocast", lambda device, precision: seen.append(device)
                        or torch.autocast("cpu", enabled=False))
    harness.score_pairs(harness.scorer_for(model, tok, "cpu", 64), pairs[:1])
    assert seen, "--dtype auto takes the trainer's autocast"


def test_a_transformers_folder_scores_as_our_import_of_it(tmp_path):
    """--hf scores through transformers; convert.py --from-hf makes it one of our runs; both give the
    same per-pair log-likelihoods (the import is exact, and so is the scoring of each)."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "examples"))
    import make_tiny_llama

    make_tiny_llama.make(tmp_path / "hf", vocab=300, d_model=32, layers=2, texts=SENTENCES * 20)
    rc, _, err = run_here("convert", "--from-hf", tmp_path / "hf", "--out", tmp_path / "ours")
    assert rc == 0, err
    theirs = harness.HFScorer(tmp_path / "hf", "cpu")
    ours = harness.RunScorer.open(tmp_path / "ours", "cpu", max_len=theirs.max_len)
    assert theirs.start_id == ours.start_id == ours.tok.bos_id  # an imported tokenizer keeps its bos
    pairs = [("the cat", " sat on the mat"), ("", "a dog"), ("my bird sang", " at dawn")]
    for a, b in zip(harness.score_pairs(theirs, pairs), harness.score_pairs(ours, pairs)):
        assert abs(a.logprob - b.logprob) < 1e-4 and a.tokens == b.tokens
    seen = []  # the head runs at the scored columns only, not at every position of the batch
    theirs.model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    long, short = ("the cat sat on the mat and the dog", " ran"), ("a", " cat")
    ids = [harness.tokenize_pair(theirs, *p) for p in (long, short)]
    harness.score_pairs(theirs, [long, short])
    assert seen == [ids[0][1] + ids[1][1]] and seen[0] < len(ids[0][0]) - 1
    doc = [tasks.document(" ".join(SENTENCES * 30))]  # several windows of 1024 tokens
    assert len(harness.rolling_windows(theirs, doc[0].continuations[0])) > 1
    assert harness.evaluate_items(theirs, doc).metrics["bpb"] == pytest.approx(
        harness.evaluate_items(ours, doc).metrics["bpb"], rel=1e-5)


def test_a_transformers_folder_it_cannot_score_is_a_one_line_error(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "examples"))
    import make_tiny_llama

    make_tiny_llama.make(tmp_path / "hf", vocab=300, d_model=32, layers=1, texts=SENTENCES * 20)
    with pytest.raises(ConfigError, match="--max-len 2048 exceeds .*max_position_embeddings=1024"):
        harness.HFScorer(tmp_path / "hf", "cpu", max_len=2048)
    from slmlab import traces

    tok, model = traces.load_hf_folder(tmp_path / "hf", "cpu")
    tok.bos_token, tok.eos_token = None, None
    monkeypatch.setattr(traces, "load_hf_folder", lambda *a: (tok, model))
    with pytest.raises(ConfigError, match="has neither a bos nor an eos token"):
        harness.HFScorer(tmp_path / "hf", "cpu")


def test_task_scoring_leaves_no_moe_loads_for_the_next_eval(tiny):
    from arch.moe import moe_metrics

    _, tok = tiny
    cfg = load_config(overrides=["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
                                 "model.layers=CA", "model.vocab_size=300", "model.mlp=moe",
                                 "model.mixer_opts={moe: {experts: 4, top_k: 2}}"])
    torch.manual_seed(0)
    model = model_from_config(cfg)
    items = {"t": [tasks.choice("the cat", [" sat", " ran"], 0)]}
    assert "task_t_acc" in harness.task_metrics(model, tok, "cpu", 32, items)
    assert moe_metrics(model) == {} and model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert moe_metrics(model)["moe.max_load"] > 0  # a forward outside task scoring is still counted


def test_train_eval_tasks_are_logged_at_each_eval_and_equal_eval_py(runs, tmp_path):
    """train.eval_tasks: the periodic and final evaluations score the tasks; the final numbers are
    eval.py's on the saved model at the same context."""
    _, _, items = runs
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 200) + "\n")
    rc, out, err = run_here("train", "--arch", "hybrid", "--data", corpus, "--out", tmp_path / "run",
                            *tiny_overrides(tmp_path, steps=20, **{"optim.lr": 1e-2, "train.warmup_steps": 1,
                                                                   "train.eval_every": 10,
                                                                   "train.eval_tasks": str(items)}))
    assert rc == 0, err
    assert "eval task tails: 8 of 8 items from" in out and "step 10: val loss" in out and "  tails acc_norm " in out
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "task_tails_acc_norm" in r]
    assert [r["step"] for r in evals] == [10, 20] and evals[-1].get("final")
    rc, js, err = run_here("eval", "--run", tmp_path / "run", "--tasks", items, "--json")
    assert rc == 0, err
    mine = json.loads(js)["tasks"]["tails"]["results"][str(tmp_path / "run")]
    assert mine["acc"] == evals[-1]["task_tails_acc"] and mine["acc_norm"] == evals[-1]["task_tails_acc_norm"]


def test_a_bad_train_eval_task_stops_before_training(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 50) + "\n")
    rc, _, err = run_here("train", "--data", corpus, "--out", tmp_path / "run",
                          *tiny_overrides(tmp_path, steps=2, **{"train.eval_tasks": "hellaswagg"}))
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: train.eval_tasks: unknown task 'hellaswagg'"), err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_eval_py_on_a_diffusion_run_marks_its_bounds(runs, tmp_path):
    _, trained, items = runs
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 50) + "\n")
    rc, _, err = run_here("train", "--arch", "diffusion", "--data", corpus, "--out", tmp_path / "diff",
                          *tiny_overrides(tmp_path, steps=2))
    assert rc == 0, err
    lam = tmp_path / "lam.jsonl"
    lam.write_text("".join(json.dumps({"context": s.rsplit(" ", 1)[0], "continuation": " " + s.rsplit(" ", 1)[1]})
                           + "\n" for s in SENTENCES))
    rc, out, err = run_here("eval", "--run", tmp_path / "diff", "--run", trained, "--tasks", f"{items},{lam}",
                            "--mc-samples", "3", "--json")
    assert rc == 0, err
    res = json.loads(out)["tasks"]
    assert res["lam"]["results"][str(tmp_path / "diff")]["bound"] and "bound" not in res["lam"]["results"][str(trained)]
    assert f"note: --mc-samples has no effect on {trained}: it is not a masked-diffusion run" in err
    assert "| ppl | ≤ " in harness.table(json.loads(out))
