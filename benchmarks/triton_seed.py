"""Compile the benchmarks' Triton kernels ahead, here, for the lent GPU: a seed of Triton's on-disk cache.

A lent GPU gives one 540-second command; on the H200 run a cold cache made every benchmark's autotuner
compile each config of each new key (~1-3 s apiece, ~78 in bench_train alone) inside its step's limit, and
one step's table was lost to its timeout. Triton looks a compiled kernel up by a key made of its own build
(the hash of its Python sources and libtriton), the kernel's source and specialisation, the ptxas version
and the compile options: nothing from the GPU itself. So the same Triton wheel under the same Python on this
machine builds the entries that machine would, and gpu_check.sh unpacks them into its cache.

    python benchmarks/triton_seed.py build [--out .triton_seed]   # under the GPU image's Python + Triton
    python benchmarks/triton_seed.py check [.triton_seed]         # there: does this Triton use the seed?
    python benchmarks/triton_seed.py unpack .triton_seed CACHE    # there: into TRITON_CACHE_DIR
    python benchmarks/triton_seed.py report CACHE                 # there, after the runs: what compiled anyway

`benchmarks/triton_seed.sh` makes the environment (Python 3.12, torch 2.11.0, Triton 3.6.0: the image's)
and runs `build`. What it compiles: benchmarks/compile_check.py's training step (every config the autotuners
keep) for the GPT-2 blocks at head_dim 64/96/128 and the llama block under bf16 autocast, and bench_kernels'
norm rows with 16-bit weights (`bench-norms`): the kernels and shapes of bench_kernels and bench_train (a key
does not depend on the batch size; compile_check --batch shows it). Not covered: the kernel tests' odd
shapes, fp16/fp32, and torch.compile's own kernels.
Outputs: DIR/cache.tar.xz and DIR/manifest.json (versions, a digest of the key's parts that do not come
from the kernel, of the kernel sources, and the entry count). A kernel's group file names its files by
absolute path: the archive holds bare names and `unpack` points them into the cache they land in.
What still happens there: Triton builds each signature's small C launcher with gcc on first launch (a
compile-only run never launches), and the autotuners time every config.
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
    """A digest of the parts of Triton's cache key that do not come from the kernel: Triton's own build (its
    sources and libtriton), the CUDA backend's (the ptxas version, sm_90) and the cache-invalidating
    environment variables, as this machine has them."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import triton_key

    parts = [triton_key(), make_backend(GPUTarget("cuda", 90, 32)).hash(),
             str(sorted(get_cache_invalidating_env_vars().items()))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _clean_env(cache: str) -> dict:
    """The build's environment: no TRITON_* knob (they enter the key or the options) and no STAGED_FAST_*
    switch (an autotuning switch would leave configs out), and its own cache folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRITON_", "STAGED_FAST_"))}
    env["TRITON_CACHE_DIR"] = cache
    return env


GROUP_PREFIX = "__grp__"


def _relocate_groups(cache: Path, to: Path | None) -> None:
    """A kernel's group file (__grp__NAME.json) lists its files by absolute path, and Triton treats a listed
    file that does not exist as a miss (and compiles again). In the archive the paths are bare file names
    (to=None); unpacked, they point into the cache they now sit in."""
    for group in cache.glob(f"*/{GROUP_PREFIX}*.json"):
        data = json.loads(group.read_text())
        children = data.get("child_paths") or {}
        data["child_paths"] = {name: (os.path.basename(path) if to is None else
                                      str(to / group.parent.name / os.path.basename(path)))
                               for name, path in children.items()}
        group.write_text(json.dumps(data))


def unpack(seed: Path, cache: Path) -> int:
    """Extract the seed into `cache` (Triton's TRITON_CACHE_DIR) with its group files pointing there, and
    note which entries came from it and when (for `report`)."""
    archive = seed / "cache.tar.xz"
    if not archive.is_file():
        _say_no_seed(seed)
        return 2
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        names = sorted({Path(m.name).parts[0] for m in tar.getmembers()})
        tar.extractall(cache, filter="data")
    _relocate_groups(cache, cache.resolve())
    _seed_note(cache).write_text(json.dumps(dict(entries=names, unpacked_ns=time.time_ns())))
    print(f"triton seed: {len(names)} entries unpacked into {cache}")
    return 0


def _say_no_seed(seed: Path) -> None:
    print(f"triton seed: none at {seed} (benchmarks/triton_seed.sh builds one; carry it along)")


def _seed_note(cache: Path) -> Path:
    return cache.parent / f"{cache.name}.seeded.json"


def report(cache: Path) -> int:
    """One line: how many seeded kernels were compiled again here (a key or path mismatch: should be 0) and
    how many other kernels were compiled since the unpack (the tests' shapes, torch.compile's own, and any
    the seed lacks)."""
    note_path = _seed_note(cache)
    if not note_path.is_file():
        print("triton cache: no seed was unpacked")
        return 0
    note = json.loads(note_path.read_text())
    seeded, since = set(note["entries"]), note["unpacked_ns"]
    recompiled = others = 0
    for entry in cache.iterdir():
        cubins = [p for p in entry.glob("*.cubin") if p.stat().st_mtime_ns > since] if entry.is_dir() else []
        if cubins and entry.name in seeded:
            recompiled += 1
        elif cubins:
            others += 1
    print(f"triton cache: {len(seeded)} seeded entries, {recompiled} of them compiled again here (0 if the seed "
          f"was used), {others} other kernels compiled here (test shapes, torch.compile's, any the seed lacks)")
    return 0


def build(out: Path, groups, dtypes, first_config: bool, bench_norms: bool = True) -> int:
    import torch
    import triton

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="triton_seed_") as cache:
        env = _clean_env(cache)
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
        _relocate_groups(Path(cache), None)  # bare names: `unpack` points them into the cache they land in
        # Written beside, then renamed over an older seed: a build cut off leaves the older one whole.
        archive, partial = out / "cache.tar.xz", out / "cache.tar.xz.partial"
        with tarfile.open(partial, "w:xz") as tar:
            for name in entries:
                tar.add(Path(cache) / name, arcname=name)
        manifest = dict(triton=triton.__version__, python=platform.python_version(),
                        torch=torch.__version__, triton_build_key=triton_build_key(), kernels=kernels_digest(),
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


def check(seed: Path) -> int:
    """Says whether this machine's Triton would use the seed. Exit 0 either way (the seed only saves time);
    2 when there is no seed to check."""
    manifest_path = seed / "manifest.json"
    if not manifest_path.is_file():
        _say_no_seed(seed)
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
              f"with another build key (a different Triton build, ptxas, or TRITON_* setting)")
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
    u = sub.add_parser("unpack", help="extract the seed into Triton's cache folder (gpu_check.sh does)")
    u.add_argument("seed")
    u.add_argument("cache", help="the TRITON_CACHE_DIR the runs will use")
    r = sub.add_parser("report", help="after the runs: seeded kernels compiled again, and others compiled")
    r.add_argument("cache")
    n = sub.add_parser("bench-norms", help="(build's helper) compile bench_kernels' norm rows into TRITON_CACHE_DIR")
    n.add_argument("--first_config", action="store_true", help="only each autotuner's first config")
    args = ap.parse_args(argv)
    if args.command == "check":
        return check(Path(args.seed))
    if args.command == "unpack":
        return unpack(Path(args.seed), Path(args.cache))
    if args.command == "report":
        return report(Path(args.cache))
    if args.command == "bench-norms":
        compile_bench_norms(args.first_config)
        return 0
    groups = GROUPS if args.workloads is None else [args.workloads[0::2], args.workloads[1::2]]
    return build(Path(args.out), [g for g in groups if g], args.dtypes, args.first_config,
                 bench_norms=not args.no_bench_norms)


if __name__ == "__main__":
    sys.exit(main())
