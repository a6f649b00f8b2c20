"""A .txt file is tokenized in pieces (staged_fast/data/text_pieces.py): the tokens must be the whole file's.

Tokenized in one call, a 22 MB file held 3.7 GB; in pieces each tokenizer call sees at most 2 x PIECE_CHARS
characters. These tests shrink PIECE_CHARS so that small texts cross many seams, and compare with the file
tokenized whole (the old path, which a PIECE_CHARS larger than the file still takes).
"""
import io
import json
import logging

import numpy as np
import pytest

import staged_fast.data.text_pieces as text_pieces_mod
from staged_fast.data import prepare_data
from staged_fast.data.text_pieces import seam_check, text_pieces

# What splits badly: runs of blank lines and spaces, digits, contractions, CJK without spaces, punctuation
# against words, tabs, a URL, unicode letters, and text that has no candidate seam for a long stretch.
TRICKY = ("Hello world.\n\n\nIt's 2026: 12345 apples,   and 67 pears!\tTabs\there. "
          "東京は日本の首都です。大阪は第二の都市です。 Ünïcödé wörds café naïve. "
          "See https://example.com/a_b?c=1&d=2 for more... (parens) [brackets] {braces} "
          + "x" * 300 + " end of a long word.\n  indented line\n\nNew paragraph—with dashes–and “quotes”. ")



@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(text_pieces_mod, "PIECE_CHARS", 48)
    monkeypatch.setattr(text_pieces_mod, "READ_CHARS", 100)  # refills cross seams and pieces too
    return 48


def _corpus_text(n_chars: int) -> str:
    import lzma

    from staged_fast.data.sources import BUNDLED_CORPUS
    with lzma.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        text = "\n\n".join(json.loads(line)["text"] for line in f)
    return (text[:n_chars] + TRICKY) * 2


def test_the_pieces_join_to_the_text_and_tokenize_as_it_does(tok, small_pieces):
    text = _corpus_text(20_000)
    pieces = list(text_pieces(io.StringIO(text), seam_check(tok)))
    assert "".join(pieces) == text
    assert len(pieces) > 200
    assert all(len(p) >= small_pieces for p in pieces[:-1])
    longer = [p for p in pieces if len(p) > 2 * small_pieces]  # only where the text has no seam: the x run
    assert longer and all("x" * (len(p) - 2 * small_pieces) in p for p in longer)
    joined = [i for p in pieces for i in tok.encode(p)]
    assert joined == tok.encode(text)


def test_a_tokenizer_with_no_seam_reads_the_rest_whole_and_says_so(monkeypatch, small_pieces, caplog):
    monkeypatch.setattr(text_pieces_mod, "GIVE_UP_CHECKS", 16)
    checked = []

    def never(left, right):
        checked.append((left, right))
        return False
    text = "word " * 200
    with caplog.at_level(logging.WARNING):
        pieces = list(text_pieces(io.StringIO(text), never, "big.txt"))
    assert pieces == [text]
    assert checked and all(len(left) <= text_pieces_mod.CONTEXT and len(right) <= text_pieces_mod.CONTEXT
                           for left, right in checked)
    assert "tokenized in one piece" in caplog.text and "big.txt" in caplog.text


def test_a_run_of_punctuation_longer_than_the_window_is_not_cut_inside(tok):
    """GPT-2 keeps "(((...(_" in one pre-token; 64 characters of it tokenized whole and in halves happened to
    agree, so the ids check alone cut before "_" (found by a review's fuzzing, default sizes)."""
    text = "a" * 8150 + " " + "(" * 69 + "_x and more text " * 1000
    pieces = list(text_pieces(io.StringIO(text), seam_check(tok)))
    assert len(pieces) > 1 and "".join(pieces) == text
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)
    assert not any(p.startswith("_") for p in pieces)


def test_random_runs_of_punctuation_space_and_letters_tokenize_as_whole(tok, monkeypatch):
    """Seeded fuzz at tiny pieces (8 characters): runs of one character, some longer than the 64-character window,
    where GPT-2's pre-tokenizer groups what a naive cut would split."""
    import random

    monkeypatch.setattr(text_pieces_mod, "PIECE_CHARS", 8)
    monkeypatch.setattr(text_pieces_mod, "READ_CHARS", 50)
    holds = seam_check(tok)
    alphabet = list("!_.-=*'()#/,:;\"`~@$%^&+[]{}<>?|\\") + ["s", "ab", " ", "\n", "\t", "  ", "12", "é", "東", "'s",
                                                              "'ll", "\r\n", "ـ", "①", "²"]
    rng = random.Random(7)
    for _ in range(300):
        text = "".join(rng.choice(alphabet) * rng.choice([1, 1, 1, 2, 5, 66, 67, 129]) for _ in range(rng.randint(1, 15)))
        pieces = list(text_pieces(io.StringIO(text), holds))
        assert "".join(pieces) == text
        assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text), text


