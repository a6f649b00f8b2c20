"""Evaluation: WikiText perplexity, LAMBADA and HellaSwag accuracy (`python -m staged_fast.evaluate --help`)."""
from .common import InputError, load_eval_model, load_eval_tokenizer
from .hellaswag import evaluate_hellaswag, load_hellaswag
from .lambada import evaluate_lambada, load_lambada
from .wikitext import evaluate_wikitext, load_wikitext

__all__ = [
    "InputError",
    "evaluate_hellaswag",
    "evaluate_lambada",
    "evaluate_wikitext",
    "load_eval_model",
    "load_eval_tokenizer",
    "load_hellaswag",
    "load_lambada",
    "load_wikitext",
]
