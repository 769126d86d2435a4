"""SFT: chat / prompt-completion jsonl, loss on the replies only (checked token by token on a hand
example), the tokenizer folder's chat template, training through train.py, traces as SFT input,
and one-line errors for data without a reply."""
import json
import math
import re

import pytest
import torch
from sft_helpers import qwen_like, sft_overrides, write_chat
from trainer_helpers import losses, run_here

from slmlab.errors import ConfigError, DataError
from slmlab.sft import CHATML, IGNORE, ChatTemplate, detect_format, pad_batch, prepare_sft, read_examples
from slmlab.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def base(sft_base):
    return sft_base  # conftest.py: one make_base run shared with test_lora.py


@pytest.fixture(scope="module")
def sft_run(base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sftrun")
    chat = write_chat(tmp / "chat.jsonl")
    rc, _, err = run_here("train", "--arch", "hybrid", "--data", chat, "--out", tmp / "run",
                     *sft_overrides(tmp, steps=40, **{"train.init_from": str(base), "train.eval_every": 20}))
    assert rc == 0, err
    return tmp / "run"


def test_loss_mask_covers_exactly_the_assistant_tokens(base):
    tok = Tokenizer.load(base)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "see you"}]
    [(ids, labels)] = ChatTemplate(CHATML, tok).encode(msgs)
    assert len(ids) == len(labels)
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert all(lab in (i, IGNORE) for i, lab in zip(ids, labels))
    assert tok.decode(trained) == "hello there<|im_end|>\nsee you<|im_end|>\n<|eos|>"
    untrained = [i for i, lab in zip(ids, labels) if lab == IGNORE]
    assert tok.decode(untrained) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                                     "<|im_start|>assistant\n<|im_start|>user\nbye<|im_end|>\n<|im_start|>assistant\n")


def test_a_trailing_user_turn_is_no_place_to_learn_to_stop(base):
    """The closing eos is learned right after the last reply; after a trailing user turn it taught the
    model to stop once a user had spoken."""
    tok = Tokenizer.load(base)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    [(ids, labels)] = ChatTemplate(CHATML, tok).encode(msgs)
    assert ids[-1] == tok.eos_id and labels[-1] == IGNORE
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE]) == "b<|im_end|>\n"


def test_a_tool_call_turn_may_have_null_content():
    """OpenAI's tool-call shape: an assistant turn with content null beside tool_calls (refused before)."""
    from slmlab.errors import DataError
    from slmlab.sft import as_messages

    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
    msgs = as_messages({"messages": [{"role": "user", "content": "w"}, call, {"role": "tool", "content": "42"},
                                     {"role": "assistant", "content": "42!"}]}, "messages", "f:1")
    assert msgs[1]["content"] == "" and msgs[1]["tool_calls"] == call["tool_calls"]
    with pytest.raises(DataError, match="content may be null only beside tool_calls"):
        as_messages({"messages": [{"role": "user", "content": None}]}, "messages", "f:1")


def test_padded_batch_shifts_labels_and_ignores_padding():
    x, y = pad_batch([([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8]), ([5, 9], [IGNORE, 9])], seq_len=16, pad_id=2)
    assert x.tolist() == [[5, 6, 7], [5, 2, 2]]
    assert y.tolist() == [[IGNORE, 7, 8], [9, IGNORE, IGNORE]]


def test_format_detected_from_fields(tmp_path):
    chat = write_chat(tmp_path / "c.jsonl", n=3)
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "c", "completion": "d"}))
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": "plain"}) + "\n")
    assert detect_format(str(chat)) == "chat" and detect_format(str(pc)) == "prompt_completion"
    assert detect_format(str(text)) is None and detect_format(str(chat), "text") is None
    assert detect_format("stdlib") is None
    with pytest.raises(DataError, match="needs a .jsonl file"):
        detect_format("stdlib", "chat")
    assert read_examples(pc, "prompt_completion")[1] == (f"{pc}:2", [{"role": "user", "content": "c"},
                                                                     {"role": "assistant", "content": "d"}])


