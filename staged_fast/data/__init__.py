"""Data: tokenize + pack + cache a corpus (prepare.py; `python -m staged_fast.data` prepares it ahead, with
the data flags of flags.py), deterministic resumable batches (sampler.py), input resolution and loading
(sources.py; .txt files in tokenizer-safe pieces, text_pieces.py), and the bundled default corpus (corpus.jsonl.xz, ~1.27M GPT-2
tokens: Debian fortunes + Python 3.11 docs, licences in LICENSE.corpus.txt; rebuilt by scripts/make_corpus.py).
"""
from .prepare import PreparedData, prepare_data, split_documents, token_dtype
from .sampler import TokenSampler, num_windows, val_batches
from .sources import BUNDLED_CORPUS, DataError

__all__ = ["BUNDLED_CORPUS", "DataError", "PreparedData", "TokenSampler", "num_windows", "prepare_data",
           "split_documents", "token_dtype", "val_batches"]
