"""Compile the benchmarks' Triton kernels ahead, here, for the lent GPU: a seed of Triton's on-disk cache.

A lent GPU gives one 540-second command; on the H200 run a cold cache made every benchmark's autotuner
compile each config of each new key (~1-3 s apiece, ~78 in bench_train alone) inside its step's limit, and
one step's table was lost to its timeout. Triton looks a compiled kernel up by a key made of its own build
(the hash of its Python sources and libtriton), the kernel's source and specialisation, the ptxas version
and the compile options: nothing from the GPU itself. So the same Triton wheel under the same Python on this
machine builds the entries that machine would, and gpu_check.sh unpacks them into its cache.

    python benchmarks/triton_seed.py build [--out .triton_seed]   # under the GPU image's Python + Triton
    python benchmarks/triton_seed.py check [.triton_seed]         # there: does this Triton use the seed?

`benchmarks/triton_seed.sh` makes the environment (Python 3.12, torch 2.11.0, Triton 3.6.0: the image's)
and runs `build`. What it compiles: benchmarks/compile_check.py's training step (every config the autotuners
keep) for the GPT-2 blocks at head_dim 64/96/128 and the llama block under bf16 autocast, and bench_kernels'
norm rows with 16-bit weights (`bench-norms`): the kernels and shapes of bench_kernels and bench_train (a key
does not depend on the batch size; compile_check --batch shows it). Not covered: the kernel tests' odd
shapes, fp16/fp32, and torch.compile's own kernels.
Outputs: DIR/cache.tar.xz and DIR/manifest.json (versions, the Triton build's key, the entry count).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: `benchmarks` and `staged_fast` from this checkout
# Two compile processes (Triton compiles on one core each), about equal work.
GROUPS = (["gpt2_hd64", "gpt2_hd96"], ["gpt2_hd128", "llama"])


def compile_bench_norms(first_config: bool = False) -> None:
    """bench_kernels' own norm rows, which no training step launches: layer norm and RMSNorm with 16-bit
    weights, plain and with a 16-bit residual, at its hidden sizes (768, 1536; each autotuner config)."""
    from benchmarks import compile_check as cc  # first: the kernels must be decorated for the GPU compiler

    cc.load_kernels_for_gpu()
    import torch

    from staged_fast.kernels.layernorm import layer_norm
    from staged_fast.kernels.rmsnorm import rms_norm

    with cc.compile_only(cc.Recorder(first_config=first_config), "90a"):
        for hidden in (768, 1536):
            x, r, dy, ds = (torch.randn(1, 1024, hidden, dtype=torch.bfloat16) for _ in range(4))
            w, b = torch.ones(hidden, dtype=torch.bfloat16), torch.zeros(hidden, dtype=torch.bfloat16)
            for norm, params in ((layer_norm, (w, b)), (rms_norm, (w,))):
                leaves = [t.clone().requires_grad_() for t in (x, r, *params)]
                xl, rl, *pl = leaves
                norm(xl, *pl, 1e-5).backward(dy)
                y, s = norm(xl, *pl, 1e-5, residual=rl)
                torch.autograd.backward([y, s], [dy, ds])


def kernels_digest() -> str:
    """A digest of this checkout's kernel sources: a seed built from other sources holds kernels no launch
    asks for (their keys include the source), so `check` says it is stale."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "staged_fast" / "kernels").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def triton_build_key() -> str:
    """A digest of Triton's own part of its cache key (its sources and libtriton), as this machine has it."""
    from triton.runtime.cache import triton_key

    return hashlib.sha256(triton_key().encode()).hexdigest()


