"""Deterministic batches from a packed token array: `TokenSampler` (training) and `val_batches` (evaluation).

Windows: the array is cut into non-overlapping windows of seqlen + 1 tokens; window i starts at token
i * seqlen, so consecutive windows share one boundary token (the last target of one window is the first
input of the next). x = window[:-1], y = window[1:].

Training order: one global stream of samples. Epoch e is a permutation of all windows drawn from
`np.random.default_rng([seed, e])`; global sample g is window `perm_{g // n}[g % n]` (n windows). Global
micro-batch j is samples j*B .. j*B+B-1 (so batches run across epoch ends without a gap), and rank r's k-th
`next_batch` returns global micro-batch k*W + r (W ranks). Hence:
- ranks never see the same sample in a step, and together consume the same samples as one rank would;
- 2 ranks x grad_accum g consume exactly the samples of 1 rank x grad_accum 2g, per optimizer step.

Resume: the state is the number of global samples consumed (plus seed/seqlen/batch_size/world_size and the
window count to validate). Loading it on the same layout continues bit for bit; loading it with another
world_size or batch_size continues from the first unseen global sample (the new layout's micro-batch 0
starts there). A different seed, seqlen or data cannot be continued and raises DataError.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .sources import DataError

STATE_VERSION = 1


def num_windows(n_tokens: int, seqlen: int) -> int:
    """Windows of seqlen + 1 tokens starting every seqlen tokens."""
    return max(0, (n_tokens - 1) // seqlen)


def _check_layout(tokens: np.ndarray, seqlen: int, batch_size: int, rank: int, world_size: int,
                  what: str) -> int:
    if seqlen < 1 or batch_size < 1:
        raise DataError(f"seqlen and batch_size must be >= 1 (got {seqlen}, {batch_size}).")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size}).")
    n = num_windows(len(tokens), seqlen)
    if n < 1:
        raise DataError(
            f"The {what} data holds {len(tokens)} tokens, fewer than one sample of seqlen + 1 = {seqlen + 1} "
            f"tokens. Fix: pass more data, or a smaller --seqlen (at most {max(len(tokens) - 1, 0)})"
            + (", or hold out more (a larger --val_fraction, or give --val_data more text)."
               if what == "validation" else "."))
    return n


def _gather(tokens: np.ndarray, windows: np.ndarray, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = windows[:, None] * seqlen + np.arange(seqlen + 1)        # (B, T+1)
    w = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))  # memmap fancy-index reads only these rows
    return w[:, :-1], w[:, 1:]                                     # x, y: (B, T) int64


class TokenSampler:
    """Shuffled, rank-sharded, resumable micro-batches over a packed token array (see module docstring)."""

    def __init__(self, tokens: np.ndarray, *, seqlen: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, data_digest: str | None = None):
        self.n_windows = _check_layout(tokens, seqlen, batch_size, rank, world_size, "training")
        self.data_digest = data_digest  # of the tokens (PreparedData.train_digest): a resume on others is refused
        self.tokens, self.seqlen, self.batch_size = tokens, seqlen, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start = 0   # global sample index where this layout's micro-batch 0 begins (set by resume)
        self.k = 0       # next_batch calls made on this rank since `start`
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def windows_for(self, first_sample: int, count: int) -> np.ndarray:
        """Window indices of global samples first_sample .. first_sample + count - 1."""
        out = np.empty(count, dtype=np.int64)
        g, filled = first_sample, 0
        while filled < count:  # at most a few epochs when batch_size exceeds the window count
            epoch, pos = divmod(g, self.n_windows)
            take = min(count - filled, self.n_windows - pos)
            out[filled:filled + take] = self._permutation(epoch)[pos:pos + take]
            filled += take
            g += take
        return out

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed by all ranks together, assuming they call next_batch in lockstep."""
        return self.start + self.k * self.world_size * self.batch_size

    @property
    def epoch(self) -> float:
        return self.consumed_samples / self.n_windows

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (batch_size, seqlen), y = x shifted left by one token."""
        first = self.start + (self.k * self.world_size + self.rank) * self.batch_size
        self.k += 1
        return _gather(self.tokens, self.windows_for(first, self.batch_size), self.seqlen)

    def state_dict(self) -> dict:
        """Identical on every rank (rank-free), so saving rank 0's copy is enough."""
        return {"version": STATE_VERSION, "consumed_samples": self.consumed_samples,
                "micro_batches": self.k, "seed": self.seed, "seqlen": self.seqlen,
                "batch_size": self.batch_size, "world_size": self.world_size, "n_windows": self.n_windows,
                "data_digest": self.data_digest}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seqlen", "n_windows"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"Cannot resume the data order: the checkpoint's sampler has {key}={state[key]}, this run "
                    f"{key}={getattr(self, key)}. Fix: resume with the same --seed, --seqlen and data as the "
                    "checkpoint (leave them out to take the checkpoint's), or add --reset_data_order to start a "
                    "new data order.")
        saved = state.get("data_digest")
        if saved is not None and self.data_digest is not None and saved != self.data_digest:
            raise DataError(
                f"Cannot resume the data order: the checkpoint's sampler read other training tokens (digest "
                f"{saved}) than this run's data gives ({self.data_digest}), with as many samples, so the order "
                "would go on over different text. Fix: resume with the data and tokenizer the checkpoint was "
                "trained on, or add --reset_data_order to start a new data order on this data.")
        # Same layout: start + k*W*B == old consumed count, so this continues bit for bit. New world_size or
        # batch_size: the new micro-batch 0 begins at the first sample no rank has seen.
        self.start, self.k = int(state["consumed_samples"]), 0


def val_batches(tokens: np.ndarray, *, seqlen: int, batch_size: int, num_batches: int, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation batches: windows in order, global batch j = windows j*B .. j*B+B-1, rank r gets
    batches k*W + r. Same every call; disjoint across ranks.

    Yields min(num_batches, n_windows // (B*W)) batches on every rank (the same count everywhere, so a
    mean over ranks stays fair); raises DataError if the data cannot fill one batch per rank.
    """
    n = _check_layout(tokens, seqlen, batch_size, rank, world_size, "validation")
    count = min(num_batches, n // (batch_size * world_size))
    if count < 1:
        raise DataError(
            f"The validation data holds {len(tokens)} tokens = {n} samples of seqlen {seqlen}, fewer than one "
            f"batch of {batch_size} per rank x {world_size} rank(s) (validation uses --batch_size). Fix: a "
            "smaller --batch_size or --seqlen, or hold out more (a larger --val_fraction, or give --val_data "
            "more text).")
    for k in range(count):
        first = (k * world_size + rank) * batch_size
        yield _gather(tokens, np.arange(first, first + batch_size), seqlen)
