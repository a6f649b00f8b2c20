"""The lines a run prints before its first update: what it trains, on what, and for how long (as nanoGPT and
torchtitan print their parameter count and tokens per update), so a wrong flag shows before hours are spent."""
from __future__ import annotations


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def precision(args, device_type: str) -> str:
    if args.bf16:
        return "bf16 autocast"
    if args.fp16:
        return "fp16 autocast + loss scaling"
    return "fp32 (TF32 matmuls)" if args.tf32 and device_type == "cuda" else "fp32"


def describe_run(trainer) -> list[str]:
    """Three lines: model, data, schedule. Parameter counts are global (FSDP2's sharded parameters count whole)."""
    a, config, dist = trainer.args, trainer.config, trainer.dist
    n_params = sum(p.numel() for p in trainer.model.parameters())
    ranks = f"{dist.world_size} {a.parallel} ranks" if dist.world_size > 1 else "1 process"
    model = (f"model: {config.arch} {config.shape_str()}, {_count(n_params)} parameters "
             f"({_count(config.n_params_non_embedding)} in the blocks), vocab {config.vocab_size}, "
             f"dropout {config.dropout}; {trainer.backend} kernels, {precision(a, trainer.device.type)} on "
             f"{trainer.device.type}, {ranks}")
    per_update = trainer.tokens_per_step
    updates, exact = trainer.growths.updates_left(a, trainer.step, trainer.iteration)
    if not exact:
        to_go = f"at least {updates:,} updates to go (a --grow_when growth that restarts the step counter adds more)"
    elif updates != max(0, a.train_steps - trainer.step):
        to_go = f"{updates:,} updates to go (the growths restart the step counter)"
    else:
        to_go = f"{updates:,} updates to go"
    train_tokens = len(trainer.data.train)
    data = (f"data: {train_tokens:,} train / {len(trainer.data.val):,} val tokens ({trainer.data.source}); "
            f"{per_update:,} tokens per update = {a.batch_size} x {a.seqlen} x {a.grad_accum} accumulated x "
            f"{dist.world_size} ranks; {to_go} = {updates * per_update:,} tokens "
            f"({updates * per_update / max(train_tokens, 1):.2f} epochs)")
    s = trainer.schedule
    start = "from step 0" if trainer.step == 0 else f"resumed at step {trainer.step}"
    schedule = (f"schedule: {start} to {s.train_steps}, peak LR {s.base_lr:.3g}, warmup {s.warmup_steps}, "
                f"{s.decay} decay to {s.min_lr:g}")
    return [model, data, schedule]
