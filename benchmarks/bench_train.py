"""Claim: a training step of our GPT (fused kernels) is faster than transformers' GPT-2 with SDPA.

Same shapes, same weights, same dropout: one step = forward + backward + AdamW, in bf16 autocast
(fp32 master weights) on CUDA. Reported: tokens/s, ratio to HF, peak memory, and MFU =
6 * N * tokens/s / device peak, N = the matmul weights (non-embedding parameters plus the tied LM
head; attention's T^2 term is not counted, as in Kaplan et al.'s 6N). Before timing, both models'
losses are compared on one batch in eval mode (same function, so the baseline is the same model).

Goal on H100 (issue 4): ours (kernels triton) >= 1.3x HF's tokens/s at GPT2_base, MFU reported.

    python benchmarks/bench_train.py                                       # GPU: GPT2_base, batch 16 x 1024
    python benchmarks/bench_train.py --quick                               # fewer steps
    python benchmarks/bench_train.py --size tiny --device cpu --kernels torch   # proves it runs on CPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from staged_fast.cli_help import HelpFormatter  # noqa: E402
from staged_fast.cli_types import unit_interval  # noqa: E402

import torch  # noqa: E402

from benchmarks.harness import peak_memory_cuda, print_table, provenance, paired_ratio, time_fn, time_interleaved, write_json  # noqa: E402
from staged_fast import activation_checkpointing  # noqa: E402
from staged_fast.config import PRESETS, preset_config  # noqa: E402
from staged_fast.heap import keep_freed_heap  # noqa: E402
from staged_fast.hf import hf_config, to_hf_state_dict  # noqa: E402
from staged_fast.kernels import BACKENDS, resolve_backend  # noqa: E402
from staged_fast.metrics import device_peak_flops  # noqa: E402
from staged_fast.model import GPT  # noqa: E402

def device_peak(device: torch.device) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s or None, the device's name): the trainer's table (staged_fast.metrics)."""
    if device.type != "cuda":
        return None, "cpu"
    return device_peak_flops(device), torch.cuda.get_device_name(device)


ROWS = ("hf_sdpa", "hf_eager", "hf_sdpa_compiled", "ours_torch", "ours_torch_compile", "ours_triton",
        "ours_triton_compile", "ours_torch_ac", "ours_triton_ac", "ours_torch_sac", "ours_triton_sac")
