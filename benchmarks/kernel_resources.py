"""Registers, spills and programs per SM of the kernels' configs, compiled for a GPU without one.

Triton compiles a kernel ahead of time for a named target (here sm_90a, H100/H200) on any machine; the
PTX then goes through Triton's own ptxas with -v, which reports the registers per thread and the bytes
spilled. Each kernel is compiled as a launch at GPT-2's shapes would be (launch_attrs: the 16-divisible
pointers and integers marked, an integer equal to 1 made a constant), so the figures are those of
compile_check.py's real launches. From the registers and warps follow how many programs one SM holds (64K registers, 64 warps,
32 blocks), and from the grid's programs per SM how many waves the backward's grid takes. This is what
chose the backward's configs and its untuned default (staged_fast/kernels/layernorm.py); whether a
config is also the fastest is for bench_kernels.py on a GPU, where the autotuner times them. With
--kernel attention: every config of the flash attention autotuners, bf16, at head_dim 64/96/128, with and
without dropout (a config that spills is timed by the autotuner for nothing): the forward, the backward
(atomic dQ), and the deterministic backward's two kernels (dK/dV without dQ, and the dQ kernel).

    python benchmarks/kernel_resources.py                      # norms: hidden 768 and 1536, sm_90a
    python benchmarks/kernel_resources.py --kernel attention   # ~140 compiles, several minutes
    python benchmarks/kernel_resources.py --hidden 1024 --arch 80
    PYTHONPATH=/path/to/other/triton python benchmarks/kernel_resources.py   # another Triton version
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not for the CPU interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from staged_fast.cli_help import HelpFormatter  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from benchmarks.harness import print_table, write_json  # noqa: E402
from staged_fast.kernels import attention, layernorm  # noqa: E402

SM_REGISTERS, SM_WARPS, SM_BLOCKS = 65536, 64, 32  # per SM, sm_80 and sm_90
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256

# What training feeds the backward under --bf16 (fp32 parameters and residual stream, bf16 branch and
# dy), by kernel argument: (X, DY, DS, DX, DX2, HAS_DS, HAS_DX2). Placeholders take another pointer's type.
BWD_CASES = {
    "no residual: fp32 stream, bf16 dy": ("fp32", "bf16", "bf16", "fp32", "fp32", False, False),
    "residual: + fp32 ds, bf16 branch grad": ("fp32", "bf16", "fp32", "fp32", "bf16", True, True),
    "bf16 in, bf16 out": ("bf16", "bf16", "bf16", "bf16", "bf16", False, False),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--kernel", choices=["norm", "attention"], default="norm", help="which kernels (default norm)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[768, 1536], help="norm hidden sizes (default 768 1536)")
    ap.add_argument("--head_dim", type=int, nargs="+", default=[64, 96, 128], choices=[64, 96, 128],
                    help="attention head dims (default 64 96 128)")
    ap.add_argument("--dropout", choices=["off", "on", "both"], default="both", help="attention dropout (default both)")
    ap.add_argument("--arch", default="90a", help="compute capability to compile for: 90a (H100/H200, default), 80, ...")
    ap.add_argument("--rms", action="store_true", help="RMSNorm's backward (no mean, no bias) instead of LayerNorm's")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"\d+a?", args.arch):
        ap.error(f"--arch {args.arch!r}: give a compute capability such as 90a or 80")
    if any(h < 1 or h > layernorm.MAX_HIDDEN for h in args.hidden):
        ap.error(f"--hidden: each size must be in 1..{layernorm.MAX_HIDDEN}")
    return args


def ptxas_usage(ptx: str, arch: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) from `ptxas -v` on the kernel's PTX."""
    ptxas = get_ptxas(int(arch.rstrip("a"))).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        out = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed: {out.stderr.strip()[:400]}")
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spill = re.search(r"(\d+) bytes spill stores", out.stderr)
    return int(regs.group(1)) if regs else 0, int(spill.group(1)) if spill else 0


