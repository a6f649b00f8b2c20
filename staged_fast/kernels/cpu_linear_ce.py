"""The LM head + cross-entropy for CPU training: logits computed transposed, the gradient made in the forward.

Why (measured on AVX-512 x86 with MKL, `benchmarks/bench_kernels.py --only linear_ce_cpu`): at the training
shapes (N = B*T of a few hundred tokens, d a few hundred, V = 50257) MKL runs `W @ h.T` (a tall V x N
output) ~1.7x faster than the usual `h @ W.T` (a wide N x V output), and a row-major (V, N) block makes the
softmax a reduction over rows that vectorises across the N samples. Making the gradient in the forward
(softmax - one-hot, already divided by the number of counted targets) needs one (V, N) buffer instead of the
logits, the log-probabilities and their gradient, and the backward is then two plain GEMMs.

With a tied embedding (GPT-2) the LM head's weight gradient is also the buffer the embedding's gradient rows
are added into (`tied_embedding`): the usual path zero-fills a dense (V, d) embedding gradient and then adds
it to the head's, two more passes over 50257 x d floats per update for a few hundred rows.

Used by `kernels.linear_cross_entropy` on the torch backend for CPU tensors of float32/float64 when a
gradient is wanted and CPU autocast is off; everything else (evaluation, autocast) keeps F.linear +
F.cross_entropy, the reference this path is tested against (tests/test_kernels_linear_ce.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _cpu_training(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def eligible(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the transposed CPU path serves this call (else the plain F.linear + F.cross_entropy)."""
    return (_cpu_training(hidden) and weight.device.type == "cpu" and weight.dtype == hidden.dtype
            and (hidden.requires_grad or weight.requires_grad))


def tied_eligible(weight: torch.Tensor) -> bool:
    """Whether a tied embedding + LM head of `weight` can share one gradient buffer in this forward."""
    return _cpu_training(weight) and weight.requires_grad


class HeadGradLink:
    """Hands the LM head's weight gradient to the tied embedding's backward, which runs after it (the
    embedding is the first op of the graph, the head the last) and drops the reference again, so the
    autograd engine's AccumulateGrad can take the buffer as the parameter's .grad without a copy."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad = None


class TiedEmbedding(torch.autograd.Function):
    """F.embedding whose weight gradient rows go into the head's weight gradient in place (see HeadGradLink)."""

    @staticmethod
    def forward(ctx, weight, idx, link):
        ctx.save_for_backward(idx)
        ctx.link = link
        ctx.weight_meta = (weight.shape, weight.dtype, weight.device)
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (idx,) = ctx.saved_tensors
        shape, dtype, device = ctx.weight_meta
        rows = grad_out.reshape(-1, shape[1]).to(dtype)
        grad, ctx.link.grad = ctx.link.grad, None
        if grad is None:  # the head made no weight gradient (this graph had no head): a dense one as usual
            return torch.zeros(shape, dtype=dtype, device=device).index_add_(0, idx.reshape(-1), rows), None, None
        grad.index_add_(0, idx.reshape(-1), rows)
        return None, None, None  # already inside the head's gradient, which the engine accumulates


def tied_embedding(weight, idx, link: HeadGradLink):
    return TiedEmbedding.apply(weight, idx, link)


def loss_and_grad_logits_t(hidden, weight, targets, ignore_index: int = -100):
    """(loss, g) with g (V, N) the gradient of the mean loss with respect to the transposed logits W @ h.T.

    Mean over targets != ignore_index, like F.cross_entropy (NaN when none is counted, as it is).
    """
    n = hidden.shape[0]
    g = weight @ hidden.t()  # (V, N): the logits, overwritten in place by their gradient below
    valid = targets != ignore_index
    cols = torch.arange(n, device=hidden.device)
    rows = torch.where(valid, targets, 0)
    target_logit = g[rows, cols]
    m = g.amax(dim=0)
    g.sub_(m).exp_()
    total = g.sum(dim=0)
    per_token = total.log() + m - target_logit
    n_valid = valid.sum().to(g.dtype)
    loss = torch.where(valid, per_token, 0).sum() / n_valid
    # softmax / n_valid, minus 1 / n_valid at the target; ignored columns contribute nothing
    scale = torch.where(valid, 1.0 / (total * n_valid), 0)
    g.mul_(scale)
    g[rows[valid], cols[valid]] -= 1.0 / n_valid
    return loss, g


class TransposedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, link):
        loss, g = loss_and_grad_logits_t(hidden, weight, targets, ignore_index)
        ctx.save_for_backward(hidden, weight, g)
        ctx.link = link
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, g = ctx.saved_tensors
        grad_hidden = grad_weight = None
        # the loss scale goes onto the small (N, d) operands, never over the (V, N) block
        if ctx.needs_input_grad[0]:
            grad_hidden = (g.t() @ weight).mul_(grad_loss)
        if ctx.needs_input_grad[1]:
            grad_weight = g @ (hidden * grad_loss)
            if ctx.link is not None:
                ctx.link.grad = grad_weight
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy_cpu(hidden, weight, targets, ignore_index: int = -100, link: HeadGradLink | None = None):
    """Mean cross-entropy of hidden (N, d) @ weight (V, d).T against targets (N,), CPU training layout.
    With `link`, the weight gradient is also handed to the tied embedding that shares `weight`."""
    return TransposedLinearCrossEntropy.apply(hidden, weight, targets, int(ignore_index), link)
