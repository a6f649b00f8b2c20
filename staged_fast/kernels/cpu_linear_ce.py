"""The LM head + cross-entropy for CPU training: logits computed transposed, in vocabulary blocks.

Why (measured on AVX-512 x86 with MKL, `benchmarks/bench_kernels.py --only linear_ce_cpu`): at the training
shapes (N = B*T of a few hundred tokens, d a few hundred, V = 50257) MKL runs `W @ h.T` (a tall V x N
output) ~1.7x faster than the usual `h @ W.T` (a wide N x V output), and a row-major (V, N) block makes the
softmax a reduction over rows that vectorises across the N samples. The forward makes the logits one block
of ~4 MB of vocabulary rows at a time and exponentiates each block against its own column max while it is
still in cache; what normalises the softmax (one scale per block and column), 1/n_valid and the incoming
loss scale are folded into the small (N, d) operands of the backward's two GEMMs per block, and the one-hot
part is N row updates, so no pass over the (V, N) buffer normalises it. One (V, N) buffer is kept instead of
the logits, the log-probabilities and their gradient.

With a tied embedding (GPT-2) the LM head's weight gradient is also the buffer the embedding's gradient rows
are added into (`tied_embedding`): the usual path zero-fills a dense (V, d) embedding gradient and then adds
it to the head's, two more passes over 50257 x d floats per update for a few hundred rows.

Used by `kernels.linear_cross_entropy` on the torch backend for CPU tensors of float32/float64 when a
gradient is wanted, CPU autocast is off and nothing is being compiled; everything else (evaluation,
autocast) keeps F.linear + F.cross_entropy, the reference this path is tested against
(tests/test_cpu_linear_ce.py).
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


BLOCK_BYTES = 1 << 22  # a block of transposed logits stays in L2/L3 between its GEMM and its softmax passes


def block_rows(n: int, vocab: int, itemsize: int) -> int:
    return max(256, min(vocab, BLOCK_BYTES // max(1, n * itemsize)))


def exp_blocks(hidden, weight):
    """The transposed logits W @ h.T made block by block of vocabulary rows, each block exponentiated against its
    own column max while it is still in cache. Returns (e, block_max, block_sum, rows): e (V, N) holds
    exp(logit - block_max[k]) for the rows of block k, block_sum[k] its column sums."""
    n = hidden.shape[0]
    vocab = weight.shape[0]
    rows = block_rows(n, vocab, hidden.element_size())
    e = torch.empty((vocab, n), dtype=hidden.dtype)
    h_t = hidden.t()
    maxes, sums = [], []
    for start in range(0, vocab, rows):
        block = e[start:start + rows]
        torch.mm(weight[start:start + rows], h_t, out=block)
        m = block.amax(dim=0)
        block.sub_(m).exp_()
        maxes.append(m)
        sums.append(block.sum(dim=0))
    return e, torch.stack(maxes), torch.stack(sums), rows


def blocks_of(e, rows):
    return [e[start:start + rows] for start in range(0, e.shape[0], rows)]


class TransposedLinearCrossEntropy(torch.autograd.Function):
    """softmax(W @ h.T) kept as per-block exponentials plus per-block column scales: the probabilities of block k
    are e[k] * scale[k] (scale = exp(block_max - max) / total), so no pass over the (V, N) block normalises it.
    The backward folds scale[k], the loss scale and 1/n_valid into the small (N, d) operands of each block's
    GEMMs and subtracts the one-hot part as N row updates; ignored tokens get a zero scale."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, link):
        e, block_max, block_sum, rows = exp_blocks(hidden, weight)
        valid = targets != ignore_index
        target_rows = torch.where(valid, targets, 0)
        target_logit = (weight[target_rows] * hidden).sum(dim=1)
        top = block_max.amax(dim=0)
        rescale = torch.exp(block_max - top)
        total = (block_sum * rescale).sum(dim=0)
        n_valid = valid.sum().to(hidden.dtype)
        per_token = total.log() + top - target_logit
        loss = torch.where(valid, per_token, 0).sum() / n_valid  # NaN when nothing is counted, as F.cross_entropy
        ctx.save_for_backward(hidden, weight, e, rescale / total, target_rows, valid.to(hidden.dtype) / n_valid)
        ctx.rows, ctx.link = rows, link
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, e, block_scale, target_rows, token_scale = ctx.saved_tensors
        s = token_scale * grad_loss  # (N,): d loss / d logit column, before the softmax - one-hot factor
        e_blocks, w_blocks = blocks_of(e, ctx.rows), blocks_of(weight, ctx.rows)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = -weight[target_rows] * s[:, None] if want_h else None
        grad_weight = torch.empty_like(weight) if want_w else None
        # one walk over the blocks: each block of e feeds both GEMMs while it is in cache
        for k, (e_k, w_k) in enumerate(zip(e_blocks, w_blocks)):
            scale_k = block_scale[k] * s
            if want_h:
                grad_hidden.addcmul_(e_k.t() @ w_k, scale_k[:, None])
            if want_w:
                start = k * ctx.rows
                torch.mm(e_k, hidden * scale_k[:, None], out=grad_weight[start:start + e_k.shape[0]])
        if want_w:
            grad_weight.index_add_(0, target_rows, hidden * -s[:, None])
            if ctx.link is not None:
                ctx.link.grad = grad_weight
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy_cpu(hidden, weight, targets, ignore_index: int = -100, link: HeadGradLink | None = None):
    """Mean cross-entropy of hidden (N, d) @ weight (V, d).T against targets (N,), CPU training layout.
    With `link`, the weight gradient is also handed to the tied embedding that shares `weight`."""
    return TransposedLinearCrossEntropy.apply(hidden, weight, targets, int(ignore_index), link)