def build(out: Path, groups, dtypes, first_config: bool, bench_norms: bool = True) -> int:
    import triton

    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="triton_seed_") as cache:
        env["TRITON_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        commands = [[str(ROOT / "benchmarks" / "compile_check.py"), "--workloads", *group, "--dtypes", *dtypes,
                     *(["--first_config"] if first_config else [])] for group in groups]
        if bench_norms:
            commands.append([str(Path(__file__).resolve()), "bench-norms",
                             *(["--first_config"] if first_config else [])])
        procs = [subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for command in commands]
        failed = False
        for command, proc in zip(commands, procs):
            log, _ = proc.communicate()
            last = log.strip().splitlines()[-1] if log.strip() else "done"
            print(f"{Path(command[0]).name} {' '.join(command[1:])}: {last}", flush=True)
            if proc.returncode != 0:
                print(log[-3000:], file=sys.stderr)
                failed = True
        if failed:
            print("error: a compile failed (above); no seed written", file=sys.stderr)
            return 1
        entries = sorted(p.name for p in Path(cache).iterdir() if p.is_dir())
        # Written beside, then renamed over an older seed: a build cut off leaves the older one whole.
        archive, partial = out / "cache.tar.xz", out / "cache.tar.xz.partial"
        with tarfile.open(partial, "w:xz") as tar:
            for name in entries:
                tar.add(Path(cache) / name, arcname=name)
        manifest = dict(triton=triton.__version__, python=platform.python_version(),
                        torch=_torch_version(), triton_build_key=triton_build_key(), kernels=kernels_digest(),
                        entries=len(entries),
                        workloads=[w for g in groups for w in g] + (["bench_norms"] if bench_norms else []),
                        dtypes=list(dtypes), all_configs=not first_config,
                        built=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        seconds=round(time.perf_counter() - t0))
        (out / "manifest.json.partial").write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(partial, archive)
        os.replace(out / "manifest.json.partial", out / "manifest.json")
    print(f"{len(entries)} compiled kernels -> {archive} ({archive.stat().st_size / 2**20:.1f} MiB), "
          f"Triton {manifest['triton']} under Python {manifest['python']}")
    return 0


def _torch_version() -> str:
    import torch

    return torch.__version__


def check(seed: Path) -> int:
    """Says whether this machine's Triton would use the seed. Exit 0 either way (the seed only saves time);
    2 when there is no seed to check."""
    manifest_path = seed / "manifest.json"
    if not manifest_path.is_file():
        print(f"triton seed: none at {seed} (benchmarks/triton_seed.sh builds one; carry it along)")
        return 2
    manifest = json.loads(manifest_path.read_text())
    import triton

    here = dict(triton=triton.__version__, python=platform.python_version())
    if manifest.get("kernels") != kernels_digest():
        print(f"triton seed: STALE (built {manifest['built']} from other kernel sources than this checkout's: "
              f"launches will not find their kernels in it); rebuild it with benchmarks/triton_seed.sh")
    elif manifest["triton_build_key"] == triton_build_key():
        print(f"triton seed: usable, {manifest['entries']} kernels built {manifest['built']} by Triton "
              f"{manifest['triton']} under Python {manifest['python']}")
    else:
        print(f"triton seed: NOT usable here (every kernel compiles afresh): built by Triton {manifest['triton']} "
              f"under Python {manifest['python']}, this is Triton {here['triton']} under Python {here['python']} "
              f"with another build key (a different wheel or Python)")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the kernels into a seed (under the GPU image's Python and Triton)")
    b.add_argument("--out", default=str(ROOT / ".triton_seed"), help="where cache.tar.xz and manifest.json go")
    b.add_argument("--workloads", nargs="+", default=None,
                   help="compile_check workloads, split over two processes (default: all four)")
    b.add_argument("--dtypes", nargs="+", default=["bf16"], help="compile_check dtypes (default bf16)")
    b.add_argument("--first_config", action="store_true", help="only each autotuner's first config (for tests)")
    b.add_argument("--no_bench_norms", action="store_true", help="leave out bench_kernels' 16-bit-weight norm rows")
    c = sub.add_parser("check", help="does this machine's Triton use the seed?")
    c.add_argument("seed", nargs="?", default=str(ROOT / ".triton_seed"))
    n = sub.add_parser("bench-norms", help="(build's helper) compile bench_kernels' norm rows into TRITON_CACHE_DIR")
    n.add_argument("--first_config", action="store_true", help="only each autotuner's first config")
    args = ap.parse_args(argv)
    if args.command == "check":
        return check(Path(args.seed))
    if args.command == "bench-norms":
        compile_bench_norms(args.first_config)
        return 0
    groups = GROUPS if args.workloads is None else [args.workloads[0::2], args.workloads[1::2]]
    return build(Path(args.out), [g for g in groups if g], args.dtypes, args.first_config,
                 bench_norms=not args.no_bench_norms)


if __name__ == "__main__":
    sys.exit(main())
