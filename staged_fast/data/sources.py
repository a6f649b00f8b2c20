"""Where the text comes from: local files and folders, a saved `datasets` folder, a hub dataset, or the
bundled corpus.

`resolve_source` turns the user's `--data` list into a `Source` (cheap: stats files, loads nothing), whose
`key` feeds the cache fingerprint; `load_texts` loads it as `datasets.Dataset` parts with a column `text`,
one row per document, except that a `.txt` file's rows are pieces of it (text_pieces.py) marked by the
columns `first` and `last`. Local files: `.txt` (one file = one document), `.jsonl`/`.json` and `.parquet`
(one record = one document, text in `text_field`); folders are walked for those extensions. A folder written
by `Dataset.save_to_disk` (state.json + dataset_info.json + data-*.arrow) or `DatasetDict.save_to_disk`
(dataset_dict.json; its "train" split, or its only split) is read with `datasets.load_from_disk`, one row per
document, text in `text_field`; it is given alone, and keyed by its files' stats.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path

from .text_pieces import SeamCheck, text_pieces

SUPPORTED = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
BUNDLED_CORPUS = Path(__file__).parent / "corpus.jsonl.xz"


def _text_piece_features():
    import datasets  # imported lazily: resolving a source must stay cheap

    return datasets.Features({"text": datasets.Value("large_string"), "first": datasets.Value("bool"),
                              "last": datasets.Value("bool")})


class DataError(ValueError):
    """Bad data input; the message names the problem and the fix."""


@dataclass
class Source:
    kind: str                      # "files", "hub" or "bundled"
    description: str               # for logs and PreparedData.source
    key: dict                      # what identifies the input for the cache (stats / name / hash)
    files: list[Path] = field(default_factory=list)
    hub_name: str = ""
    hub_config: str | None = None
    saved_split: str | None = None  # kind "saved": the DatasetDict split read (None: a Dataset folder)


def _file_key(p: Path) -> list:
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


def _saved_kind(folder: Path) -> str | None:
    """'dict' / 'dataset' for a folder written by DatasetDict / Dataset.save_to_disk, else None."""
    if (folder / "dataset_dict.json").is_file():
        return "dict"
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return "dataset"
    return None


def _saved_source(entry: str, folder: Path, text_field: str) -> Source:
    """A save_to_disk folder: which split to read, and the files that make it up (their stats key the cache)."""
    def read_json(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{entry!r} looks like a folder written by `datasets` save_to_disk, but {path.name} "
                            f"cannot be read ({e}). Fix: save the dataset again with save_to_disk.") from e

    split, files, ds_dir = None, [], folder
    if _saved_kind(folder) == "dict":
        splits = list(read_json(folder / "dataset_dict.json").get("splits", []))
        split = "train" if "train" in splits else splits[0] if len(splits) == 1 else None
        if split is None:
            raise DataError(f"The DatasetDict folder {entry!r} has no 'train' split (its splits: "
                            f"{', '.join(splits) or 'none'}) and more than one, so which to train on is not clear. "
                            f"Fix: save the split you want on its own (dataset_dict[split].save_to_disk(folder)) "
                            f"or name it 'train'.")
        files.append(folder / "dataset_dict.json")
        ds_dir = folder / split
    state = read_json(ds_dir / "state.json")
    data_files = [ds_dir / f["filename"] for f in state.get("_data_files", [])]
    files += [ds_dir / "state.json", ds_dir / "dataset_info.json"] + data_files
    absent = [f for f in files if not f.is_file()]
    if absent or not data_files:
        raise DataError(f"The datasets folder {entry!r} is incomplete: "
                        f"{absent[0].name if absent else 'state.json lists no data files'}. Fix: save the dataset "
                        f"again with save_to_disk.")
    desc = f"datasets folder {folder.name}" + (f" (split {split})" if split else "")
    return Source("saved", desc, {"saved": [_file_key(f) for f in files], "split": split, "text_field": text_field},
                  files=[folder], saved_split=split)


def _walk(folder: Path) -> list[Path]:
    """The data files under `folder`, in sorted order; linked folders are followed (os.walk skipped them
    silently), each real folder once, so a link back up ends the walk there instead of looping."""
    found, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        if _saved_kind(Path(root)):  # its json files are metadata, not documents
            raise DataError(f"{root} inside --data folder {str(folder)!r} was written by `datasets` save_to_disk; "
                            f"it cannot be mixed with other files. Fix: pass it alone (--data {root}).")
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / n for n in sorted(names)
                  if not n.startswith(".") and Path(n).suffix.lower() in SUPPORTED]
    return found


def _looks_like_path(entry: str) -> bool:
    """A hub name is `name` or `org/name`, optionally `:config`; anything else that is missing is a bad path."""
    return (entry.startswith((".", "/", "~")) or entry.count("/") > 1 or "\\" in entry
            or Path(entry.partition(":")[0]).suffix.lower() in SUPPORTED)


def resolve_source(data: list[str] | str | None, *, text_field: str = "text") -> Source:
    """Classify `data` and stat it; raises DataError for missing paths, empty folders, unknown extensions."""
    if data is None:
        digest = hashlib.sha256(BUNDLED_CORPUS.read_bytes()).hexdigest()[:16]
        return Source("bundled", "bundled corpus (Debian fortunes + Python 3.11 docs)",
                      {"bundled": digest})
    if isinstance(data, (str, os.PathLike)):
        data = [str(data)]
    if not data:
        raise DataError("No data given (an empty list). Fix: pass files/folders or a hub dataset name to "
                        "--data, or leave --data out to train on the bundled corpus.")
    entries = [str(d) for d in data]
    missing = [e for e in entries if not Path(e).expanduser().exists()]
    if len(entries) == 1 and missing and not _looks_like_path(entries[0]):
        name, _, config = entries[0].partition(":")
        return Source("hub", f"hub dataset {entries[0]} (split train)",
                      {"hub": name, "config": config or None, "text_field": text_field},
                      hub_name=name, hub_config=config or None)
    if missing:
        raise DataError(
            f"Data path {missing[0]!r} does not exist. Fix: check the path passed to --data (files or folders "
            f"of {', '.join(SUPPORTED)}); a hub dataset is given alone as name[:config], e.g. "
            "'wikitext:wikitext-103-raw-v1'.")
    saved = [e for e in entries if Path(e).expanduser().is_dir() and _saved_kind(Path(e).expanduser())]
    if saved:
        if len(entries) > 1:
            raise DataError(f"{saved[0]!r} is a folder written by `datasets` save_to_disk; such a folder is given "
                            f"alone to --data. Fix: pass only it, or save all the text into one dataset.")
        return _saved_source(saved[0], Path(saved[0]).expanduser().resolve(), text_field)
    files: list[Path] = []
    for e in entries:
        p = Path(e).expanduser().resolve()
        if p.is_dir():
            found = _walk(p)
            if not found:
                raise DataError(f"Folder {e!r} holds no {'/'.join(SUPPORTED)} files. Fix: point --data at a "
                                "folder with text data, or at the files themselves.")
            files += found
        elif p.suffix.lower() in SUPPORTED:
            files.append(p)
        else:
            raise DataError(f"Unsupported data file {e!r} (extension {p.suffix or 'none'!r}). Fix: use "
                            f"{', '.join(SUPPORTED)} files (decompress first), or a hub dataset name.")
    desc = f"{len(files)} local file{'s' * (len(files) != 1)}" + (f" ({files[0].name})" if len(files) == 1 else "")
    return Source("files", desc, {"files": [_file_key(f) for f in files], "text_field": text_field}, files=files)


def _select_text(ds, text_field: str, where: str):
    """Keep only the text column, renamed to 'text'; DataError when the field is absent."""
    if text_field not in ds.column_names:
        raise DataError(
            f"{where} has no field {text_field!r} (its fields: {', '.join(ds.column_names) or 'none'}). "
            f"Fix: pass the field that holds the text with --text_field (text_field=...).")
    ds = ds.select_columns([text_field])
    feature = ds.features[text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        # an int column, or a list (which the tokenizer took for a text pair and silently joined)
        held = "values that are not all strings" if type(feature).__name__ == "Json" else f"{feature} values"
        raise DataError(f"{where}: field {text_field!r} holds {held}, not text. Fix: pass the field that holds "
                        f"the text with --text_field, or make every value of {text_field!r} a string.")
    missing = ds.data.column(text_field).null_count  # arrow's count: no pass over the data
    if missing:
        raise DataError(f"{where}: {missing} record(s) have no value (null or absent) in field {text_field!r}. "
                        f"Fix: drop those records, or give them a string.")
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def _name_the_file_that_is_not_utf8(files: list[Path], error: Exception) -> None:
    """datasets' error for a text file it cannot decode names none of them: find the file, line and byte."""
    for f in files:
        try:
            data = f.read_bytes()
            data.decode("utf-8")
        except UnicodeDecodeError as bad:
            line = data.count(b"\n", 0, bad.start) + 1
            raise DataError(f"{f} is not UTF-8 text: byte 0x{data[bad.start]:02x} at offset {bad.start} (line "
                            f"{line}). Fix: convert it (e.g. iconv -f latin1 -t utf-8), or leave it out of --data.") \
                from error
        except OSError:
            continue


