"""Data pipeline: inputs -> packed token streams, cache, split, sampler order/sharding/resume, errors."""
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import staged_fast.data.prepare as prepare_mod
from staged_fast.data import (DataError, TokenSampler, num_windows, prepare_data, split_documents,
                              token_dtype, val_batches)
from staged_fast.tokenizer import load_tokenizer

DOCS = [f"Document number {i}: the quick brown fox {'jumps ' * (i % 3 + 1)}over the lazy dog." for i in range(12)]


@pytest.fixture(scope="module", autouse=True)
def quiet():
    import datasets
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()



def prep(data, tok, tmp_path, **kw):
    kw.setdefault("val_fraction", 0.1)
    return prepare_data(data, tok, tokenizer_name="gpt2", cache_dir=tmp_path / "cache", **kw)


def split_at_eos(arr, eos):
    arr = np.asarray(arr).tolist()
    assert arr and arr[-1] == eos, "every stream ends with an EOS"
    out, cur = [], []
    for t in arr:
        if t == eos:
            out.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    return out


def assert_streams(p, texts, tok):
    """train / val are whole documents + EOS, in input order, disjoint, together all documents."""
    expected = [tuple(tok.encode(t)) for t in texts if t]
    train, val = split_at_eos(p.train, p.eos_id), split_at_eos(p.val, p.eos_id)
    assert train and val
    assert not set(train) & set(val)
    val_set = set(val)
    assert train == [e for e in expected if e not in val_set]
    assert val == [e for e in expected if e in val_set]


# ---------------------------------------------------------------- inputs


def test_txt_files(tok, tmp_path):
    paths = []
    for i, d in enumerate(DOCS):
        paths.append(tmp_path / f"doc{i:02d}.txt")
        paths[-1].write_text(d)
    p = prep([str(x) for x in paths], tok, tmp_path)
    assert p.eos_id == 50256 and p.vocab_size == 50257 and p.train.dtype == np.uint16
    assert isinstance(p.train, np.memmap) and "12 local files" in p.source
    assert_streams(p, DOCS, tok)


def test_jsonl_json_and_text_field(tok, tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(DOCS)))
    p = prep([str(tmp_path / "a.jsonl")], tok, tmp_path, text_field="body")
    assert_streams(p, DOCS, tok)
    (tmp_path / "b.json").write_text(json.dumps([{"text": d} for d in DOCS]))  # a JSON array works too
    assert_streams(prep([str(tmp_path / "b.json")], tok, tmp_path), DOCS, tok)


def test_parquet(tok, tmp_path):
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "a.parquet")
    assert_streams(prep([str(tmp_path / "a.parquet")], tok, tmp_path), DOCS, tok)


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_save_to_disk_folders(tok, tmp_path, monkeypatch):
    """Dataset / DatasetDict save_to_disk folders are read with load_from_disk (text field, train split), left
    untouched, cached, and the cache follows their files."""
    import datasets

    ds = datasets.Dataset.from_dict({"id": list(range(len(DOCS))), "body": DOCS})
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"validation": ds.select(range(2)), "train": ds}).save_to_disk(str(tmp_path / "dd"))
    before = {name: _listing(tmp_path / name) for name in ("ds", "dd")}
    p = prep([str(tmp_path / "ds")], tok, tmp_path, text_field="body")
    assert_streams(p, DOCS, tok)
    assert "datasets folder ds" in p.source
    q = prep(str(tmp_path / "dd"), tok, tmp_path, text_field="body")
    assert_streams(q, DOCS, tok)
    assert "split train" in q.source and q.fingerprint != p.fingerprint
    assert {name: _listing(tmp_path / name) for name in ("ds", "dd")} == before  # no cache files written there

    def no_build(*a, **k):
        raise AssertionError("rebuilt although cached")
    monkeypatch.setattr(prepare_mod, "_build", no_build)
    assert prep([str(tmp_path / "ds")], tok, tmp_path, text_field="body").fingerprint == p.fingerprint
    datasets.Dataset.from_dict({"body": DOCS[:6]}).save_to_disk(str(tmp_path / "ds2"))
    import shutil
    shutil.rmtree(tmp_path / "ds")
    (tmp_path / "ds2").rename(tmp_path / "ds")  # other contents in the same folder: a new cache entry
    with pytest.raises(AssertionError, match="rebuilt"):
        prep([str(tmp_path / "ds")], tok, tmp_path, text_field="body")