# _ac: --activation_checkpointing (full); _sac: with --ac_policy matmuls (selective)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--size", default="GPT2_base", choices=list(PRESETS), help="model preset")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--kernels", default="auto", choices=BACKENDS, help="our model's kernels (auto: triton on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 16 on CUDA, 2 on CPU)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per sequence (default 1024 on CUDA, 64 on CPU)")
    p.add_argument("--dropout", type=unit_interval, default=0.1, help="embedding/residual/attention dropout of both models")
    p.add_argument("--steps", type=int, default=None, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--quick", action="store_true", help="fewer timed steps")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"comma-separated rows to run, in this order, of {', '.join(ROWS)} (default all; hf_sdpa, the "
                   "baseline, always runs first; each compiled row spends ~30-60 s compiling in its warm-up)")
    p.add_argument("--json", default=None, help="also write the rows and provenance to this JSON file")
    args = p.parse_args(argv)
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        p.error(f"unknown --rows {unknown}; choose from {', '.join(ROWS)}")
    return args


def build_models(args, device, attn_implementation="sdpa"):
    """Our GPT and an HF GPT2LMHeadModel (SDPA or eager attention) holding the same initial weights."""
    from transformers import AutoModelForCausalLM

    config = preset_config(args.size, n_positions=max(1024, args.seqlen), dropout=args.dropout, attn_dropout=args.dropout)
    torch.manual_seed(0)
    ours = GPT(config)
    hf = AutoModelForCausalLM.from_config(hf_config(config), attn_implementation=attn_implementation)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias", "lm_head.weight"))]
    if missing or unexpected:
        raise RuntimeError(f"HF conversion mismatch: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return config, ours.to(device), hf.to(device)


def loss_fns(ours, hf):
    """x: (B, T + 1) tokens. Both models read the same T tokens x[:, :-1]. Ours predicts all T next
    tokens; HF with labels (its standard training call) shifts internally and scores T - 1 of them.
    "hf_logits" scores HF's logits against the same T targets as ours, for validation."""
    return {
        "ours": lambda x: ours(x[:, :-1], x[:, 1:]),
        # use_cache=False: training needs no KV cache (the default builds one at every step)
        "hf": lambda x: hf(input_ids=x[:, :-1], labels=x[:, :-1], use_cache=False).loss,
        "hf_logits": lambda x: torch.nn.functional.cross_entropy(
            hf(input_ids=x[:, :-1], use_cache=False).logits.float().flatten(0, 1), x[:, 1:].flatten()
        ),
    }


def select(model, kernels, checkpointing: str | None) -> None:
    """A row's settings on a model that rows share: our kernels and activation checkpointing (None, or its
    policy: "full" or "matmuls"; HF: none)."""
    if kernels is not None and model.kernels_backend != kernels:
        model.set_kernels(kernels)
    if kernels is not None:
        model.activation_checkpointing = int(checkpointing is not None)
        model.activation_checkpointing_policy = checkpointing or "full"


def make_step(model, fn_key, kernels, compiled, data, device, amp, checkpointing=None):
    """One training step of a row: forward + backward + AdamW (fused, as our trainer and HF's Trainer use
    by default on CPU and CUDA), with the row's settings selected at each call (rows may share a model)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    target = torch.compile(model) if compiled else model
    loss_fn = loss_fns(target, target)[fn_key]

    def step():
        select(model, kernels, checkpointing)
        model.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def saved_activation_mib(model, fn_key, kernels, checkpointing, data, device, amp) -> float | None:
    """MiB kept from one training forward for the backward (each storage once, parameters not counted): what
    autograd saves plus, under the selective policy, the outputs the checkpoint keeps; what activation
    checkpointing cuts, measured the same way on any device. None where this torch cannot show the kept outputs."""
    if checkpointing == "matmuls" and not activation_checkpointing.CAN_RECORD_KEPT:
        return None
    select(model, kernels, checkpointing)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            activation_checkpointing.recording_kept_outputs() as kept_outputs:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fns(model, model)[fn_key](data)
    for t in kept_outputs:
        pack(t)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(kept.values()) / 2**20


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    batch = args.batch or (16 if cuda else 2)
    seqlen = args.seqlen or (1024 if cuda else 64)
    args.seqlen = seqlen
    steps = args.steps or (3 if not cuda else 10 if args.quick else 30)
    amp = cuda  # bf16 autocast on CUDA; fp32 on CPU (CPU bf16 is slow and not what we claim)
    backend = resolve_backend(args.kernels, device)
    peak, device_name = device_peak(device)
    heap = "" if cuda else f", glibc heap kept for reuse: {keep_freed_heap()} (as our trainer does; both rows)"
    prov = provenance()
    print(f"bench_train: {args.size} on {device_name}, batch {batch} x {seqlen}, "
          f"{'bf16 autocast' if amp else 'fp32'}, dropout {args.dropout}, kernels {backend}, "
          f"torch {prov['torch']}, {torch.get_num_threads()} threads, {prov['date']}{heap}")

    config, ours, hf = build_models(args, device)
    n_matmul = ours.num_params(non_embedding=True) + ours.transformer.wte.weight.numel()
    g = torch.Generator(device="cpu").manual_seed(1)
    data = torch.randint(0, config.vocab_size, (batch, seqlen + 1), generator=g).to(device)
    fns = loss_fns(ours, hf)

    # Same function before timing: eval mode (no dropout), same batch.
    ours.set_kernels(backend)
    ours.eval()
    hf.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        l_ours, l_hf = fns["ours"](data).float().item(), fns["hf_logits"](data).float().item()
    tol = 0.05 if amp else 1e-4
    if abs(l_ours - l_hf) > tol:
        raise SystemExit(f"validation failed: our loss {l_ours:.5f} vs HF {l_hf:.5f} (tolerance {tol})")
    print(f"validated: initial loss ours {l_ours:.4f}, HF {l_hf:.4f}")

    # HF eager = its plain attention (materialised scores); HF SDPA is the baseline of vs_hf; compiled rows
    # pay a one-off compile in the warm-up. Rows run in the order --rows names them, after hf_sdpa: a run
    # cut short by a time limit keeps the rows named first.
    order = list(dict.fromkeys(["hf_sdpa"] + args.rows))
    available = {  # row name -> (model, loss key, our kernels, compiled, activation checkpointing)
        "hf_sdpa": (hf, "hf", None, False, None),
        "ours_torch": (ours, "ours", "torch", False, None),
        "ours_torch_ac": (ours, "ours", "torch", False, "full"),
        "ours_torch_sac": (ours, "ours", "torch", False, "matmuls"),
    }
    if cuda:
        if "hf_eager" in order:  # a second HF model, built only when asked for
            available["hf_eager"] = (build_models(args, device, "eager")[2], "hf", None, False, None)
        available["hf_sdpa_compiled"] = (hf, "hf", None, True, None)
        # inductor fuses our torch ops (as it does HF's): the like-for-like match for hf_sdpa_compiled
        available["ours_torch_compile"] = (ours, "ours", "torch", True, None)
    if backend != "torch":
        available[f"ours_{backend}"] = (ours, "ours", backend, False, None)
        available[f"ours_{backend}_ac"] = (ours, "ours", backend, False, "full")
        available[f"ours_{backend}_sac"] = (ours, "ours", backend, False, "matmuls")
        if cuda:
            available[f"ours_{backend}_compile"] = (ours, "ours", backend, True, None)
    runs = [(name, *available[name]) for name in order if name in available]
    steps_by_row = {name: make_step(model, fn_key, kernels, compiled, data, device, amp, ac)
                    for name, model, fn_key, kernels, compiled, ac in runs}
    saved_mib = {name: None if compiled else saved_activation_mib(model, fn_key, kernels, ac, data, device, amp)
                 for name, model, fn_key, kernels, compiled, ac in runs}
    # CPU: rounds over the rows, so the load of a shared CPU falls on every row alike. CUDA: one row at a time
    # (each owns the GPU while timed; compiled rows pay their compile in the warm-up), printed as measured so a
    # run cut short by a time limit still reports its first rows.
    timings = {} if cuda else time_interleaved(steps_by_row, warmup=3, reps=steps)
    rows = []
    meta = {"size": args.size, "batch": batch, "seqlen": seqlen, "device": device_name, "kernels": backend,
            "amp_bf16": amp, "peak_flops": peak}
    for name, step in steps_by_row.items():
        t = timings[name] if name in timings else time_fn(step, name=name, device=device, warmup=3, reps=steps)
        tokens_per_s = batch * seqlen / (t.median_ms * 1e-3)
        row = {"model": name, "ms/step": t.median_ms, "p20": t.p20_ms, "p80": t.p80_ms, "tokens/s": tokens_per_s,
               "MFU": 6 * n_matmul * tokens_per_s / peak if peak else None}
        row["saved_MiB"] = saved_mib[name]
        if cuda:
            row["peak_GiB"] = peak_memory_cuda(step, device) / 2**30
        row["vs_hf"] = tokens_per_s / rows[0]["tokens/s"] if rows else 1.0
        if timings:  # CPU: also the median of the per-round ratios (each round's steps shared the same load)
            row["vs_hf_paired"] = paired_ratio(timings[order[0]], timings[name])
        rows.append(row)
        print(f"{name}: {t.median_ms:.1f} ms/step, {tokens_per_s:.0f} tokens/s, {row['vs_hf']:.2f}x HF SDPA", flush=True)
        if args.json:  # after every row: a run cut off by a time limit keeps the rows it measured
            write_json(args.json, {**meta, "complete": len(rows) == len(steps_by_row), "rows": rows})
    print_table(rows, ["model", "ms/step", "p20", "p80", "tokens/s", "vs_hf"] + (["vs_hf_paired"] if timings else [])
                + ["MFU", "saved_MiB", "peak_GiB"])
    if peak is None:
        print(f"note: no bf16 peak known for {device_name}: MFU not reported (add it to staged_fast.metrics.DEVICE_PEAK_FLOPS).")
    print("saved_MiB: what one forward keeps for the backward, parameters not counted (compiled rows: not measured); "
          "_ac rows: --activation_checkpointing; _sac rows: with --ac_policy matmuls")
    print(f"MFU = 6 x {n_matmul / 1e6:.1f}M matmul params x tokens/s / {peak or 0:.3g} FLOP/s; "
          f"vs_hf = tokens/s / HF's (same run)" + ("; vs_hf_paired = median over rounds of HF's step time / "
                                                    "this row's in the same round." if timings else "."))


if __name__ == "__main__":
    main()
