"""Evaluation: WikiText perplexity and LAMBADA accuracy (`python -m staged_fast.evaluate --help`)."""
from .common import InputError, load_eval_model, load_eval_tokenizer
from .lambada import evaluate_lambada, load_lambada
from .wikitext import evaluate_wikitext, load_wikitext

__all__ = [
    "InputError",
    "evaluate_lambada",
    "evaluate_wikitext",
    "load_eval_model",
    "load_eval_tokenizer",
    "load_lambada",
    "load_wikitext",
]
