import os

import pytest

# Kernels tests run Triton on CPU through its interpreter when no GPU is present.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # torch reads CUBLAS_WORKSPACE_CONFIG once per process, at its first cuBLAS matmul, so --deterministic
    # run in-process after other GPU tests would find it unset (and raise); a fresh `python -m` sets it in time.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenized-data cache for the whole session (the bundled corpus is tokenized once)."""
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="session")
def small_vocab(tmp_path_factory):
    """(tokenizer folder, data cache) of a 512-token BPE trained on the bundled corpus: training runs whose
    point is not the vocabulary are much faster with it, above all under the Triton interpreter, where the
    GPT-2 vocabulary's LM-head loss dominates."""
    from benchmarks.staged_vs_direct import make_tokenizer

    folder = tmp_path_factory.mktemp("bpe512")
    return str(make_tokenizer(folder / "tokenizer", 512)), str(folder / "cache")


@pytest.fixture(scope="session")
def tok():
    """The GPT-2 tokenizer (bundled, offline), loaded once."""
    from staged_fast.tokenizer import load_tokenizer

    return load_tokenizer("gpt2")


@pytest.fixture
def record_encoded(monkeypatch):
    """record_encoded(seen): from then on, every text the data preparation tokenizes (its corpus encoder; the
    .txt seam checks' 128-character probes are not these) is appended to the list `seen`."""
    import staged_fast.data.prepare as prepare_mod

    real = prepare_mod.batch_encoder

    def start(seen: list) -> list:
        def recording(tokenizer):
            encode = real(tokenizer)

            def run(texts):
                seen.extend(texts)
                return encode(texts)
            return run
        monkeypatch.setattr(prepare_mod, "batch_encoder", recording)
        return seen
    return start