def _text_rows(files: list[Path], holds: SeamCheck):
    """Rows of pieces of each file (one document per file): text, first / last piece of its document?"""
    for path in files:
        with open(path, encoding="utf-8") as f:  # universal newlines, as datasets' text builder reads
            pieces = text_pieces(f, holds, str(path))
            piece, first = next(pieces, None), True
            for following in pieces:
                yield {"text": piece, "first": first, "last": False}
                piece, first = following, False
            if piece is not None:
                yield {"text": piece, "first": first, "last": True}


def load_texts(source: Source, *, text_field: str, hf_cache_dir: Path, scratch_dir: Path, holds: SeamCheck,
               num_proc: int = 1) -> list:
    """The documents of `source` as `datasets.Dataset` parts, in the input's order: a string column 'text'
    with one row per document, or for a run of .txt files, pieces of them (with bool columns 'first' and
    'last'), cut where `holds` says the tokenizer's output does not change, written under `scratch_dir`."""
    import datasets

    if source.kind == "bundled":
        with lzma.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        return [datasets.Dataset.from_dict({"text": texts})]
    if source.kind == "hub":
        try:
            ds = datasets.load_dataset(source.hub_name, source.hub_config, split="train",
                                       num_proc=num_proc if num_proc > 1 else None)
        except Exception as e:  # network, unknown name, missing config: many exception types
            raise DataError(
                f"Could not load the hub dataset {source.hub_name!r} (config {source.hub_config!r}, split "
                f"train): {type(e).__name__}: {e}. Fix: check the name[:config] (e.g. "
                "'wikitext:wikitext-103-raw-v1'), that huggingface.co is reachable, or pass local files; "
                "if you meant a local path, it does not exist.") from e
        return [_select_text(ds, text_field, f"Hub dataset {source.hub_name!r}")]
    if source.kind == "saved":
        folder = source.files[0] / source.saved_split if source.saved_split else source.files[0]
        try:
            ds = datasets.load_from_disk(str(folder))
        except Exception as e:  # corrupt arrow, version mismatch: many exception types
            raise DataError(f"Could not read the datasets folder {str(folder)!r} with datasets.load_from_disk: "
                            f"{type(e).__name__}: {e}. Fix: save it again with save_to_disk (same datasets "
                            f"version).") from e
        return [_select_text(ds, text_field, f"The {source.description}")]

    parts = []
    by_builder: dict[str, list[Path]] = {}
    for f in source.files:  # one load_dataset call per run of same-type files keeps the user's order
        builder = SUPPORTED[f.suffix.lower()]
        if by_builder and builder not in by_builder:
            parts.append(by_builder)
            by_builder = {}
        by_builder.setdefault(builder, []).append(f)
    parts.append(by_builder)

    loaded = []
    for group in parts:
        ((builder, files),) = group.items()
        nonempty = [f for f in files if f.stat().st_size > 0]  # an empty file is zero documents
        if not nonempty:
            continue
        try:
            if builder == "text":  # into the build's work folder: a resumed build reads its pieces back
                ds = datasets.Dataset.from_generator(
                    _text_rows, gen_kwargs={"files": nonempty, "holds": holds}, features=_text_piece_features(),
                    cache_dir=str(scratch_dir), fingerprint=f"staged_fast-text-pieces-{len(loaded)}")
            else:
                # read afresh: datasets keys its own cache on path and mtime only, so a file rewritten with its
                # mtime kept (tar, rsync -a, cp -p) was read from the old text into a new entry of ours
                ds = datasets.load_dataset(builder, data_files=[str(f) for f in nonempty], split="train",
                                           cache_dir=str(hf_cache_dir), download_mode="force_redownload")
        except Exception as e:
            if builder == "text":
                _name_the_file_that_is_not_utf8(nonempty, e)
            raise DataError(f"Could not read {builder} file(s) {[f.name for f in nonempty][:3]}: "
                            f"{type(e).__name__}: {e}. Fix: check the files are valid {builder} "
                            "(UTF-8 text, one JSON object per line, or parquet).") from e
        if builder != "text":
            ds = _select_text(ds, text_field, f"File {nonempty[0].name!r}" if len(nonempty) == 1
                              else f"The {builder} files ({nonempty[0].name}, ...)")
        loaded.append(ds)
    if not loaded:
        raise DataError(f"No text in {source.description}: every file is empty. Fix: pass files that "
                        "contain text.")
    return loaded
