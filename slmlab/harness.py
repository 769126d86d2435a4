"""Log-likelihood scoring of task Items (slmlab/tasks.py) and their metrics, for eval.py.

Each (context, continuation) pair is tokenized as start token + context + continuation: the
continuation's tokens are those the whole text's encoding adds to the context's, as in
lm-evaluation-harness (a context's trailing whitespace moves to the continuation first), or its own
encoding when a token of the whole spans the seam. A pair longer than the scorer's
max_len loses tokens from the left of its context. The scorer returns, for every continuation token,
log p(token | everything before it) and whether the token was the argmax; a pair's log-likelihood
is their sum and it is "greedy" when every token was the argmax.

Metrics, per task:
  multiple choice: acc (highest log-likelihood), acc_norm (highest log-likelihood per UTF-8 byte of
                   the continuation: longer choices are not penalised for their length), chance
  completion:      acc (the continuation is the greedy output), ppl (exp of the mean negative
                   log-likelihood of the continuations), bpb (bits per UTF-8 byte of the continuations)
Each accuracy has its standard error, sqrt(p(1-p)/(n-1)) (None for one item); two models on the
same items compare by the paired difference of their per-item results and its standard error (paired()).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError, SlmlabError
from .precision import autocast, check_precision


def precision(device, dtype: str = "auto"):
    """The autocast context every scorer runs its forward in, ours and transformers' alike, so a paired
    difference never mixes precisions: auto = the trainer's default (bf16 on a CUDA GPU with bf16, fp16
    on one without, fp32 on CPU), or fp32 / bf16 / fp16 on any device (slmlab/precision.py)."""
    check_precision(dtype, "--dtype")  # named as eval.py's flag
    return autocast(device, dtype)


@dataclass
class PairScore:
    logprob: float  # sum over the continuation's tokens, nats
    greedy: bool
    tokens: int
    truncated: bool  # the context lost tokens on the left to fit max_len


class CausalScorer:
    """Left-to-right scoring (score_causal); subclasses give encode() and masked_logits()."""

    bound = False  # scores are exact log-likelihoods

    def score(self, enc, batch_tokens: int, progress=None) -> list[PairScore]:
        return score_causal(self, enc, batch_tokens, progress)


def check_positions(cfg, max_len: int, name: str):
    """Learned positions have no rows past model.max_positions: say so before scoring, not mid-way."""
    if cfg.pos == "learned" and max_len > cfg.max_positions:
        raise ConfigError(f"--max-len {max_len} exceeds {name}'s model.max_positions={cfg.max_positions} "
                          "(model.pos=learned)")


class RunScorer(CausalScorer):
    """One of our autoregressive models (open_scorer: a run directory's): scores under the trainer's
    autocast, at the run's evaluation context by default."""

    def __init__(self, model, tok, device, max_len: int, name: str = "model", dtype: str = "auto"):
        cfg = model.cfg
        if not cfg.causal:  # scorer_for gives a masked-diffusion LM its DiffusionScorer
            raise ConfigError(f"{name}: a bidirectional model has no left-to-right log-likelihood to score")
        check_positions(cfg, max_len, name)
        self.model, self.tok, self.device, self.max_len, self.name = model, tok, torch.device(device), max_len, name
        self.start_id, self.dtype = tok.start_id, dtype

    @classmethod
    def open(cls, run_dir, device, max_len: int | None = None, samples: int = 16, dtype: str = "auto"):
        """A run directory's scorer: a DiffusionScorer (`samples` mask draws a pair) for a masked-diffusion
        run, else a RunScorer; at the run's evaluation context unless max_len."""
        from .evaluate import run_eval_shape
        from .rundir import RunDir

        cfg, model, tok = RunDir.open(run_dir).load(device)
        return scorer_for(model, tok, device, max_len or run_eval_shape(cfg)[0], str(run_dir), samples, dtype)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    @torch.no_grad()
    def masked_logits(self, idx, mask):
        """fp32 logits [N, V] at the `mask` positions of [B, T] `idx` (row by row): the head runs there only."""
        with precision(self.device, self.dtype):
            h = self.model.hidden(idx)[0][mask]
            # lm_head.weight, not lm_head(h): under data.added_tokens it is a parametrization's output.
            return F.linear(h, self.model.lm_head.weight).float()


class DiffusionScorer:
    """A masked-diffusion run (arch/diffusion.py): -log p(continuation | context) has no exact form, so
    each pair gets LLaDA's Monte-Carlo estimate of its ELBO bound. A draw masks l of the continuation's
    L tokens, l uniform in 1..L, the positions uniform, the context never; the draw's estimate is
    (L / l) x the masked tokens' -log p(x_i | the masked sequence), and the pair's is the mean over
    `samples` draws (unbiased for the ELBO, an upper bound on the NLL: `bound`). The draws are seeded
    by the pair's ids, so a pair scores the same in any batch, order or --limit. "greedy": with the
    whole continuation masked, every token is the model's argmax. No padding is ever added (every
    position sees every other): a batch holds pairs of one length."""

    bound = True

    def __init__(self, model, tok, device, max_len: int, name: str = "model", samples: int = 16, dtype: str = "auto"):
        if samples < 1:
            raise ConfigError(f"--mc-samples must be >= 1, got {samples}")
        check_positions(model.cfg, max_len, name)
        self.model, self.tok, self.device, self.max_len, self.name = model, tok, torch.device(device), max_len, name
        self.samples, self.start_id, self.dtype = samples, tok.start_id, dtype

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def draws(self, ids: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(masks [samples + 1, len(ids)] bool, weights [samples]): the pair's seeded draws, then the
        all-masked row for the greedy check."""
        import zlib

        g = torch.Generator().manual_seed(zlib.crc32(torch.tensor(ids, dtype=torch.int64).numpy().tobytes()))
        T = len(ids)
        masks = torch.zeros(self.samples + 1, T, dtype=torch.bool)
        ls = torch.randint(1, n + 1, (self.samples,), generator=g)
        for k, l in enumerate(ls.tolist()):
            masks[k, T - n + torch.randperm(n, generator=g)[:l]] = True
        masks[-1, T - n:] = True
        return masks, n / ls.double()

    @torch.no_grad()
    def score(self, enc, batch_tokens: int, progress=None) -> list[PairScore]:
        kept = [(ids[-self.max_len:], n, len(ids) > self.max_len) for ids, n in enc]
        by_len: dict[int, list[int]] = {}
        for i, (ids, _, _) in enumerate(kept):
            by_len.setdefault(len(ids), []).append(i)
        out: list[PairScore | None] = [None] * len(enc)
        done, rows = 0, self.samples + 1
        for T, group in sorted(by_len.items(), reverse=True):
            per = max(1, batch_tokens // (T * rows))
            for at in range(0, len(group), per):
                batch = group[at:at + per]
                for i, s in zip(batch, self._score_batch([kept[i] for i in batch])):
                    out[i] = s
                done += len(batch)
                if progress:
                    progress(done, len(enc))
        return out

    def _score_batch(self, pairs) -> list[PairScore]:
        x0 = torch.tensor([ids for ids, _, _ in pairs]).repeat_interleave(self.samples + 1, 0)
        drawn = [self.draws(ids, n) for ids, n, _ in pairs]
        masked = torch.cat([m for m, _ in drawn])
        xt = torch.where(masked, torch.full_like(x0, self.model.mask_id), x0).to(self.device)
        with precision(self.device, self.dtype):
            h = self.model.hidden(xt)[0][masked.to(self.device)]
            logits = F.linear(h, self.model.lm_head.weight).float()
        logits[:, self.model.mask_id] = float("-inf")  # SUBS: the clean token is never the mask
        t = x0[masked].to(self.device)
        lp = logits.log_softmax(-1).gather(1, t[:, None])[:, 0].double().cpu()
        top = (logits.argmax(-1) == t).cpu()
        row_of = masked.nonzero()[:, 0]  # each masked position's row, in the order lp lists them
        per_row = torch.zeros(len(masked), dtype=torch.float64).index_add_(0, row_of, lp)
        all_top = torch.zeros(len(masked), dtype=torch.long).index_add_(0, row_of, top.long()) == masked.sum(1)
        out, rows = [], self.samples + 1
        for j, ((_, n, truncated), (_, w)) in enumerate(zip(pairs, drawn)):
            r = slice(j * rows, (j + 1) * rows - 1)
            out.append(PairScore((w * per_row[r]).mean().item(), bool(all_top[(j + 1) * rows - 1]), n, truncated))
        return out


def scorer_for(model, tok, device, max_len: int, name: str = "model", samples: int = 16, dtype: str = "auto"):
    """The scorer of one of our models: DiffusionScorer for a masked-diffusion LM, else RunScorer."""
    if getattr(model, "mask_id", None) is not None:
        return DiffusionScorer(model, tok, device, max_len, name, samples, dtype)
    return RunScorer(model, tok, device, max_len, name, dtype)


class HFScorer(CausalScorer):
    """A transformers model folder (a baseline: SmolLM, Qwen, ...), at its max_position_embeddings by
    default (capped at 2048). Its bos token starts each pair, or its eos when it has no bos."""

    def __init__(self, folder, device, max_len: int | None = None, dtype: str = "auto"):
        from .traces import load_hf_folder

        self.tok, self.model = load_hf_folder(folder, device)
        self.name, self.device, self.dtype = str(folder), torch.device(device), dtype
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_len = max_len or min(positions or 2048, 2048)
        # Past it GPT-2's learned table has no rows (an IndexError mid-scoring); a RoPE model never trained there.
        if positions and self.max_len > positions:
            raise ConfigError(f"--max-len {self.max_len} exceeds {folder}'s max_position_embeddings={positions}")
        self.start_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        if self.start_id is None:  # a pair with an empty context, or a document's first token, has nothing to follow
            raise ConfigError(f"{folder}'s tokenizer has neither a bos nor an eos token to start each pair with")

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def masked_logits(self, idx, mask):
        # The same autocast as our runs': a transformers model in fp32 beside a bf16 run of ours on
        # CUDA made every paired difference partly one of precision.
        # Logits only at the columns some row scores: [B, T, V] for a 152k vocabulary is ~10 GB at the
        # default --batch-tokens. (A 1-D logits_to_keep is what every transformers 5 CausalLM takes.)
        keep = mask.any(0).nonzero()[:, 0]
        with precision(self.device, self.dtype):
            logits = self.model(input_ids=idx, logits_to_keep=keep).logits
        # (a model that ignores logits_to_keep, as xLSTM's passes it on unread, returns every column)
        return logits[mask[:, keep] if logits.shape[1] == len(keep) else mask].float()


def tokenize_pair(scorer, context: str, continuation: str) -> tuple[list[int], int]:
    """(start + context + continuation ids, continuation length in tokens), left-truncated to
    max_len + 1 ids (max_len predictions)."""
    moved = len(context) - len(context.rstrip())  # lm-evaluation-harness moves newlines too
    if moved:
        context, continuation = context[:-moved], context[-moved:] + continuation
    ctx = scorer.encode(context) if context else []
    # Encoded after its context, as lm-evaluation-harness does and as the model reads it: a tokenizer
    # that marks where a text starts (SentencePiece's prepended ▁) gives " Paris" alone a stray first
    # token. Alone when a token spans the seam (the context's ids are then no prefix of the whole's).
    whole = scorer.encode(context + continuation)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else scorer.encode(continuation)
    if not cont:
        raise DataError(f"continuation {continuation!r} encodes to no tokens")
    if len(cont) > scorer.max_len:
        raise DataError(f"a continuation of {len(cont)} tokens does not fit the {scorer.max_len}-token context "
                        f"(--max-len): {continuation[:60]!r}")
    start = [] if scorer.start_id is None else [scorer.start_id]
    return start + ctx + cont, len(cont)


def score_pairs(scorer, pairs: list[tuple[str, str]], batch_tokens: int = 16384, progress=None) -> list[PairScore]:
    """PairScore of each (context, continuation), in order; progress(done, total) after each batch."""
    return scorer.score([tokenize_pair(scorer, c, k) for c, k in pairs], batch_tokens, progress)


def score_causal(scorer, enc, batch_tokens: int, progress=None) -> list[PairScore]:
    """Causal models: one row of input ids per pair, except that pairs whose one-token continuations
    follow the same ids share a row (MMLU's " A".." D" cost one forward, not four: lm-evaluation-harness
    does the same). Rows go in batches of up to batch_tokens padded tokens, longest first; right
    padding is never looked at. A batch's log-probabilities are read into its pairs' scores and dropped."""
    rows: dict[tuple, int] = {}  # (input ids, 1) -> its row for one-token pairs; a longer pair's key is its own
    inputs, on_row = [], []  # per row: (input ids, positions scored), the pairs it scores
    for i, (ids, n) in enumerate(enc):
        ids = ids[-(scorer.max_len + 1):]
        key = (tuple(ids[:-1]), 1) if n == 1 else (i,)
        if key not in rows:
            rows[key] = len(inputs)
            inputs.append((ids[:-1], n))
            on_row.append([])
        on_row[rows[key]].append(i)
    out: list[PairScore | None] = [None] * len(enc)
    order = sorted(range(len(inputs)), key=lambda r: -len(inputs[r][0]))
    at = done = 0
    while at < len(order):
        batch = order[at:at + max(1, batch_tokens // max(len(inputs[order[at]][0]), 1))]
        at += len(batch)
        idx = torch.zeros(len(batch), len(inputs[batch[0]][0]), dtype=torch.long)
        mask = torch.zeros_like(idx, dtype=torch.bool)
        for b, r in enumerate(batch):
            x, n = inputs[r]
            idx[b, :len(x)] = torch.tensor(x)
            mask[b, len(x) - n:len(x)] = True
        lp = scorer.masked_logits(idx.to(scorer.device), mask.to(scorer.device)).log_softmax(-1)
        for r, row_lp in zip(batch, lp.split([inputs[r][1] for r in batch])):  # the mask's positions, row by row
            for i in on_row[r]:
                ids, n = enc[i]
                t = torch.tensor(ids[-n:], device=row_lp.device)
                out[i] = PairScore(row_lp.gather(1, t[:, None]).double().sum().item(),
                                   bool((row_lp.argmax(-1) == t).all()), n, len(ids) > scorer.max_len + 1)
            done += len(on_row[r])
        if progress:
            progress(done, len(enc))
    return out


@dataclass
class TaskResult:
    metrics: dict  # name -> value
    per_item: dict = field(default_factory=dict)  # metric -> [0/1 per item], for paired comparisons
    n: int = 0
    truncated: int = 0  # pairs whose context lost tokens


def stderr(xs: list[float]) -> float | None:
    """sqrt(p(1-p)/(n-1)) of 0/1 results; None for one item, which has none (JSON null, not NaN)."""
    n = len(xs)
    if n < 2:
        return None
    p = sum(xs) / n
    return math.sqrt(max(p * (1 - p), 0.0) / (n - 1))


def rolling_windows(scorer, text: str) -> list[tuple[list[int], int]]:
    """A document as (ids, scored tokens) windows: start token + its tokens, cut into disjoint spans of
    max_len predictions, each window's first id the last of the one before: every token is predicted
    once. The last, shorter span reads a full max_len ids, the tokens before it for context, as
    lm-evaluation-harness's rolling log-likelihood does."""
    ids = ([] if scorer.start_id is None else [scorer.start_id]) + scorer.encode(text)
    L, out = scorer.max_len, []
    for k in range(0, len(ids) - 1, L):  # ids k+1 .. end-1 are predicted
        end = min(k + L + 1, len(ids))
        out.append((ids[max(0, end - L - 1):end], end - 1 - k))
    return out


def evaluate_text(scorer, items, batch_tokens: int = 16384, progress=None) -> TaskResult:
    """Documents: bpb (bits per UTF-8 byte, comparable across tokenizers) and word_ppl (per
    whitespace-separated word), over all of them."""
    windows = [w for it in items for w in rolling_windows(scorer, it.continuations[0])]
    nll = -sum(s.logprob for s in scorer.score(windows, batch_tokens, progress))
    units = [it.units or (len(it.continuations[0].encode("utf-8")), len(it.continuations[0].split())) for it in items]
    n_bytes, words = sum(b for b, _ in units), sum(w for _, w in units)
    bound = {"bound": True} if getattr(scorer, "bound", False) else {}
    return TaskResult({"bpb": nll / math.log(2) / n_bytes, "word_ppl": _exp(nll / max(words, 1)),
                       "tokens": sum(n for _, n in windows), **bound}, n=len(items))


def evaluate_items(scorer, items, batch_tokens: int = 16384, progress=None) -> TaskResult:
    if items[0].text:
        return evaluate_text(scorer, items, batch_tokens, progress)
    pairs = [(c, k) for it in items for c, k in zip(it.contexts, it.continuations)]
    scores = score_pairs(scorer, pairs, batch_tokens, progress)
    res = TaskResult({}, n=len(items), truncated=sum(s.truncated for s in scores))
    bound = {"bound": True} if getattr(scorer, "bound", False) else {}  # a diffusion run's ELBO estimates
    at = 0
    if items[0].is_choice:
        acc, acc_norm, chance = [], [], 0.0
        for it in items:
            s = scores[at:at + len(it.contexts)]
            at += len(s)
            ll = [x.logprob for x in s]
            # A choice's length without the space the format puts before it, as lm-evaluation-harness
            # (which adds that space as its target delimiter): the +1 favoured short choices.
            per_byte = [x.logprob / max(len(k.removeprefix(" ").encode("utf-8")), 1)
                        for x, k in zip(s, it.continuations)]
            acc.append(float(_argmax(ll) == it.label))
            acc_norm.append(float(_argmax(per_byte) == it.label))
            chance += 1 / len(it.contexts)
        res.per_item = {"acc": acc, "acc_norm": acc_norm}
        res.metrics = {"acc": sum(acc) / len(acc), "acc_stderr": stderr(acc), "acc_norm": sum(acc_norm) / len(acc),
                       "acc_norm_stderr": stderr(acc_norm), "chance": chance / len(items), **bound}
    else:
        acc = [float(s.greedy) for s in scores]
        nll = -sum(s.logprob for s in scores)
        n_bytes = sum(len(it.continuations[0].encode("utf-8")) for it in items)
        res.per_item = {"acc": acc}
        res.metrics = {"acc": sum(acc) / len(acc), "acc_stderr": stderr(acc), "ppl": _exp(nll / len(scores)),
                       "bpb": nll / math.log(2) / n_bytes, **bound}
    return res


def _exp(x: float) -> float:
    # A perplexity per word or continuation can pass e**709 (one 300-token "word" of an untrained
    # model): inf, where math.exp would raise after every pair was scored.
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])  # ties go to the first choice


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean of b - a, its standard error) over the same items: the paired difference two models'
    accuracies differ by, and how sure that is (about 2 standard errors is the usual bar). The error
    is nan for one item (ablate's report tests it with isfinite); eval.py's JSON writes it null."""
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return mean, float("nan")
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return mean, math.sqrt(var / n)


class Ticker:
    """A task's progress on stderr: at most one line every 15 s, and the last."""

    def __init__(self, label: str, say):
        self.label, self.say, self.t0, self.last = label, say, time.time(), time.time()

    def __call__(self, done: int, total: int):
        now = time.time()
        if now - self.last > 15 or done == total:
            self.say(f"  {self.label}: {done:,}/{total:,} scored, {now - self.t0:.0f} s")
            self.last = now


# ---- eval.py: every model on every task, the table, the JSON ----
def load_scorer(kind: str, where: str, device, max_len: int | None, samples: int = 16, dtype: str = "auto"):
    if kind == "run":
        return RunScorer.open(where, device, max_len, samples, dtype)
    return HFScorer(where, device, max_len, dtype)


def check_model(kind: str, where: str):
    """The files a model needs, checked before any model loads: a mistyped second path is a one-line
    error at once, not after the first model has been scored for an hour."""
    if kind == "run":
        from .rundir import RunDir

        RunDir.open(where)
    else:
        from .export.hf import hf_config_file

        hf_config_file(Path(where).expanduser(), label="--hf ")


def evaluate_models(models: list[tuple[str, str]], tasks, device, limit=None, max_len=None, batch_tokens=16384,
                    say=None, samples: int | None = None, fewshot: int = 0, dtype: str = "auto") -> dict:
    """{"models": [label], "tasks": {name: {source, items, of, results: {label: metrics}, per_item, paired}},
    "errors": [...]}: the items are read once, each model loads once (one at a time) and scores every
    task. A model that fails to load or to score a task gets {"error": why} there (and a line in
    "errors"); the others are still scored, so nothing already computed is lost."""
    import sys

    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    labels = [where if kind == "run" else f"hf:{where}" for kind, where in models]
    if len(set(labels)) < len(labels):
        raise ConfigError(f"a model is given twice: {', '.join(sorted({x for x in labels if labels.count(x) > 1}))}")
    for kind, where in models:
        check_model(kind, where)
    from .tasks import read_items

    out = {"models": labels, "dtype": dtype, "tasks": {}, "errors": []}
    items = {}
    for task in tasks:  # tasks.resolve_all has refused a name given twice
        items[task.name], total = read_items(task, limit, fewshot)
        out["tasks"][task.name] = {"source": task.source, "items": len(items[task.name]), "of": total,
                                   "fewshot": fewshot, "results": {}, "per_item": {}, "paired": {}}
        say(f"{task.name}: {len(items[task.name]):,} of {total:,} items from {task.source}"
            + (f", {fewshot}-shot" if fewshot else ""))

    for (kind, where), label in zip(models, labels):
        try:
            scorer = load_scorer(kind, where, device, max_len, samples or 16, dtype)
        except (SlmlabError, torch.OutOfMemoryError) as e:
            _record_failure(out, label, [t.name for t in tasks], e, say)
            continue
        if samples is not None and not isinstance(scorer, DiffusionScorer):
            say(f"note: --mc-samples has no effect on {label}: it is not a masked-diffusion run")
        for task in tasks:
            t0 = time.time()
            try:
                res = evaluate_items(scorer, items[task.name], batch_tokens, Ticker(f"{label} {task.name}", say))
            except (SlmlabError, torch.OutOfMemoryError) as e:
                _record_failure(out, label, [task.name], e, say)
                continue
            entry = out["tasks"][task.name]
            entry["results"][label] = {**res.metrics, "max_len": scorer.max_len, "truncated": res.truncated,
                                       "seconds": round(time.time() - t0, 2)}
            entry["per_item"][label] = res.per_item
            if res.truncated:
                say(f"note: {label} {task.name}: {res.truncated} pair(s) longer than {scorer.max_len} tokens lost "
                    "context on the left (--max-len)")
        del scorer
    for entry in out["tasks"].values():
        ref = entry["per_item"].get(labels[0])
        for label in labels[1:]:
            if ref is not None and label in entry["per_item"]:
                entry["paired"][label] = {m: list(paired(ref[m], entry["per_item"][label][m])) for m in ref}
    return out


def _record_failure(out: dict, label: str, names: list[str], e: Exception, say):
    msg = "out of memory (lower --batch-tokens)" if isinstance(e, torch.OutOfMemoryError) else str(e)
    for name in names:
        out["tasks"][name]["results"][label] = {"error": msg}
    out["errors"].append(f"{label} {', '.join(names)}: {msg}")
    say(f"error: {out['errors'][-1]} (going on with the rest)")


def table(results: dict) -> str:
    """Markdown: a row per task and metric, a column per model (accuracies in % +- standard error), then
    each later model's paired difference from the first."""
    labels = results["models"]
    head = ["task", "metric", *labels, *[f"{x} - {labels[0]}" for x in labels[1:]]]
    rows = []
    for name, entry in results["tasks"].items():
        scored = [r for r in entry["results"].values() if "error" not in r]
        first = scored[0] if scored else {}
        shot = f", {entry['fewshot']}-shot" if entry.get("fewshot") else ""
        shown = f"{name} ({entry['items']:,} of {entry['of']:,}{shot})" if entry["items"] < entry["of"] else \
            f"{name} ({entry['items']:,}{shot})"
        for metric in [m for m in ("acc", "acc_norm", "ppl", "bpb", "word_ppl") if m in first]:
            cells = [_cell(entry["results"][label], metric) for label in labels]
            for label in labels[1:]:
                d = entry["paired"].get(label, {}).get(metric)
                cells.append(f"{100 * d[0]:+.1f} ± {_percent(d[1])}" if d else "")
            rows.append([shown, metric, *cells])
            shown = ""
        if not scored:
            rows.append([shown, "failed", *["failed"] * len(labels), *[""] * (len(labels) - 1)])
        if "chance" in first:
            rows.append(["", "chance", *[f"{100 * first['chance']:.1f}"] * len(labels), *[""] * (len(labels) - 1)])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _cell(r: dict, metric: str) -> str:
    if "error" in r:
        return "failed"
    if metric.startswith("acc"):
        return f"{100 * r[metric]:.1f} ± {_percent(r[metric + '_stderr'])}"
    value = "n/a" if r[metric] is None else f"{r[metric]:.4g}"  # None: an overflowed perplexity read back from JSON
    return ("≤ " if r.get("bound") else "") + value


def _percent(se) -> str:
    # One item has no standard error (None from stderr(), nan from paired(), null once through JSON).
    return "n/a" if se is None or not math.isfinite(se) else f"{100 * se:.1f}"


def to_json(results, indent: int | None = None, default=None) -> str:
    """Strict JSON: NaN and Infinity are no JSON, and many parsers refuse them, so a non-finite number
    (paired()'s nan for one item, an overflowed perplexity, a broken model's nan) is written null."""
    import json

    return json.dumps(_finite_or_none(results), indent=indent, default=default, allow_nan=False)


def _finite_or_none(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


def report(results: dict, as_json: bool = False):
    if as_json:
        print(to_json(results))
        return
    print(table(results))
    if any(m for e in results["tasks"].values() for m in e["paired"].values()):
        print("\n(differences are paired over the same items, ± one standard error; |difference| > 2 standard "
              "errors is the usual bar for a real one)")
    for line in results.get("errors", []):
        print(f"failed: {line}")


def write_json(results: dict, path):
    from .checkpoint import publish

    with publish(path) as tmp:
        tmp.write_text(to_json(results, indent=1))


# ---- train.eval_tasks: the trainer's evaluations score tasks too ----
def load_task_items(specs: str, limit: int, say=None) -> dict:
    """{task name: items} for train.eval_tasks (eval.py's --tasks syntax), read once before training
    starts, so a bad spec is an error before step 1; {} when specs is empty."""
    from .tasks import read_items, resolve_all

    out = {}
    for _, task in resolve_all(specs, "train.eval_tasks") if specs.strip() else []:
        out[task.name], total = read_items(task, limit or None)
        if say:
            say(f"eval task {task.name}: {len(out[task.name]):,} of {total:,} items from {task.source}")
    return out


def task_metrics(model, tok, device, max_len: int, items: dict, batch_tokens: int = 16384,
                 dtype: str = "auto") -> dict:
    """{"task_NAME_METRIC": value} of `model` (in eval mode for the scoring) on each task's items:
    acc and acc_norm for multiple choice, acc and ppl for completions; dtype: the run's train.precision."""
    was_training = model.training
    model.eval()
    try:
        scorer = scorer_for(model, tok, device, max_len, name="the run", dtype=dtype)
        out = {}
        for name, its in items.items():
            m = evaluate_items(scorer, its, batch_tokens).metrics
            out.update({f"task_{name}_{k}": m[k] for k in ("acc", "acc_norm", "ppl", "bpb") if k in m})
        return out
    finally:
        model.extra_metrics()  # drop the MoE loads and spike rates these forwards recorded: the next eval's are its own
        model.train(was_training)


def primary_scores(ev: dict) -> dict:
    """{"NAME acc_norm": value} from an evaluation's task_NAME_METRIC keys: each task's acc_norm
    (multiple choice), acc (completions) or bpb (text)."""
    out = {}
    for key, value in ev.items():
        if not key.startswith("task_"):
            continue
        for metric, unless in (("_acc_norm", None), ("_acc", "_acc_norm"), ("_bpb", "_acc")):
            name = key[5:-len(metric)]
            if key.endswith(metric) and (unless is None or f"task_{name}{unless}" not in ev):
                out[f"{name} {metric[1:]}"] = value
                break
    return out


def task_label(ev: dict) -> str:
    """'  NAME acc_norm 0.412 ...' for a progress line (primary_scores)."""
    return "".join(f"  {k} {v:.3f}" for k, v in primary_scores(ev).items())