def test_tokenizer_folders_own_template_is_used(base, tmp_path):
    tok = Tokenizer.load(base)
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(folder)
    own = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
          "{% if add_generation_prompt %}[assistant] {% endif %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": own}))
    t = ChatTemplate.for_tokenizer(folder, tok)
    assert t.source == own and t.end == ""
    [(ids, labels)] = t.encode([{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}])
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE]) == "r\n<|eos|>"
    assert ChatTemplate.for_tokenizer(tmp_path, tok).source == CHATML


def test_sft_loss_goes_down_through_train_py(sft_run):
    got = losses(sft_run)
    first, last = sum(got[k] for k in (1, 2, 3)) / 3, sum(got[k] for k in (38, 39, 40)) / 3
    assert last < 0.6 * first, (first, last)
    final = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["final"] and final["val_tokens"] > 0 and 0 <= final["exact_match"] <= 1
    assert (sft_run / "chat_template.jinja").read_text() == CHATML


def test_sft_distills_from_a_teacher_on_the_replies(base, sft_run, tmp_path):
    """train.teacher on chat data: the KL runs on the reply positions only (the -1 labels), and a
    student taught mostly by the chat-trained teacher learns its replies."""
    chat = write_chat(tmp_path / "chat.jsonl")
    rc, _, err = run_here("train", "--arch", "hybrid", "--data", chat, "--out", tmp_path / "student",
                     *sft_overrides(tmp_path, steps=20, **{"train.init_from": str(base), "train.teacher": str(sft_run),
                                                           "train.distill_alpha": 0.9, "model.loss_chunk": 64}))
    assert rc == 0, err
    recs = [json.loads(line) for line in (tmp_path / "student/metrics.jsonl").read_text().splitlines()]
    ce = [r["ce"] for r in recs if "ce" in r]
    # ~0.38 measured; with the untaught base as the teacher ~0.61, so this needs the teacher's replies
    assert len(ce) == 20 and sum(ce[-3:]) < 0.5 * sum(ce[:3]), ce


def test_sft_resumes_after_its_base_is_gone(base, tmp_path):
    """A full fine-tune's checkpoint holds every weight and its run the tokenizer and chat template:
    --resume needs neither train.init_from's weights nor its tokenizer any more."""
    import shutil

    mine = shutil.copytree(base, tmp_path / "base")
    chat, out = write_chat(tmp_path / "chat.jsonl"), tmp_path / "run"
    ov = sft_overrides(tmp_path, steps=2, **{"train.init_from": str(mine), "train.ckpt_every": 2})
    assert run_here("train", "--data", chat, "--out", out, *ov)[0] == 0
    shutil.rmtree(mine)
    rc, stdout, err = run_here("train", "--resume", "--out", out, "--steps", "4")
    assert rc == 0, err
    assert "no longer exists: the tokenizer (and chat template) come from" in stdout
    assert sorted(losses(out)) == [1, 2, 3, 4]


def test_traces_are_valid_sft_input(sft_run, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in ("the", "of", "and")))
    out = tmp_path / "traces.jsonl"
    rc, _, err = run_here("sample", "--run", sft_run, "--prompts", prompts, "--out", out, "--num-samples", "2",
                     "--temperature", "1", "--max-new-tokens", "12")
    assert rc == 0, err
    assert detect_format(str(out)) == "prompt_completion"
    convs = read_examples(out, "prompt_completion")
    assert len(convs) == 6 and [c[0]["content"] for _, c in convs[:2]] == ["say the", "say the"]
    [(ids, labels)] = ChatTemplate(CHATML, Tokenizer.load(sft_run)).encode(convs[0][1])
    assert any(lab != IGNORE for lab in labels)


