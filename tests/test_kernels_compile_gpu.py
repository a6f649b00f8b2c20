"""Every Triton launch of a training step compiles for an H100/H200 (sm_90a), checked without a GPU.

The other kernel tests run Triton's interpreter here, which accepts kernels the real compiler rejects.
benchmarks/compile_check.py steps GPT-2 blocks at head_dim 64/96/128 and a llama block under autocast bf16
and fp16 (and fp32, exact and --tf32, at head_dim 64/96) with each launch turned into a full compile (down
to ptxas) of the launch's own signature; nothing runs. These tests run it as a user would (a subprocess:
this session imported the kernels for the interpreter) and show that it catches what the interpreter lets
through.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every kernel a training step launches (the attention dropout-mask kernel serves tests only).
TRAINING_KERNELS = {
    "_layer_norm_fwd_kernel", "_norm_bwd_kernel", "_sum_partials_kernel", "_attn_fwd_kernel",
    "_attn_bwd_prep_kernel", "_attn_bwd_kernel", "_ce_row_kernel", "_rms_norm_fwd_kernel", "_rope_kernel",
    "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
    "_attn_bwd_dq_kernel",  # the deterministic backward's (torch.use_deterministic_algorithms)
}


def _compiled_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_every_training_launch_compiles_for_sm90(tmp_path):
    # Two processes of about equal work (~80 s each with a cold Triton cache here; Triton compiles on one core,
    # and CI machines have two): fp32 (exact dots and --tf32's, one attention config) and both 16-bit types at
    # head_dim 64; head_dim 96 in bf16 and 128 in fp16 (their attention); the llama block in both. The
    # script's default steps every head_dim in every dtype.
    groups = [["gpt2_hd64:bf16", "gpt2_hd64:fp16", "gpt2_hd64:fp32", "gpt2_hd64:tf32"],
              ["gpt2_hd96:bf16", "gpt2_hd128:fp16", "llama:bf16", "llama:fp16"]]
    procs = [subprocess.Popen([sys.executable, "benchmarks/compile_check.py", "--first_config", "--pairs", *pairs,
                               "--json", str(tmp_path / f"compile{i}.json")], cwd=ROOT,
                              env=_compiled_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, pairs in enumerate(groups)]
    rows, stdout = [], ""
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=1200)
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
        report = json.loads((tmp_path / f"compile{i}.json").read_text())
        assert report["failures"] == [] and report["arch"] == "90a"
        assert f"all {len(report['rows'])} distinct kernels compiled for sm_90a" in out
        rows += report["rows"]
        stdout += out
    assert {r["kernel"] for r in rows} == TRAINING_KERNELS
    for pairs in groups:
        for pair in pairs:
            assert f"{pair.replace(':', ' ')}: " in stdout, stdout[-3000:]
    attention = [r["constexprs"] for r in rows if r["kernel"] == "_attn_fwd_kernel"]
    for head_dim in (64, 96, 128):  # with dropout (training) and without (eval)
        for dropout in (True, False):
            assert any(f"HEAD_DIM={head_dim} " in c and f"DROPOUT={dropout} " in c for c in attention), attention
    backward = [r["constexprs"] for r in rows if r["kernel"] == "_attn_bwd_kernel"]
    for atomic in (True, False):  # atomic dQ (default) and split (the dQ kernel beside it)
        assert any(f"DQ_ATOMIC={atomic} " in c for c in backward), backward
    loss = [r["constexprs"] for r in rows if r["kernel"] == "_ce_row_kernel"]
    assert any("WRITE_GRAD=True" in c for c in loss) and any("WRITE_GRAD=False" in c for c in loss)
    residual_bwd = [r for r in rows if r["kernel"] == "_norm_bwd_kernel" and "HAS_DX2=True" in r["constexprs"]]
    assert {r["dtype"] for r in residual_bwd} == {"bf16", "fp16"}  # the 16-bit branch's gradient, as trained
    assert any(r["dtype"] == "fp32" and "PRECISION=ieee" in r["constexprs"] for r in rows)  # fp32 attention
    for kernel in ("_attn_fwd_kernel", "_attn_bwd_kernel"):  # and fp32 under --tf32: TF32 tensor-core dots
        assert any(r["kernel"] == kernel and r["dtype"] == "tf32" and "PRECISION=tf32" in r["constexprs"]
                   for r in rows)


def test_a_kernel_the_interpreter_runs_but_the_compiler_rejects_is_reported(tmp_path):
    """A loop-carried value that changes type (int accumulator, float sum) runs in the interpreter and is a
    compile error for a GPU: the harness must surface it, not pass it by."""
    kernel = textwrap.dedent('''
        import os, sys
        sys.path.insert(0, os.getcwd())
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if not interpret:
            from benchmarks import compile_check as cc  # before triton: the kernel is decorated for the GPU
        import torch
        import triton
        import triton.language as tl

        @triton.jit
        def row_sum(X, Out, N, BLOCK: tl.constexpr):
            acc = 0
            for start in range(0, N, BLOCK):
                acc += tl.sum(tl.load(X + start + tl.arange(0, BLOCK)), axis=0)
            tl.store(Out, acc)

        x, out = torch.randn(64), torch.empty(1)
        if interpret:
            row_sum[(1,)](x, out, 64, BLOCK=16)
            print("interpreted:", abs(float(out) - float(x.sum())) < 1e-4)  # a tolerance: the sums' orders differ
        else:
            recorder = cc.Recorder(first_config=True)
            try:
                with cc.compile_only(recorder, "90a"):
                    row_sum[(1,)](x, out, 64, BLOCK=16)
            except Exception as e:
                print("compile error:", type(e).__name__)
            else:
                print("compiled", len(recorder.kernels))
    ''')
    script = tmp_path / "bad_kernel.py"
    script.write_text(kernel)
    interpreted = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                                 env=dict(_compiled_env(), TRITON_INTERPRET="1"), timeout=300)
    assert "interpreted: True" in interpreted.stdout, interpreted.stdout + interpreted.stderr[-2000:]
    compiled = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=_compiled_env(), capture_output=True,
                              text=True, timeout=300)
    assert "compile error: CompilationError" in compiled.stdout, compiled.stdout + compiled.stderr[-2000:]


_NORM_BWD_COMPILES = '''
import json, os, sys
sys.path.insert(0, os.getcwd())
from benchmarks import compile_check as cc  # before triton: the kernels are decorated for the GPU
import torch
cc.load_kernels_for_gpu()
from staged_fast.kernels import layernorm
m, n = 16 * 1024, 768
x, dy = torch.randn(m, n, dtype=torch.bfloat16), torch.randn(m, n, dtype=torch.bfloat16)
weight, mean, rstd = torch.ones(n), torch.zeros(m), torch.ones(m)
recorder = cc.Recorder(first_config=False)
with cc.compile_only(recorder, "90a"):
    layernorm.norm_backward("layer_norm", dy, x, weight, mean, rstd)
kept = layernorm._prune_bwd(layernorm._norm_bwd_kernel.configs, {"N": n}, BLOCK_N=1024)
print(json.dumps({"compiles": sum(1 for k in recorder.kernels if k[0] == "_norm_bwd_kernel"), "configs": len(kept),
                  "distinct": len({(c.kwargs["BLOCK_M"], c.num_warps, c.kwargs["PROGRAMS_PER_SM"] == 1) for c in kept})}))
'''


def test_norm_backward_configs_differing_only_in_programs_per_sm_share_one_compile():
    """The autotuner compiles every config it times. PROGRAMS_PER_SM only sizes the grid, and as a constexpr
    each of its values compiled the same kernel again; a plain integer is specialised only on being 1.
    Compiled for sm_90a here (no GPU): the distinct compiles of one new GPT-2 shape are counted."""
    proc = subprocess.run([sys.executable, "-c", _NORM_BWD_COMPILES], cwd=ROOT, env=_compiled_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["compiles"] == counts["distinct"] < counts["configs"], counts
