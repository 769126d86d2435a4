"""The LM head and its cross-entropy, chunked over tokens so the [N, V] logits never exist whole.

The plain head materialises fp32 logits, their log-softmax and both gradients: about 12 bytes per
token per vocabulary entry, 9.9 GB for the ~124M GPT-2 shape at 16 x 1024 tokens (vocab 50304) on a
16-24 GB card. Chunked, one [chunk, V] block lives at a time: the forward turns each chunk's logits
into its loss and d(logits), and d(logits) at once into dx and dW, so nothing of size V is kept
for the backward (which only scales the saved dx and dW by the incoming gradient).

`linear_cross_entropy_ref` is the plain head (the obviously-correct path); tests/test_loss.py holds
the chunked one to it, forward and gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1  # LM.loss's: SFT's prompt positions and padding


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
    """(per-row logsumexp, sum of scale * CE) of one fp32 chunk."""
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, tc.clamp_min(0)[:, None]).squeeze(1)
    return lse, ((lse - picked) * scale).sum()


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


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk: int, ignore_index: int, row_scale, exclude):
        need_dx, need_dw = ctx.needs_input_grad[:2]
        cd, acc, w, scale_all = _prepare(x, weight, targets, ignore_index, row_scale)
        with torch.autocast(x.device.type, enabled=False):  # the matmuls are cast by hand, to cd
            total = torch.zeros((), dtype=acc, device=x.device)
            dx = torch.empty_like(x) if need_dx else None
            dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
            for s in range(0, x.shape[0], chunk):
                xc, tc, scale = x[s:s + chunk].to(cd), targets[s:s + chunk], scale_all[s:s + chunk]
                logits = _chunk_logits(xc, w, exclude)
                lse, part = _chunk_loss(logits, tc, scale)
                total += part
                # d(loss)/d(logits) = (softmax - onehot(target)) * the row's factor, built in place
                # in the logits' buffer (an excluded column: exp(-inf) = 0).
                g = logits.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, tc.clamp_min(0)[:, None], torch.full_like(lse[:, None], -1.0))
                g = g.mul_(scale[:, None]).to(cd)
                if need_dx:
                    dx[s:s + chunk] = g @ w
                if need_dw:  # summed in place where the dtypes allow (no [V, d] temporary per chunk)
                    if dw.dtype == cd:
                        dw.addmm_(g.t(), xc)
                    else:
                        dw += g.t() @ xc
        ctx.save_for_backward(dx, None if dw is None else dw.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        dx, dw = ctx.saved_tensors
        return (None if dx is None else dx * grad_out, None if dw is None else dw * grad_out,
                None, None, None, None, None)


def _chunked_loss_no_grad(x, weight, targets, chunk: int, ignore_index: int, row_scale, exclude):
    cd, acc, w, scale_all = _prepare(x, weight, targets, ignore_index, row_scale)
    total = torch.zeros((), dtype=acc, device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        for s in range(0, x.shape[0], chunk):
            logits = _chunk_logits(x[s:s + chunk].to(cd), w, exclude)
            total += _chunk_loss(logits, targets[s:s + chunk], scale_all[s:s + chunk])[1]
    return total


def linear_token_nll(x, weight, targets, chunk: int = 0, exclude=None):
    """Per-position cross-entropy (nats, shaped like targets) of logits = x @ weight.T, `chunk`
    positions of logits at a time (0: all at once): evaluation's share of model.loss_chunk (no
    gradients kept). exclude: a vocabulary column left out of the softmax."""
    x2, t2 = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    step = chunk or max(1, x2.shape[0])
    parts = [F.cross_entropy(_chunk_logits(x2[s:s + step], weight, exclude), t2[s:s + step], reduction="none")
             for s in range(0, x2.shape[0], step)]
    return torch.cat(parts).view_as(targets) if parts else x2.new_zeros(targets.shape, dtype=torch.float32)


def linear_cross_entropy(x, weight, targets, chunk: int, ignore_index: int = IGNORE_INDEX, *, row_scale=None,
                         exclude=None):
    """linear_cross_entropy_ref's value and gradients, `chunk` tokens of logits at a time.
    x [..., d], weight [V, d], targets [...] (ignore_index positions count for nothing); row_scale
    and exclude as in linear_cross_entropy_ref."""
    if chunk <= 0:
        raise ValueError(f"linear_cross_entropy: chunk must be > 0, got {chunk}")
    x2, t2 = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    if x2.shape[0] != t2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {x2.shape[0]} positions but {t2.shape[0]} targets")
    rs = None if row_scale is None else row_scale.reshape(-1)
    if rs is not None and rs.shape[0] != t2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {rs.shape[0]} row scales but {t2.shape[0]} targets")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedLinearCE.apply(x2, weight, t2, chunk, ignore_index, rs, exclude)
    return _chunked_loss_no_grad(x2, weight, t2, chunk, ignore_index, rs, exclude)