def test_a_stopped_traces_job_resumes_to_the_uninterrupted_file(sft_run, tmp_path, monkeypatch):
    """Ctrl-C after two prompts keeps their completions in OUT.partial; a write cut by a kill is dropped;
    --resume with other settings is refused by name; with the same ones it writes what the uninterrupted
    job wrote (every prompt samples from its own seeded generator)."""
    from slmlab import traces

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in ("the", "of", "and", "to", "a")))
    job = ["--run", sft_run, "--prompts", prompts, "--num-samples", "2", "--temperature", "1", "--max-new-tokens", "8"]
    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    partial = tmp_path / "cut.jsonl.partial"
    assert run_here("sample", *job, "--out", whole)[0] == 0 and not (tmp_path / "whole.jsonl.partial").exists()
    real = traces.run_completions

    def stopped_after_two(*args, **kw):
        for n, unit in enumerate(real(*args, **kw)):
            if n == 2:
                raise KeyboardInterrupt
            yield unit

    monkeypatch.setattr(traces, "run_completions", stopped_after_two)
    rc, _, err = run_here("sample", *job, "--out", cut)
    assert rc == 130 and f"stopped: 4 completions kept in {partial}; the same command with --resume" in err
    assert not cut.exists() and len(partial.read_text().splitlines()) == 1 + 4
    with open(partial, "a") as f:
        f.write('{"prompt": "say')  # a write the kill cut short
    monkeypatch.setattr(traces, "run_completions", real)
    rc, _, err = run_here("sample", *job, "--out", cut)
    assert rc == 2 and "holds the completions of an unfinished job: --resume continues it, --force starts over" in err
    rc, _, err = run_here("sample", *job, "--out", cut, "--resume", "--seed", "1", "--top-p", "0.9")
    assert rc == 2 and "made with other settings (--top-p None there, 0.9 now; --seed 0 there, 1 now)" in err
    assert run_here("sample", *job, "--out", cut, "--resume")[0] == 0
    assert cut.read_text() == whole.read_text() and not partial.exists()
    rc, _, err = run_here("sample", *job, "--out", cut, "--resume")
    assert rc == 2 and "is finished already" in err