def test_a_stretch_without_candidates_only_lengthens_its_piece(tok, small_pieces, caplog):
    """A long line with no place to cut (hex) is not a tokenizer without seams: the file goes on in pieces."""
    text = "0123456789abcdef" * 20 + " word" * 2000
    with caplog.at_level(logging.WARNING):
        pieces = list(text_pieces(io.StringIO(text), seam_check(tok)))
    assert "one piece" not in caplog.text
    assert len(pieces[0]) >= 320 and len(pieces) > 100 and max(len(p) for p in pieces[1:]) <= 2 * small_pieces
    assert [i for p in pieces for i in tok.encode(p)] == tok.encode(text)


def test_short_and_empty_texts(tok, small_pieces):
    holds = seam_check(tok)
    assert list(text_pieces(io.StringIO(""), holds)) == []
    assert list(text_pieces(io.StringIO("short text"), holds)) == ["short text"]
    assert list(text_pieces(io.StringIO("y" * 500), holds)) == ["y" * 500]  # no candidate at all: one piece


def _build(tmp_path, name, data, tok, **kw):
    return prepare_data(data, tok, tokenizer_name="gpt2", cache_dir=tmp_path / name, **kw)


@pytest.mark.parametrize("layout", ["one_file_cut_into_val", "files_and_jsonl"])
def test_prepared_tokens_equal_the_file_tokenized_whole(tok, tmp_path, monkeypatch, record_encoded, layout):
    """Documents made of many rows: the split's lengths, the chosen val documents, and a tail cut inside a row
    (one file holds one document, so its tail is cut off into val) all match the whole-file build."""
    texts = [_corpus_text(3000 + 700 * i) for i in range(3)]
    if layout == "one_file_cut_into_val":
        (tmp_path / "one.txt").write_text(texts[0].replace("\n", "\r\n"), newline="")  # universal newlines too
        data, kw = [str(tmp_path / "one.txt")], {"val_fraction": 0.3}
    else:
        folder = tmp_path / "in"
        folder.mkdir()
        for i, text in enumerate(texts):
            (folder / f"a{i}.txt").write_text(text)
        (folder / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("json doc", "", "two")))
        (folder / "c.txt").write_text("   ")  # whitespace only: GPT-2 gives it tokens, a document
        (folder / "d.txt").write_text("small file")
        data, kw = [str(folder)], {"val_fraction": 0.25, "seed": 3}
    monkeypatch.setattr(text_pieces_mod, "PIECE_CHARS", 10 ** 9)
    whole = _build(tmp_path, "whole", data, tok, **kw)
    monkeypatch.setattr(text_pieces_mod, "PIECE_CHARS", 64)
    seen = record_encoded([])
    pieces = _build(tmp_path, "pieces", data, tok, **kw)
    assert len(pieces.val) > 0 and len(pieces.train) > 0
    assert np.array_equal(pieces.train, whole.train) and np.array_equal(pieces.val, whole.val)
    assert pieces.fingerprint == whole.fingerprint  # the same content under the same key
    longest = max(len(t) for t in seen)
    assert longest <= 2 * 64 + 300 < len(texts[0]), longest  # no call saw a whole file (300: TRICKY's x run)
    assert not [p for p in (tmp_path / "pieces").iterdir() if p.name.startswith(".")]  # the pieces went with the build


