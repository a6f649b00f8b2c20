"""Preparing one large .txt file: tokenized in seam-checked pieces (now) vs in one call (before).

A .txt file is one document. Before, the whole file went to the tokenizer's own call at once, which held
~165 bytes of memory per byte of text and ran on one thread; now it is streamed in pieces cut where the
tokenizer's output does not change (staged_fast/data/text_pieces.py), and encoded by the Rust tokenizer's
encode_batch_fast (no offsets or token strings; staged_fast/tokenizer.batch_encoder). Each mode builds the cache in its own
process from a cold cache folder (peak RSS is that process's own, its imports measured apart), the two
alternate `--reps` times, and the token files must come out byte-equal.

    python benchmarks/bench_data_prep.py              # a 20 MB file cut from the bundled corpus
    python benchmarks/bench_data_prep.py --mb 5 --reps 1
    python benchmarks/bench_data_prep.py --file my_corpus.txt
"""
from __future__ import annotations

import argparse
import json
import lzma
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.harness import print_table  # noqa: E402
from staged_fast.cli_help import HelpFormatter  # noqa: E402
from staged_fast.cli_types import positive_float, positive_int  # noqa: E402

# One build, run in a child process so that its peak RSS is its own. argv: mode, file, cache folder.
CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import datasets
import staged_fast.data.text_pieces as text_pieces
from staged_fast.data import prepare_data
from staged_fast.tokenizer import load_tokenizer

datasets.disable_progress_bars()
mode, path, cache = sys.argv[1:4]
if mode == "whole":  # the old path: no seam is looked for inside a file, and the tokenizer's own call encodes
    import staged_fast.data.prepare as prepare
    text_pieces.PIECE_CHARS = 1 << 62
    prepare.batch_encoder = lambda tok: lambda texts: tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
tokenizer = load_tokenizer("gpt2")
imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
data = prepare_data([path], tokenizer, tokenizer_name="gpt2", cache_dir=cache, val_fraction=0.01)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "imports_mib": imports / 1024,
                  "tokens": int(len(data.train) + len(data.val)), "folder": str(Path(cache) / data.fingerprint)}))
"""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--mb", type=positive_float, default=20.0,
                    help="size of the generated file in MB, cut from the bundled corpus (default 20; the one-call "
                         "mode needs ~165 MB of memory per MB)")
    ap.add_argument("--file", default=None, help="time this .txt file instead of a generated one")
    ap.add_argument("--reps", type=positive_int, default=2, help="builds per mode, alternating (default 2)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.file is not None and not Path(args.file).is_file():
        ap.error(f"--file {args.file}: no such file")
    return args


def _generated_file(folder: Path, megabytes: float) -> Path:
    from staged_fast.data.sources import BUNDLED_CORPUS

    with lzma.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        corpus = "\n\n".join(json.loads(line)["text"] for line in f)
    want = int(megabytes * 1e6)
    path = folder / "one_document.txt"
    with open(path, "w", encoding="utf-8") as out:
        written = 0
        while written < want:
            chunk = corpus[:want - written]
            out.write(chunk)
            written += len(chunk.encode("utf-8"))
    return path


def _build(mode: str, path: Path, cache: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(path), str(cache)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the {mode} build failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_data_prep-") as tmp:
        tmp = Path(tmp)
        path = Path(args.file) if args.file else _generated_file(tmp, args.mb)
        size_mb = path.stat().st_size / 1e6
        print(f"file: {path} ({size_mb:.1f} MB), {args.reps} build(s) per mode, alternating", flush=True)
        runs: dict[str, list[dict]] = {"pieces": [], "whole": []}
        for rep in range(args.reps):
            for mode in runs:
                run = _build(mode, path, tmp / f"{mode}{rep}")
                runs[mode].append(run)
                print(f"  {mode} #{rep + 1}: {run['seconds']:.1f} s, peak {run['peak_mib']:.0f} MiB", flush=True)
        first = {mode: Path(r[0]["folder"]) for mode, r in runs.items()}
        for name in ("train.bin", "val.bin"):
            if (first["pieces"] / name).read_bytes() != (first["whole"] / name).read_bytes():
                sys.exit(f"{name} differs between the two modes: the pieces changed the tokens")
        rows = []
        for mode, label in (("whole", "one call per file (before)"), ("pieces", "seam-checked pieces, encode_batch_fast (now)")):
            seconds = statistics.median(r["seconds"] for r in runs[mode])
            peak = statistics.median(r["peak_mib"] for r in runs[mode])
            extra = peak - statistics.median(r["imports_mib"] for r in runs[mode])
            rows.append({"mode": label, "seconds": round(seconds, 2), "peak MiB": round(peak),
                         "peak - imports MiB": round(extra), "bytes per text byte": round(extra * 2 ** 20 / (size_mb * 1e6)),
                         "tokens": runs[mode][0]["tokens"]})
        print_table(rows, list(rows[0]))
        before, now = rows
        print(f"pieces vs one call: {before['seconds'] / now['seconds']:.2f}x faster, "
              f"{before['peak - imports MiB'] / max(now['peak - imports MiB'], 1):.1f}x less memory above the imports; "
              "token files byte-equal")
        if args.json:
            Path(args.json).write_text(json.dumps({"file_mb": size_mb, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
