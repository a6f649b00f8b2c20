"""benchmarks/triton_seed.py: kernels compiled ahead here are what Triton loads instead of compiling, when its
build matches; `check` says whether it does, `unpack` puts a seed into a cache where Triton finds it, and
`report` says what was compiled anyway. (The GPU's seed is built under the GPU image's Python and Triton by
triton_seed.sh; here the test venv's Triton builds and reads its own.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import triton_seed  # noqa: E402


def _env(cache):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)
    return env


def _files(cache: Path) -> dict:
    """Every file in the cache with its modification time: a kernel compiled again rewrites its files."""
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}


def _seed_script(*args, env=None):
    proc = subprocess.run([sys.executable, "benchmarks/triton_seed.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_an_unpacked_seed_is_loaded_not_recompiled(tmp_path):
    seed = tmp_path / "seed"
    env = dict(_env(tmp_path / "unused"), STAGED_FAST_NORM_AUTOTUNE="0")  # the build must not inherit it
    _seed_script("build", "--out", str(seed), "--workloads", "gpt2_hd64", "--first_config", env=env)
    assert sorted(p.name for p in seed.iterdir()) == ["cache.tar.xz", "manifest.json"]  # no partial files left
    manifest = json.loads((seed / "manifest.json").read_text())
    assert manifest["entries"] >= 10 and manifest["triton_build_key"] == triton_seed.triton_build_key()
    assert manifest["kernels"] == triton_seed.kernels_digest()
    assert manifest["workloads"] == ["gpt2_hd64", "bench_norms"]
    assert not (tmp_path / "unused").exists()  # the build compiles into a cache of its own
    # Unpacked somewhere else than where it was built, as on the GPU machine.
    cache = tmp_path / "elsewhere" / "cache"
    _seed_script("unpack", str(seed), str(cache))
    before = _files(cache)
    assert len({name.split(os.sep)[0] for name in before}) == manifest["entries"]
    again = subprocess.run([sys.executable, "benchmarks/compile_check.py", "--workloads", "gpt2_hd64", "--dtypes",
                            "bf16", "--first_config"], cwd=ROOT, env=_env(cache), capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    _seed_script("bench-norms", "--first_config", env=_env(cache))
    assert _files(cache) == before  # every launch loaded its kernel from the seed: nothing compiled or rewritten
    said = _seed_script("report", str(cache))
    assert f"{manifest['entries']} seeded entries, 0 of them compiled again here" in said
    assert "0 other kernels compiled here" in said
    assert "triton seed: usable" in _seed_script("check", str(seed))


def test_report_counts_seeded_kernels_compiled_again_and_others(tmp_path, capsys):
    """What `report` reads: the unpack's note, and cubins written after it."""
    import tarfile
    import time

    entries = tmp_path / "entries"
    for name in ("SEEDED1", "SEEDED2"):
        (entries / name).mkdir(parents=True)
        (entries / name / "k.cubin").write_bytes(b"x")
        (entries / name / "__grp__k.json").write_text(json.dumps({"child_paths": {"k.cubin": "/gone/k.cubin"}}))
    seed = tmp_path / "seed"
    seed.mkdir()
    with tarfile.open(seed / "cache.tar.xz", "w:xz") as tar:
        for name in ("SEEDED1", "SEEDED2"):
            tar.add(entries / name, arcname=name)
    cache = tmp_path / "cache"
    assert triton_seed.unpack(seed, cache) == 0
    group = json.loads((cache / "SEEDED1" / "__grp__k.json").read_text())
    assert group["child_paths"] == {"k.cubin": str(cache.resolve() / "SEEDED1" / "k.cubin")}  # points here now
    time.sleep(0.01)
    (cache / "SEEDED2" / "k.cubin").write_bytes(b"y")  # compiled again
    (cache / "NEW").mkdir()
    (cache / "NEW" / "k.cubin").write_bytes(b"z")
    capsys.readouterr()
    assert triton_seed.report(cache) == 0
    out = capsys.readouterr().out
    assert "2 seeded entries, 1 of them compiled again here" in out and "1 other kernels compiled here" in out, out


def test_check_says_when_a_seed_is_stale_not_usable_or_missing(tmp_path, capsys):
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
    assert triton_seed.unpack(tmp_path / "none", tmp_path / "cache") == 2