def test_chat_streams_each_reply_and_keeps_the_conversation(sft_run, monkeypatch, capsys):
    """Typed turns get the replies generate gives at temperature 0 for the same conversation (each
    reply cut at the end-of-turn marker, which is never printed); the second turn is prompted with the
    first exchange, /reset forgets it, and Ctrl-D ends with exit 0."""
    import io

    import sample
    from slmlab.cli import run_cli
    from slmlab.rundir import RunDir

    run = RunDir.open(sft_run)
    _, model, tok = run.load(torch.device("cpu"))
    template = ChatTemplate.for_tokenizer(run.path, tok)

    def reply(msgs):
        ids = template.prompt_ids(msgs)
        out = model.generate(torch.tensor([ids]), 12, temperature=0, eos_id=tok.eos_id)
        return template.reply(tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True))

    user = [{"role": "user", "content": c} for c in ("say the", "say of")]
    first = reply(user[:1])
    convs = [user[:1], [user[0], {"role": "assistant", "content": first}, user[1]], user[1:]]
    prompted, generate = [], type(model).generate

    def recording(self, idx, *a, **kw):
        prompted.append(idx[0].tolist())
        return generate(self, idx, *a, **kw)

    monkeypatch.setattr(type(model), "generate", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("say the\nsay of\n/reset\n\nsay of\n"))
    want = [reply(c) for c in convs]
    capsys.readouterr()
    del prompted[:]
    assert run_cli(sample.main, ["--run", str(sft_run), "--chat", "--temperature", "0", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert prompted == [template.prompt_ids(c) for c in convs]  # the history, and none after /reset
    assert out == "".join(r + "\n" for r in want) and "<|im_end|>" not in out, out
    assert "/reset starts the conversation over" in err and "(a new conversation)" in err


def test_the_reply_printer_never_shows_the_marker_or_the_prefix():
    """One character a token: what is printed at each step is a prefix of the reply, never a piece of the
    end-of-turn marker or of the reply prefix (Qwen3's empty think block); the marker ends the turn."""
    import io

    from slmlab.chat import EndOfTurn, ReplyPrinter

    class Chars:
        def decode(self, ids, skip_special_tokens=False):
            return "".join(map(chr, ids))

    out = io.StringIO()
    printer = ReplyPrinter(Chars(), prefix="<think></think>", end="<|im_end|>", out=out)
    text = "<think></think> Hi <there>|<|im_end|>\nnext"
    for i, ch in enumerate(text):
        try:
            printer.add(ord(ch))
        except EndOfTurn:
            assert text[:i + 1].endswith("<|im_end|>")
            break
        assert "Hi <there>|".startswith(out.getvalue()), out.getvalue()
    assert printer.finish() == "Hi <there>|" and out.getvalue() == "Hi <there>|\n"


def test_chat_without_an_assistant_turn_is_one_line_exit_2(base, tmp_path):
    bad = write_chat(tmp_path / "bad.jsonl", n=4)
    lines = bad.read_text().splitlines()
    lines[2] = json.dumps({"messages": [{"role": "user", "content": "hello?"}]})
    bad.write_text("\n".join(lines) + "\n")
    rc, _, err = run_here("train", "--arch", "hybrid", "--data", bad, "--out", tmp_path / "r",
                     *sft_overrides(tmp_path, steps=2, **{"train.init_from": str(base)}))
    assert rc == 2
    assert err.strip().splitlines()[-1] == f"error: {bad}:3: a chat example without an assistant turn " \
                                           "(no tokens to train on)"


def test_sft_needs_a_tokenizer(tmp_path):
    chat = write_chat(tmp_path / "c.jsonl", n=4)
    rc, _, err = run_here("train", "--arch", "hybrid", "--data", chat, "--out", tmp_path / "r",
                     *sft_overrides(tmp_path, steps=2))
    assert rc == 2 and "SFT data needs a tokenizer" in err


def test_masked_val_loss_counts_reply_tokens_only(base):
    from slmlab.rundir import RunDir
    from slmlab.sft import masked_val_loss

    cfg, model, tok = RunDir.open(base).load()
    t = ChatTemplate(CHATML, tok)
    [ex] = t.encode([{"role": "user", "content": "say the"}, {"role": "assistant", "content": "the the"}])
    lengths = torch.ones(cfg.model.vocab_size, dtype=torch.float64)
    a = masked_val_loss(model, [ex], tok.pad_id, 96, 4, "cpu", lengths)
    assert a["val_tokens"] == sum(lab != IGNORE for lab in ex[1][1:])
    from slmlab.sft import pad_batch

    x, y = pad_batch([ex], 96, tok.pad_id)
    with torch.no_grad():
        by_hand = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    model.cfg.loss_chunk = 5  # a few positions of logits at a time: the same number
    b = masked_val_loss(model, [ex], tok.pad_id, 96, 4, "cpu", lengths)
    assert a["val_loss"] == pytest.approx(by_hand.item(), rel=1e-5)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)


def test_exact_match_fits_replies_in_a_learned_position_table(base):
    """model.pos=learned: a held-out conversation whose prompt + reply cannot fit in max_positions is left
    out of exact match, and the others' reply budget is clamped to what fits (both used to crash)."""
    from arch import LM, ModelConfig
    from slmlab.sft import exact_match

    tok = Tokenizer.load(base)
    t = ChatTemplate(CHATML, tok)
    short = [{"role": "user", "content": "say the"}, {"role": "assistant", "content": "the the"}]
    long = [{"role": "user", "content": "say " + "the of " * 40}, {"role": "assistant", "content": "the the"}]
    fit = len(t.prompt_ids(short)) + len(tok.encode("the the")) + 2  # under the +16 tokens of slack
    assert len(t.prompt_ids(long)) > fit
    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, layers="A",
                           pos="learned", max_positions=fit)).eval()
    out = exact_match(model, t, [short, long], "cpu")
    assert out["exact_n"] == 1 and out["exact_match"] in (0.0, 1.0)


@pytest.mark.parametrize("phase,needle", [
    ("data: {corpus}", "train.phases[0].data does not apply to SFT data"),
    ("order: quality", "train.phases[0].order=quality does not apply to SFT data"),
])
def test_sft_refuses_phase_data_and_order(base, tmp_path, phase, needle):
    """SFT batches come from data.spec at random: a phase's own data or order would be silently ignored."""
    chat = write_chat(tmp_path / "c.jsonl", n=8)
    (tmp_path / "corpus.txt").write_text("the of and\n" * 50)
    phases = (f"[{{seq_len: 96, share: 0.5, tokens_per_step: 768, {phase.format(corpus=tmp_path / 'corpus.txt')}}}, "
              "{seq_len: 96, share: 0.5, tokens_per_step: 768}]")
    rc, _, err = run_here("train", "--arch", "hybrid", "--data", chat, "--out", tmp_path / "r",
                     *sft_overrides(tmp_path, steps=2, **{"train.init_from": str(base), "train.phases": phases,
                                                          "train.quality_score": "fn:length"}))
    assert rc == 2 and err.strip().splitlines()[-1].startswith("error: " + needle), err
    assert not (tmp_path / "r").exists()


