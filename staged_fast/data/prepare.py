"""Tokenize, split, pack and cache a corpus: `prepare_data` -> `PreparedData` (two token memmaps).

Pipeline: resolve the input (sources.py) -> fingerprint -> cache hit? open the memmaps : load documents
with `datasets`, tokenize with `Dataset.map(batched=True, num_proc=...)`, split whole documents into
train/val (seeded), write `cache_dir/<fingerprint>/{train,val}.bin` (+ `meta.json`) atomically.

Packing: every document is followed by the tokenizer's EOS, so a stream reads `doc0 EOS doc1 EOS ...`.
Token ids are stored as uint16 when the vocabulary fits (<= 65536 ids, e.g. GPT-2's 50257), else uint32.

Train/val split (deterministic from `seed`): documents are shuffled and taken into val until it holds
at least `max(val_fraction * total_tokens, min_val_tokens)` tokens; a document that would overshoot
twice that target is skipped, and at least one document always stays in train. Only when whole documents
cannot reach the target (one document, or a few huge ones) is the tail of the largest train document cut
off into val (its head gets an EOS). Val text is never in train either way. With a separate validation set
(`val_data`), no split is made: each input is cached whole, as train or as val.

Caching is atomic: the files are written to a temporary folder that is renamed to `<fingerprint>/` only
when complete (meta.json last), so a crash never leaves a cache that would be used. One process builds an
input and tokenizer at a time (a lock file, `.tokens-<key>.lock`): a second job on the same data waits and
then finds it built, and the builder removes what interrupted builds left. Builds resume: the input is
tokenized in chunks of ~CHUNK_TEXT_BYTES of text, each kept in the work folder (`.tokens-<key>.work/`, keyed
by the input and tokenizer, so other split settings share it) as it finishes, so a build that is killed or
preempted and run again keeps the finished chunks and loses at most the one it was in; the work folder goes
when the entry is complete. Under torch.distributed
with `rank0_only_build`, the local rank 0 of each node builds (where the shared filesystem has no flock,
several nodes race harmlessly: the first rename wins) while the other ranks wait (up to a day, on the
rendezvous store), then everyone opens the memmaps; a build error on any rank is raised on every rank
instead of hanging the others.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tokenizer import batch_encoder, id_space, tokenizer_fingerprint
from .sources import DataError, Source, load_texts, resolve_source
from .text_pieces import seam_check

FORMAT_VERSION = 1
# Text per tokenizing chunk: a killed build loses at most one chunk's work; each chunk costs a pool of
# --num_workers processes (~1 s). Fixed, not per process: a requeue with other --num_workers finds the same chunks.
CHUNK_TEXT_BYTES = 1 << 30
logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: np.ndarray    # packed train tokens, read-only np.memmap (uint16 or uint32)
    val: np.ndarray      # packed validation tokens, same dtype
    vocab_size: int      # the tokenizer's id space (largest id + 1), added tokens included
    eos_id: int          # the document separator
    fingerprint: str     # cache key: input + tokenizer + split settings + format version
    source: str          # human-readable description of the input
    folders: tuple = ()  # the cache entries read: one, or with val_data (train's, val's)
    train_digest: str | None = None  # of train.bin's bytes (None: an entry written before digests were kept)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids 0..65535, so vocabularies up to 65536 entries; larger ones need uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2 ** 16 else np.uint32)


def _input_key(source: Source, tokenizer, tokenizer_name: str) -> dict:
    """What decides the tokens: the input and the tokenizer (and the format)."""
    return {"format": FORMAT_VERSION, "input": source.key, "tokenizer": tokenizer_name,
            "tokenizer_hash": tokenizer_fingerprint(tokenizer), "vocab_size": id_space(tokenizer)}


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _fingerprint(source: Source, tokenizer, tokenizer_name: str, val_fraction: float,
                 min_val_tokens: int, seed: int, whole: str | None = None) -> str:
    key = _input_key(source, tokenizer, tokenizer_name)
    if whole is None:  # split: the split's settings decide the content (keys as before: old caches still hit)
        key.update(val_fraction=val_fraction, min_val_tokens=min_val_tokens, seed=seed)
    else:
        key["whole"] = whole
    return _digest(key)


def _tokens_key(source: Source, tokenizer, tokenizer_name: str) -> str:
    """The key of a build's tokenizing work (its lock and work folder): the entries of one input and tokenizer
    under other split settings share it, so an interrupted build resumed with another --val_fraction or --seed
    keeps what it tokenized."""
    return _digest(_input_key(source, tokenizer, tokenizer_name))


def _assign(lengths: np.ndarray, whole: str | None, **split) -> tuple[np.ndarray, int, int]:
    """split_documents' (val_mask, cut_doc, cut_at), or every document to one side (`whole`: train / val)."""
    if whole is None:
        return split_documents(lengths, **split)
    return np.full(len(lengths), whole == "val", dtype=bool), -1, 0


