"""The LM head and its cross-entropy, chunked over tokens so the [N, V] logits never exist whole.

The plain head materialises fp32 logits, their log-softmax and both gradients: about 12 bytes per
token per vocabulary entry, 9.9 GB for the ~124M GPT-2 shape at 16 x 1024 tokens (vocab 50304) on a
16-24 GB card. Chunked, one [chunk, V] block lives at a time: the forward turns each chunk's logits
into its loss and d(logits), and d(logits) at once into dx and dW, so nothing of size V is kept
for the backward (which only scales the saved dx and dW by the incoming gradient).

Distillation (`Distill`: the teacher's hidden states and head) is the same loop with a second
[chunk, V] block, the teacher's logits, so neither model's logits exist whole either.

`linear_cross_entropy_ref` and `linear_distill_loss_ref` are the plain heads (the obviously-correct
paths); tests/test_loss.py holds the chunked ones to them, forward and gradients.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1  # LM.loss's: SFT's prompt positions and padding


class Distill(NamedTuple):
    """The teacher's side of a distillation loss (Hinton et al. 2015): its final hidden states
    [..., d_t] (computed without gradients, one row per student position) and its head [V, d_t]."""
    hidden: torch.Tensor
    weight: torch.Tensor
    alpha: float  # weight of the KL term; 1 - alpha weighs the cross-entropy
    temperature: float


def _upcast(logits):
    """bf16/fp16 logits to fp32 for the softmax; fp32 and fp64 stay as they are."""
    return logits.float() if logits.element_size() < 4 else logits


def linear_cross_entropy_ref(x, weight, targets, ignore_index: int = IGNORE_INDEX, *, row_scale=None,
                             exclude=None):
    """Mean cross-entropy of logits = x @ weight.T over the targets that are not ignore_index; with
    row_scale [...] (shaped like targets), sum(row_scale * CE) instead. exclude: a vocabulary column
    no target may take, left out of the softmax (the diffusion objective's mask token)."""
    logits = _upcast(F.linear(x, weight))
    if exclude is not None:
        logits = logits.clone()
        logits[..., exclude] = float("-inf")
    if row_scale is None:
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index)
    ce = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none")
    return (ce * row_scale.flatten()).sum()


def linear_distill_loss_ref(x, weight, targets, teacher: Distill, ignore_index: int = IGNORE_INDEX):
    """((1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T), CE) of logits = x @ weight.T,
    both means over the targets that are not ignore_index (SFT's prompt positions count for nothing)."""
    logits = _upcast(F.linear(x, weight)).flatten(0, -2)
    t_logits = _upcast(F.linear(teacher.hidden, teacher.weight)).flatten(0, -2)
    valid = targets.flatten() != ignore_index
    ce = F.cross_entropy(logits, targets.flatten(), ignore_index=ignore_index)
    temp = teacher.temperature
    kl = F.kl_div(F.log_softmax(logits / temp, dim=-1), F.log_softmax(t_logits / temp, dim=-1),
                  log_target=True, reduction="none").sum(-1)
    return (1 - teacher.alpha) * ce + teacher.alpha * temp * temp * kl[valid].mean(), ce


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run the head's matmuls in (so chunked == plain under bf16 too)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _chunk_logits(xc, w, exclude):
    """One chunk's fp32 logits, the excluded column at -inf (out of the softmax, gradient 0)."""
    logits = _upcast(xc @ w.t())
    if exclude is not None:
        logits[:, exclude] = float("-inf")
    return logits


def _chunk_loss(logits, tc, scale):
    """(per-row logsumexp, sum of scale * CE) of one fp32 chunk. An ignored row (scale 0) reads column
    0 as its target, which may be the excluded -inf column: its term is 0, not 0 * inf = nan."""
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, tc.clamp_min(0)[:, None]).squeeze(1)
    return lse, torch.where(scale != 0, (lse - picked) * scale, 0.0).sum()


class _Rows(NamedTuple):
    """One chunk's rows: the student's input, targets, loss factors and (distilling) the teacher's input."""
    x: torch.Tensor
    targets: torch.Tensor
    scale: torch.Tensor
    teacher_x: Optional[torch.Tensor]