def test_examples_longer_than_seq_len_are_said_to_be_truncated(base, tmp_path, capsys):
    """A reply that runs past train.seq_len loses its tail and closing eos: the data line says how many."""
    from slmlab.sft import prepare_sft

    chat = tmp_path / "long.jsonl"
    chat.write_text("".join(json.dumps({"prompt": "q", "completion": "answer " * 60}) + "\n" for _ in range(4)))
    prepare_sft(str(chat), "prompt_completion", ChatTemplate(CHATML, Tokenizer.load(base)), 0.25, 96)
    assert "3 train truncated to seq_len 96: the rest of their reply and its closing eos are not learned" in \
        capsys.readouterr().out


def test_no_held_out_reply_within_the_eval_length_is_an_error(base, tmp_path):
    """train.eval_seq_len shorter than every held-out prompt: a DataError, not val_loss 0.0 over 0 tokens."""
    from slmlab.sft import masked_val_loss, prepare_sft

    chat = write_chat(tmp_path / "c.jsonl", n=10)
    t = ChatTemplate(CHATML, Tokenizer.load(base))
    with pytest.raises(DataError, match="no held-out example \\(of 1\\) has a reply within the 8-token evaluation "
                                        "length.*raise train.eval_seq_len"):
        prepare_sft(str(chat), "chat", t, 0.1, 96, 8)
    data = prepare_sft(str(chat), "chat", t, 0.1, 96, 96)
    assert len(data.val) == 1 and len(data.train) == 9
    from slmlab.rundir import RunDir

    _, model, tok = RunDir.open(base).load()
    with pytest.raises(DataError, match="no validation loss"):
        masked_val_loss(model, data.val, tok.pad_id, 8, 4, "cpu", torch.ones(300, dtype=torch.float64))


def test_traces_from_a_transformers_folder(base, tmp_path):
    """sample.py --hf: a tiny random Llama with this tokenizer and ChatML as its chat_template."""
    transformers = pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(base / "tokenizer.json"), bos_token="<|bos|>",
                                               eos_token="<|eos|>", pad_token="<|pad|>")
    tok.chat_template = CHATML
    tok.save_pretrained(hf)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)).save_pretrained(hf)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "say the"}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "say of"}]}) + "\n")
    out = tmp_path / "t.jsonl"
    rc, _, err = run_here("sample", "--hf", hf, "--prompts", prompts, "--out", out, "--num-samples", "2",
                     "--max-new-tokens", "6")
    assert rc == 0, err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [set(r) for r in recs] == [{"messages"}] * 4  # one format per file: a prompt became a user turn
    assert recs[0]["messages"][0] == {"role": "user", "content": "say the"}
    assert recs[2]["messages"][-1]["role"] == "assistant" and recs[2]["messages"][1]["content"] == "say of"
    assert detect_format(str(out)) == "chat" and len(read_examples(out, "chat")) == 4
    # the folder's generation_config.json sampling settings do not apply (they did, even to greedy decoding)
    greedy = ["--temperature", "0", "--max-new-tokens", "12", "--force"]
    rc, _, err = run_here("sample", "--hf", hf, "--prompts", prompts, "--out", out, *greedy)
    assert rc == 0 and "note:" not in err, err
    plain = out.read_text()
    transformers.GenerationConfig(repetition_penalty=50.0, no_repeat_ngram_size=1).save_pretrained(hf)
    rc, _, err = run_here("sample", "--hf", hf, "--prompts", prompts, "--out", out, *greedy)
    assert rc == 0 and out.read_text() == plain, err
    assert "generation_config.json's no_repeat_ngram_size=1, repetition_penalty=50.0 not used" in err


