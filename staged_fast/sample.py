"""`python -m staged_fast.sample --checkpoint PATH --prompt TEXT`: generate text to eyeball a model.

Decoding uses a KV cache built from the model's own modules (staged_fast/model.py stays cache-free for
training): the prompt is run once, then each new token costs one position's worth of compute. Sampling
applies, in this order (as transformers does): temperature, top-k, top-p (nucleus); temperature 0 is greedy.

Past the model's window (n_positions) positions cannot be reused, so each further step re-runs the last
n_positions tokens from scratch, as nanoGPT's crop does (correct, but without the cache's speed-up).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .cli_help import HelpFormatter, quiet_on_closed_pipe
from .cli_types import finite_float
from .evaluate.common import (
    DTYPES, InputError, autocast, check_vocab, load_eval_model, load_eval_tokenizer, not_utf8_error, pick_device,
    run_cli,
)


def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Logits (..., V) divided by `temperature`, with the tokens outside top-k / top-p set to -inf.

    top_k keeps the k largest logits (tokens tied with the k-th are kept too). top_p keeps the smallest set
    of most likely tokens whose probability adds up to at least top_p (always at least the most likely one).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 here (0 means greedy, see sample_next), got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        if top_p <= 0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = mass_before >= top_p  # the top token has mass_before 0 and always stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class CachedDecoder:
    """Incremental forward of a staged_fast GPT with per-layer key/value caches.

    `prefill(idx)` runs a prompt (B, T) and `step(tokens)` one new token per row; both return the logits
    for the next token, (B, V), equal to `model(sequence[:, -n_positions:])[:, -1]`.

    `max_length` (prompt + tokens to be fed) sizes the caches when it is below n_positions: a model with a
    long window (an HF folder's max_position_embeddings) would otherwise hold a window's worth per layer.
    """

    def __init__(self, model, max_length: int | None = None):
        self.model = model
        self.n_positions = model.config.n_positions
        self.capacity = self.n_positions if max_length is None else max(1, min(max_length, self.n_positions))
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (B, nh, capacity, hs)
        self.length = 0  # positions filled in the cache
        self.tokens: torch.Tensor | None = None  # (B, L) everything seen so far

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        self.tokens = idx
        return self._restart()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens, tokens[:, None]], dim=1)
        if self.length == self.n_positions:  # window full: positions shift, the cache is stale
            return self._restart()
        if self.length == self.capacity:
            raise ValueError(f"the decoder's caches were sized for max_length={self.capacity} tokens and are full; "
                             f"build it with a larger max_length (at most n_positions={self.n_positions})")
        return self._forward(tokens[:, None])[:, -1]

    def _restart(self) -> torch.Tensor:
        self.cache, self.length = [], 0
        window = self.tokens[:, -self.n_positions :]
        if window.shape[1] > self.capacity:
            raise ValueError(f"a prompt of {window.shape[1]} tokens does not fit the decoder's max_length="
                             f"{self.capacity}; build it with max_length >= prompt + new tokens")
        return self._forward(window)[:, -1]

    def _forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of `idx` placed after the `self.length` cached positions."""
        if self.model.config.arch == "llama":  # RoPE and GQA caches: staged_fast.llama.Llama.cached_forward
            logits = self.model.cached_forward(idx, self.length, self.cache, self.capacity)
            self.length += idx.shape[1]
            return logits
        tr = self.model.transformer
        B, T = idx.shape
        past = self.length
        pos = torch.arange(past, past + T, device=idx.device)
        x = tr.wte(idx) + tr.wpe(pos)  # (B, T, C); eval mode: no dropout
        C = x.shape[-1]
        if past == 0:
            mask, causal = None, True
        elif T == 1:
            mask, causal = None, False  # one query sees every cached key
        else:  # query i (absolute past + i) sees keys 0 .. past + i
            keys = torch.arange(past + T, device=idx.device)
            mask, causal = keys[None, :] <= (past + torch.arange(T, device=idx.device))[:, None], False
        for i, block in enumerate(tr.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(C, dim=2)
            # (B, T, C) -> (B, nh, T, hs)
            q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
            if len(self.cache) <= i:
                shape = (B, attn.n_head, self.capacity, C // attn.n_head)
                self.cache.append((k.new_empty(shape), v.new_empty(shape)))
            k_cache, v_cache = self.cache[i]
            k_cache[:, :, past : past + T] = k
            v_cache[:, :, past : past + T] = v
            y = F.scaled_dot_product_attention(q, k_cache[:, :, : past + T], v_cache[:, :, : past + T],
                                               attn_mask=mask, is_causal=causal, scale=attn.scale)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + block.mlp(block.ln_2(x))
        self.length = past + T
        return self.model.lm_head(tr.ln_f(x))


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None,
             eos_token_id: int | None = None) -> torch.Tensor:
    """Prompt (B, T) -> (B, T + max_new_tokens). After a row emits `eos_token_id` it repeats it (padding)."""
    # The last new token is never fed back, so prompt + max_new_tokens positions always suffice.
    decoder = CachedDecoder(model, max_length=idx.shape[1] + max_new_tokens)
    logits = decoder.prefill(idx)
    out = idx
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for n in range(max_new_tokens):
        # On CUDA, multinomial on NaN probabilities is a device-side assert, which ends the CUDA context; and
        # argmax of NaNs picks garbage. (A host read per token: sampling reads its tokens back anyway.)
        if not bool(torch.isfinite(logits).all()):
            raise InputError(f"the model's next-token logits are not finite at new token {n + 1} (inf or NaN). "
                             f"Fix: under --dtype fp16 the logits may overflow: use --dtype bf16 or fp32; in fp32 "
                             f"the checkpoint itself holds inf or NaN (a diverged run): sample an earlier one.")
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if eos_token_id is not None:
            nxt = nxt.masked_fill(done, eos_token_id)
            done |= nxt == eos_token_id
        out = torch.cat([out, nxt[:, None]], dim=1)
        if n + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            break
        logits = decoder.step(nxt)
    return out


def read_prompt_file(path: str) -> str:
    """A prompt kept in a file (long ones, or ones with quotes a shell would mangle); a final newline is the
    editor's, not the prompt's."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8_error(file, e, "--prompt_file") from e
    except OSError as e:
        raise InputError(f"--prompt_file {path}: cannot be read ({e.strerror}). Fix: check the path.") from e
    return text[:-1] if text.endswith("\n") else text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m staged_fast.sample", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="staged_fast checkpoint or run folder, Hugging Face GPT-2 folder, or hub name")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    prompt.add_argument("--prompt_file", default=None, help="read the text to continue from this UTF-8 file "
                        "(nanoGPT's FILE: prompt)")
    p.add_argument("--max_new_tokens", type=int, default=100, help="tokens to generate per sample")
    p.add_argument("--temperature", type=finite_float, default=0.8, help="softmax temperature; 0 = greedy")
    p.add_argument("--top_k", type=int, default=200, help="keep only the k most likely tokens (0 = off)")
    p.add_argument("--top_p", type=finite_float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (same seed, same samples)")
    p.add_argument("--num_samples", type=int, default=1, help="samples drawn in one batch")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or folder (default: the one saved in the checkpoint folder, else GPT-2 BPE)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="compute dtype (bf16/fp16 via autocast)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    return p


def main(argv=None) -> list[str]:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise InputError("--max_new_tokens and --num_samples must be at least 1.")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise InputError("--temperature must be >= 0, --top_p in (0, 1] and --top_k >= 0 (0 turns top-k off).")
    if args.prompt_file is not None:
        args.prompt = read_prompt_file(args.prompt_file)
    device = pick_device(args.device)
    model = load_eval_model(args.checkpoint, device=device)
    tokenizer = load_eval_tokenizer(args.tokenizer, args.checkpoint)
    check_vocab(model, tokenizer)
    ids = tokenizer.encode(args.prompt, add_special_tokens=False) if args.prompt else [tokenizer.eos_token_id]
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with autocast(device, args.dtype):
        out = generate(model, idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                       top_p=args.top_p, generator=generator, eos_token_id=tokenizer.eos_token_id)
    texts = []
    for row in out.tolist():
        new = row[len(ids):]
        if tokenizer.eos_token_id in new:  # a finished document: stop at its end
            new = new[: new.index(tokenizer.eos_token_id)]
        texts.append(args.prompt + tokenizer.decode(new))
    for i, text in enumerate(texts):
        print(f"----- sample {i + 1}/{len(texts)} -----")
        print(text)
    return texts


if __name__ == "__main__":
    sys.exit(quiet_on_closed_pipe(run_cli, main))
