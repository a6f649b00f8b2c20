"""The kernel diagnostics in benchmarks/, run as a user would (subprocesses: this test session imported
the kernels under the CPU interpreter).

kernel_resources.py compiles the norm kernels for sm_90a without a GPU (Triton's ptxas); the test holds
the untuned backward default to what it claims: no spills, and a grid that fits in one wave at the
registers it compiles to. host_overhead.py times the host side of each op with the launches stubbed.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_default_backward_config_fits_one_wave(tmp_path):
    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/kernel_resources.py", "--hidden", "768", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    backward = [r for r in rows if r["kernel"] == "layer_norm bwd"]
    assert len({r["case"] for r in backward}) == 3 and len(backward) >= 3 * 9
    assert all(r["regs"] > 0 and r["resident"] >= 1 for r in rows)
    for r in backward:
        if r["autotune"] == "default":
            assert r["spill_bytes"] == 0, r
            assert r["waves"] <= 1, r  # programs per SM <= what fits: every program runs at once
    # The first fixed config (4 rows of 1024 lanes, 8 warps: 120-128 registers) holds two programs per SM,
    # so its grid of 4 per SM ran in 2 waves: why it was slow.
    old = [r for r in backward if r["rows/warps/per_sm"] == "4/8/1"]
    assert old and all(r["resident"] == 2 for r in old)
    assert "resident = programs one SM holds" in proc.stdout


def test_kernel_resources_marks_arguments_as_the_jit_does():
    """kernel_resources compiles each config with the attributes Triton's JIT gives a real launch: pointers
    and the named 16-divisible integers marked as the backend marks them, nothing else; and the JIT does
    turn an integer equal to 1 into a constant (so GROUP=1 is compiled as one)."""
    code = """
from benchmarks import kernel_resources as kr
from staged_fast.kernels import attention
from triton.backends.compiler import BaseBackend
from triton._C.libtriton import native_specialize_impl
fn = attention._attn_bwd_kernel.fn
sig = kr._attention_signature("bwd", True)
attrs = kr.launch_attrs(fn, sig, kr.attention_divisible_ints(sig))
marked = sorted(fn.arg_names[i] for (i,) in attrs)
expected = sorted(n for n, t in sig.items() if t.startswith("*") or n.startswith("stride_") or n in ("T", "T_KEY"))
assert marked == expected and "H" not in marked and "GROUP" not in marked and "stride_qm" in marked, marked
assert all(v == BaseBackend.parse_attr("D") for v in attrs.values()), attrs
assert native_specialize_impl(BaseBackend, 1, False, True, True) == ("constexpr", 1)
assert native_specialize_impl(BaseBackend, 1024, False, True, True) == ("i32", "D")
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_attention_configs_compile_for_sm90(tmp_path):
    """Every config of the attention autotuners compiles for sm_90a (head_dim 64, no dropout here: the full
    table takes minutes): forward, backward, and the split backward's dK/dV and dQ kernels, each with its
    registers and a resident count."""
    from staged_fast.kernels import attention

    out = tmp_path / "attention.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/kernel_resources.py", "--kernel", "attention", "--head_dim", "64",
                           "--dropout", "off", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == len(attention._FWD_SHAPES) + 2 * len(attention._BWD_SHAPES) + len(attention._DQ_SHAPES)
    assert {r["kernel"] for r in rows} == {"attention fwd", "attention bwd", "attention bwd dk/dv (split)",
                                           "attention bwd dq (split)"}
    assert all(r["regs"] > 0 and r["resident"] >= 1 and r["head_dim"] == 64 and not r["dropout"] for r in rows)


def test_host_overhead_times_every_op_with_launches_stubbed(tmp_path):
    out = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, "benchmarks/host_overhead.py", "--calls", "5", "--rounds", "2",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["op"].split(" ")[0] for r in rows] == ["layer_norm", "layer_norm", "attention"]
    assert all(r["ours_us"] > 0 and r["torch_us"] > 0 for r in rows)
    assert "Triton launches stubbed" in proc.stdout


