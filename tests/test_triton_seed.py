"""benchmarks/triton_seed.py: kernels compiled ahead here are what Triton loads instead of compiling, when its
build matches; `check` says whether it does. (The GPU's seed is built under the GPU image's Python and
Triton by triton_seed.sh; here the test venv's Triton builds and reads its own.)"""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import triton_seed  # noqa: E402


def _env(cache):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)
    return env


def _entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if p.is_dir()} if cache.exists() else set()


def test_a_seed_is_loaded_not_recompiled(tmp_path):
    seed = tmp_path / "seed"
    build = subprocess.run([sys.executable, "benchmarks/triton_seed.py", "build", "--out", str(seed),
                            "--workloads", "gpt2_hd64", "--first_config"], cwd=ROOT, env=_env(tmp_path / "unused"),
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert sorted(p.name for p in seed.iterdir()) == ["cache.tar.xz", "manifest.json"]  # no partial files left
    manifest = json.loads((seed / "manifest.json").read_text())
    assert manifest["entries"] >= 10 and manifest["triton_build_key"] == triton_seed.triton_build_key()
    assert manifest["kernels"] == triton_seed.kernels_digest()
    assert manifest["workloads"] == ["gpt2_hd64", "bench_norms"]
    assert not (tmp_path / "unused").exists()  # the build compiles into a cache of its own
    cache = tmp_path / "cache"  # what gpu_check.sh does with a carried seed
    cache.mkdir()
    with tarfile.open(seed / "cache.tar.xz") as tar:
        tar.extractall(cache, filter="data")
    seeded = _entries(cache)
    assert len(seeded) == manifest["entries"]
    again = subprocess.run([sys.executable, "benchmarks/compile_check.py", "--workloads", "gpt2_hd64", "--dtypes",
                            "bf16", "--first_config"], cwd=ROOT, env=_env(cache), capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    norms = subprocess.run([sys.executable, "benchmarks/triton_seed.py", "bench-norms", "--first_config"], cwd=ROOT,
                           env=_env(cache), capture_output=True, text=True, timeout=900)
    assert norms.returncode == 0, norms.stdout[-3000:] + norms.stderr[-3000:]
    assert _entries(cache) == seeded  # every launch found its kernel in the seed: nothing compiled afresh
    check = subprocess.run([sys.executable, "benchmarks/triton_seed.py", "check", str(seed)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "triton seed: usable" in check.stdout, check.stdout


def test_check_says_when_a_seed_is_not_usable_or_missing(tmp_path, capsys):
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "manifest.json").write_text(json.dumps(dict(triton="3.6.0", python="3.12.3", triton_build_key="0" * 64,
                                                        entries=3, built="2026-11-29 05:00 UTC")))
    assert triton_seed.check(seed) == 0
    assert "STALE" in capsys.readouterr().out  # no digest of the kernel sources it was built from
    manifest = json.loads((seed / "manifest.json").read_text())
    (seed / "manifest.json").write_text(json.dumps(dict(manifest, kernels=triton_seed.kernels_digest())))
    assert triton_seed.check(seed) == 0
    assert "NOT usable here" in capsys.readouterr().out
    assert triton_seed.check(tmp_path / "none") == 2
    assert "triton seed: none" in capsys.readouterr().out
