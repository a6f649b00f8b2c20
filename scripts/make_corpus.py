"""Rebuild the bundled default corpus `staged_fast/data/corpus.jsonl.xz` (~1.1M GPT-2 tokens).

Two permissively licensed English sources, both from the Debian archive (licences in
staged_fast/data/LICENSE.corpus.txt):
- `fortunes` + `fortunes-min` (fortune-mod 1.99.1, BSD licence): the non-offensive files
  (`/usr/share/games/fortunes/*`, not `off/`), minus `ascii-art` (pictures, not prose) and `ethnic`
  (jokes about ethnic groups: not something a default corpus should teach). One fortune = one document.
- `python3.11-doc` (PSF License Agreement): the reStructuredText sources (`html/_sources/*.rst.txt`) of the
  tutorial, HOWTOs, FAQ, language reference, "using" and "extending" guides and the glossary.
  One top-level section of a page = one document (pages are long; sections give the train/val split
  a finer grain).
Stored as JSON lines `{"text": ..., "source": ...}`, compressed with xz.

Usage (on a Debian/Ubuntu machine with network access to the archive):
    python scripts/make_corpus.py                       # apt-get download the .debs, extract, build
    python scripts/make_corpus.py --debian_root DIR     # DIR holds the .debs already extracted (dpkg-deb -x)

The output is deterministic (files in sorted order, documents in file order, exact duplicates dropped,
xz preset 9e), so rebuilding from the same packages gives the same bytes.
"""
from __future__ import annotations

import argparse
import json
import lzma
import re
import subprocess
import tempfile
from pathlib import Path

EXCLUDE = {"ascii-art", "ethnic"}
PYDOC_PARTS = ("tutorial", "howto", "faq", "reference", "using", "extending", "glossary.rst.txt")
DEBS = ("fortunes", "fortunes-min", "python3.11-doc")
FORTUNES = Path("usr/share/games/fortunes")
PYDOC = Path("usr/share/doc/python3.11/html/_sources")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "staged_fast" / "data" / "corpus.jsonl.xz"

_OVERSTRIKE = re.compile(r".\x08")  # "_\bX" / "X\bX": old terminal underline/bold; keep the last char


def extract_debs(workdir: Path) -> Path:
    """apt-get download the source packages, dpkg-deb -x them; return the extraction root."""
    subprocess.run(["apt-get", "download", *DEBS], cwd=workdir, check=True)
    for deb in sorted(workdir.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir / "root")], check=True)
    return workdir / "root"


def clean(text: str) -> str:
    text = _OVERSTRIKE.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))  # trailing blanks carry no text
    return text.strip("\n")


def read_fortunes(folder: Path) -> list[str]:
    """One document per fortune (fortune files separate entries with a line holding only '%')."""
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.is_symlink() and p.suffix == "" and p.name not in EXCLUDE)
    if not files:
        raise SystemExit(f"no fortune files found in {folder}")
    docs = []
    for path in files:
        raw = path.read_bytes().decode("utf-8", errors="replace")
        docs += [clean(chunk) for chunk in re.split(r"^%\n", raw, flags=re.MULTILINE)]
    return docs


# A top-level reST section starts at a title underlined with '=' (pages use '*' over+under for the page title).
_SECTION = re.compile(r"^(?=[^\n]+\n=+\n)", re.MULTILINE)


def read_pydoc(folder: Path) -> list[str]:
    """One document per top-level section of each selected Python documentation page."""
    files = []
    for part in PYDOC_PARTS:
        p = folder / part
        files += sorted(p.rglob("*.rst.txt")) if p.is_dir() else [p] if p.is_file() else []
    if not files:
        raise SystemExit(f"no Python documentation sources found in {folder}")
    docs = []
    for path in files:
        docs += [clean(chunk) for chunk in _SECTION.split(path.read_text(encoding="utf-8"))]
    return docs


def dedup(docs: list[str], source: str, seen: set[str]) -> list[dict]:
    out = []
    for d in docs:
        if d and d not in seen:
            seen.add(d)
            out.append({"text": d, "source": source})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debian_root", type=Path, default=None,
                    help="folder where the .debs were extracted with dpkg-deb -x (default: download them)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .jsonl.xz path")
    ap.add_argument("--count_tokens", action="store_true", help="also report the GPT-2 token count")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.debian_root or extract_debs(Path(tmp))
        seen: set[str] = set()
        records = dedup(read_fortunes(root / FORTUNES), "fortunes", seen)
        records += dedup(read_pydoc(root / PYDOC), "python3.11-doc", seen)
    docs = [r["text"] for r in records]
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(args.out, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(payload)
    print(f"{len(docs)} documents, {len(payload) / 1e6:.2f} MB text, "
          f"{args.out.stat().st_size / 1e6:.2f} MB xz -> {args.out}")
    if args.count_tokens:
        from staged_fast.tokenizer import load_tokenizer
        tok = load_tokenizer("gpt2")
        n = sum(len(ids) + 1 for ids in tok(docs)["input_ids"])  # +1: the EOS after each document
        print(f"{n:,} GPT-2 tokens (documents + EOS separators)")


if __name__ == "__main__":
    main()
