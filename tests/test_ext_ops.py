"""The extension staged_fast._C: it loads, its operator passes torch.library.opcheck (schema, fake
tensor, dispatcher), rejects bad arguments with messages, and the C++ unit test passes."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from staged_fast import ops
from staged_fast.growth import index_maps as im

pytestmark = pytest.mark.skipif(os.environ.get("STAGED_FAST_NO_EXT") == "1",
                                reason="installed with STAGED_FAST_NO_EXT=1 (no C++ extension); CI builds it and runs these")
ROOT = Path(__file__).resolve().parents[1]
ops.extension_available("cpu")  # imports staged_fast._C (if built), which registers torch.ops.staged_fast.*


def test_extension_imports_and_registers():
    import staged_fast._C as ext

    assert ext.with_openmp is True
    assert hasattr(torch.ops.staged_fast, "grow_tiles_")


def test_opcheck():
    rule = im.width_rule("transformer.h.0.mlp.c_fc.weight", (32, 8), 8)
    src = [torch.randn(32, 8), torch.randn(32, 8), torch.rand(32, 8)]
    dst = [torch.empty(rule.dst_shape) for _ in src]
    noise = torch.randn(rule.tiling.noise_shape())
    torch.library.opcheck(torch.ops.staged_fast.grow_tiles_.default,
                          (src, dst, [1.0, 0.5, 0.25], *rule.tiling.as_args(), noise),
                          test_utils=("test_schema", "test_faketensor"))
    part = [torch.empty(9, rule.dst_shape[1]) for _ in src]  # destination rows [20, 29) only
    torch.library.opcheck(torch.ops.staged_fast.grow_tiles_.default,
                          (src, part, [1.0, 0.5, 0.25], *rule.tiling.as_args(), noise, 20, 29),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_arguments_raise():
    t = im.width_rule("transformer.h.0.mlp.c_fc.weight", (32, 8), 8).tiling
    op = torch.ops.staged_fast.grow_tiles_
    with pytest.raises(RuntimeError, match="the tiling writes"):
        op([torch.randn(32, 8)], [torch.empty(10)], [1.0], *t.as_args(), None)
    with pytest.raises(RuntimeError, match="src\\[0\\] is Double"):
        op([torch.randn(32, 8, dtype=torch.float64)], [torch.empty(64, 16)], [1.0], *t.as_args(), None)
    with pytest.raises(RuntimeError, match="same length"):
        op([torch.randn(32, 8)], [torch.empty(64, 16)], [1.0, 2.0], *t.as_args(), None)
    with pytest.raises(RuntimeError, match="invalid tiling"):
        op([torch.randn(32, 8)], [torch.empty(64, 16)], [1.0], 1, 32, 8, 3, 2, True, None)
    # destination row ranges: 0 <= row_begin <= row_end <= 64 rows, dst sized to the range
    for begin, end in ((-1, 3), (5, 4), (60, 65)):
        with pytest.raises(RuntimeError, match="invalid destination row range"):
            op([torch.randn(32, 8)], [torch.empty(max(end - begin, 0), 16)], [1.0], *t.as_args(), None, begin, end)
    with pytest.raises(RuntimeError, match="the tiling writes 48 "):
        op([torch.randn(32, 8)], [torch.empty(4, 16)], [1.0], *t.as_args(), None, 2, 5)
    with pytest.raises(RuntimeError, match="the tiling writes"):  # row_end defaults to every row
        op([torch.randn(32, 8)], [torch.empty(3, 16)], [1.0], *t.as_args(), None, 60)
    with pytest.raises(ValueError, match="invalid destination row range"):  # the reference checks alike
        ops.grow_tiles_([torch.randn(32, 8)], [torch.empty(0, 16)], [1.0], t, rows=(5, 4), backend="reference")


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_cpp_unit_test(tmp_path):
    exe = tmp_path / "test_grow_tiles"
    subprocess.run(["g++", "-O2", "-std=c++17", f"-I{ROOT / 'csrc'}", str(ROOT / "csrc/test_grow_tiles.cpp"),
                    "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    assert "all passed" in out.stdout


def test_extension_is_built():
    """CI installs with the extension; a silently missing build would turn the kernel tests into skips."""
    assert ops.extension_available("cpu"), "staged_fast._C did not build: run pip install --no-build-isolation -e ."


CASES = [  # (parameter name, source shape, n_embd): 16-byte-vectorisable columns and odd ones
    ("transformer.h.0.attn.c_attn.weight", (3 * 64, 64), 64),
    ("transformer.h.0.mlp.c_fc.weight", (4 * 40, 40), 40),
    ("transformer.h.0.mlp.c_proj.weight", (24, 4 * 24), 24),
    ("transformer.h.0.mlp.c_fc.weight", (4 * 13, 13), 13),  # 13 columns: the scalar path
    ("transformer.wte.weight", (101, 48), 48),
    ("transformer.ln_f.weight", (48,), 48),
    ("transformer.h.0.attn.c_attn.bias", (3 * 36,), 36),
]


# every case, and the block-diagonal ones (which noise splits) again with noise
WITH_CASES = pytest.mark.parametrize("case,with_noise", [(c, False) for c in CASES] + [
    (c, True) for c in CASES if im.width_rule(*c).noise
], ids=lambda v: f"{v[0].split('.')[-2]}-{'x'.join(map(str, v[1]))}" if isinstance(v, tuple) else f"noise{v}")
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel needs a GPU: "
                                "benchmarks/gpu_check.sh runs this test there (step tests_ext)")


def _inputs(case, dtype, with_noise):
    """(rule, sources (param, exp_avg, exp_avg_sq), their scales, noise or None) of a CASES entry."""
    name, shape, n_embd = case
    rule = im.width_rule(name, shape, n_embd)
    g = torch.Generator().manual_seed(1000 * len(name) + shape[0])
    src = [torch.randn(shape, generator=g).to(dtype) for _ in range(2)] + [torch.rand(shape, generator=g).to(dtype)]
    noise = torch.randn(rule.tiling.noise_shape(), generator=g) * 0.01 if with_noise else None
    return rule, src, [1.0, 0.5, 0.25], noise


def _row_ranges(rule) -> list[tuple[int, int]]:
    """Destination row ranges of a rule (dim 0 of the grown tensor): halves as 2 ranks' shards, odd ones, empty."""
    n = rule.dst_shape[0]
    return [(0, n), (0, (n + 1) // 2), ((n + 1) // 2, n), (1, n - 1), (n // 3, n // 3 + 1), (n, n), (0, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@WITH_CASES
def test_row_range_is_the_slice_of_the_whole(case, dtype, with_noise):
    """A destination row range (one FSDP shard: dim 0 of the grown tensor, 1-D tensors as one element per row)
    writes exactly those rows of the whole grown tensor, fused and reference alike, output poisoned."""
    rule, src, scales, noise = _inputs(case, dtype, with_noise)
    whole = [torch.full(rule.dst_shape, float("nan"), dtype=dtype) for _ in src]
    ops.grow_tiles_(src, whole, scales, rule.tiling, noise, backend="fused")
    for begin, end in _row_ranges(rule):
        for backend in ("fused", "reference"):
            part = [torch.full((end - begin, *rule.dst_shape[1:]), float("nan"), dtype=dtype) for _ in src]
            ops.grow_tiles_(src, part, scales, im.dim0_tiling(rule), noise, rows=(begin, end), backend=backend)
            for w, p in zip(whole, part):
                assert torch.equal(w[begin:end], p), (backend, begin, end)


@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@WITH_CASES
def test_cuda_kernel_is_bit_equal_to_cpu(case, dtype, with_noise):
    """The CUDA grow_tiles_ (vectorised where columns and pointers allow, 32-bit indices where they fit)
    writes exactly what the CPU kernel writes, for the parameter and both Adam moments, output poisoned:
    whole destinations and destination row ranges (odd row counts, empty ranges)."""
    rule, src, scales, noise = _inputs(case, dtype, with_noise)
    # the rule's own tiling, whole; then the dim-0 tiling (whole: the same tensor) on row ranges
    calls = [(rule.tiling, 0, None)] + [(im.dim0_tiling(rule), b, e) for b, e in _row_ranges(rule)]
    for tiling, begin, end in calls:
        shape = (rule.dst_shape[0] if end is None else end - begin, *rule.dst_shape[1:])
        cpu = [torch.full(shape, float("nan"), dtype=dtype) for _ in src]
        torch.ops.staged_fast.grow_tiles_(src, cpu, scales, *tiling.as_args(), noise, begin, end)
        gpu = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for _ in src]
        torch.ops.staged_fast.grow_tiles_([s.cuda() for s in src], gpu, scales, *tiling.as_args(),
                                          None if noise is None else noise.cuda(), begin, end)
        for c, d in zip(cpu, gpu):
            assert torch.equal(c, d.cpu()), f"{case[0]} {dtype} rows [{begin}, {end}): CUDA differs from CPU"


def test_a_released_storage_is_refused_not_read():
    """A tensor whose memory was released (storage resized to 0, as sharded growth frees old shards) must raise,
    not be read: the shapes still look right, so only the storage size tells."""
    src = torch.randn(4, 8)
    dst = torch.empty(8, 16)
    t = im.Tiling(groups=1, rows=4, cols=8, row_halves=2, col_halves=2, block_diagonal=False)
    src.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match="storage holds 0 bytes"):
        ops.grow_tiles_([src], [dst], [1.0], t, backend="fused")