def resident_programs(regs: int, warps: int, shared: int) -> int:
    """Programs of `warps` warps one SM holds at `regs` registers per thread and `shared` bytes."""
    per_warp = -(-max(regs, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_regs = SM_REGISTERS // (per_warp * warps)
    by_shared = (228 * 1024) // shared if shared else SM_BLOCKS
    return max(0, min(by_regs, SM_WARPS // warps, SM_BLOCKS, by_shared))


def launch_attrs(fn, signature: dict, divisible_ints=()) -> dict:
    """The argument attributes a real launch gives the compiler: Triton's JIT marks a pointer whose address,
    and an integer whose value, is a multiple of 16 (tt.divisibility). torch's allocations are aligned, and at
    the shapes training runs (GPT-2: T 1024, hidden and head_dim multiples of 16) so are the strides and sizes
    named in `divisible_ints`. Without the marks loads are not vectorised, addresses take more registers, and
    ptxas reports spills a real launch does not have."""
    marked = [name for name, ty in signature.items() if ty.startswith("*") or name in divisible_ints]
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in marked}


def compile_usage(fn, signature: dict, constexprs: dict, options: dict, arch: str, divisible_ints=()) -> dict:
    """Compile `fn` for sm_`arch` as a real launch with these arguments would (launch_attrs); its registers,
    spills, shared memory and the programs one SM holds."""
    target = GPUTarget("cuda", int(arch.rstrip("a")), 32)
    signature = {**signature, **{k: "constexpr" for k in constexprs}}
    source = ASTSource(fn, signature, constexprs, launch_attrs(fn, signature, divisible_ints))
    kernel = triton.compile(source, target=target, options=options)
    regs, spill = ptxas_usage(kernel.asm["ptx"], arch)
    shared = int(getattr(kernel.metadata, "shared", 0) or 0)
    return {"regs": regs, "spill_bytes": spill, "shared": shared,
            "resident": resident_programs(regs, options["num_warps"], shared)}


def backward_signature(case, rms: bool) -> tuple[dict, dict]:
    x, dy, ds, dx, dx2, has_ds, has_dx2 = case
    p = lambda t: f"*{t}"  # noqa: E731
    sig = {"DY": p(dy), "X": p(x), "W": "*fp32", "Mean": "*fp32", "Rstd": "*fp32", "DS": p(ds), "DX": p(dx),
           "DX2": p(dx2), "DW_partial": "*fp32", "DB_partial": "*fp32"}
    sig.update({name: "i32" for name in ("stride_dy", "stride_x", "stride_ds", "stride_dx", "M", "N")})
    return sig, {"RMS": rms, "HAS_DS": has_ds, "HAS_DX2": has_dx2}


def _with_programs_per_sm(signature: dict, constexprs: dict) -> tuple[dict, dict]:
    """The backward's PROGRAMS_PER_SM is a plain integer argument (it only sizes the grid), after BLOCK_N."""
    constexprs = {k: v for k, v in constexprs.items() if k != "PROGRAMS_PER_SM"}
    return {**signature, **{k: "constexpr" for k in constexprs}, "PROGRAMS_PER_SM": "i32"}, constexprs


def _strides(signature: dict) -> list[str]:
    return [name for name in signature if name.startswith("stride_")]


def _norm_divisible_ints(signature: dict, hidden: int) -> list[str]:
    """A norm launch's integers that are multiples of 16: the rows M (batch 16 x 1024 tokens), and with a
    hidden size that is one, the hidden size and the row strides (contiguous rows)."""
    return ["M"] + (["N", *_strides(signature)] if hidden % 16 == 0 else [])


def attention_divisible_ints(signature: dict) -> list[str]:
    """An attention launch's integers that are multiples of 16 at GPT-2's shapes (q, k, v views of the
    (B, T, 3, H, D) projection, head_dim 64/96/128, T 1024): every stride, T and its bucket; not H (12
    heads). GROUP is 1 (no GQA), which the JIT turns into a constant, as it does any integer equal to 1."""
    return ["T", "T_KEY", *_strides(signature)]


def backward_rows(hidden: int, arch: str, rms: bool) -> list[dict]:
    block_n = triton.next_power_of_2(hidden)
    default = layernorm._default_bwd_config(hidden)
    configs = [default] + [layernorm._bwd_config(*c) for c in layernorm._BWD_SHAPES]
    rows = []
    for case_name, case in BWD_CASES.items():
        sig, flags = backward_signature(case, rms)
        seen = set()
        for config in configs:
            tag = (config.kwargs["BLOCK_M"], config.num_warps, config.kwargs["PROGRAMS_PER_SM"])
            if tag in seen:
                continue
            seen.add(tag)
            elements = layernorm._thread_elements(config, block_n)
            full_sig, constexprs = _with_programs_per_sm(sig, {**flags, **config.kwargs, "BLOCK_N": block_n})
            usage = compile_usage(layernorm._norm_bwd_kernel.fn, full_sig, constexprs, {"num_warps": config.num_warps},
                                  arch, _norm_divisible_ints(sig, hidden))
            lo, hi = layernorm._THREAD_ELEMENTS
            timed = "default" if config is default else ("tuned" if lo <= elements <= hi else "pruned")
            rows.append({
                "kernel": "rms_norm bwd" if rms else "layer_norm bwd", "hidden": hidden, "case": case_name,
                "rows/warps/per_sm": "/".join(map(str, tag)), "autotune": timed, "elements/thread": elements,
                **usage, "waves": round(tag[2] / usage["resident"], 2) if usage["resident"] else None,
            })
            print("row:", rows[-1], flush=True)
    return rows


def forward_rows(hidden: int, arch: str) -> list[dict]:
    """The forward's one tile per hidden size (not tuned: it ran at ~95% of copy bandwidth on an H200)."""
    block_m, block_n, warps = layernorm._tile(hidden)
    rows = []
    for case_name, (x, r, y, s, has_residual) in {
        "no residual: fp32 stream -> bf16 y": ("fp32", "fp32", "bf16", "bf16", False),
        "residual: bf16 + fp32 stream": ("bf16", "fp32", "bf16", "fp32", True),
    }.items():
        sig = {"X": f"*{x}", "R": f"*{r}", "W": "*fp32", "B": "*fp32", "Y": f"*{y}", "S": f"*{s}",
               "Mean": "*fp32", "Rstd": "*fp32", "stride_x": "i32", "stride_r": "i32", "stride_y": "i32",
               "stride_s": "i32", "M": "i32", "N": "i32", "eps": "fp32"}
        constexprs = {"HAS_RESIDUAL": has_residual, "BLOCK_M": block_m, "BLOCK_N": block_n}
        usage = compile_usage(layernorm._layer_norm_fwd_kernel, sig, constexprs, {"num_warps": warps}, arch,
                              _norm_divisible_ints(sig, hidden))
        rows.append({"kernel": "layer_norm fwd", "hidden": hidden, "case": case_name,
                     "rows/warps/per_sm": f"{block_m}/{warps}/-", "autotune": "fixed",
                     "elements/thread": block_m * block_n // (32 * warps), **usage, "waves": None})
    return rows


def _attention_signature(kernel: str, dropout: bool) -> dict:
    """Argument types, in order, of the attention kernel `kernel` (fwd, bwd or dq) on bf16 tensors."""
    seed = "*i64" if dropout else "*fp32"
    if kernel == "fwd":
        sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*bf16", "LSE": "*fp32", "Seed": seed}
        strides = [f"stride_{t}{d}" for t in ("q", "k", "v") for d in ("b", "h", "m" if t == "q" else "n")]
        scalars = {"qk_scale": "fp32", "out_scale": "fp32", "threshold": "i32"}
    else:  # the dQ kernel takes the backward's arguments less DK, DV and dv_scale, and writes dQ in bf16
        outputs = {"DQ": "*bf16"} if kernel == "dq" else {"DQ": "*fp32", "DK": "*bf16", "DV": "*bf16"}
        sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "LSE": "*fp32", "Delta": "*fp32",
               **outputs, "Seed": seed}
        strides = [f"stride_{t}{d}" for t in ("q", "k", "v", "do") for d in ("b", "h", "m" if t in ("q", "do") else "n")]
        scalars = {"qk_scale": "fp32", "ds_scale": "fp32", **({} if kernel == "dq" else {"dv_scale": "fp32"}),
                   "threshold": "i32"}
    sig.update({name: "i32" for name in strides + ["H", "GROUP", "T", "T_KEY"]})
    sig.update(scalars)
    return sig


# row name: (signature kind, autotuned kernel, its configs, constexprs beyond the common ones)
ATTENTION_KERNELS = {
    "attention fwd": ("fwd", attention._attn_fwd_kernel, attention._FWD_SHAPES, {}),
    "attention bwd": ("bwd", attention._attn_bwd_kernel, attention._BWD_SHAPES, {"DQ_ATOMIC": True}),
    "attention bwd dk/dv (split)": ("bwd", attention._attn_bwd_kernel, attention._BWD_SHAPES, {"DQ_ATOMIC": False}),
    "attention bwd dq (split)": ("dq", attention._attn_bwd_dq_kernel, attention._DQ_SHAPES, {}),
}


def attention_rows(arch: str, head_dims=(64, 96, 128), dropouts=(False, True)) -> list[dict]:
    """Every GPU config of the attention autotuners (bf16), per head_dim and dropout: the forward, the
    backward, and the split (deterministic) backward's dK/dV and dQ kernels."""
    rows = []
    for name, (kind, kernel, shapes, extra) in ATTENTION_KERNELS.items():
        fn = kernel.fn
        for head_dim in head_dims:
            d0, d1 = attention._split_head_dim(head_dim)
            for dropout in dropouts:
                sig = _attention_signature(kind, dropout)
                for block_m, block_n, warps, stages in shapes:
                    constexprs = {"GROUP": 1, "HEAD_DIM": head_dim, "D0": d0, "D1": d1, "DROPOUT": dropout,
                                  "UPCAST": False, "PRECISION": "tf32", **extra, "BLOCK_M": block_m, "BLOCK_N": block_n}
                    usage = compile_usage(fn, sig, constexprs, {"num_warps": warps, "num_stages": stages}, arch,
                                          attention_divisible_ints(sig))
                    rows.append({
                        "kernel": name, "head_dim": head_dim, "dropout": dropout,
                        "config": f"{block_m}x{block_n}/w{warps}/s{stages}", "regs": usage["regs"],
                        "spill_bytes": usage["spill_bytes"], "shared_KiB": round(usage["shared"] / 1024, 1),
                        "resident": usage["resident"],
                    })
                    print("row:", rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"Triton {triton.__version__}, compiled for sm_{args.arch} (no GPU needed); ptxas: "
          f"{get_ptxas(int(args.arch.rstrip('a'))).path}")
    if args.kernel == "attention":
        dropouts = {"off": (False,), "on": (True,), "both": (False, True)}[args.dropout]
        rows = attention_rows(args.arch, args.head_dim, dropouts)
        print()
        print_table(rows, ["kernel", "head_dim", "dropout", "config", "regs", "spill_bytes", "shared_KiB", "resident"])
        print("\nconfig = BLOCK_M x BLOCK_N / warps / pipeline stages; resident = programs one SM holds.")
        if args.json:
            write_json(args.json, {"triton": triton.__version__, "arch": args.arch, "rows": rows})
        return
    rows = []
    for hidden in args.hidden:
        rows += backward_rows(hidden, args.arch, args.rms)
        if not args.rms:
            rows += forward_rows(hidden, args.arch)
    print()
    print_table(rows, ["kernel", "hidden", "case", "rows/warps/per_sm", "autotune", "elements/thread", "regs",
                       "spill_bytes", "resident", "waves"])
    print("\nresident = programs one SM holds (registers, warps, blocks, shared memory); waves = the grid's "
          "programs per SM / resident (1 = every program runs at once). autotune: default = the untuned "
          "config; tuned = timed by the autotuner at this size; pruned = outside 4-16 elements per thread.")
    if args.json:
        write_json(args.json, {"triton": triton.__version__, "arch": args.arch, "rows": rows})


if __name__ == "__main__":
    main()