def test_bad_arguments_exit_2():
    import torch

    bad = [("kernel_resources.py", ["--arch", "sm90"]), ("kernel_resources.py", ["--hidden", "0"]),
           ("host_overhead.py", ["--calls", "0"]), ("compile_check.py", ["--arch", "hopper"]),
           ("compile_check.py", ["--dtypes", "fp8"]), ("compile_check.py", ["--pairs", "gpt2_hd64:fp8"]),
           ("compile_check.py", ["--pairs", "llama:bf16", "--dtypes", "bf16"]), ("compile_check.py", ["--batch", "0"]),
           ("triton_seed.py", ["bake"]), ("bench_data_prep.py", ["--mb", "0"]),
           ("bench_data_prep.py", ["--file", "no/such.txt"])]
    if not torch.cuda.is_available():
        bad.append(("host_overhead.py", ["--device", "cuda"]))
    for script, args in bad:
        proc = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and f"{script}: error" in proc.stderr, proc.stderr


def test_bench_data_prep_builds_both_ways_and_compares_them(tmp_path):
    out = tmp_path / "prep.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_data_prep.py", "--mb", "0.3", "--reps", "1",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "token files byte-equal" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["one call per file (before)", "seam-checked pieces, encode_batch_fast (now)"]
    assert rows[0]["tokens"] == rows[1]["tokens"] > 50_000 and all(r["seconds"] > 0 for r in rows)


def test_bench_train_runs_rows_in_the_order_named_after_the_baseline(tmp_path):
    """On CPU (tiny model, torch kernels): the baseline hf_sdpa runs first even when named last, as
    gpu_check relies on (a run cut short keeps the rows named first); an unknown row is refused up front."""
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--quick", "--size", "tiny", "--kernels", "torch",
                           "--rows", "ours_torch,ours_torch_ac,ours_torch_sac,hf_sdpa", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(out.read_text())  # written after each row (atomically), marked complete after the last
    rows = payload["rows"]
    assert [r["model"] for r in rows] == ["hf_sdpa", "ours_torch", "ours_torch_ac", "ours_torch_sac"]
    assert payload["complete"] is True
    # activation checkpointing keeps less; the selective policy keeps the matmul and attention outputs too
    assert 0 < rows[2]["saved_MiB"] < rows[3]["saved_MiB"] < rows[1]["saved_MiB"], rows
    assert rows[0]["vs_hf"] == 1 and rows[1]["tokens/s"] > 0 and rows[1]["vs_hf"] == rows[1]["tokens/s"] / rows[0]["tokens/s"]
    assert [p.name for p in tmp_path.iterdir()] == ["train.json"]  # no temporary file left
    bad = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--rows", "ours_tirton"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown --rows ['ours_tirton']" in bad.stderr


def test_bench_kernels_times_split_dq_against_atomic_dq(tmp_path):
    """bench_kernels' attention_dq group, at its CPU toy shape (times meaningless; the wiring is the test):
    both dQ modes validated and timed, the split rows against the atomic baseline."""
    out = tmp_path / "dq.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_kernels.py", "--quick", "--device", "cpu", "--only",
                           "attention_dq", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(out.read_text())  # rewritten after each row, complete after the last
    rows = payload["rows"]
    assert payload["complete"] is True and payload["peaks"]["bandwidth_Bps"] > 0
    assert {(r["impl"], r["mode"]) for r in rows} == {
        (impl, mode) for impl in ("triton_atomic_dq", "triton_split_dq") for mode in ("fwd", "bwd", "fwd+bwd")}
    assert all(r["vs"] == "triton_atomic_dq" and r["speedup"] > 0 for r in rows if r["impl"] == "triton_split_dq")


def test_print_table_of_no_rows_prints_the_headers(capsys):
    """A benchmark whose rows were all filtered out (e.g. a CPU-only row asked for on a GPU) printed a
    TypeError instead of its empty table."""
    from benchmarks.harness import print_table

    print_table([], ["kernel", "ms"])
    assert capsys.readouterr().out.splitlines() == ["kernel | ms", "-------|---"]