def test_save_to_disk_folder_errors(tok, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"body": DOCS})
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match=r"no 'train' split \(its splits: a, b\)"):
        prep([str(tmp_path / "two")], tok, tmp_path)
    ds.save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DataError, match=r"no field 'text'.*body.*--text_field"):
        prep([str(tmp_path / "one")], tok, tmp_path)
    (tmp_path / "a.txt").write_text(DOCS[0])
    with pytest.raises(DataError, match="given alone"):
        prep([str(tmp_path / "one"), str(tmp_path / "a.txt")], tok, tmp_path, text_field="body")
    (tmp_path / "outer").mkdir()
    ds.save_to_disk(str(tmp_path / "outer" / "inner"))
    with pytest.raises(DataError, match="save_to_disk.*pass it alone"):
        prep([str(tmp_path / "outer")], tok, tmp_path, text_field="body")
    (tmp_path / "one" / "state.json").write_text("{not json")
    with pytest.raises(DataError, match="state.json cannot be read"):
        prep([str(tmp_path / "one")], tok, tmp_path, text_field="body")


def test_folder_walk_mixed_types_and_empty_docs(tok, tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(DOCS[0])
    (root / "b.txt").write_text("")  # empty file: no document, no EOS
    pq.write_table(pa.table({"text": DOCS[1:5]}), root / "c.parquet")
    (root / "sub" / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in ["", *DOCS[5:]]))
    (root / "notes.md").write_text("ignored")
    (root / ".hidden.txt").write_text("ignored")
    p = prep([str(root)], tok, tmp_path)
    assert_streams(p, DOCS, tok)
    assert "4 local files" in p.source


