"""A tiny random-weight Llama as a transformers folder, with its own byte-level BPE and chat template.

It stands in for a downloaded checkpoint in the imported-model worked example (docs/finetune.md):
the tokenizer is trained here on the Python standard library's source and nothing is downloaded.

    python examples/make_tiny_llama.py --out /tmp/tiny-llama [--vocab 1024] [--d-model 128] [--layers 4]
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmlab.cli import run_cli
from slmlab.errors import ConfigError

# Llama-3's chat markers and template shape, so SFT goes through a family's own template, not ChatML.
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
MARKERS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
            "\n\n{{ message['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
            "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def stdlib_text(max_bytes: int) -> list[str]:
    out, n = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            s = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        out.append(s)
        n += len(s)
        if n >= max_bytes:
            break
    return out


def make(out: Path, vocab: int, d_model: int, layers: int, seed: int = 0, texts: list[str] | None = None):
    """Write the folder; `texts` trains the BPE (default: 2 MB of the standard library's source)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[BOS, EOS, PAD, *MARKERS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or stdlib_text(2_000_000), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                                clean_up_tokenization_spaces=False)
    fast.chat_template = TEMPLATE
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=d_model, intermediate_size=3 * d_model,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=1024, tie_word_embeddings=True,
                                   bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                                   pad_token_id=fast.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(str(out))
    fast.save_pretrained(str(out))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: random LlamaForCausalLM, {n:,} parameters, vocab {len(fast)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the folder to write (config.json, model.safetensors, tokenizer)")
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size (default 1024)")
    p.add_argument("--d-model", type=int, default=128, help="hidden size, a multiple of 8 (default 128)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (300 <= args.vocab <= 65536 and args.d_model >= 8 and args.d_model % 8 == 0 and 1 <= args.layers <= 64):
        raise ConfigError("need 300 <= --vocab <= 65536, --d-model a positive multiple of 8, 1 <= --layers <= 64")
    make(Path(args.out), args.vocab, args.d_model, args.layers, args.seed)


if __name__ == "__main__":
    sys.exit(run_cli(main))