def _alloc(path: Path, dtype, n: int) -> np.ndarray:
    """A writable memmap of n tokens at `path` (an empty file and array when n is 0: mmap cannot map 0 bytes)."""
    if n == 0:
        path.touch()
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="w+", shape=(n,))


def _open(path: Path, dtype, n: int) -> np.ndarray:
    return np.zeros(0, dtype=dtype) if n == 0 else np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def split_documents(lengths: np.ndarray, *, val_fraction: float, min_val_tokens: int,
                    seed: int) -> tuple[np.ndarray, int, int]:
    """Choose the validation documents (rule in the module docstring).

    lengths: tokens per document, EOS included. Returns (val_mask per document, cut_doc, cut_at):
    when cut_doc >= 0, tokens [cut_at:] of that train document go to val as well.
    """
    n_docs, total = len(lengths), int(lengths.sum())
    target = max(math.ceil(val_fraction * total), min_val_tokens, 1)
    val_mask = np.zeros(n_docs, dtype=bool)
    val_tokens, val_docs, budget = 0, 0, 2 * target
    rng = np.random.default_rng([seed, 0x5A11])
    for i in rng.permutation(n_docs):  # a count, not val_mask.sum(): that made this quadratic in n_docs
        if val_tokens >= target or val_docs == n_docs - 1:
            break
        if val_tokens + lengths[i] <= budget:
            val_mask[i] = True
            val_tokens += int(lengths[i])
            val_docs += 1
    cut_doc, cut_at = -1, 0
    if val_tokens < target:
        train_idx = np.flatnonzero(~val_mask)
        cut_doc = int(train_idx[np.argmax(lengths[train_idx])])
        take = min(target - val_tokens, int(lengths[cut_doc]) - 2)  # head keeps >= 1 token (+ its EOS)
        if take < 1:
            raise DataError(f"Too little data to hold out a validation set: {total} tokens in {n_docs} "
                            "document(s). Fix: pass more text.")
        cut_at = int(lengths[cut_doc]) - take
    return val_mask, cut_doc, cut_at


def _tokenized_features():
    import datasets

    return datasets.Features({"ids": datasets.List(datasets.Value("int32")), "n": datasets.Value("int32"),
                              "first": datasets.Value("bool")})


