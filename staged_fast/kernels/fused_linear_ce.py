"""Fused LM head + cross-entropy: mean CE of logits = hidden @ weight.T without the (N, V) logits.

    loss = sum_{i: t_i != ignore} (logsumexp(z_i) - z_i[t_i]) / n_valid,     z = hidden @ weight.T

The tokens are processed in chunks of C rows. Per chunk: z = h_c @ W^T (torch matmul, cuBLAS); one
Triton program per row computes logsumexp over V in BLOCK_V slices (online max/sum in fp32), the row
loss, and overwrites z in place with the *unnormalised* dL_i/dz_i = softmax(z_i) - onehot(t_i) (zero for
ignored rows); then grad_h_c = dz @ W and grad_W += dz^T @ h_c (torch matmuls, fp32 outputs). So the
gradients are computed during the forward (as Liger-Kernel does); the backward applies the incoming
grad_output and 1/n_valid together, in fp32, and casts once. Why not scale by 1/n in the forward:
under fp16 the loss scale (GradScaler's 65536) arrives only in the backward, and dz/n rounded to fp16
first loses the small softmax entries (below fp16's smallest subnormal at V=50257, N=8192); dz itself
is in [-1, 1], where fp16 keeps ~3 digits down to 6e-8, as torch's own fp16 logits gradient does.

Memory (N tokens, V vocab, d hidden, e bytes per element of the inputs' dtype):
  chunk logits C x V x e with C ~ N / 8 (see TARGET_CHUNKS; GPT-2, 16k tokens, bf16: 2048 x 50257 x 2 B
  = 206 MB); grad_hidden N x d fp32 (50 MB at 16k x 768); grad_weight V x d fp32 (154 MB at d=768).
  Unfused: N x V logits in e bytes, plus an fp32 copy and its fp32 gradient (16k tokens: ~8 GB).
Out-of-range targets (not in [0, V) and not ignore_index) make the loss NaN instead of raising,
because checking them on the host would synchronize the GPU every step.
When nothing needs a gradient (eval), only the loss is computed (no gradient buffers).
With all targets ignored the loss is NaN (0/0), as F.cross_entropy's mean.
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from ._common import INTERPRETED, cdiv, check_device, check_dtype, new_empty, next_power_of_2


@triton.jit
def _ce_row_kernel(
    Z, stride_z, Targets, Loss,
    V, V_pad, ignore_index,
    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Row loss, and (WRITE_GRAD) dL/dz written over the logits row Z in place."""
    row = tl.program_id(0).to(tl.int64)
    z_ptr = Z + row * stride_z
    t = tl.load(Targets + row)
    ignored = t == ignore_index
    in_range = (t >= 0) & (t < V)
    cols = tl.arange(0, BLOCK_V)
    # Pass 1: running max m and rescaled sum s of exp(z - m), in fp32.
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        z = tl.load(z_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    z_t = tl.load(z_ptr + tl.where(in_range, t, 0)).to(tl.float32)
    loss = tl.where(ignored, 0.0, tl.where(in_range, lse - z_t, float("nan")))
    tl.store(Loss + row, loss)
    if WRITE_GRAD:
        # Pass 2: dz = softmax - onehot (1/n_valid is applied in the backward); zero for ignored rows.
        scale = tl.where(ignored, 0.0, 1.0)
        for start in range(0, V_pad, BLOCK_V):  # the padded columns get 0: no gradient flows there
            offs = start + cols
            z = tl.load(z_ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
            g = tl.where(offs < V, tl.exp(z - lse) - tl.where(offs == t, 1.0, 0.0), 0.0)
            tl.store(z_ptr + offs, (g * scale).to(Z.dtype.element_ty), mask=offs < V_pad)


# Chunking. Every chunk adds its dz^T @ h_c into the (V, d) fp32 grad_weight, a read-modify-write of
# V x d x 4 bytes (154 MB at GPT-2 base), so the chunk count, not the chunk size, costs time: 8 chunks
# keep that traffic well under the matmuls' time while the chunk logits stay at N x V / 8 elements,
# a small fraction of the unfused path's N x V logits + fp32 copy + fp32 gradient. Rows are rounded up
# to a multiple of 128 for the matmuls (16 under the interpreter, so CPU tests cross chunk borders).
TARGET_CHUNKS = 8
VOCAB_ALIGN = 64  # rows of W padded to this multiple for aligned (fast) cuBLAS kernels
ROW_MULTIPLE = 16 if INTERPRETED else 128


def _chunk_rows(n: int) -> int:
    rows = cdiv(cdiv(n, TARGET_CHUNKS), ROW_MULTIPLE) * ROW_MULTIPLE
    return max(1, min(n, rows))


_FP32_OUTPUT_MODE: dict[tuple[torch.device, torch.dtype], str] = {}


def _probe(fn, x, y, expected) -> bool:
    try:
        return bool(torch.allclose(fn(x, y), expected, rtol=1e-3, atol=1e-3))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def fp32_output_mode(device: torch.device, dtype: torch.dtype) -> str:
    """How cuBLAS writes a 16-bit product into fp32 on this torch, probed once per (device, dtype):
      "addmm": torch.addmm(out_dtype=float32) accumulates into an fp32 buffer (newer torch);
      "mm":    only torch.mm(out_dtype=float32), where addmm refuses an fp32 addend (torch 2.11 on an
               H200 did; some versions check "self and mat2 must have the same dtype"): exact fp32
               products, and an fp32 temporary added for the accumulating GEMMs;
      "cast":  neither: 16-bit products converted (a 16-bit temporary, products rounded), with a warning.
    Off CUDA (no such kernels in torch) always "cast".
    """
    key = (device, dtype)
    mode = _FP32_OUTPUT_MODE.get(key)
    if mode is None:
        mode = probe_fp32_output_mode(device, dtype) if device.type == "cuda" else "cast"
        if mode == "cast" and device.type == "cuda":
            warnings.warn(
                f"fused linear+CE: torch {torch.__version__} cannot write {dtype} matmuls into fp32 "
                "(neither torch.addmm nor torch.mm take out_dtype=torch.float32 here); falling back to a "
                "16-bit product plus a conversion (slower, one extra (V, d) temporary). Use torch >= 2.8."
            )
        _FP32_OUTPUT_MODE[key] = mode
    return mode


def probe_fp32_output_mode(device: torch.device, dtype: torch.dtype) -> str:
    """The first of "addmm", "mm" that gives the exact fp32 product of small dtype matrices on device, else
    "cast". Autocast is off inside: the first call comes from a training step under autocast, where the
    fp32 reference product came out 16-bit and both modes were judged missing (the slow fallback ran)."""
    with torch.autocast(device.type, enabled=False):
        # Small integers: exact in 16 bits, and no draw from torch's RNG.
        x = (torch.arange(64 * 32, device=device) % 7 - 3).reshape(64, 32).to(dtype)
        y = (torch.arange(32 * 48, device=device) % 5 - 2).reshape(32, 48).to(dtype)
        product = x.float() @ y.float()

        def addmm(a, b):
            z = torch.ones(64, 48, device=device)
            return torch.addmm(z, a, b, out_dtype=torch.float32, out=z)

        if _probe(addmm, x, y, 1 + product):
            return "addmm"
        if _probe(lambda a, b: torch.mm(a, b, out_dtype=torch.float32, out=torch.empty_like(product)), x, y, product):
            return "mm"
    return "cast"


def _matmul_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (fp32) = a @ b, or out += a @ b, for a, b of any one float dtype."""
    if a.dtype == torch.float32:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    mode = fp32_output_mode(out.device, a.dtype)
    if mode == "addmm":
        torch.addmm(out, a, b, beta=1 if accumulate else 0, out_dtype=torch.float32, out=out)
    elif mode == "mm":
        if accumulate:
            out += torch.mm(a, b, out_dtype=torch.float32)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=out)
    elif accumulate:
        out += (a @ b).float()
    else:
        out.copy_(a @ b)


def _check(hidden, weight, targets):
    op = "fused_linear_cross_entropy"
    check_device(op, hidden, weight, targets)
    check_dtype(op, hidden, "hidden")
    check_dtype(op, weight, "weight")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden must be (N, d) and weight (V, d), got {tuple(hidden.shape)} and {tuple(weight.shape)}."
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{op}: hidden and weight dtypes differ ({hidden.dtype} vs {weight.dtype}); cast one.")
    if targets.shape != (hidden.shape[0],) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{op}: targets must be an integer tensor of shape ({hidden.shape[0]},), "
            f"got {tuple(targets.shape)} {targets.dtype}."
        )


def linear_cross_entropy_forward(hidden, weight, targets, ignore_index: int = -100, compute_grad: bool = True,
                                 chunk_rows: int | None = None):
    """Returns (loss, grad_hidden, grad_weight, inv_n): loss a 0-dim fp32 tensor; the gradients of
    n_valid * loss (unnormalised: multiply by inv_n = 1 / n_valid, a (1,) fp32 tensor, for the
    gradient of the loss), both fp32, or None when compute_grad is False. Runs with autocast off (the
    op's body inherits the caller's): every matmul here has its dtypes chosen, and autocast would
    recast them."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _forward(hidden, weight, targets, ignore_index, compute_grad, chunk_rows)


def _forward(hidden, weight, targets, ignore_index, compute_grad, chunk_rows):
    _check(hidden, weight, targets)
    n, d = hidden.shape
    v = weight.shape[0]
    device = hidden.device
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    targets = targets.contiguous()
    losses = new_empty((n,), dtype=torch.float32, device=device)
    n_valid = (targets != ignore_index).sum().to(torch.float32)
    inv_n = (1.0 / n_valid).reshape(1)  # a device scalar: no host sync
    # The vocabulary is padded to a multiple of VOCAB_ALIGN rows of zeros: GPT-2's 50257 makes every
    # matmul's leading dimension odd, and cuBLAS then falls back to slow unaligned kernels (an H200 ran
    # the chunk GEMMs in sm75 cutlass kernels, 65% of the op's time). One copy of W per call buys that.
    v_pad = cdiv(v, VOCAB_ALIGN) * VOCAB_ALIGN
    w = weight if v_pad == v else torch.nn.functional.pad(weight, (0, 0, 0, v_pad - v))
    grad_h = new_empty((n, d), dtype=torch.float32, device=device) if compute_grad else None
    grad_w = new_empty((v_pad, d), dtype=torch.float32, device=device) if compute_grad else None
    block_v = min(1024 if INTERPRETED else 8192, next_power_of_2(v))
    warps = 4 if INTERPRETED else 16 if block_v >= 8192 else 8
    c = chunk_rows or _chunk_rows(n)
    for start in range(0, n, c):
        h_c = hidden[start:start + c]
        z = h_c @ w.t()  # (C, V_pad) in the inputs' dtype, fp32 accumulation in cuBLAS
        _ce_row_kernel[(h_c.shape[0],)](
            z, z.stride(0), targets[start:start + c], losses[start:start + c],
            v, v_pad, ignore_index,
            WRITE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=warps,
        )
        if compute_grad:
            _matmul_fp32(grad_h[start:start + c], z, w, accumulate=False)
            _matmul_fp32(grad_w, z.t(), h_c, accumulate=start > 0)  # the first chunk initialises it
    loss = losses.sum() * inv_n[0]
    return loss, grad_h, (grad_w[:v] if compute_grad else None), inv_n


# ---- torch.library ops (opaque for torch.compile) and autograd ----


@torch.library.custom_op("staged_fast::linear_cross_entropy_loss", mutates_args=())
def _loss_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return linear_cross_entropy_forward(hidden, weight, targets, ignore_index, compute_grad=False)[0]


@torch.library.custom_op("staged_fast::linear_cross_entropy", mutates_args=())
def _loss_grad_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return linear_cross_entropy_forward(hidden, weight, targets, ignore_index, compute_grad=True)


@_loss_op.register_fake
def _(hidden, weight, targets, ignore_index):
    return hidden.new_empty((), dtype=torch.float32)


@_loss_grad_op.register_fake
def _(hidden, weight, targets, ignore_index):
    f32 = torch.float32
    return (hidden.new_empty((), dtype=f32), hidden.new_empty(hidden.shape, dtype=f32),
            weight.new_empty(weight.shape, dtype=f32), hidden.new_empty((1,), dtype=f32))


def _setup(ctx, inputs, output):
    hidden, weight, _, _ = inputs
    _, grad_h, grad_w, inv_n = output
    ctx.mark_non_differentiable(grad_h, grad_w, inv_n)
    ctx.save_for_backward(grad_h, grad_w, inv_n)
    ctx.dtypes = (hidden.dtype, weight.dtype)


def _backward(ctx, grad_loss, _gh, _gw, _inv_n):
    grad_h, grad_w, inv_n = ctx.saved_tensors
    scale = grad_loss.to(torch.float32) * inv_n[0]  # loss scale and 1/n_valid meet in fp32
    h_dtype, w_dtype = ctx.dtypes
    return (grad_h * scale).to(h_dtype), (grad_w * scale).to(w_dtype), None, None


_loss_grad_op.register_autograd(_backward, setup_context=_setup)


def fused_linear_cross_entropy(hidden, weight, targets, ignore_index: int = -100):
    """Mean cross-entropy of hidden (N, d) @ weight (V, d).T against targets (N,), as a 0-dim fp32 tensor.

    Under autocast, hidden and weight are cast to the autocast dtype first (as F.linear would be), so
    the matmuls run on tensor cores; the softmax statistics stay fp32.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    _check(hidden, weight, targets)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _loss_grad_op(hidden, weight, targets, int(ignore_index))[0]
    return _loss_op(hidden, weight, targets, int(ignore_index))


def linear_cross_entropy_reference(hidden, weight, targets, ignore_index: int = -100):
    """Plain PyTorch: full logits, then F.cross_entropy in fp32 (the torch backend's path; fp64 stays fp64)."""
    logits = hidden @ weight.t()
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index)