def test_hf_traces_end_at_the_templates_marker_and_without_a_template_take_one_turn_with_bos(base, tmp_path, monkeypatch):
    """sample.py --hf --prompts: a reply running past the template's end-of-turn marker was kept whole (the --run
    path cuts it there); a folder without a chat template completed only the last message of a conversation,
    and without the tokenizer's BOS."""
    from types import SimpleNamespace

    from tokenizers import processors

    from slmlab.traces import hf_completions

    transformers = pytest.importorskip("transformers")
    tok = Tokenizer.load(base)
    hf_tok = tok.hf  # a BOS from the post-processor, as Llama's tokenizer.json adds it
    hf_tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", tok.bos_id)])
    hf_tok.save(str(tmp_path / "tokenizer.json"))
    seen, scripted = [], tok.encode("Fine.<|im_end|>\n<|im_start|>user") + [tok.eos_id]

    def generate(self, input_ids=None, attention_mask=None, **kw):
        seen.append(input_ids[0].tolist())
        return torch.cat([input_ids, torch.tensor([scripted] * input_ids.shape[0])], 1)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "generate", generate)
    args = SimpleNamespace(seed=0, batch_size=4, temperature=0.0, top_k=0, num_samples=1, max_new_tokens=8)
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "How are you?"}]
    for template in (CHATML, None):
        args.hf = hf = tmp_path / f"hf{template is None}"
        t = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                                 bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
        t.chat_template = template
        t.save_pretrained(hf)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)).save_pretrained(hf)
        if template:
            assert [r for _, unit in hf_completions(args, [turns], "cpu") for _, r in unit] == ["Fine."]
            assert tok.decode(seen[-1]).startswith("<|im_start|>system\ns<|im_end|>")
            continue
        with pytest.raises(ConfigError, match=f"^--prompts example 2 has 2 messages, but --hf {hf} has no chat "
                                              "template to render them"):
            list(hf_completions(args, [turns[1:], turns], "cpu"))
        assert [r for _, unit in hf_completions(args, [turns[1:]], "cpu") for _, r in unit] == \
            ["Fine.<|im_end|>\n<|im_start|>user"]
        assert seen[-1] == [tok.bos_id] + tok.encode("How are you?")


# ---------------------------------------------------------------- chat templates as transformers renders them
TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
         {"role": "user", "content": "again"}, {"role": "assistant", "content": "world", "reasoning_content": "hmm"}]


def labelled(tok, example):
    ids, labels = example
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def test_a_template_syntax_error_names_the_file_and_line(base, tmp_path):
    tok = Tokenizer.load(base)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}\n{{ m.content }}\n")
    with pytest.raises(ConfigError) as e:
        ChatTemplate.for_tokenizer(tmp_path, tok)
    assert re.match(rf"{tmp_path / 'chat_template.jinja'}: line \d of the chat template: Unexpected end of template",
                    str(e.value)) and "\n" not in str(e.value)
    # transformers' {% generation %} tag (its assistant masks) renders its body
    assert ChatTemplate("a{% generation %}b{% endgeneration %}c", tok).render([]) == "abc"


def test_templates_render_as_transformers_apply_chat_template(tmp_path):
    """Its tojson (no HTML escaping, non-ASCII kept, indent), strftime_now, special-token names, and the
    messages' own fields (a reasoning under transformers' other names too)."""
    transformers = pytest.importorskip("transformers")
    folder = qwen_like(tmp_path / "tok")
    template = ("{{ bos_token }}{{ strftime_now('%Y') }}{% for m in messages %}{{ m | tojson }}|"
                "{{ {'c': m.content} | tojson(indent=2) }}|{{ m.name }}|{{ m.reasoning_content }}{% endfor %}"
                "{{ eos_token }}{{ pad_token }}")
    msgs = [{"role": "user", "content": "<b> & é", "name": "ünï"},
            {"role": "assistant", "content": "ok", "reasoning": "why"}]
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<|endoftext|>",
                                              eos_token="<|im_end|>", pad_token="<|endoftext|>")
    want = hf.apply_chat_template(msgs, chat_template=template, tokenize=False)
    assert ChatTemplate(template, Tokenizer.load(folder)).render(msgs) == want
    assert "é" in want and "ünï" in want and "why" in want