def _chunk_bounds(ds) -> list[tuple[int, int]]:
    """Row ranges [a, b) of `ds` holding about CHUNK_TEXT_BYTES of text each (one range for a small part)."""
    import pyarrow.compute as pc

    n = ds.num_rows
    if n == 0:
        return [(0, 0)]
    sizes = pc.binary_length(ds.with_format("arrow")["text"]).fill_null(0).to_numpy()
    ends = np.cumsum(sizes, dtype=np.int64)
    marks = np.arange(1, int(ends[-1]) // CHUNK_TEXT_BYTES + 1, dtype=np.int64) * CHUNK_TEXT_BYTES
    cuts = np.unique(np.searchsorted(ends, marks, side="left") + 1)  # each chunk ends at the row reaching its mark
    bounds = [0, *(int(c) for c in cuts if 0 < c < n), n]
    return list(zip(bounds[:-1], bounds[1:]))


def _finished(path: Path) -> bool:
    """Did a map finish writing `path` (one file, or with num_proc N its N shard files, as datasets names them)?"""
    if path.exists():
        return True
    counts: dict[int, int] = {}
    pattern = re.compile(re.escape(path.stem) + r"_\d{5}_of_(\d{5})" + re.escape(path.suffix))
    for f in path.parent.glob(f"{path.stem}_*_of_*{path.suffix}"):
        if m := pattern.fullmatch(f.name):
            counts[int(m[1])] = counts.get(int(m[1]), 0) + 1
    return any(found == total for total, found in counts.items())


def _tokenize(parts: list, tokenizer, eos_id: int, num_proc: int, tokens_key: str, work: Path):
    """Dataset.map over each part: text -> rows of ids (+ EOS at a document's end), their count `n`, and
    `first` (the row starts a document: a .txt file's pieces continue it). Empty documents are dropped.
    Chunk by chunk (_chunk_bounds), each map's output cached in `work` under a name that says what it holds:
    a chunk finished by an earlier, interrupted build is read back (datasets reuses a map's cache file) instead
    of tokenized again."""
    import datasets

    ids_of = batch_encoder(tokenizer)

    def encode(batch):
        ids = ids_of(batch["text"])
        whole = [True] * len(ids)
        out = {"ids": [], "n": [], "first": []}
        for x, first, last in zip(ids, batch.get("first", whole), batch.get("last", whole)):
            if last and (x or not first):  # a document's end, if it has text (its earlier pieces have)
                x.append(eos_id)
            if x or (first and not last):  # an empty first piece stays: it marks where its document starts
                out["ids"].append(x)
                out["n"].append(len(x))
                out["first"].append(first)
        return out

    # v3: chunked; the tokens' key covers the input's stats and the tokenizer, the rest says which rows
    jobs = [(ds, a, b, f"staged_fast-v3-{tokens_key}-{i}-{a}-{b}") for i, ds in enumerate(parts)
            for a, b in _chunk_bounds(ds)]
    kept = sum(_finished(work / f"{key}.arrow") for *_, key in jobs)
    if kept:
        logger.warning("data: resuming an interrupted preparation: %d of %d chunks were tokenized before (in %s)",
                       kept, len(jobs), work)
    tokenized = []
    for j, (ds, a, b, key) in enumerate(jobs):
        chunk = ds if (a, b) == (0, ds.num_rows) else ds.select(range(a, b))  # contiguous: no index file
        desc = "tokenizing" if len(jobs) == 1 else f"tokenizing {j + 1}/{len(jobs)}"
        tokenized.append(chunk.map(encode, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
                                   remove_columns=ds.column_names, new_fingerprint=key, desc=desc,
                                   features=_tokenized_features(), cache_file_name=str(work / f"{key}.arrow")))
    return datasets.concatenate_datasets(tokenized) if len(tokenized) > 1 else tokenized[0]


def _document_lengths(ds) -> np.ndarray:
    """Tokens per document (EOS included): the rows' counts summed from each row that starts a document."""
    if ds.num_rows == 0:  # every document empty (and the map's output then lacks its columns)
        return np.zeros(0, dtype=np.int64)
    columns = ds.with_format("arrow")  # datasets' own column access builds Python objects: 51 s for 5M rows
    counts = columns["n"].to_numpy().astype(np.int64)
    starts = np.flatnonzero(columns["first"].to_numpy(zero_copy_only=False))
    assert starts[0] == 0, "the first row must start a document"
    return np.add.reduceat(counts, starts)


class UnusableTokens(DataError):
    """The tokenized input cannot make a cache entry (no text, too little to hold out a validation set): a rerun
    of the same input cannot use what was tokenized. (An error while loading it may pass: a network outage, a
    file being copied.)"""


def _build(source: Source, tokenizer, out_dir: Path, *, fingerprint: str, tokens_key: str, tokenizer_name: str,
           text_field: str, val_fraction: float, min_val_tokens: int, seed: int, num_proc: int,
           cache_dir: Path, work: Path, whole: str | None = None) -> None:
    """Tokenize into `work` (.txt pieces and tokenized chunks: what a rerun resumes from), then write the entry."""
    t0 = time.perf_counter()
    vocab_size, eos_id = id_space(tokenizer), tokenizer.eos_token_id
    dtype = token_dtype(vocab_size)
    parts = load_texts(source, text_field=text_field, hf_cache_dir=cache_dir / "hf_datasets",
                       scratch_dir=work, holds=seam_check(tokenizer), num_proc=num_proc)
    ds = _tokenize(parts, tokenizer, eos_id, num_proc, tokens_key, work)
    try:
        _write(ds, source, out_dir, fingerprint=fingerprint, tokenizer_name=tokenizer_name, vocab_size=vocab_size,
               eos_id=eos_id, dtype=dtype, val_fraction=val_fraction, min_val_tokens=min_val_tokens, seed=seed,
               cache_dir=cache_dir, whole=whole, t0=t0)
    except DataError as e:
        raise UnusableTokens(str(e)) from None


def _write(ds, source: Source, out_dir: Path, *, fingerprint: str, tokenizer_name: str, vocab_size: int,
           eos_id: int, dtype: np.dtype, val_fraction: float, min_val_tokens: int, seed: int, cache_dir: Path,
           whole: str | None, t0: float) -> None:
    """Split the tokenized rows' documents, write train.bin / val.bin / meta.json, rename into `out_dir`."""
    lengths = _document_lengths(ds)
    # a document of its EOS alone is a .txt file whose every piece gave no tokens (a tokenizer that drops
    # what it cannot encode): dropped, as an empty document is
    kept = lengths > 1
    if not kept.any():
        raise DataError(f"No text in {source.description}: every document is empty (0 tokens). Fix: pass "
                        "data that contains text (and for jsonl/parquet, check --text_field).")
    index = np.flatnonzero(kept)
    kept_val, kept_cut, cut_at = _assign(lengths[index], whole, val_fraction=val_fraction,
                                         min_val_tokens=min_val_tokens, seed=seed)
    val_mask = np.zeros(len(lengths), dtype=bool)
    val_mask[index] = kept_val
    cut_doc = int(index[kept_cut]) if kept_cut >= 0 else -1
    n_val = int(lengths[val_mask].sum()) + (int(lengths[cut_doc]) - cut_at if cut_doc >= 0 else 0)
    n_train = int(lengths[index].sum()) - n_val + (1 if cut_doc >= 0 else 0)  # +1: the EOS after the cut head

    tmp = Path(tempfile.mkdtemp(prefix=f".{fingerprint}.tmp-", dir=cache_dir))
    try:
        train = _alloc(tmp / "train.bin", dtype, n_train)
        val = _alloc(tmp / "val.bin", dtype, n_val)
        ti = vi = 0
        doc, at = -1, 0  # the row's document, and where the row starts in it
        # streams arrow batches (no Python lists): memory stays bounded on large corpora
        for batch in ds.with_format("arrow").iter(batch_size=1024):
            rows = batch.column("ids").combine_chunks()
            flat = rows.flatten().to_numpy().astype(dtype, copy=False)
            ends = rows.offsets.to_numpy() - rows.offsets[0].as_py()
            for r, first in enumerate(batch.column("first").to_numpy(zero_copy_only=False)):
                a = flat[ends[r]:ends[r + 1]]
                if first:
                    doc, at = doc + 1, 0
                if not kept[doc]:
                    continue
                if doc == cut_doc:  # its tokens [:cut_at] train, then an EOS; the rest val
                    to_train = min(max(cut_at - at, 0), len(a))
                elif val_mask[doc]:
                    to_train = 0
                else:
                    to_train = len(a)
                train[ti:ti + to_train] = a[:to_train]
                ti += to_train
                if doc == cut_doc and at < cut_at <= at + len(a):  # the row holding the cut
                    train[ti] = eos_id
                    ti += 1
                val[vi:vi + len(a) - to_train] = a[to_train:]
                vi += len(a) - to_train
                at += len(a)
        assert (ti, vi) == (n_train, n_val), (ti, vi, n_train, n_val)
        for array in (train, val):
            if isinstance(array, np.memmap):
                array.flush()
        del train, val
        digest = _file_digest(tmp / "train.bin")  # what a resumed sampler checks it reads the tokens it read
        meta = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "source": source.description,
                "input": source.key, "tokenizer": tokenizer_name, "vocab_size": vocab_size, "eos_id": eos_id,
                "dtype": dtype.name, "train_tokens": n_train, "val_tokens": n_val, "documents": int(kept.sum()),
                "val_documents": int(val_mask.sum()), "val_cut_document": cut_doc >= 0,
                "val_fraction": val_fraction, "min_val_tokens": min_val_tokens, "seed": seed, "whole": whole,
                "train_digest": digest, "build_seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, out_dir)  # atomic; fails if another process finished first
        except OSError:
            if not _valid(out_dir):
                raise
        logger.info("data: %s -> %d train + %d val tokens (%s) in %.1f s, cached at %s", source.description,
                    n_train, n_val, dtype.name, meta["build_seconds"], out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _file_digest(path: Path) -> str:
    """BLAKE2b-128 of a file's bytes (~1 GB/s: seconds beside the tokenization)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def _valid(out_dir: Path) -> dict | None:
    """The meta of a complete cache entry, or None (missing, other format, or truncated files)."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        ok = (meta["format"] == FORMAT_VERSION
              and (out_dir / "train.bin").stat().st_size == meta["train_tokens"] * itemsize
              and (out_dir / "val.bin").stat().st_size == meta["val_tokens"] * itemsize)
        return meta if ok else None
    except (OSError, ValueError, KeyError):
        return None


def _dist_info() -> tuple[bool, int, int]:
    """(distributed?, rank, local rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False, 0, 0
    rank = dist.get_rank()
    return True, rank, int(os.environ.get("LOCAL_RANK", rank))


def prepare_data(data: list[str] | str | None, tokenizer, *, tokenizer_name: str,
                 cache_dir: str | Path = "~/.cache/staged_fast", val_fraction: float = 0.01,
                 min_val_tokens: int = 0, num_proc: int = 1, text_field: str = "text", seed: int = 0,
                 rank0_only_build: bool = True, val_data: list[str] | str | None = None) -> PreparedData:
    """Tokenized, packed, cached train/val token arrays for `data`.

    data: local files/folders (.txt = one document per file; .jsonl/.json/.parquet = one per record, text in
      `text_field`), or one folder written by datasets' save_to_disk (split train of a DatasetDict), or one hub
      dataset `name[:config]` (split train), or None for the bundled corpus.
    tokenizer: a transformers tokenizer with an EOS token; `tokenizer_name` is recorded and keys the cache
      (together with a hash of the tokenizer's full definition).
    val_fraction / min_val_tokens: the validation share in tokens (whole documents, at least one).
    num_proc: tokenization processes for `Dataset.map`. The seed's `--num_workers` meant DataLoader workers;
      here batches are memmap slices that need no workers, so that flag maps to this.
    seed: decides which documents are held out (part of the cache key).
    rank0_only_build: under torch.distributed, only local rank 0 builds; the others wait and open the cache.
    val_data: a separate validation set (same forms as `data`): then `data` is all train, `val_data` all
      validation, each cached on its own, and val_fraction / min_val_tokens / seed do not apply.

    The cache key of a hub dataset is its name and config (no revision): delete `cache_dir/<fingerprint>`
    to pick up a newer version. Local files are keyed by path, size and mtime; the bundled corpus by its hash.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}. Fix: pass e.g. --val_fraction 0.01.")
    if tokenizer.eos_token_id is None:
        raise DataError("The tokenizer has no EOS token, which separates documents. Fix: use a tokenizer "
                        "with one (e.g. 'gpt2') or set tokenizer.eos_token before preparing data.")
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(tokenizer=tokenizer, tokenizer_name=tokenizer_name, cache_dir=cache_dir, val_fraction=val_fraction,
                    min_val_tokens=min_val_tokens, num_proc=num_proc, text_field=text_field, seed=seed,
                    rank0_only_build=rank0_only_build)
    if val_data is None:
        meta, out_dir, fp = _prepare_one(data, None, **settings)
        train_meta, train_dir, val_meta, val_dir = meta, out_dir, meta, out_dir
        source = meta["source"]
    else:
        train_meta, train_dir, train_fp = _prepare_one(data, "train", **settings)
        val_meta, val_dir, val_fp = _prepare_one(val_data, "val", **settings)
        shared = sorted(_input_files(train_meta["input"]) & _input_files(val_meta["input"]))
        if train_meta["input"] == val_meta["input"] or shared:
            what = f"the same input as --data ({val_meta['source']})" if train_meta["input"] == val_meta["input"] \
                else f"files of --data ({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''})"
            raise DataError(f"--val_data names {what}: the validation loss would be measured on training text. Fix: "
                            f"give held-out text to --val_data, or leave it out to hold out a --val_fraction of "
                            f"--data.")
        fp = hashlib.sha256(f"{train_fp}:{val_fp}".encode()).hexdigest()[:20]
        source = f"{train_meta['source']} (train) + {val_meta['source']} (val)"
    dtype = np.dtype(train_meta["dtype"])
    return PreparedData(
        train=_open(train_dir / "train.bin", dtype, train_meta["train_tokens"]),
        val=_open(val_dir / "val.bin", dtype, val_meta["val_tokens"]),
        vocab_size=train_meta["vocab_size"], eos_id=train_meta["eos_id"], fingerprint=fp, source=source,
        folders=(train_dir,) if val_dir == train_dir else (train_dir, val_dir),
        train_digest=train_meta.get("train_digest"))


def _build_once(out_dir: Path, fingerprint: str, tokens_key: str, cache_dir: Path,
                build: Callable[[Path], None]) -> None:
    """Run `build(work folder)` for a cache entry unless another process built it meanwhile. One builder per
    input and tokenizer (`tokens_key`'s lock): a second job on the same data and cache (on any node, where the
    filesystem's flock reaches it) waits for the first and then finds the entry, instead of tokenizing it again.
    Holding the lock, the work folder `.tokens-<key>.work` is this build's: what an interrupted build tokenized
    there is resumed from, and the temporary files it was writing are removed; the folder goes once the entry
    is complete, or when the tokens cannot make one (UnusableTokens: a rerun cannot use them). Where another
    builder is seen alive in the folder anyway (locks that do not reach across nodes), or the filesystem has no
    flock, the build works in a private folder instead (no resume, nothing shared)."""
    from ..run_folder import RunLock, describe_holder, remove_leftovers

    def waiting(holder: dict | None) -> None:
        logger.warning("data: another process is preparing this data (%s) into %s: waiting for it to finish "
                       "(to go on without it: stop that process, or give this one another --cache_dir)",
                       describe_holder(holder), out_dir)

    lock = RunLock(cache_dir, flag="--cache_dir", name=f".tokens-{tokens_key}.lock", role="a data cache")
    lock.acquire(wait=waiting)
    heartbeat = None
    try:
        if _valid(out_dir) is not None:
            logger.info("data: %s was prepared by the process waited for", out_dir)
            return
        shared = cache_dir / f".tokens-{tokens_key}.work"
        private = lock.warning is not None
        if private:  # no flock there: another builder's folders look like leftovers
            logger.warning("data: %s", lock.warning.removeprefix("warning: "))
        else:  # a private builder keeps its marker here too: a third one then steps aside as well
            heartbeat = _Heartbeat.start(shared)
            private = heartbeat.others_alive()
            if private:
                logger.warning("data: another builder is alive in %s although this process holds its lock (the "
                               "filesystem's locks do not reach across nodes?): tokenizing in a private folder, "
                               "which a rerun cannot resume from", shared)
        if private:
            work = Path(tempfile.mkdtemp(prefix=f".{fingerprint}.scratch-", dir=cache_dir))
        else:
            work = shared
            count, freed = remove_leftovers(cache_dir, (f".{fingerprint}.tmp-", f".{fingerprint}.scratch-"))
            if count:
                logger.warning("data: removed %d folder(s) (%.1f MB) left in %s by interrupted preparations of this "
                               "data", count, freed / 1e6, cache_dir)
            _remove_partial_writes(work)
            _mention_other_work(cache_dir, work)
        if out_dir.exists():  # a stale or foreign entry under our key: replace it
            shutil.rmtree(out_dir, ignore_errors=True)
        try:
            build(work)
        except UnusableTokens:
            shutil.rmtree(work, ignore_errors=True)
            raise
        except BaseException:
            if private:
                shutil.rmtree(work, ignore_errors=True)
            else:
                logger.warning("data: preparation stopped; what it tokenized so far stays in %s and the same command "
                               "resumes from it (delete that folder to free its space instead)", work)
            raise
        if heartbeat is not None:
            heartbeat.stop()
            heartbeat = None
        shutil.rmtree(work, ignore_errors=True)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        lock.release()


class _Heartbeat:
    """A builder's marker in the shared work folder, touched every PERIOD seconds while it builds. The lock
    should keep a second builder out; where it does not (flock that is local to each node), the second sees a
    marker younger than STALE and works privately instead of removing the first one's files."""

    PERIOD, STALE = 15.0, 60.0

    def __init__(self, marker: Path):
        import threading

        self.marker, self._stopped = marker, threading.Event()
        self._thread = threading.Thread(target=self._beat, name="data-build-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, work: Path) -> "_Heartbeat":
        import socket

        work.mkdir(parents=True, exist_ok=True)
        marker = work / f".builder-{socket.gethostname()}-{os.getpid()}"
        marker.touch()  # ours first, then others_alive: two racing builders both step aside, never share
        return cls(marker)

    def others_alive(self) -> bool:
        """Is another builder's marker fresh (younger than STALE, and not a dead process of this host)? Dead
        builders' markers are removed."""
        import socket

        host, now, alive = socket.gethostname(), time.time(), False
        for other in self.marker.parent.glob(".builder-*"):
            if other == self.marker:
                continue
            try:
                young = now - other.stat().st_mtime < self.STALE
            except FileNotFoundError:
                continue
            if young and not _dead_here(other.name.removeprefix(".builder-"), host):
                alive = True
            else:
                other.unlink(missing_ok=True)  # a builder that died: its files are leftovers
        return alive

    def _beat(self) -> None:
        while not self._stopped.wait(self.PERIOD):
            try:
                os.utime(self.marker)
            except OSError:
                return

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        self.marker.unlink(missing_ok=True)
        try:  # a folder made only for the marker (a private build's) goes too; one with work stays
            self.marker.parent.rmdir()
        except OSError:
            pass


def _dead_here(builder: str, host: str) -> bool:
    """Is `builder` ("<host>-<pid>") a process of this host that no longer runs (killed: its marker stays)?"""
    who, _, pid = builder.rpartition("-")
    if who != host or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _mention_other_work(cache_dir: Path, work: Path) -> None:
    """Work folders of other inputs or tokenizers: builds that were interrupted (their own commands resume them)
    or run now. Only said: whether they will run again is the user's to know."""
    others = [p for p in cache_dir.glob(".tokens-*.work") if p != work and p.is_dir()]
    if others:
        size = sum(f.stat().st_size for p in others for f in p.rglob("*") if f.is_file())
        logger.warning("data: %d work folder(s) of other preparations (interrupted, or running now) hold %.1f MB in "
                       "%s: their commands resume them; delete the .tokens-*.work folders that will not run again",
                       len(others), size / 1e6, cache_dir)


def _remove_partial_writes(work: Path) -> None:
    """The files a killed build was writing in its work folder: datasets writes a map's output to a `tmp*`
    file and a generated dataset to a `*.incomplete` folder, and renames them only when complete."""
    if not work.is_dir():
        return
    for path in sorted(work.rglob("*"), reverse=True):  # deepest first
        if path.name.endswith(".incomplete") and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith("tmp") and path.is_file():
            path.unlink(missing_ok=True)


_WAITS = 0  # prepare_data calls waited for so far: every rank makes them in the same order


def _gather_build_errors(fingerprint: str, error: str | None) -> list[str | None]:
    """Every rank's build error (or None), once every rank has one: the ranks that do not build wait here for
    those that do, up to a day (tokenizing a large corpus can outlast the default group's 30 minutes). Through
    the rendezvous store, which every rank already reaches, rather than a collective: a new gloo group would
    need gloo's networking between nodes that run NCCL alone."""
    global _WAITS
    import datetime

    import torch.distributed as dist

    _WAITS += 1
    world, rank = dist.get_world_size(), dist.get_rank()
    get_store = getattr(dist.distributed_c10d, "_get_default_store", None)  # private, present since torch 1.x
    if get_store is None:  # a future torch without it: the default group's collective, with its timeout
        errors = [None] * world
        dist.all_gather_object(errors, error)
        return errors
    store = get_store()
    # keyed by the call, not the fingerprint: nodes with their own copy of the data (other mtimes) have other
    # fingerprints, build their own entries, and must still meet here
    keys = [f"staged_fast/data/{_WAITS}/{r}" for r in range(world)]
    store.set(keys[rank], json.dumps({"fingerprint": fingerprint, "error": error}))
    store.wait(keys, datetime.timedelta(days=1))
    return [json.loads(store.get(key))["error"] for key in keys]


def _input_files(key: dict) -> set[str]:
    """The real paths of the files an input reads (its cache key lists them), so that links and spellings of
    one file compare equal: a --val_data file inside the --data folder was accepted."""
    return {os.path.realpath(entry[0]) for entry in (*key.get("files", ()), *key.get("saved", ()))}


def _prepare_one(data, whole: str | None, *, tokenizer, tokenizer_name: str, cache_dir: Path, val_fraction: float,
                 min_val_tokens: int, num_proc: int, text_field: str, seed: int,
                 rank0_only_build: bool) -> tuple[dict, Path, str]:
    """Build (or find) the cache entry of one input, split or `whole` (train / val): (meta, folder, key)."""
    source = resolve_source(data, text_field=text_field)
    fp = _fingerprint(source, tokenizer, tokenizer_name, val_fraction, min_val_tokens, seed, whole)
    tokens_key = _tokens_key(source, tokenizer, tokenizer_name)
    out_dir = cache_dir / fp

    distributed, rank, local_rank = _dist_info()
    builder = not (distributed and rank0_only_build) or local_rank == 0
    error = None
    if builder and _valid(out_dir) is None:
        try:
            _build_once(out_dir, fp, tokens_key, cache_dir, lambda work: _build(
                source, tokenizer, out_dir, fingerprint=fp, tokens_key=tokens_key, tokenizer_name=tokenizer_name,
                text_field=text_field, val_fraction=val_fraction, min_val_tokens=min_val_tokens, seed=seed,
                num_proc=num_proc, cache_dir=cache_dir, work=work, whole=whole))
        except Exception as e:
            if not distributed:
                raise
            error = e
    elif builder:
        logger.info("data: cache hit %s (%s)", out_dir, source.description)
    if distributed:  # doubles as the barrier: nobody opens the files before the builders are done
        errors = _gather_build_errors(fp, None if error is None else f"rank {rank}: {type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [m for m in errors if m is not None]
        if failed:
            raise DataError(f"Data preparation failed on another rank: {failed[0]}")
    meta = _valid(out_dir)
    if meta is None:
        raise DataError(f"The data cache {out_dir} is missing or incomplete after preparation. Fix: with "
                        "several nodes, put --cache_dir on a filesystem every node can read, or pass "
                        "rank0_only_build=False; else delete the folder and retry.")
    return meta, out_dir, fp