class _Terms(NamedTuple):
    """One chunk's share of the loss: the objective's, the cross-entropy's, and what the gradient
    needs (the student's logits, their logsumexp and, distilling, both tempered log-softmaxes)."""
    loss: torch.Tensor
    ce: torch.Tensor
    logits: torch.Tensor
    lse: torch.Tensor
    log_q: Optional[torch.Tensor] = None  # student, at the temperature
    log_p: Optional[torch.Tensor] = None  # teacher, at the temperature


def _chunk_terms(rows: _Rows, w, exclude, teacher: Optional[Distill], tw) -> _Terms:
    logits = _chunk_logits(rows.x, w, exclude)
    lse, ce = _chunk_loss(logits, rows.targets, rows.scale)
    if teacher is None:
        return _Terms(ce, ce, logits, lse)
    temp, alpha = teacher.temperature, teacher.alpha
    log_q = torch.log_softmax(logits / temp, dim=-1)
    log_p = torch.log_softmax(_chunk_logits(rows.teacher_x, tw, None).div_(temp), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    loss = (1 - alpha) * ce + alpha * temp * temp * (kl * rows.scale).sum()
    return _Terms(loss, ce, logits, lse, log_q, log_p)


def _logits_grad(t: _Terms, targets, scale, teacher: Optional[Distill]):
    """d(loss)/d(logits) of one chunk, built in place in its buffers: (softmax - onehot(target)) per
    cross-entropy, plus alpha * T * (student_T - teacher_T) distilling, times each row's factor
    (an excluded column: exp(-inf) = 0)."""
    g = t.logits.sub_(t.lse[:, None]).exp_()
    g.scatter_add_(1, targets.clamp_min(0)[:, None], torch.full_like(t.lse[:, None], -1.0))
    if teacher is not None:
        g.mul_(1 - teacher.alpha).add_(t.log_q.exp_().sub_(t.log_p.exp_()), alpha=teacher.alpha * teacher.temperature)
    return g.mul_(scale[:, None])


def _prepare(x, weight, targets, ignore_index, row_scale):
    """(matmul dtype, accumulation dtype, weight in the matmul dtype, per-row loss factor): the
    factor is row_scale, or 1 / #valid on valid rows and 0 on ignored ones (the mean)."""
    cd = _compute_dtype(x)
    acc = torch.promote_types(cd, torch.float32)
    if row_scale is not None:
        return cd, acc, weight.to(cd), row_scale.to(acc)
    valid = targets != ignore_index
    # No valid target: 1/0 = inf, and 0 * inf = nan, the nan F.cross_entropy's mean gives.
    return cd, acc, weight.to(cd), valid.to(acc) / valid.sum().to(acc)


def _chunks(x, targets, scale, teacher: Optional[Distill], chunk: int, cd):
    """The rows `chunk` at a time, inputs cast to the matmul dtype."""
    for s in range(0, x.shape[0], chunk):
        tx = None if teacher is None else teacher.hidden[s:s + chunk].to(cd)
        yield s, _Rows(x[s:s + chunk].to(cd), targets[s:s + chunk], scale[s:s + chunk], tx)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk: int, ignore_index: int, row_scale, exclude, teacher):
        need_dx, need_dw = ctx.needs_input_grad[:2]
        cd, acc, w, scale_all = _prepare(x, weight, targets, ignore_index, row_scale)
        tw = None if teacher is None else teacher.weight.to(cd)
        with torch.autocast(x.device.type, enabled=False):  # the matmuls are cast by hand, to cd
            total, ce = (torch.zeros((), dtype=acc, device=x.device) for _ in range(2))
            dx = torch.empty_like(x) if need_dx else None
            dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
            for s, rows in _chunks(x, targets, scale_all, teacher, chunk, cd):
                terms = _chunk_terms(rows, w, exclude, teacher, tw)
                total += terms.loss
                ce += terms.ce
                g = _logits_grad(terms, rows.targets, rows.scale, teacher).to(cd)
                if need_dx:
                    dx[s:s + chunk] = g @ w
                if need_dw:  # summed in place where the dtypes allow (no [V, d] temporary per chunk)
                    if dw.dtype == cd:
                        dw.addmm_(g.t(), rows.x)
                    else:
                        dw += g.t() @ rows.x
        ctx.save_for_backward(dx, None if dw is None else dw.to(weight.dtype))
        ctx.mark_non_differentiable(ce)
        return total, ce

    @staticmethod
    def backward(ctx, grad_out, _grad_ce):
        dx, dw = ctx.saved_tensors
        return (None if dx is None else dx * grad_out, None if dw is None else dw * grad_out,
                None, None, None, None, None, None)


