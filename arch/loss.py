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


def linear_cross_entropy_ref(x, weight, targets, ignore_index: int = IGNORE_INDEX):
    """Mean cross-entropy of logits = x @ weight.T over the targets that are not ignore_index."""
    logits = _upcast(F.linear(x, weight))
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run the head's matmuls in (so chunked == plain under bf16 too)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _chunk_loss(logits, tc, valid):
    """(per-row logsumexp, summed CE of the valid rows) of one fp32 chunk."""
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, tc.clamp_min(0)[:, None]).squeeze(1)
    return lse, ((lse - picked) * valid).sum()


def _prepare(x, weight, targets, ignore_index):
    """(matmul dtype, accumulation dtype, weight in the matmul dtype, valid-target mask, 1 / #valid)."""
    cd = _compute_dtype(x)
    acc = torch.promote_types(cd, torch.float32)
    valid = targets != ignore_index
    # No valid target: 1/0 = inf, and the loss 0 * inf = nan, as F.cross_entropy's mean gives.
    return cd, acc, weight.to(cd), valid, 1.0 / valid.sum().to(acc)


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk: int, ignore_index: int):
        need_dx, need_dw = ctx.needs_input_grad[:2]
        cd, acc, w, valid_all, inv_n = _prepare(x, weight, targets, ignore_index)
        with torch.autocast(x.device.type, enabled=False):  # the matmuls are cast by hand, to cd
            total = torch.zeros((), dtype=acc, device=x.device)
            dx = torch.empty_like(x) if need_dx else None
            dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
            for s in range(0, x.shape[0], chunk):
                xc, tc, valid = x[s:s + chunk].to(cd), targets[s:s + chunk], valid_all[s:s + chunk]
                logits = _upcast(xc @ w.t())
                lse, part = _chunk_loss(logits, tc, valid)
                total += part
                # d(mean CE)/d(logits) = (softmax - onehot(target)) / n_valid, zero on ignored rows,
                # built in place in the logits' buffer.
                g = logits.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, tc.clamp_min(0)[:, None], torch.full_like(lse[:, None], -1.0))
                g = g.mul_((valid.to(acc) * inv_n)[:, None]).to(cd)
                if need_dx:
                    dx[s:s + chunk] = g @ w
                if need_dw:  # summed in place where the dtypes allow (no [V, d] temporary per chunk)
                    if dw.dtype == cd:
                        dw.addmm_(g.t(), xc)
                    else:
                        dw += g.t() @ xc
        ctx.save_for_backward(dx, None if dw is None else dw.to(weight.dtype))
        return total * inv_n

    @staticmethod
    def backward(ctx, grad_out):
        dx, dw = ctx.saved_tensors
        return (None if dx is None else dx * grad_out, None if dw is None else dw * grad_out,
                None, None, None)


def _chunked_loss_no_grad(x, weight, targets, chunk: int, ignore_index: int):
    cd, acc, w, valid_all, inv_n = _prepare(x, weight, targets, ignore_index)
    total = torch.zeros((), dtype=acc, device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        for s in range(0, x.shape[0], chunk):
            logits = _upcast(x[s:s + chunk].to(cd) @ w.t())
            total += _chunk_loss(logits, targets[s:s + chunk], valid_all[s:s + chunk])[1]
    return total * inv_n


def linear_token_nll(x, weight, targets, chunk: int):
    """Per-position cross-entropy (nats, shaped like targets) of logits = x @ weight.T, `chunk`
    positions of logits at a time: evaluation's share of model.loss_chunk (no gradients kept)."""
    x2, t2 = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    parts = [F.cross_entropy(_upcast(F.linear(x2[s:s + chunk], weight)), t2[s:s + chunk], reduction="none")
             for s in range(0, x2.shape[0], chunk)]
    return torch.cat(parts).view_as(targets)


def linear_cross_entropy(x, weight, targets, chunk: int, ignore_index: int = IGNORE_INDEX):
    """linear_cross_entropy_ref's value and gradients, `chunk` tokens of logits at a time.
    x [..., d], weight [V, d], targets [...] (ignore_index positions count for nothing)."""
    if chunk <= 0:
        raise ValueError(f"linear_cross_entropy: chunk must be > 0, got {chunk}")
    x2, t2 = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    if x2.shape[0] != t2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {x2.shape[0]} positions but {t2.shape[0]} targets")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedLinearCE.apply(x2, weight, t2, chunk, ignore_index)
    return _chunked_loss_no_grad(x2, weight, t2, chunk, ignore_index)
