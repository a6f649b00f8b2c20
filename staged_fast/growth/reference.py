"""Plain-PyTorch reference of the growth kernels, built the seed's way: zeros blocks and torch.cat.

It follows staged_fast/growth/index_maps.py tile by tile and computes in the same arithmetic as the
C++/CUDA kernels (float32, or float64 for float64 tensors), so the two agree bit for bit; the tests
hold both against `index_maps.apply_gather`. It allocates the temporaries the fused kernels avoid.
"""
from __future__ import annotations

import torch

from .index_maps import Tiling


def grow_tensor_reference(
    src: torch.Tensor, tiling: Tiling, scale: float = 1.0, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """The grown tensor (flat, tiling.dst_numel elements) of `src` by tiling, scale and optional noise."""
    t = tiling
    if src.numel() != t.src_numel:
        raise ValueError(f"src has {src.numel()} elements, the tiling needs {t.src_numel}")
    acc = torch.promote_types(src.dtype, torch.float32)
    x = src.reshape(t.groups, t.rows, t.cols)
    if noise is not None:
        noise = noise.reshape(t.noise_shape()).to(acc)
    groups = []
    for g in range(t.groups):
        if scale == 0.0:
            value = torch.zeros(t.rows, t.cols, dtype=acc, device=src.device)
        else:
            value = x[g].to(acc) * scale
        row_blocks = []
        for rh in range(t.row_halves):
            tiles = []
            for ch in range(t.col_halves):
                diagonal = not t.block_diagonal or rh == ch
                tile = value if diagonal else torch.zeros_like(value)
                if noise is not None:  # the block row [W - E, E]
                    tile = tile - noise[g, rh] if diagonal else noise[g, rh].clone()
                tiles.append(tile)
            row_blocks.append(torch.cat(tiles, dim=1))
        groups.append(torch.cat(row_blocks, dim=0))
    return torch.cat(groups, dim=0).to(src.dtype).reshape(-1)


def row_range(tiling: Tiling, rows: tuple[int, int] | None) -> tuple[int, int]:
    """(begin, end) of the destination rows a call writes (None: all `tiling.dst_rows`), checked."""
    begin, end = (0, tiling.dst_rows) if rows is None else rows
    if not 0 <= begin <= end <= tiling.dst_rows:
        raise ValueError(f"invalid destination row range [{begin}, {end}): the tiling has {tiling.dst_rows} "
                         f"destination rows (0 <= row_begin <= row_end <= rows)")
    return begin, end


def grow_tiles_reference(srcs, dsts, scales, tiling: Tiling, noise: torch.Tensor | None = None,
                         rows: tuple[int, int] | None = None) -> None:
    """Same contract as the fused op staged_fast::grow_tiles_: writes into preallocated `dsts`, which hold the
    destination rows `rows` = (begin, end) only (None: all); it builds each whole grown tensor, then slices."""
    begin, end = row_range(tiling, rows)
    for i, (s, d, k) in enumerate(zip(srcs, dsts, scales)):
        grown = grow_tensor_reference(s, tiling, k, noise if i == 0 else None)
        d.view(-1).copy_(grown.view(tiling.dst_rows, tiling.dst_cols)[begin:end].reshape(-1))