def _sentencepiece_like(kind: str):
    """A small BPE trained here, with a Llama-style front: Metaspace ("▁" for spaces, one added before the
    text), or the newer normalizer form that prepends "▁" to every input, whatever it starts with."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "metaspace":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"])
    backend.train_from_iterator([_corpus_text(20_000)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["metaspace", "prepend_normalizer"])
def test_sentencepiece_style_tokenizers_get_the_whole_files_tokens(tmp_path, monkeypatch, kind, caplog):
    """Metaspace adds its "▁" only where a text does not start with one, so a seam before a space holds; the
    prepending normalizer changes every piece's start, no seam holds, and the file is read whole."""
    sp = _sentencepiece_like(kind)
    (tmp_path / "one.txt").write_text(_corpus_text(4000))
    data = [str(tmp_path / "one.txt")]
    monkeypatch.setattr(text_pieces_mod, "PIECE_CHARS", 10 ** 9)
    whole = prepare_data(data, sp, tokenizer_name=kind, cache_dir=tmp_path / "whole", val_fraction=0.2)
    monkeypatch.setattr(text_pieces_mod, "PIECE_CHARS", 64)
    monkeypatch.setattr(text_pieces_mod, "GIVE_UP_CHECKS", 16)
    with caplog.at_level(logging.WARNING):
        pieces = prepare_data(data, sp, tokenizer_name=kind, cache_dir=tmp_path / "pieces", val_fraction=0.2)
    assert np.array_equal(pieces.train, whole.train) and np.array_equal(pieces.val, whole.val)
    assert ("tokenized in one piece" in caplog.text) == (kind == "prepend_normalizer")


def test_a_file_whose_pieces_all_give_no_tokens_is_dropped_as_an_empty_document(tmp_path, monkeypatch):
    """A BPE without an unknown token drops what it cannot encode: a file of such text in many pieces made a
    document of its EOS alone; whole, it was an empty document and dropped. Both builds must agree."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator([_corpus_text(3000).encode("ascii", "ignore").decode()],
                                trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"]))
    ascii_only = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    assert ascii_only("東京。大阪。", add_special_tokens=False)["input_ids"] == []
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text("東京は日本の首都です。大阪は第二の都市です。" * 40)
    (folder / "b.txt").write_text(_corpus_text(2000).encode("ascii", "ignore").decode())
    (folder / "c.txt").write_text("The river runs by the old mill and on to the sea. " * 30)
    builds = {}
    for name, piece in (("whole", 10 ** 9), ("pieces", 48)):
        monkeypatch.setattr(text_pieces_mod, "PIECE_CHARS", piece)
        builds[name] = prepare_data([str(folder)], ascii_only, tokenizer_name="ascii", cache_dir=tmp_path / name,
                                    val_fraction=0.2)
    assert np.array_equal(builds["pieces"].train, builds["whole"].train)
    assert np.array_equal(builds["pieces"].val, builds["whole"].val)
    meta = json.loads((builds["pieces"].folders[0] / "meta.json").read_text())
    assert meta["documents"] == 2


@pytest.mark.parametrize("pre", ["Whitespace", "WhitespaceSplit", "BertPreTokenizer"])
def test_tokenizers_that_drop_the_space_still_get_pieces(tmp_path, pre, caplog, small_pieces):
    """Whitespace-style pre-tokenizers drop the space a seam sits before, so no pre-token starts at the seam;
    the check asks only that none straddles it (it asked for a start, and such files were read whole)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = getattr(pre_tokenizers, pre)()
    text = " ".join(_corpus_text(6000).split())  # one long line: the cuts must come before spaces
    backend.train_from_iterator([text], trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]")
    with caplog.at_level(logging.WARNING):
        pieces = list(text_pieces(io.StringIO(text), seam_check(tokenizer)))
    assert "one piece" not in caplog.text
    assert len([p for p in pieces if len(p) > 2 * small_pieces]) <= 2, [len(p) for p in pieces]  # TRICKY's x run
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert [i for p in pieces for i in encode(p)] == encode(text)


def test_the_batch_encoder_gives_the_tokenizers_own_ids(tok):
    """The corpus is tokenized with the Rust tokenizer's encode_batch_fast (no offsets or token strings): the
    same ids as the tokenizer's call, added tokens in the text included; without it, that call."""
    from staged_fast.tokenizer import batch_encoder

    texts = [_corpus_text(3000), "one<|endoftext|>two", "", "  spaced \n\n lines\t", TRICKY]
    expected = tok(texts, add_special_tokens=False)["input_ids"]
    assert batch_encoder(tok)(texts) == expected
    assert 50256 in expected[1]
    calls = []  # a tokenizer without a Rust backend: its own call
    slow = type("Slow", (), {"__call__": lambda self, t, **k: calls.append(k) or {"input_ids": [[1]] * len(t)}})()
    assert batch_encoder(slow)(["a", "b"]) == [[1], [1]] and calls == [{"add_special_tokens": False, "verbose": False}]
