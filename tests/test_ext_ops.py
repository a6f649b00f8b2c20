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