def test_qwen3_multi_turn_is_one_example_per_assistant_turn(tmp_path):
    """Qwen3 writes the empty think block in the last turn only, so a conversation's renders are not
    prefixes of each other (SFT refused it): each assistant turn becomes an example of its own, as
    generation sees it, and its eos (<|im_end|>, the end-of-turn token) is labelled once."""
    folder = qwen_like(tmp_path / "tok")
    tok, t = Tokenizer.load(folder), ChatTemplate.for_tokenizer(folder, Tokenizer.load(folder))
    first, second = t.encode(TURNS, "c.jsonl:1")
    assert labelled(tok, first) == "<think>\n\n</think>\n\nhello<|im_end|>\n"
    assert labelled(tok, second) == "<think>\nhmm\n</think>\n\nworld<|im_end|>\n"
    assert tok.decode(second[0]) == t.render(TURNS)  # no second <|im_end|> after the template's own
    assert tok.decode(first[0]) == t.render(TURNS[:1], True) + "<think>\n\n</think>\n\nhello<|im_end|>\n"


def test_a_perfect_model_scores_exact_match_1_under_a_reply_prefix(tmp_path):
    """The labels of a Qwen3 reply start with <think>\\n\\n</think>\\n\\n: exact match compared that with
    the bare answer, so a model generating exactly its labels scored 0."""
    from slmlab.sft import exact_match

    folder = qwen_like(tmp_path / "tok")
    t = ChatTemplate.for_tokenizer(folder, Tokenizer.load(folder))

    class Parrot:  # generates the labelled tokens of the conversation's last reply
        def room(self, n):
            return None

        def generate(self, idx, n, temperature, eos_id):
            ids, labels = t.encode(self.conv)[-1]
            return torch.tensor([idx[0].tolist() + [i for i, lab in zip(ids, labels) if lab != IGNORE][:n]])

    for conv in (TURNS[:2], TURNS):
        Parrot.conv = conv
        assert exact_match(Parrot(), t, [conv], "cpu") == {"exact_match": 1.0, "exact_n": 1}


def test_a_turn_rendered_unlike_its_generation_prompt_names_the_example_and_where(base, tmp_path):
    chat = write_chat(tmp_path / "c.jsonl", n=3)
    odd = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
           "{% if add_generation_prompt %}BOT:{% endif %}")
    with pytest.raises(DataError) as e:
        prepare_sft(str(chat), "chat", ChatTemplate(odd, Tokenizer.load(base), "odd.jinja"), 0.3, 96)
    assert re.fullmatch(rf"{chat}:\d: odd.jinja renders message 2 \(assistant\) not as its generation prompt "
                        r"followed by the reply: after '<user>say \w+\\n' the prompt has 'BOT:', "
                        r"the turn '<assistant>\w+ \w+\\n'", str(e.value)), str(e.value)


def test_a_prompt_is_completed_after_its_last_message(base, tmp_path):
    """[user, assistant, user] was cut at its last assistant turn: the first question was answered, the
    final one dropped. Only a final assistant turn (a reference reply) is left out."""
    from slmlab.traces import read_prompts

    three = TURNS[:3]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": three}) + "\n" + json.dumps({"messages": TURNS}) + "\n")
    assert read_prompts(prompts) == [three, three]
    t = ChatTemplate(CHATML, Tokenizer.load(base))
    assert t.prompt_ids(three) == t.prompt_ids(TURNS) == t.encode_text(t.render(three, True))