def _chunked_loss_no_grad(x, weight, targets, chunk: int, ignore_index: int, row_scale, exclude, teacher):
    cd, acc, w, scale_all = _prepare(x, weight, targets, ignore_index, row_scale)
    tw = None if teacher is None else teacher.weight.to(cd)
    total, ce = (torch.zeros((), dtype=acc, device=x.device) for _ in range(2))
    with torch.autocast(x.device.type, enabled=False):
        for _, rows in _chunks(x, targets, scale_all, teacher, chunk, cd):
            terms = _chunk_terms(rows, w, exclude, teacher, tw)
            total += terms.loss
            ce += terms.ce
    return total, ce


def linear_token_nll(x, weight, targets, chunk: int = 0, exclude=None):
    """Per-position cross-entropy (nats, shaped like targets) of logits = x @ weight.T, `chunk`
    positions of logits at a time (0: all at once): evaluation's share of model.loss_chunk (no
    gradients kept). exclude: a vocabulary column left out of the softmax."""
    x2, t2 = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    step = chunk or max(1, x2.shape[0])
    parts = [F.cross_entropy(_chunk_logits(x2[s:s + step], weight, exclude), t2[s:s + step], reduction="none")
             for s in range(0, x2.shape[0], step)]
    return torch.cat(parts).view_as(targets) if parts else x2.new_zeros(targets.shape, dtype=torch.float32)


def _chunked(x, weight, targets, chunk: int, ignore_index: int, row_scale, exclude, teacher):
    """(loss, CE) of the chunked head, rows flattened; the checks both public functions share."""
    if chunk <= 0:
        raise ValueError(f"linear_cross_entropy: chunk must be > 0, got {chunk}")
    x2, t2 = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    if x2.shape[0] != t2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {x2.shape[0]} positions but {t2.shape[0]} targets")
    rs = None if row_scale is None else row_scale.reshape(-1)
    if rs is not None and rs.shape[0] != t2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {rs.shape[0]} row scales but {t2.shape[0]} targets")
    if teacher is not None:
        th = teacher.hidden.reshape(-1, teacher.hidden.shape[-1])
        if th.shape[0] != t2.shape[0] or teacher.weight.shape[0] != weight.shape[0]:
            raise ValueError(f"linear_distill_loss: the teacher gives {th.shape[0]} positions x "
                             f"{teacher.weight.shape[0]} logits, the student {t2.shape[0]} x {weight.shape[0]}")
        teacher = teacher._replace(hidden=th)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedLinearCE.apply(x2, weight, t2, chunk, ignore_index, rs, exclude, teacher)
    return _chunked_loss_no_grad(x2, weight, t2, chunk, ignore_index, rs, exclude, teacher)


def linear_cross_entropy(x, weight, targets, chunk: int, ignore_index: int = IGNORE_INDEX, *, row_scale=None,
                         exclude=None):
    """linear_cross_entropy_ref's value and gradients, `chunk` tokens of logits at a time.
    x [..., d], weight [V, d], targets [...] (ignore_index positions count for nothing); row_scale
    and exclude as in linear_cross_entropy_ref."""
    return _chunked(x, weight, targets, chunk, ignore_index, row_scale, exclude, None)[0]


def linear_distill_loss(x, weight, targets, teacher: Distill, chunk: int, ignore_index: int = IGNORE_INDEX):
    """linear_distill_loss_ref's (loss, CE) and the loss's gradients, `chunk` tokens of the
    student's and the teacher's logits at a time."""
    return _chunked(x, weight, targets, chunk, ignore_index, None, None, teacher)
