"""Helpers shared by the Triton kernel files: interpreter detection, output allocation, checks.

Output poisoning: launchers allocate every output and scratch buffer through `new_empty`, which
returns `torch.empty` normally and a NaN-filled tensor inside `poisoned_outputs()`. Tests run the
kernels in that context, so an output element a kernel forgets to write shows up as NaN instead of
passing by luck with whatever memory held.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

_POISON = False


def env_switch(name: str, default: bool = True) -> bool:
    """An on/off environment variable: 0, false, off or no (any case) is off; unset gives `default`."""
    value = os.environ.get(name)
    return default if value is None else value.lower() not in ("0", "false", "off", "no")


def autotuning(switch: bool) -> bool:
    """Whether an autotuner with this on/off switch may time configs now: not under
    torch.use_deterministic_algorithms(True), because timing can pick another config in another run and a
    config's tiling sets the order of its sums (the bits). Then each kernel runs its default config."""
    return switch and not torch.are_deterministic_algorithms_enabled()


def interpreting() -> bool:
    """True when TRITON_INTERPRET is set now (Triton reads it when a kernel is decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Whether the kernels of this package were decorated (imported) under the interpreter. Triton decides
# per kernel at import time, so a later change of the environment variable does not affect them.
INTERPRETED = interpreting()


@contextlib.contextmanager
def poisoned_outputs():
    """Within this context launchers fill fresh outputs with NaN before the kernels write them."""
    global _POISON
    old, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = old


def new_empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_device(op: str, *tensors: torch.Tensor) -> None:
    """Triton needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; all on one device."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{op}: all inputs must be on one device, got {device} and {t.device}.")
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            f"{op}: the Triton kernels were compiled for the GPU but got CPU tensors; for CPU set "
            f"TRITON_INTERPRET=1 before the first import of staged_fast.kernels' Triton modules (slow, "
            f"for checking), or use --kernels torch."
        )
    if device.type == "cuda" and INTERPRETED:
        raise RuntimeError(
            f"{op}: the Triton kernels were imported under TRITON_INTERPRET=1 (CPU interpreter) but got "
            f"CUDA tensors; unset TRITON_INTERPRET to compile them for the GPU."
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"{op}: unsupported device {device}; the Triton kernels run on CUDA.")


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(op: str, t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}.")


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: for fp32 inputs what torch's fp32 matmuls use (exact "ieee" by default,
    "tf32" after torch.set_float32_matmul_precision("high"/"medium"), e.g. the trainer's --tf32); 16-bit
    inputs take the tensor cores whatever the setting."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# Host-side integer helpers. triton.cdiv / triton.next_power_of_2 are constexpr functions in Triton >= 3.6
# and cost ~2 us a call on the host (argument unwrapping), several per launch; these are plain ints.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


class TunedLaunch:
    """Launches a `triton.autotune`d kernel; once the autotuner has chosen a config for a key, later
    launches with that key go straight to the compiled function with the config's arguments. Triton's
    Autotuner.run rebuilds its key from every argument on each call (~9 us of host time here, about a
    small kernel's device time). `key` must separate at least what the autotuner's key does (its key
    arguments and the dtypes of the tensor arguments); a finer key only tunes more often. A key whose
    arguments leave one config after the autotuner's prune runs that config untimed."""

    def __init__(self, autotuned):
        self.autotuned = autotuned
        self._chosen: dict = {}
        self.last = None  # the config of the latest launch (benchmarks print it)

    def __call__(self, grid, key, *args, **kwargs):
        """Launch on `grid`; returns the triton.Config that ran."""
        hit = self._chosen.get(key)
        if hit is None:
            configs = self._candidates(args, kwargs)
            if len(configs) > 1:
                self.autotuned[grid](*args, **kwargs)
                config = self.autotuned.best_config
                self._chosen[key] = (config, config.all_kwargs())
                self.last = config
                return config
            # One candidate (autotuning off, fp32, the interpreter): nothing to time. Triton 3.6's autotuner
            # would still benchmark it (~0.1 s of launches and cache flushes per new key; 3.8 skips that).
            hit = self._chosen[key] = (configs[0], configs[0].all_kwargs())
        config, config_kwargs = hit
        self.autotuned.fn[grid](*args, **kwargs, **config_kwargs)
        self.last = config
        return config

    def _candidates(self, args, kwargs) -> list:
        """The configs the autotuner would time for these arguments (its own early prune)."""
        tuner = self.autotuned
        if len(tuner.configs) == 1:
            return list(tuner.configs)
        tuner.nargs = dict(zip(tuner.arg_names, args))  # what prune_configs reads, as Autotuner.run sets it
        try:
            return tuner.prune_configs(kwargs)
        finally:
            tuner.nargs = None


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: few programs, each looping over many rows, keeps it fast


def assert_within_torch_error(out, torch_out, ref, *, name: str, factor: float = 2.0, atol: float = 0.0) -> None:
    """FlashAttention's test rule: max|out - ref| <= factor * max|torch_out - ref| + atol.

    `ref` is the op computed in float64; `torch_out` the same op done by PyTorch in the kernel's dtype,
    so the bound scales with what that dtype can deliver. Also fails on any NaN/inf in `out`.
    """
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        raise AssertionError(f"{name}: {int((~torch.isfinite(out64)).sum())} non-finite elements (unwritten or overflow).")
    err = (out64 - ref64).abs().max().item()
    torch_err = (torch_out.detach().double() - ref64).abs().max().item()
    bound = factor * torch_err + atol
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.3e} > {factor} x torch's {torch_err:.3e} + {atol:.1e} = {bound:.3e}.")
