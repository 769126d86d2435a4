"""A tiny pretrained base run and chat data for the SFT and LoRA tests."""
from __future__ import annotations

import json
import random
from pathlib import Path

from trainer_helpers import run_here, tiny_overrides, write_corpus

WORDS = "the of and to a in is it you that".split()


def sft_overrides(tmp: Path, steps: int, **extra) -> list[str]:
    """tiny_overrides with one phase long enough for a ChatML example over a 300-token vocabulary."""
    return tiny_overrides(tmp, steps=steps, **{"train.phases": "[]", "train.seq_len": 96, "train.batch_size": 8,
                                                "optim.lr": 0.01, **extra})


def write_chat(path: Path, n: int = 60, seed: int = 0) -> Path:
    """`say W` -> `W W`: a reply the model can learn from the prompt in a few dozen steps."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            w = rng.choice(WORDS)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                             {"role": "assistant", "content": f"{w} {w}"}]}) + "\n")
    return path


def make_base(tmp: Path) -> Path:
    corpus = write_corpus(tmp / "corpus.txt")
    rc, _, err = run_here("train", "--arch", "hybrid", "--data", corpus, "--out", tmp / "base",
                          *sft_overrides(tmp, steps=6))
    assert rc == 0, err
    return tmp / "base"


# Qwen3's chat template, cut to what matters here: an assistant turn after the last user turn opens with a
# think block (empty without reasoning_content), earlier turns do not; {% generation %} as Qwen's own
# assistant-mask variants write it.
QWEN3_LIKE = """{%- set ns = namespace(last_user=0) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
{%- if m.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if loop.index0 > ns.last_user %}{{- '<think>\\n' + (m.reasoning_content or '') + '\\n</think>\\n\\n' }}{%- endif %}
{%- generation %}{{- m.content + '<|im_end|>' }}{%- endgeneration %}
{{- '\\n' }}
{%- else %}
{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""


def qwen_like(folder: Path, template: str = QWEN3_LIKE) -> Path:
    """A tokenizer folder as Qwen's: <|im_start|>/<|im_end|> special, <|im_end|> the eos, <think> one token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS) + " hello world again hmm"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": template}))
    return folder
