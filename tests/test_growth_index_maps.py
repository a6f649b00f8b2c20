"""The index maps drive everything: the torch.cat reference and the fused C++ kernels must equal the
element-by-element definition (index_maps.apply_gather) bit for bit, on every parameter kind."""
import os

import pytest
import torch

from staged_fast import ops
from staged_fast.growth import index_maps as im
from staged_fast.growth.reference import grow_tensor_reference

# (name, source shape, n_embd): every kind, odd sizes (primes, 1) included.
CASES = [
    ("transformer.wte.weight", (211, 12), 12),
    ("transformer.wpe.weight", (17, 12), 12),
    ("transformer.h.0.ln_1.weight", (12,), 12),
    ("transformer.h.3.mlp.c_fc.bias", (52,), 13),
    ("transformer.ln_f.bias", (12,), 12),
    ("transformer.h.0.attn.c_attn.weight", (39, 13), 13),
    ("transformer.h.0.attn.c_attn.bias", (39,), 13),
    ("transformer.h.1.attn.c_proj.weight", (13, 13), 13),
    ("transformer.h.1.mlp.c_fc.weight", (52, 13), 13),
    ("transformer.h.1.mlp.c_proj.weight", (13, 52), 13),
    ("transformer.h.1.mlp.c_proj.weight", (1, 1), 1),
]
needs_ext = pytest.mark.skipif(os.environ.get("STAGED_FAST_NO_EXT") == "1",
                               reason="installed with STAGED_FAST_NO_EXT=1 (no C++ extension); CI builds it and runs these")


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _bits(t):
    return t.contiguous().view(-1).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("name,shape,n_embd", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reference_and_kernel_equal_index_map(name, shape, n_embd, dtype):
    rule = im.width_rule(name, shape, n_embd)
    src = _rand(shape, dtype, 0)
    for scale in (rule.param_scale, rule.exp_avg_scale, rule.exp_avg_sq_scale, 0.0):
        want = im.apply_gather(src, rule.tiling, scale)
        assert want.numel() == torch.Size(rule.dst_shape).numel()
        assert torch.equal(_bits(grow_tensor_reference(src, rule.tiling, scale)), _bits(want))
        if ops.extension_available("cpu"):
            got = ops.grow_tensor(src, rule.tiling, scale, backend="fused")
            assert torch.equal(_bits(got), _bits(want)), f"{name} scale {scale}"


@needs_ext
@pytest.mark.parametrize("name,shape,n_embd", [c for c in CASES if im.width_rule(*c).noise])
def test_noise_split_bit_exact(name, shape, n_embd):
    rule = im.width_rule(name, shape, n_embd)
    src = _rand(shape, torch.float32, 1)
    noise = _rand(rule.tiling.noise_shape(), torch.float32, 2) * 0.1
    want = im.apply_gather(src, rule.tiling, 1.0, noise)
    assert torch.equal(_bits(grow_tensor_reference(src, rule.tiling, 1.0, noise)), _bits(want))
    assert torch.equal(_bits(ops.grow_tensor(src, rule.tiling, 1.0, noise, backend="fused")), _bits(want))
    # Function preservation of the split: each block row still sums to W along the duplicated input.
    t = rule.tiling
    grown = want.view(t.groups, t.row_halves, t.rows, t.col_halves, t.cols)
    torch.testing.assert_close(grown.sum(3), src.view(t.groups, 1, t.rows, t.cols).expand_as(grown.sum(3)))


@needs_ext
def test_fused_triple_writes_param_and_state_in_one_call():
    rule = im.width_rule("transformer.h.0.attn.c_attn.weight", (3 * 40, 40), 40)
    p, m, v = (_rand((120, 40), torch.float32, s) for s in range(3))
    v = v.abs()
    outs = [torch.empty(rule.dst_shape) for _ in range(3)]
    scales = [rule.param_scale, rule.exp_avg_scale, rule.exp_avg_sq_scale]
    torch.ops.staged_fast.grow_tiles_([p, m, v], outs, scales, *rule.tiling.as_args(), None)
    for src, out, s in zip((p, m, v), outs, scales):
        assert torch.equal(out.view(-1), im.apply_gather(src, rule.tiling, s))


def test_zero_scale_writes_positive_zero():
    rule = im.copy_rule((4,), 0.0)
    src = torch.tensor([-0.0, float("nan"), -1.0, 2.0])
    for out in [grow_tensor_reference(src, rule.tiling, 0.0)] + (
        [ops.grow_tensor(src, rule.tiling, 0.0, backend="fused")] if ops.extension_available() else []
    ):
        assert torch.equal(_bits(out), torch.zeros(4, dtype=torch.int32))


def test_depth_layer_maps():
    assert im.depth_layer_map(2, "alternate_id") == [(0, 0, False), (1, 0, True), (2, 1, False), (3, 1, True)]
    assert im.depth_layer_map(2, "append_copy") == [(0, 0, False), (1, 1, False), (2, 0, True), (3, 1, True)]
    assert im.depth_scale("mlp.c_proj.bias", True, True) == 0.0
    assert im.depth_scale("mlp.c_proj.bias", True, False) == 1.0
    assert im.depth_scale("attn.c_attn.weight", True, True) == 1.0
    with pytest.raises(ValueError, match="alternate_copy"):
        im.depth_layer_map(2, "sideways")


def test_state_scales_follow_gradient_scale():
    vec = im.width_rule("transformer.h.0.ln_1.weight", (8,), 8)
    lnf = im.width_rule("transformer.ln_f.weight", (8,), 8)
    assert (vec.param_scale, vec.exp_avg_scale, vec.exp_avg_sq_scale) == (1.0, 0.5, 0.25)
    assert (lnf.param_scale, lnf.exp_avg_scale, lnf.exp_avg_sq_scale) == (0.5, 1.0, 1.0)
