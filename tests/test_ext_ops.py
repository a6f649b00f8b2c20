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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel needs a GPU: benchmarks/gpu_check.sh runs "
                    "this test there (step tests_ext)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case,with_noise", [(c, False) for c in CASES] + [
    (c, True) for c in CASES if im.width_rule(*c).noise  # noise splits block-diagonal tilings only
], ids=lambda v: f"{v[0].split('.')[-2]}-{'x'.join(map(str, v[1]))}" if isinstance(v, tuple) else f"noise{v}")
def test_cuda_kernel_is_bit_equal_to_cpu(case, dtype, with_noise):
    """The CUDA grow_tiles_ (vectorised where columns and pointers allow, 32-bit indices where they fit)
    writes exactly what the CPU kernel writes, for the parameter and both Adam moments, output poisoned."""
    name, shape, n_embd = case
    rule = im.width_rule(name, shape, n_embd)
    g = torch.Generator().manual_seed(1000 * len(name) + shape[0])
    src = [torch.randn(shape, generator=g).to(dtype) for _ in range(2)] + [torch.rand(shape, generator=g).to(dtype)]
    scales = [1.0, 0.5, 0.25]
    noise = torch.randn(rule.tiling.noise_shape(), generator=g) * 0.01 if with_noise else None
    args = (*rule.tiling.as_args(), noise)
    cpu_dst = [torch.full(rule.dst_shape, float("nan"), dtype=dtype) for _ in src]
    torch.ops.staged_fast.grow_tiles_(src, cpu_dst, scales, *args)
    gpu_dst = [torch.full(rule.dst_shape, float("nan"), dtype=dtype, device="cuda") for _ in src]
    gpu_args = (*rule.tiling.as_args(), noise.cuda() if noise is not None else None)
    torch.ops.staged_fast.grow_tiles_([s.cuda() for s in src], gpu_dst, scales, *gpu_args)
    for c, d in zip(cpu_dst, gpu_dst):
        assert torch.equal(c, d.cpu()), f"{name} {dtype}: CUDA differs from CPU"
