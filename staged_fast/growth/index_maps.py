"""The one definition of where every element of a grown tensor comes from, and with which scale.

Width doubling writes every grown tensor as a grid of tiles of its source. A source tensor is viewed as
(G, R, C): G groups (3 for c_attn: q, k, v; 1 otherwise), R rows, C columns (1-D tensors are (G, 1, n)).
Its grown tensor is viewed as (G, RH, R, CH, C): RH row halves and CH column halves (1 or 2 each).
Tile (g, rh, ch) holds

    scale * src[g]                 when not block_diagonal, or rh == ch   (a "diagonal" tile)
    exact +0.0                     when block_diagonal and rh != ch        (an "off-diagonal" tile)

and with noise E (G, RH, R, C) (weights of block-diagonal kinds only, width_noise > 0) each block row
is split function-preservingly into [W - E, E]: diagonal tiles get `scale * src - E[g, rh]`,
off-diagonal tiles get `E[g, rh]`. A scale of exactly 0 writes +0.0 without reading the source.

This module drives everything else: `reference.py` builds the tiles with torch.cat, the C++/CUDA
kernels (csrc/grow_tiles.h) take the six Tiling integers below and implement the same formula, and the
tests compare both with `gather_index`, an element-by-element map built from the definition above.

Optimizer state follows the gradient, not the value. On the grown model at the symmetric point, the
gradient of a duplicated element is `grad_scale` times the small model's gradient of its source (1/2
for every kind: both copies feed the loss equally; 1 for ln_f, whose two halves each feed the logits
with the full small gradient because the tied head sums them). Adam's state is therefore mapped with
exp_avg * grad_scale and exp_avg_sq * grad_scale**2, which keeps m / sqrt(v) (the update direction)
of every copied element equal to its source's. Off-diagonal tiles get zero state (their weight is 0).
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch


class Kind(enum.Enum):
    EMBEDDING = "embedding"  # wte, wpe (V, E) -> (V, 2E): [W, W] along the hidden dim
    VECTOR = "vector"  # ln_1/ln_2 gamma/beta, c_fc/c_proj biases (n,) -> (2n,): [b, b]
    LN_F = "ln_f"  # final layer norm (E,) -> (2E,): [b, b] / 2 (the tied head sums the halves)
    MATRIX = "matrix"  # attn c_proj, mlp c_fc, mlp c_proj (R, C) -> (2R, 2C): [[W, 0], [0, W]]
    QKV_WEIGHT = "qkv_weight"  # c_attn (3E, E) -> (6E, 2E): block diagonal per q, k, v
    QKV_BIAS = "qkv_bias"  # c_attn bias (3E,) -> (6E,): [bq, bq, bk, bk, bv, bv]
    COPY = "copy"  # depth growth: a copy (scale 1) or zeros (scale 0) of one tensor


@dataclass(frozen=True)
class Tiling:
    """Source (groups, rows, cols) -> destination (groups, row_halves, rows, col_halves, cols)."""

    groups: int
    rows: int
    cols: int
    row_halves: int
    col_halves: int
    block_diagonal: bool

    @property
    def src_numel(self) -> int:
        return self.groups * self.rows * self.cols

    @property
    def dst_numel(self) -> int:
        return self.src_numel * self.row_halves * self.col_halves

    @property
    def dst_rows(self) -> int:
        """Rows of the destination viewed as 2-D (G*RH*R, CH*C); a kernel call may write a range of them."""
        return self.groups * self.row_halves * self.rows

    @property
    def dst_cols(self) -> int:
        return self.col_halves * self.cols

    def as_args(self) -> tuple[int, int, int, int, int, bool]:
        """The arguments the C++/CUDA kernels take, in their order."""
        return (self.groups, self.rows, self.cols, self.row_halves, self.col_halves, self.block_diagonal)

    def noise_shape(self) -> tuple[int, int, int, int]:
        return (self.groups, self.row_halves, self.rows, self.cols)


@dataclass(frozen=True)
class Rule:
    """How one parameter grows: its tiling, the scale of the value and of the gradient (and so the state)."""

    kind: Kind
    tiling: Tiling
    src_shape: tuple[int, ...]
    dst_shape: tuple[int, ...]
    param_scale: float = 1.0
    grad_scale: float = 0.5
    noise: bool = False  # accepts the [W - E, E] split

    @property
    def exp_avg_scale(self) -> float:
        return self.grad_scale

    @property
    def exp_avg_sq_scale(self) -> float:
        return self.grad_scale**2


# llama (staged_fast/llama.py): q/k/v and SwiGLU gate/up projections grow block-diagonally like c_fc; its
# o_proj/down_proj are named c_proj, its RMSNorm weights are 1-D ".weight" (VECTOR, ln_f: LN_F).
LLAMA_MATRICES = (".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".gate_proj.weight", ".up_proj.weight")


def width_rule(name: str, shape: tuple[int, ...], n_embd: int) -> Rule:
    """The width-doubling rule of parameter `name` (our GPT's names) with source `shape`."""
    shape = tuple(shape)
    E = n_embd
    if name in ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"):
        n, e = shape
        return Rule(Kind.EMBEDDING, Tiling(1, n, e, 1, 2, False), shape, (n, 2 * e))
    if name.startswith("transformer.ln_f."):
        return Rule(Kind.LN_F, Tiling(1, 1, shape[0], 2, 1, False), shape, (2 * shape[0],), 0.5, 1.0)
    if name.endswith("attn.c_attn.weight"):
        return Rule(Kind.QKV_WEIGHT, Tiling(3, E, shape[1], 2, 2, True), shape, (6 * E, 2 * shape[1]), noise=True)
    if name.endswith("attn.c_attn.bias"):
        return Rule(Kind.QKV_BIAS, Tiling(3, 1, E, 2, 1, False), shape, (6 * E,))
    if name.endswith((".c_proj.weight", ".c_fc.weight") + LLAMA_MATRICES):
        r, c = shape
        return Rule(Kind.MATRIX, Tiling(1, r, c, 2, 2, True), shape, (2 * r, 2 * c), noise=True)
    if name.endswith((".bias", ".weight")) and len(shape) == 1:
        return Rule(Kind.VECTOR, Tiling(1, 1, shape[0], 2, 1, False), shape, (2 * shape[0],))
    raise KeyError(f"no width-growth rule for parameter {name!r} of shape {shape}")


def dim0_tiling(rule: Rule) -> Tiling:
    """The rule's tiling with destination rows = dim 0 of `rule.dst_shape` (the dim FSDP shards), so that one
    rank's shard is a destination row range of the kernels. A 2-D tensor's tiling already is; a 1-D tensor's
    (one source row, one column half: (G, 1, n) -> (G, RH, 1, 1, n)) is rewritten as the same element map with
    one element per row, (G, n, 1) -> (G, RH, n, 1, 1); its noise layout (G, RH, n) is unchanged."""
    t = rule.tiling
    if len(rule.dst_shape) == 1 and t.rows == 1 and t.col_halves == 1:
        t = Tiling(t.groups, t.cols, 1, t.row_halves, 1, t.block_diagonal)
    if t.dst_rows != rule.dst_shape[0] or t.dst_numel != math.prod(rule.dst_shape):
        raise ValueError(f"the {rule.kind.value} tiling {t} does not have dim 0 of {rule.dst_shape} as its rows")
    return t


def copy_rule(shape: tuple[int, ...], scale: float) -> Rule:
    """Depth growth: the inserted layer's tensor is `scale * src` (scale 1: copy, 0: zeros)."""
    n = 1
    for s in shape:
        n *= s
    return Rule(Kind.COPY, Tiling(1, 1, n, 1, 1, False), tuple(shape), tuple(shape), scale, scale)


# ---------------------------------------------------------------------------------------------- depth
DEPTH_MODES = ("alternate_copy", "append_copy", "alternate_id", "append_id")
# Parameters zeroed in an inserted `_id` layer: with both output projections zero a pre-LN block adds
# nothing to the residual stream, so it is an exact identity.
IDENTITY_ZEROED = ("attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


def depth_layer_map(n_layer: int, mode: str) -> list[tuple[int, int, bool]]:
    """[(new_index, old_index, inserted)] for the 2 * n_layer new blocks.

    alternate: old i -> new 2i (the original) and 2i+1 (inserted); append: old i -> i and n+i (inserted).
    """
    if mode not in DEPTH_MODES:
        raise ValueError(f"unknown depth mode {mode!r}; choose one of {', '.join(DEPTH_MODES)}")
    out = []
    for i in range(n_layer):
        if mode.startswith("alternate"):
            out += [(2 * i, i, False), (2 * i + 1, i, True)]
        else:
            out += [(i, i, False), (n_layer + i, i, True)]
    return sorted(out)


def depth_scale(param_suffix: str, inserted: bool, identity: bool) -> float:
    """1.0 (copy) or 0.0 (zero) for a block parameter `param_suffix` (e.g. 'mlp.c_proj.weight')."""
    return 0.0 if inserted and identity and param_suffix in IDENTITY_ZEROED else 1.0


# ------------------------------------------------------------------------------ element-level map
def gather_index(t: Tiling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every destination element (flat, row-major): source flat index (-1 for off-diagonal tiles),
    whether it is a diagonal tile, and the flat index into the noise tensor (G, RH, R, C).

    Built element by element from the definition in the module docstring; used by the tests to check
    the reference and the kernels, and slow on purpose (no tiling shortcuts).
    """
    G, R, C, RH, CH = t.groups, t.rows, t.cols, t.row_halves, t.col_halves
    g = torch.arange(G).view(G, 1, 1, 1, 1)
    rh = torch.arange(RH).view(1, RH, 1, 1, 1)
    r = torch.arange(R).view(1, 1, R, 1, 1)
    ch = torch.arange(CH).view(1, 1, 1, CH, 1)
    c = torch.arange(C).view(1, 1, 1, 1, C)
    shape = (G, RH, R, CH, C)
    diagonal = ((rh == ch) | (not t.block_diagonal)).expand(shape)
    src = (g * R * C + r * C + c).expand(shape)
    src = torch.where(diagonal, src, torch.full_like(src, -1))
    noise = (((g * RH + rh) * R + r) * C + c).expand(shape)
    return src.reshape(-1), diagonal.reshape(-1), noise.reshape(-1)


def apply_gather(src: torch.Tensor, t: Tiling, scale: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The grown tensor by `gather_index` (flat); the definition the tests hold everything against."""
    idx, diagonal, nidx = gather_index(t)
    acc = torch.promote_types(src.dtype, torch.float32)
    flat = src.reshape(-1).to(acc)
    if scale == 0.0:
        vals = torch.zeros(idx.numel(), dtype=acc)
    else:
        vals = torch.where(diagonal, flat[idx.clamp(min=0)] * scale, torch.zeros((), dtype=acc))
    if noise is not None:
        n = noise.reshape(-1).to(acc)[nidx]
        vals = torch.where(diagonal, vals - n, n)
    return vals.to(src.dtype)