def test_uint32_for_large_vocab(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    docs = [" ".join(f"w{(i * 7919 + j * 104729) % 70_000}" for j in range(50)) for i in range(20)]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    p = prepare_data([str(tmp_path / "big.jsonl")], big, tokenizer_name="wordlevel", cache_dir=tmp_path / "c",
                     val_fraction=0.1)
    assert p.train.dtype == np.uint32 and p.vocab_size == 70_001
    assert p.train.max() > 65_535
    assert_streams(p, docs, big)
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_bundled_corpus(tok, tmp_path):
    p = prep(None, tok, tmp_path, val_fraction=0.01)
    n = len(p.train) + len(p.val)
    assert n > 1_000_000 and p.train.dtype == np.uint16 and "bundled" in p.source
    assert 0.01 * n <= len(p.val) <= 0.03 * n
    assert tok.decode(p.train[:2000]).count("<|endoftext|>") > 5  # fortunes are short documents


# ---------------------------------------------------------------- cache


def test_cache_hit_and_invalidation(tok, tmp_path, monkeypatch):
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    first = prep([str(f)], tok, tmp_path)
    train0 = np.array(first.train)
    entries = sorted(os.listdir(tmp_path / "cache"))
    assert first.fingerprint in entries and not [e for e in entries if ".tmp-" in e]

    def no_build(*a, **k):
        raise AssertionError("rebuilt although cached")
    monkeypatch.setattr(prepare_mod, "_build", no_build)
    again = prep([str(f)], tok, tmp_path)
    assert again.fingerprint == first.fingerprint and np.array_equal(again.train, train0)

    # a different split seed or val_fraction, or a changed file, is a different cache entry
    for kw in ({"seed": 1}, {"val_fraction": 0.2}):
        with pytest.raises(AssertionError, match="rebuilt"):
            prep([str(f)], tok, tmp_path, **kw)
    f.write_text(f.read_text() + json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(AssertionError, match="rebuilt"):
        prep([str(f)], tok, tmp_path)


def test_a_file_rewritten_with_its_mtime_kept_is_read_afresh(tok, tmp_path):
    """datasets keys its own cache on a file's path and mtime: a new version with the old mtime (tar, rsync -a,
    cp -p) was read from the old text into a new entry of ours (its size differs, so our key changed)."""
    f = tmp_path / "a.txt"
    f.write_text(" ".join(["apple"] * 300))
    os.utime(f, (1_700_000_000, 1_700_000_000))
    prep([str(f)], tok, tmp_path)
    f.write_text(" ".join(["cherry"] * 500))
    os.utime(f, (1_700_000_000, 1_700_000_000))
    again = prep([str(f)], tok, tmp_path)
    text = tok.decode(np.concatenate([again.train, again.val]).tolist())
    assert "cherry" in text and "apple" not in text


def test_linked_folders_inside_a_data_folder_are_read_once(tok, tmp_path):
    """A symlinked subfolder was skipped silently (os.walk does not follow links); a link back up must not loop."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.txt").write_text("linked document text")
    top = tmp_path / "top"
    top.mkdir()
    (top / "a.txt").write_text("own document text")
    (top / "linked").symlink_to(other)
    (other / "up").symlink_to(top)  # a loop: top/linked/up is top
    from staged_fast.data.sources import _walk

    assert [p.name for p in _walk(top)] == ["a.txt", "b.txt"]


def test_a_file_that_is_not_utf8_is_named(tok, tmp_path):
    """datasets' error named the first three files of the folder, none of them the bad one."""
    folder = tmp_path / "mix"
    folder.mkdir()
    for i in range(4):
        (folder / f"a{i}.txt").write_text(f"good text {i}\n")
    (folder / "z_bad.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"z_bad\.txt is not UTF-8 text: byte 0xe9 at offset 3 \(line 1\)"):
        prep([str(folder)], tok, tmp_path)


def test_a_text_field_that_is_not_text_is_refused(tok, tmp_path):
    """A number, a list (the tokenizer took it for a text pair and joined it silently) or a missing value."""
    cases = {"number": [{"text": "a b c"}, {"text": 123}], "list": [{"text": ["a", "b"]}],
             "null": [{"text": "a b c"}, {"text": None}], "absent": [{"text": "a b c"}, {"body": "x"}]}
    for name, rows in cases.items():
        f = tmp_path / f"{name}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        match = "have no value" if name in ("null", "absent") else "not all strings|not text"
        with pytest.raises(DataError, match=match):
            prep([str(f)], tok, tmp_path)
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"holds Value\('int64'\) values, not text"):
        prep([str(tmp_path / "ints.parquet")], tok, tmp_path)


def test_a_tokenizer_with_gaps_in_its_ids_sizes_by_its_largest_id(tmp_path):
    """28 entries with EOS at id 70000: len(tokenizer) is 28; the token file needs uint32 and the model 70001."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from staged_fast.tokenizer import id_space

    vocab = {**{f"w{i}": i for i in range(27)}, "<eos>": 70_000}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    gappy = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    assert len(gappy) == 28 and id_space(gappy) == 70_001
    docs = [" ".join(f"w{(i + j) % 27}" for j in range(40)) for i in range(20)]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    p = prepare_data([str(tmp_path / "g.jsonl")], gappy, tokenizer_name="gappy", cache_dir=tmp_path / "c",
                     val_fraction=0.1)
    assert p.vocab_size == 70_001 and p.train.dtype == np.uint32 and p.train.max() == 70_000


def test_truncated_cache_is_rebuilt(tok, tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(" ".join(DOCS))
    first = prep([str(f)], tok, tmp_path)
    train0, val0 = np.array(first.train), np.array(first.val)
    del first
    bin_path = tmp_path / "cache" / prep([str(f)], tok, tmp_path).fingerprint / "train.bin"
    with open(bin_path, "r+b") as fh:  # as if a crash left a half-written file
        fh.truncate(10)
    again = prep([str(f)], tok, tmp_path)
    assert np.array_equal(again.train, train0) and np.array_equal(again.val, val0)


# ---------------------------------------------------------------- split


def test_split_documents_rules():
    lengths = np.array([10, 12, 9, 11, 10, 10, 13, 8, 10, 9] * 10)
    mask, cut, _ = split_documents(lengths, val_fraction=0.05, min_val_tokens=0, seed=3)
    val = lengths[mask].sum()
    assert cut == -1 and 0.05 * lengths.sum() <= val <= 0.1 * lengths.sum()
    again, _, _ = split_documents(lengths, val_fraction=0.05, min_val_tokens=0, seed=3)
    other, _, _ = split_documents(lengths, val_fraction=0.05, min_val_tokens=0, seed=4)
    assert np.array_equal(mask, again) and not np.array_equal(mask, other)
    mask, _, _ = split_documents(lengths, val_fraction=0.05, min_val_tokens=300, seed=3)
    assert lengths[mask].sum() >= 300
    # one document: its tail is held out; two huge ones: never all of them in val
    mask, cut, at = split_documents(np.array([1000]), val_fraction=0.1, min_val_tokens=0, seed=0)
    assert not mask.any() and cut == 0 and at == 900
    mask, cut, at = split_documents(np.array([500, 500]), val_fraction=0.01, min_val_tokens=0, seed=0)
    assert not mask.any() and cut in (0, 1) and at == 490


def test_single_text_file_tail_split(tok, tmp_path):
    text = " ".join(DOCS)
    (tmp_path / "one.txt").write_text(text)
    p = prep([str(tmp_path / "one.txt")], tok, tmp_path, val_fraction=0.2)
    ids = tok.encode(text)
    head = np.asarray(p.train).tolist()
    assert head[-1] == p.eos_id and head[:-1] + np.asarray(p.val).tolist() == ids + [p.eos_id]
    assert len(p.val) == int(np.ceil(0.2 * (len(ids) + 1)))


# ---------------------------------------------------------------- errors


def test_errors(tok, tmp_path):
    def err(data, match, **kw):
        with pytest.raises(DataError, match=match):
            prep(data, tok, tmp_path, **kw)

    err([str(tmp_path / "missing.txt")], r"missing\.txt.*does not exist")
    err([str(tmp_path / "nope" / "dir")], "does not exist")
    (tmp_path / "empty.txt").write_text("")
    err([str(tmp_path / "empty.txt")], "No text")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    err([str(tmp_path / "blank.jsonl")], "No text")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "emptydir" / "readme.md").write_text("x")
    err([str(tmp_path / "emptydir")], "holds no")
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    err([str(tmp_path / "a.jsonl")], r"no field 'text'.*body.*--text_field")
    (tmp_path / "a.csv").write_text("text\nhello\n")
    err([str(tmp_path / "a.csv")], r"Unsupported.*\.csv")
    err([], "No data")
    err([str(tmp_path / "a.jsonl")], "val_fraction", val_fraction=0.0)


def test_hub_names_and_paths_told_apart():
    from staged_fast.data.sources import resolve_source

    s = resolve_source(["wikitext:wikitext-103-raw-v1"])
    assert (s.kind, s.hub_name, s.hub_config) == ("hub", "wikitext", "wikitext-103-raw-v1")
    s = resolve_source("allenai/c4")
    assert (s.kind, s.hub_name, s.hub_config) == ("hub", "allenai/c4", None)
    for missing in ("./corpus", "data/dir/x", "train.jsonl", "~/x"):
        with pytest.raises(DataError, match="does not exist"):
            resolve_source([missing])
    with pytest.raises(DataError, match="does not exist"):  # a hub name is only taken alone
        resolve_source(["wikitext", "allenai/c4"])


# ---------------------------------------------------------------- sampler

TOK = np.arange(1001, dtype=np.int64)  # token value = position, so a window's first token tells which window


def windows(x, seqlen):
    return (x[:, 0] // seqlen).tolist()


def test_sampler_windows_and_epochs():
    s = TokenSampler(TOK, seqlen=10, batch_size=7, seed=5)
    n = num_windows(len(TOK), 10)
    assert n == 100
    seen = []
    for _ in range(30):  # 210 samples: two full epochs and a bit, batches straddle epoch ends
        x, y = s.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (7, 10)
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
        assert torch.equal(x - x[:, :1], torch.arange(10).expand(7, 10))  # contiguous windows
        assert all(v % 10 == 0 for v in x[:, 0].tolist())
        seen += windows(x, 10)
    assert sorted(seen[:100]) == list(range(100)) and sorted(seen[100:200]) == list(range(100))
    assert seen[:100] != seen[100:200]  # reshuffled per epoch
    assert seen == TokenSampler(TOK, seqlen=10, batch_size=1, seed=5).windows_for(0, 210).tolist()


def test_sampler_determinism():
    a, b, c = (TokenSampler(TOK, seqlen=16, batch_size=4, seed=s) for s in (1, 1, 2))
    for _ in range(5):
        xa, xb, xc = a.next_batch()[0], b.next_batch()[0], c.next_batch()[0]
        assert torch.equal(xa, xb)
    assert not torch.equal(xa, xc)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_disjoint_and_match_single_rank(world):
    B, steps = 3, 8
    single = TokenSampler(TOK, seqlen=10, batch_size=B, seed=0)
    ref = [single.next_batch()[0] for _ in range(steps * world)]
    ranks = [TokenSampler(TOK, seqlen=10, batch_size=B, rank=r, world_size=world, seed=0) for r in range(world)]
    for k in range(steps):
        got = [s.next_batch()[0] for s in ranks]
        for r in range(world):
            assert torch.equal(got[r], ref[k * world + r])
        step_windows = [w for g in got for w in windows(g, 10)]
        # within one epoch (first 100 samples) no sample repeats across ranks
        if (k + 1) * world * B <= 100:
            assert len(set(step_windows)) == len(step_windows)
    # union over ranks == single rank's stream
    assert ranks[0].consumed_samples == single.consumed_samples == steps * world * B


def test_state_dict_resume_is_bit_exact():
    full = TokenSampler(TOK, seqlen=10, batch_size=6, rank=1, world_size=2, seed=9)
    part = TokenSampler(TOK, seqlen=10, batch_size=6, rank=1, world_size=2, seed=9)
    ref = [full.next_batch() for _ in range(20)]  # crosses epoch ends (100 windows, 12 samples per step)
    for _ in range(7):
        part.next_batch()
    state = json.loads(json.dumps(part.state_dict()))  # survives serialization
    assert state["consumed_samples"] == 7 * 2 * 6 and state["micro_batches"] == 7
    resumed = TokenSampler(TOK, seqlen=10, batch_size=6, rank=1, world_size=2, seed=9)
    resumed.load_state_dict(state)
    for k in range(7, 20):
        x, y = resumed.next_batch()
        assert torch.equal(x, ref[k][0]) and torch.equal(y, ref[k][1])
    assert resumed.state_dict()["consumed_samples"] == full.state_dict()["consumed_samples"]


def test_resume_with_other_world_size_continues_at_first_unseen_sample():
    old = [TokenSampler(TOK, seqlen=10, batch_size=4, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(5):
        for s in old:
            s.next_batch()
    state = old[0].state_dict()
    assert state["consumed_samples"] == 40
    stream = TokenSampler(TOK, seqlen=10, batch_size=1, seed=3).windows_for(0, 100).tolist()
    new = [TokenSampler(TOK, seqlen=10, batch_size=2, rank=r, world_size=3, seed=3) for r in range(3)]
    for s in new:
        s.load_state_dict(state)
    got = []
    for _ in range(4):
        for s in new:
            got += windows(s.next_batch()[0], 10)
    assert sorted(got) == sorted(stream[40:64])  # exactly the next unseen samples, none seen before
    assert new[0].state_dict()["consumed_samples"] == 64


def test_sampler_errors():
    s = TokenSampler(TOK, seqlen=10, batch_size=4, seed=0)
    for key, other in (("seed", TokenSampler(TOK, seqlen=10, batch_size=4, seed=1)),
                       ("seqlen", TokenSampler(TOK, seqlen=20, batch_size=4, seed=0))):
        with pytest.raises(DataError, match=f"{key}="):
            s.load_state_dict(other.state_dict())
    with pytest.raises(DataError, match=r"50 tokens.*seqlen \+ 1 = 64.*--seqlen"):
        TokenSampler(np.zeros(50, np.uint16), seqlen=63, batch_size=1)
    with pytest.raises(DataError, match="rank"):
        TokenSampler(TOK, seqlen=10, batch_size=1, rank=2, world_size=2)


def test_a_resume_on_other_tokens_with_as_many_samples_is_refused(tok, tmp_path):
    """The sampler compared only its layout: a checkpoint resumed on other tokens with as many samples (data
    rewritten, another tokenizer of the same size) went on over different text. The cache keeps a digest of
    train.bin, the same for the same build anywhere, and the sampler compares it when both sides have one."""
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"text": f"Record {i}: barges carry coal and salt downriver."}) + "\n"
                            for i in range(60)))
    one = prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=tmp_path / "one", val_fraction=0.1)
    two = prepare_data([str(data)], tok, tokenizer_name="gpt2", cache_dir=tmp_path / "two", val_fraction=0.1)
    assert one.train_digest == two.train_digest == hashlib.blake2b(np.asarray(one.train).tobytes(),
                                                                      digest_size=16).hexdigest()
    saved = TokenSampler(TOK, seqlen=10, batch_size=4, seed=0, data_digest="0" * 32)
    saved.next_batch()
    with pytest.raises(DataError, match="other training tokens.*--reset_data_order"):
        TokenSampler(TOK, seqlen=10, batch_size=4, seed=0, data_digest="1" * 32).load_state_dict(saved.state_dict())
    for digest in ("0" * 32, None):  # the same tokens, or a cache entry written before digests: resumed
        TokenSampler(TOK, seqlen=10, batch_size=4, seed=0, data_digest=digest).load_state_dict(saved.state_dict())


def test_val_batches():
    one = list(val_batches(TOK, seqlen=10, batch_size=4, num_batches=6))
    assert len(one) == 6 and windows(one[0][0], 10) == [0, 1, 2, 3]
    again = list(val_batches(TOK, seqlen=10, batch_size=4, num_batches=6))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one, again))
    r0 = list(val_batches(TOK, seqlen=10, batch_size=4, num_batches=3, rank=0, world_size=2))
    r1 = list(val_batches(TOK, seqlen=10, batch_size=4, num_batches=3, rank=1, world_size=2))
    w0 = {w for x, _ in r0 for w in windows(x, 10)}
    w1 = {w for x, _ in r1 for w in windows(x, 10)}
    assert not w0 & w1 and w0 | w1 == set(range(24))
    assert torch.equal(r1[0][0], one[1][0])  # rank r gets global batch k*W + r
    # capped at what the data holds, same count on every rank
    assert len(list(val_batches(TOK, seqlen=10, batch_size=30, num_batches=9, rank=1, world_size=3))) == 1
    with pytest.raises(DataError, match="fewer than one batch"):
        list(val_batches(TOK, seqlen=10, batch_size=60, num_batches=1, world_size=2))
    with pytest.raises(DataError, match="seqlen"):
        list(val_batches(TOK[:5], seqlen=10, batch_size=1, num_batches=1))


# ---------------------------------------------------------------- torch.distributed


def _dist_worker(rank, world, init_file, data, cache_dir, results, timeout_s=1800, build_delay_s=0):
    import datetime
    import time

    import torch.distributed as dist

    import staged_fast.data.prepare as pm
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        if rank != 0:
            def no_build(*a, **k):
                raise AssertionError("a non-zero rank built the cache")
            pm._build = no_build
        elif build_delay_s:
            real_build = pm._build

            def slow_build(*a, **k):
                time.sleep(build_delay_s)
                return real_build(*a, **k)
            pm._build = slow_build
        try:
            p = pm.prepare_data(data, load_tokenizer("gpt2"), tokenizer_name="gpt2", cache_dir=cache_dir,
                                val_fraction=0.1)
            results[rank] = (p.fingerprint, np.asarray(p.train).tolist())
        except DataError as e:
            results[rank] = ("error", str(e))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_rank0_builds_and_errors_reach_every_rank(tmp_path):
    import torch.multiprocessing as mp

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (tmp_path / "empty.txt").write_text("")
    manager = mp.Manager()
    for name, data in (("good", [str(good)]), ("bad", [str(tmp_path / "empty.txt")])):
        results = manager.dict()
        mp.start_processes(_dist_worker, args=(2, tmp_path / f"init_{name}", data, tmp_path / "cache", results),
                           nprocs=2, start_method="fork")  # fork: the children need not re-import torch
        if name == "good":
            assert results[0] == results[1] and results[0][0] != "error"
        else:
            assert results[0][0] == results[1][0] == "error"
            assert "No text" in results[0][1] and "another rank" in results[1][1]


def test_a_build_longer_than_the_groups_timeout_does_not_time_out_the_waiting_rank(tmp_path):
    """Rank 1 waits for rank 0's build longer than the process group's timeout (2 s here, 30 minutes in
    training): it waits on the rendezvous store, up to a day, and both ranks open the same data."""
    import torch.multiprocessing as mp

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    results = mp.Manager().dict()
    mp.start_processes(_dist_worker, args=(2, tmp_path / "init", [str(good)], tmp_path / "cache", results, 2, 6),
                       nprocs=2, start_method="fork")
    assert results[0] == results[1] and results[0][0] != "error"


def _gather_worker(rank, world, init_file, results):
    import torch.distributed as dist

    import staged_fast.data.prepare as pm
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results[rank] = pm._gather_build_errors(f"fingerprint-of-node-{rank}", None if rank else "rank 0: boom")
    finally:
        dist.destroy_process_group()


def test_ranks_with_their_own_copies_of_the_data_still_meet(tmp_path):
    """Each node's copy of the data has its own mtimes, so its own fingerprint: the ranks' wait for the builders
    must not be keyed on it (they waited on keys no other rank set, for a day)."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.start_processes(_gather_worker, args=(2, tmp_path / "init", results), nprocs=2, start_method="fork")
    assert results[0] == results[1] == ["rank 0: boom", None]