def test_prompts_with_a_lone_surrogate_or_bad_utf8_are_one_line_and_a_bom_is_no_text(tmp_path):
    """sample.py --prompts: a "\\ud800" escape crashed the tokenizer with a traceback, as did invalid UTF-8;
    a file starting with a byte-order mark was 'not JSON'. SFT data is read the same way."""
    from slmlab.traces import read_prompts

    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": "bad \\ud800 x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"^\S+p\.jsonl:2: 'prompt' holds a lone UTF-16 surrogate \(\\ud800 at character 4\)"):
        read_prompts(p)
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "a\udc00"}]}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:1: 'content' holds a lone UTF-16 surrogate"):
        read_prompts(p)
    p.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2: not UTF-8 \(byte"):
        read_prompts(p)
    p.write_text("\ufeff" + json.dumps({"prompt": "first"}) + "\n", encoding="utf-8")
    assert read_prompts(p) == [[{"role": "user", "content": "first"}]]


def test_sft_evaluation_runs_under_autocast_as_pretraining_does(base, monkeypatch):
    """SFT's validation loss had its own loop, without autocast: fp32 on CUDA where pretraining's is bf16.
    It takes the run's train.precision, as pretraining's evaluation does."""
    import contextlib

    from slmlab import evaluate
    from slmlab.rundir import RunDir
    from slmlab.sft import masked_val_loss

    seen = []
    monkeypatch.setattr(evaluate, "autocast", lambda device, precision: seen.append((device.type, precision))
                        or contextlib.nullcontext())
    _, model, tok = RunDir.open(base).load()
    ex = ChatTemplate(CHATML, tok).encode(TURNS[:2])
    masked_val_loss(model, ex, tok.pad_id, 96, 4, "cpu", torch.ones(300, dtype=torch.float64), "fp16")
    assert seen == [("cpu", "fp16")]


def test_hf_traces_from_a_folder_transformers_cannot_load_are_one_line(tmp_path):
    """sample.py --hf on a folder with pytorch_model.bin only, or no tokenizer.json: the checks
    convert.py --from-hf makes, not transformers' tracebacks."""
    from types import SimpleNamespace

    from slmlab.traces import hf_completions

    transformers = pytest.importorskip("transformers")
    folder = qwen_like(tmp_path / "bin")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # transformers 5 saves safetensors only
    args = SimpleNamespace(hf=str(folder), seed=0, batch_size=1, temperature=0.0, max_new_tokens=2, num_samples=1,
                           top_k=0)
    with pytest.raises(ConfigError, match=f"^--hf {folder} has no model.safetensors"):
        list(hf_completions(args, [TURNS[:1]], "cpu"))
    (folder / "tokenizer.json").unlink()
    (folder / "model.safetensors").touch()
    with pytest.raises(ConfigError, match=f"^--hf {folder} has no tokenizer.json$"):
        list(hf_completions(args, [TURNS[:1]], "cpu"))


def _uneven_chat(path):
    """Replies of 1 and 12 words, alternating: micro-batches of one step score very different numbers of tokens."""
    with open(path, "w") as f:
        for i in range(60):
            w = ["the", "cat", "sat", "on", "mat"][i % 5]
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                             {"role": "assistant", "content": " ".join([w] * (1 if i % 2 else 12))}]})
                    + "\n")
    return path


def test_grad_accum_splits_a_step_without_reweighting_its_reply_tokens(sft_base, tmp_path):
    """Each micro-batch's loss is a mean over its own reply tokens: averaged with equal weights, a step
    split in 2 or 4 trained on another loss than the whole batch (5.902 and 5.871 against 5.904 at step 1)."""
    data = _uneven_chat(tmp_path / "chat.jsonl")
    runs = {}
    for accum, batch in ((1, 4), (2, 2), (4, 1)):
        out = tmp_path / f"ga{accum}"
        rc, _, err = run_here("train", "--data", data, "--out", out, *sft_overrides(
            tmp_path, steps=3, **{"train.init_from": str(sft_base), "train.grad_accum": accum,
                                  "train.batch_size": batch, "train.warmup_steps": 1}))
        assert rc == 0, err
        runs[accum] = losses(out)
    for accum in (2, 4):
        assert max(abs(runs[accum][s] - runs[1][s]) for s in (1, 2, 3)) < 1e-5, runs


def test_a_micro_batch_a_short_phase_left_without_reply_tokens_counts_for_nothing(sft_base, tmp_path):
    """A 16-token phase cuts most replies off: a micro-batch with none scored its mean over no tokens,
    NaN, and the whole step was skipped (10 such steps in a row abort the run)."""
    data = _uneven_chat(tmp_path / "chat.jsonl")
    rc, out, err = run_here("train", "--data", data, "--out", tmp_path / "run", *sft_overrides(
        tmp_path, steps=6, **{"train.init_from": str(sft_base), "train.warmup_steps": 1, "train.phases":
                              "[{seq_len: 16, share: 0.5, tokens_per_step: 64}, {seq_len: 96, share: 0.5, "
                              "tokens_per_step: 384}]"}))
    assert rc == 0 and "non-finite" not in out + err, out + err
    assert all(math.isfinite(v) for v in losses(tmp_path / "run").values())
