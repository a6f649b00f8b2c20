"""The training loop's state and steps: build, train_step, validate, grow, save, resume.

Two counters: `step` is the schedule's optimizer-step counter (the LR is a function of it; a growth with
--restart_steps R sets it to R, possibly backwards), `iteration` counts updates actually taken and only
grows (checkpoint folders, --save_every, --val_every, --log_rate and --grow_at use it).
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from . import distributed as D
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import ConfigError, GPTConfig, initial_lr_for
from .heap import keep_freed_heap
from .kernels import backend_for_head_dim, resolve_backend
from .lr_schedule import LRSchedule
from .metrics import MetricsLogger, RateWindow, device_peak_flops, flops_per_token
from .profiling import UpdateProfiler, parse_window
from .run_summary import describe_run
from .model import GPT
from .optim import COMMAND_DECIDES, decay_groups, names_in_optimizer_order, state_in_layout
from .schedule.growth_schedule import GrowthSchedule, load_plan
from .train_args import UsageError, model_config, peak_lr, restart_value


def _grown(config: GPTConfig, ops: list[str]) -> GPTConfig:
    """`config` after the growth ops of a checkpoint's growth log, in order."""
    from .growth import grown_config

    for op in ops:
        config = grown_config(config, op)
    return config


class Trainer:
    def __init__(self, args, dist: D.DistInfo, *, log=print):
        self.args, self.dist, self.log = args, dist, log
        self.device = dist.device
        self.run_dir = Path(args.save_prefix)
        self.step = 0
        self.iteration = 0
        self.tokens = 0
        self.last_val_loss = None
        self.validation_pending = False  # a SIGTERM cut this update's validation short: the resumed run does it
        self.skipped_updates = torch.zeros((), device=self.device)  # non-finite grad norms, counted on the device
        self.skipped_reported = 0
        self.growth_log: list[dict] = []
        self.stop_requested = False
        self.plan = load_plan(args, log)
        self.last_saved_iteration, self.last_saved_path = None, None
        self.fsdp = getattr(args, "parallel", "ddp") == "fsdp"  # FSDP2 shards (staged_fast.sharded)

        self.backend = resolve_backend(args.kernels, self.device)  # first: may switch on Triton's interpreter
        if self.device.type == "cpu":
            keep_freed_heap()  # reuse each step's freed buffers instead of page-faulting fresh ones (heap.py)
        ckpt = self._load_resume_checkpoint()
        self._check_run_dir(ckpt)
        # the config of the --model weights that initialize this run: it, not the flags, decides the shape checks
        # below (vocab, context, head_dim); one we cannot compute exactly is refused before data preparation
        self.pretrained = self._pretrained_config() if self._weights_from_model(ckpt) else None
        self._build_data()
        self.config = self._decide_config(ckpt)
        try:  # before the model is built: under auto, attention may run SDPA for this head_dim
            self.backend = backend_for_head_dim(args.kernels, self.backend, self.config.head_dim, log)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._build_model_and_optimizer(ckpt)
        self._build_schedule_and_state(ckpt)
        self.growths = GrowthSchedule(
            args, self.plan, n_params=self.config.n_params_non_embedding, batch_tokens=self.tokens_per_step,
            state=None if ckpt is None else ckpt.trainer_state,
        )
        _grown(self.config, [r.op for r in self.growths.requests[self.growths.next:]])  # refuse now, not mid-run

        amp_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        configure_fp32_matmul(self.device, args.tf32, amp_dtype, log)
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.fp16)
        # A run saved without --fp16 holds the disabled scaler's empty state: resumed with --fp16, the
        # scaler starts afresh (loading {} raised).
        if ckpt is not None and ckpt.trainer_state.get("scaler") and args.fp16:
            self.scaler.load_state_dict(ckpt.trainer_state["scaler"])
        self.peak_flops = device_peak_flops(self.device)
        self.metrics = MetricsLogger(self.run_dir if dist.is_main else None, tensorboard=args.tensorboard,
                                     keep_until=self.metrics_keep_until, pending=self.metrics_pending,
                                     keep_lines=self.metrics_keep_lines)
        if self.metrics.dropped:
            self.log(f"metrics.jsonl: dropped {self.metrics.dropped} line(s) logged after update "
                     f"{self.metrics_keep_until} by the interrupted run")
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "run.json").write_text(json.dumps(vars(args), indent=1, default=str))
        if ckpt is not None:
            self._restore_rng(ckpt)
        if args.doubling:
            op = "width" if args.doubling == "weights" else args.doubling_layers
            self.grow(op)
            path = self.save()
            self.log(f"grown checkpoint written to {path}; training continues from it")
        for line in describe_run(self):
            self.log(line)

    # ---------------------------------------------------------------- set-up
    def _load_resume_checkpoint(self):
        if not self.args.resume:
            return None
        if self.args.resume == "latest" and not self.args.doubling and not list_checkpoints(self.run_dir):
            # a requeued job repeats its command: killed before its first checkpoint, it starts afresh
            self.log(f"note: --resume latest: {self.run_dir} holds no complete checkpoint yet; starting a fresh run")
            return None
        path = resolve_checkpoint(self.args.resume, self.args.save_prefix)
        ckpt = load_checkpoint(path, consolidate=not self.fsdp)  # fsdp reads its own shards of a sharded one
        self.resume_path = path
        self.log(f"resuming from {path}")
        return ckpt

    def _check_run_dir(self, ckpt) -> None:
        """Refuse to write into a folder that holds another run (nothing gets overwritten). A folder with no
        complete checkpoint holds at most the leftovers of a start that was killed: it is started afresh."""
        self.metrics_keep_until = 0  # a fresh metrics.jsonl, unless this run continues one of the folder's checkpoints
        self.metrics_pending, self.metrics_keep_lines = False, None
        # rank 0's listing, on every rank: all take the same branch (and meet the same barrier), also while rank 0
        # deletes checkpoints below or where other nodes do not see the folder
        names = D.broadcast_object([p.name for p in list_checkpoints(self.run_dir)] if self.dist.is_main else None,
                                   self.dist)
        if not names:
            if (self.run_dir / "metrics.jsonl").exists():
                self.log(f"note: {self.run_dir} holds no complete checkpoint, only what an interrupted start left; "
                         f"its metrics.jsonl is started afresh")
            return
        continuing = ckpt is not None and Path(self.resume_path).resolve().parent == self.run_dir.resolve()
        if continuing:  # records an earlier attempt logged after this checkpoint are dropped (one line per update)
            self._drop_newer_checkpoints(names)
            self.metrics_keep_until = int(ckpt.trainer_state.get("iteration", 0))
            self.metrics_pending = bool(ckpt.trainer_state.get("validation_pending", False))
            self.metrics_keep_lines = ckpt.trainer_state.get("metrics_lines")  # None: written before it was kept
            self.last_saved_path = Path(self.resume_path)  # what a stop before the first update leaves to go on from
            if not self.metrics_pending:  # this state is saved: a requeue of a finished run writes nothing again
                self.last_saved_iteration = self.metrics_keep_until
            return
        if self.args.overwrite:
            if self.dist.is_main:  # out of the listing first: a kill mid-delete leaves no listed half-checkpoint
                from .checkpoint import remove_checkpoints

                remove_checkpoints(self.run_dir, [self.run_dir / name for name in names])
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            D.barrier(self.dist)
            return
        raise UsageError(
            f"--save_prefix {self.run_dir} already holds another run (checkpoints or metrics.jsonl). "
            f"Continue it with --resume latest, choose another --save_prefix, or pass --overwrite to replace it."
        )

    def _drop_newer_checkpoints(self, names: list[str]) -> None:
        """Continuing an older checkpoint of this folder: the ones after it belong to the history it replaces. Left
        listed, `--resume latest` would later take them, next to this run's metrics. Refused without --overwrite;
        with it they are renamed out of the listing, then deleted (prune's order: a kill leaves `.tmp-` folders)."""
        from .checkpoint import remove_checkpoints

        resumed = Path(self.resume_path).resolve().name  # in this folder (the caller checked)
        newer = [self.run_dir / name for name in names[names.index(resumed) + 1:]] if resumed in names else []
        if not newer:
            return
        if not self.args.overwrite:
            raise UsageError(
                f"--resume {self.resume_path} is an older checkpoint of {self.run_dir}, which also holds "
                f"{', '.join(p.name for p in newer)}: continuing it here would leave those listed beside its new "
                f"ones (a later --resume latest takes them). Continue the newest with --resume latest, branch into "
                f"another --save_prefix, or pass --overwrite to delete the checkpoints after it.")
        if self.dist.is_main:
            self.log(f"--overwrite: deleting {', '.join(p.name for p in newer)} of {self.run_dir}, after the resumed "
                     f"checkpoint")
            remove_checkpoints(self.run_dir, newer)
        D.barrier(self.dist)

    def _build_data(self) -> None:
        from .data import TokenSampler, num_windows, prepare_data, val_batches
        from .tokenizer import load_tokenizer

        a = self.args
        try:
            self.tokenizer = load_tokenizer(a.tokenizer)
        except ValueError as e:  # the message names the tokenizer and the fix
            raise UsageError(f"--tokenizer {a.tokenizer}: {e}") from e
        self.data = prepare_data(
            a.data, self.tokenizer, tokenizer_name=a.tokenizer, cache_dir=a.cache_dir,
            val_fraction=a.val_fraction, num_proc=a.num_workers, text_field=a.text_field, seed=a.seed,
            val_data=a.val_data,
        )
        # a validation set too small for one batch per rank fails now, not at the first validation mid-run
        next(val_batches(self.data.val, seqlen=a.seqlen, batch_size=a.batch_size, num_batches=1,
                         rank=self.dist.rank, world_size=self.dist.world_size))
        held = num_windows(len(self.data.val), a.seqlen) // (a.batch_size * self.dist.world_size)
        if a.val_batches > held:  # val_batches takes what there is: say so, or the curve is read as more
            self.log(f"note: --val_batches {a.val_batches}, and the validation data holds {held} batch(es) of "
                     f"{a.batch_size} x {a.seqlen} per rank: each validation uses those {held}")
        self.sampler = TokenSampler(
            self.data.train, seqlen=a.seqlen, batch_size=a.batch_size,
            rank=self.dist.rank, world_size=self.dist.world_size, seed=a.seed, data_digest=self.data.train_digest,
        )

    def _weights_from_model(self, ckpt) -> bool:
        return ckpt is None and not self.args.random and self.args.model not in ("gpt2", None)

    def _pretrained_config(self) -> GPTConfig:
        from .hf import pretrained_config

        with self._reading_model():
            return pretrained_config(self.args.model)

    @contextlib.contextmanager
    def _reading_model(self):
        """--model's config or weights being read: an error of transformers or the hub becomes a UsageError."""
        from .hf import HFImportError

        try:
            yield
        except HFImportError:  # a model we cannot represent exactly: its own message (exit 2)
            raise
        except Exception as e:  # transformers/hub errors come in many types
            raise UsageError(
                f"--model {self.args.model}: could not load it as a Hugging Face GPT-2 or Llama model "
                f"({type(e).__name__}: {' '.join(str(e).split())[:300]}). Give a local folder (config.json + "
                f"weights), a hub name with network access, or --random for a fresh model."
            ) from e

    def _decide_config(self, ckpt) -> GPTConfig:
        a = self.args
        dropouts = dict(dropout=a.dropout, attn_dropout=a.dropout if a.attn_dropout is None else a.attn_dropout)
        if ckpt is None and self.pretrained is not None:
            config = self.pretrained.replace(**dropouts)
        elif ckpt is None:
            config = model_config(a, vocab_size=self.data.vocab_size)
        else:
            config = ckpt.config.replace(**dropouts)
            asked = None if (a.size is None and a.n_layer is None) else model_config(a, vocab_size=config.vocab_size)
            # a requeued staged run repeats its command: the flags name the start size, and the checkpoint's
            # growth log says how it grew since
            growths = [g["op"] for g in ckpt.trainer_state.get("growth_log", [])]
            if asked is not None and not a.doubling and not (
                asked.same_shape(config) or _grown(asked, growths).same_shape(config)
            ):
                grown = f" (grown by {', '.join(growths)})" if growths else ""
                raise ConfigError(
                    f"The checkpoint {self.resume_path} holds a {config.shape_str()} model{grown} but the flags ask "
                    f"for {asked.shape_str()}. To grow it, add --doubling weights (width) or --doubling layers "
                    f"(depth); to continue it as it is, drop --size/--n_layer/--n_embd/--n_head."
                )
        if config.vocab_size < self.data.vocab_size:
            raise ConfigError(
                f"The model's vocab_size {config.vocab_size} is smaller than the tokenizer's {self.data.vocab_size}; "
                f"use a matching --tokenizer."
            )
        if a.seqlen > config.n_positions:
            raise ConfigError(f"--seqlen {a.seqlen} exceeds the model's n_positions={config.n_positions}.")
        return config

    def _build_model_and_optimizer(self, ckpt) -> None:
        a = self.args
        torch.manual_seed(a.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
        if self._weights_from_model(ckpt):
            from .hf import load_pretrained

            with self._reading_model():
                pretrained = load_pretrained(a.model)  # a HF GPT-2/Llama folder/name initializes the weights
            self.config = pretrained.config.replace(dropout=self.config.dropout, attn_dropout=self.config.attn_dropout)
            model = GPT(self.config, kernels_backend=self.backend)
            model.load_state_dict(pretrained.state_dict())
        else:
            model = GPT(self.config, kernels_backend=self.backend)
        if ckpt is not None and ckpt.model_state is not None:
            model.load_state_dict(ckpt.model_state)
        self.model = model.to(self.device).train()
        if self.fsdp:
            from .sharded import shard

            shard(self.model, bf16=a.bf16)  # in place, before the optimizer sees the parameters
        self.optimizer = self._new_optimizer(self.model, lr=peak_lr(a, self.config))
        if ckpt is not None and ckpt.model_state is None:  # sharded checkpoint, sharded run: any rank count
            from .sharded import load_sharded

            asked = [{k: g[k] for k in COMMAND_DECIDES} for g in self.optimizer.param_groups]
            try:
                saved_groups = load_sharded(ckpt.path, self.model, self.optimizer)
            except Exception as e:  # DCP reports missing keys / shape mismatches in many types
                raise CheckpointError(f"the sharded checkpoint {self.resume_path} cannot be loaded into this model "
                                      f"({type(e).__name__}: {' '.join(str(e).split())[:300]})") from e
            self._note_changed_hyperparameters(self.optimizer.param_groups[0], asked[0])
            for group, hyper in zip(self.optimizer.param_groups, asked):  # DCP loads the saved hyperparameters
                group.update(hyper)
            self._note_one_group(saved_groups)
        elif ckpt is not None:
            if ckpt.optimizer_state is None:
                self.log("warning: the checkpoint has no optimizer state; AdamW starts fresh")
            else:
                try:
                    state = state_in_layout(self.optimizer, self.model, ckpt.optimizer_state, ckpt.param_names)
                except ValueError as e:
                    raise CheckpointError(f"the optimizer state in {self.resume_path} belongs to different parameters "
                                          f"than this model; it cannot be resumed as is ({e}).") from None
                self._note_one_group(len(ckpt.optimizer_state["param_groups"]))
                self._note_changed_hyperparameters(ckpt.optimizer_state["param_groups"][0], self.optimizer.param_groups[0])
                if self.fsdp:  # a full checkpoint (DDP / one process): each rank keeps its slice
                    from .sharded import load_full

                    load_full(self.model, self.optimizer, None, state, names_in_optimizer_order(self.model, self.optimizer))
                else:
                    self.optimizer.load_state_dict(state)
        self.ddp_model = self._training_model()

    def _note_changed_hyperparameters(self, saved: dict, asked: dict) -> None:
        def shown(value):
            return tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else float(value)
        changed = [f"{k} {shown(saved[k])} -> {shown(asked[k])}" for k in ("betas", "eps")
                   if k in saved and shown(saved[k]) != shown(asked[k])]
        if changed:
            self.log(f"note: AdamW {', '.join(changed)} from this command (the checkpoint's moments carry on)")

    def _note_one_group(self, saved_groups: int) -> None:
        if saved_groups == 1 and self.args.weight_decay > 0:
            self.log("note: this checkpoint's AdamW had one parameter group (every parameter decayed); from here on "
                     "biases and norm gains are not decayed (staged_fast.optim)")

    def _training_model(self, grown: bool = False):
        """The model the update runs: DDP-wrapped when distributed, then compiled under --compile (a fresh
        wrapper after each growth, so the grown shapes compile once instead of hitting guard failures)."""
        self.model.activation_checkpointing = self.args.activation_checkpointing
        self.model.activation_checkpointing_policy = self.args.ac_policy
        wrapped = self.model if self.fsdp else D.wrap(self.model, self.dist)  # fsdp: sharded in place already
        if self.args.compile:
            self.log(f"torch.compile (backend {self.args.compile}) of the {self.config.n_layer}L/{self.config.n_embd}d "
                     f"model: the first update includes compilation")
            if grown:
                # The old shapes never come back: drop their graphs, which dynamo keeps on the forward's code
                # object (shared by every wrapper); past its recompile limit (8) a frame silently runs eager.
                torch.compiler.reset()
            # Shapes change only at a growth: without dynamic=False dynamo would make what changed there (e.g.
            # n_head of an FSDP block, compiled as its own frame) symbolic, and compile the grown model for
            # every size, with shape guards on each call.
            wrapped = torch.compile(wrapped, backend=self.args.compile, dynamic=False)
        return wrapped

    def _new_optimizer(self, model, lr: float) -> torch.optim.AdamW:
        a = self.args
        # fused: one kernel over all tensors (3.5x faster than the per-tensor loop on CPU, measured)
        return torch.optim.AdamW(
            decay_groups(model, a.weight_decay), lr=lr, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_eps,
            weight_decay=a.weight_decay, fused=self.device.type in ("cpu", "cuda"),
        )

    def _build_schedule_and_state(self, ckpt) -> None:
        a = self.args
        fresh = LRSchedule(
            base_lr=peak_lr(a, self.config), warmup_steps=a.warmup_steps, train_steps=a.train_steps,
            decay=a.lr_decay, min_lr=a.min_lr, decay_fraction=a.decay_fraction,
        )
        if ckpt is None:
            self.schedule = fresh
            return
        st = ckpt.trainer_state
        self.schedule = fresh if a.reset_lr_scheduler else LRSchedule.from_state_dict(st["schedule"])
        if self.schedule.train_steps < a.train_steps:  # a continued run's flags are checked at parsing (train_args)
            end = self.schedule.train_steps
            self.log(f"warning: the LR schedule of {self.resume_path} ends at step {end}, and --train_steps is "
                     f"{a.train_steps}: the updates past step {end} run at its final LR ({self.schedule.min_lr:g}). "
                     f"Pass --reset_lr_scheduler to rebuild the schedule from this command's flags, or --train_steps "
                     f"{end}.")
        if "grown_from" in st and a.lr is None and not a.reset_lr_scheduler:
            grown_lr = initial_lr_for(self.config)  # as an in-run growth moves it (grown by `grow`: not yet)
            if grown_lr != self.schedule.base_lr:
                self.log(f"peak LR {self.schedule.base_lr:.3g} -> {grown_lr:.3g}: the heuristic for the grown "
                         f"{self.config.shape_str()} model, as a growth in the run sets it (--lr keeps one fixed)")
                self.schedule.base_lr = grown_lr
        self.step, self.iteration, self.tokens = st["step"], st["iteration"], st["tokens"]
        self.last_val_loss = st.get("last_val_loss")
        self.validation_pending = bool(st.get("validation_pending", False))
        self.growth_log = list(st.get("growth_log", []))
        if a.reset_data_order:
            self.log(f"--reset_data_order: a new data order from the start of the data (seed {a.seed}), not the "
                     f"checkpoint's")
        else:
            self.sampler.load_state_dict(st["sampler"])
        # grown by train --doubling (grown_at_iteration) or by `python -m staged_fast.grow` (grown_from;
        # the trainer does not carry that key into later checkpoints, so its presence means "not trained since")
        just_grown = st.get("grown_at_iteration") == self.iteration or "grown_from" in st
        grown_op = st.get("grown_with_op") or st.get("grown_from", {}).get("op", "width")
        typed = getattr(a, "restart_given", a.restart_steps is not None)  # parse_args sets it; a Namespace may not
        if typed and a.restart_steps is not None and not a.doubling and not (a.grow_at or a.schedule or a.grow_when):
            if not just_grown:
                raise UsageError(
                    "--restart_steps on a resume moves the step counter back; that is only meant for the first "
                    "resume of a freshly grown checkpoint, and this one was not just grown. Drop --restart_steps."
                )
            # train --doubling restarted it as it grew, then stopped before an update (an offline growth since, by
            # `grow`, restarted nothing: the flag of an earlier in-run growth is not about it)
            if st.get("grown_restarted") and st.get("grown_at_iteration") == self.iteration and "grown_from" not in st:
                self.log(f"the growth at update {self.iteration} already restarted the step counter (now {self.step}); "
                         f"--restart_steps is not applied again")
                return
            r = restart_value(self.args.restart_steps, self.step, grown_op)
            self.last_saved_iteration = None  # the same update, another state: saved again at the end
            self.step = r
            self.schedule.restart(r, a.restart_warmup_steps)
            for state in self.optimizer.state.values():  # Adam's bias correction follows the counter, as in-memory
                if "step" in state:
                    state["step"] = torch.full_like(state["step"], float(r)) if torch.is_tensor(state["step"]) else r
            self.log(f"step counter restarted at {r}, LR ramp over {a.restart_warmup_steps} steps")

    def _restore_rng(self, ckpt) -> None:
        states = ckpt.trainer_state.get("rng", [])
        if len(states) == self.dist.world_size:
            mine = states[self.dist.rank]
            torch.set_rng_state(mine["cpu"])
            if self.device.type == "cuda" and mine.get("cuda") is not None:
                torch.cuda.set_rng_state(mine["cuda"], self.device)
            elif self.device.type == "cuda":  # saved on the CPU: not the start's seed, whose masks were drawn
                self.log("note: the checkpoint has no CUDA RNG state (saved on the CPU); dropout RNG is reseeded")
                torch.cuda.manual_seed(self._reseed_value())
        else:
            self.log(f"note: checkpoint RNG states are for {len(states)} ranks, this run has "
                     f"{self.dist.world_size}; dropout RNG is reseeded")
            torch.manual_seed(self._reseed_value())

    def _reseed_value(self) -> int:
        """A seed per rank and update for RNG streams a checkpoint cannot restore."""
        return self.args.seed + 7919 * self.dist.rank + self.iteration

    # ---------------------------------------------------------------- training
    @property
    def tokens_per_step(self) -> int:
        a = self.args
        return a.batch_size * a.seqlen * a.grad_accum * self.dist.world_size

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches; returns (mean loss, grad norm) on device."""
        a, model, opt = self.args, self.ddp_model, self.optimizer
        lr = self.schedule(self.step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(a.grad_accum):
            x, y = self.sampler.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = micro == a.grad_accum - 1
            if self.fsdp:  # no reduce-scatter on non-final micro-batches (grads accumulate unsharded)
                self.model.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext()
            else:
                sync = contextlib.nullcontext() if (last or not self.dist.enabled) else model.no_sync()
            with sync:
                with self.autocast():
                    loss = model(x, y)
                self.scaler.scale(loss / a.grad_accum).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(opt)
        max_norm = a.grad_clip if a.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if self.fsdp:  # the norm over sharded grads is a DTensor: its value on every rank
            from .sharded import local_value

            grad_norm = local_value(grad_norm)
        if a.fp16:
            self.scaler.step(opt)  # skips the step itself on inf/nan
            self.scaler.update()
        else:
            # A non-finite norm skips the update on the device, as GradScaler has the fused AdamW do (its
            # found_inf: no change to weights, moments or step count): testing the norm on the host waited
            # for the GPU at every update. log_record reports the skipped updates.
            not_finite = (~torch.isfinite(grad_norm)).to(torch.float32)
            opt.found_inf = not_finite
            try:
                opt.step()
            finally:
                del opt.found_inf
            self.skipped_updates += not_finite
        opt.zero_grad(set_to_none=True)
        self.step += 1
        self.iteration += 1
        self.tokens += self.tokens_per_step
        return loss_sum / a.grad_accum, grad_norm

    @torch.no_grad()
    def evaluate(self, num_batches: int | None = None, *, stoppable: bool = False) -> float | None:
        """Mean validation loss over --val_batches micro-batches per rank, averaged across ranks. `stoppable`:
        None once a SIGTERM has reached any rank, agreed before each batch (a long validation otherwise kept
        the job past the scheduler's grace period: torchrun killed the ranks before they saved)."""
        from .data import val_batches

        a = self.args
        self.model.eval()
        total = torch.zeros((), device=self.device)
        n = 0
        try:
            for x, y in val_batches(
                self.data.val, seqlen=a.seqlen, batch_size=a.batch_size, num_batches=num_batches or a.val_batches,
                rank=self.dist.rank, world_size=self.dist.world_size,
            ):
                if stoppable and D.any_rank(self.stop_requested, self.dist):
                    return None
                with self.autocast():
                    total += self.model(x.to(self.device), y.to(self.device)).float()
                n += 1
        finally:
            self.model.train()
        return D.all_reduce_mean(total / max(n, 1), self.dist).item()

    def validate(self) -> bool:
        """The run's validation of this update; False when a SIGTERM cut it short (on every rank alike): the
        checkpoint then records it as pending, and the resumed run does it before its first update, so the
        validation curve (and a slope-rule growth that reads it) is the uninterrupted run's."""
        val_loss = self.evaluate(stoppable=True)
        self.validation_pending = val_loss is None
        if val_loss is None:
            self.last_val_loss = None  # this update's record shows none; the resumed run logs it
            return False
        self.on_validation(val_loss)
        return True

    def finish_pending_validation(self) -> bool:
        """A resumed run whose checkpoint's validation was cut short does it now, and logs it; False when a
        SIGTERM cuts it short again."""
        if not self.validation_pending:
            return True
        if not self.validate():
            return False
        self.metrics.log(dict(event="validation", iteration=self.iteration, step=self.step,
                              val_loss=self.last_val_loss, resumed=True))
        return True

    def updates_total(self) -> int:
        """Updates the run takes in all, the growths' restarts of the step counter counted (a slope-rule growth
        not yet fired counts none)."""
        return self.iteration + self.growths.updates_left(self.args, self.step, self.iteration)[0]

    def grow(self, op: str, restart_step=None, restart_warmup_steps: int | None = None) -> dict:
        """Grow model and optimizer in memory (every rank identically), rebuild DDP, move the schedule."""
        from .growth import grow_model

        a = self.args
        before = self.evaluate(num_batches=1)
        old_shape = self.config.shape_str()
        restart = restart_value(a.restart_steps if restart_step is None else restart_step, self.step, op)
        warmup = a.restart_warmup_steps if restart_warmup_steps is None else restart_warmup_steps
        if op == "width" and a.width_noise == 0 and self.config.dropout == 0 and self.config.attn_dropout == 0:
            self.log("warning: width growth with dropout 0 and --width_noise 0: the two halves get identical "
                     "gradients and stay identical, so the grown model keeps the small one's capacity; pass "
                     "--width_noise (e.g. 0.01, still function-preserving) or keep dropout on")
        generator = torch.Generator().manual_seed(a.seed * 1_000_003 + self.iteration)
        noise = a.width_noise if op == "width" else 0.0  # it splits width growths; depth ones stay exact
        if self.fsdp:  # inside the shards (staged_fast.sharded): each rank builds only its rows of the grown state
            from .sharded import grow_sharded

            model, optimizer = grow_sharded(
                self.model, self.optimizer, op, bf16=self.args.bf16, width_noise=noise, generator=generator,
                optimizer_step=restart,
            )
        else:
            model, optimizer = grow_model(
                self.model, self.optimizer, op, width_noise=noise, generator=generator, optimizer_step=restart
            )
            self._check_ranks_agree(model, optimizer)
        self.model, self.config = model.train(), model.config
        self.optimizer = optimizer
        self.ddp_model = self._training_model(grown=True)
        if a.lr is None:  # the seed's heuristic follows the model size
            self.schedule.base_lr = initial_lr_for(self.config)
        step_before = self.step
        if restart is not None:
            self.step = restart
        if restart is not None or warmup:
            self.schedule.restart(self.step, warmup)
        after = self.evaluate(num_batches=1)
        self._warn_if_not_preserved(op, before, after, noise)
        event = dict(
            event="growth", op=op, iteration=self.iteration, step_before=step_before, step_after=self.step,
            loss_before=before, loss_after=after, old_size=old_shape, new_size=self.config.shape_str(),
            n_params=self.config.n_params_non_embedding, base_lr=self.schedule.base_lr,
        )
        self.growth_log.append(event)
        self.metrics.log(event)
        self.grown_at_iteration, self.grown_with_op, self.grown_restarted = self.iteration, op, restart is not None
        self.last_saved_iteration = None  # a checkpoint of this update holds the small model
        self.growths.grown(self.config.n_params_non_embedding)
        self.log(
            f"grew {old_shape} -> {self.config.shape_str()} ({op}) at update {self.iteration}: "
            f"val-batch loss {before:.4f} -> {after:.4f}, step counter {step_before} -> {self.step}, peak LR "
            f"{self.schedule.base_lr:.3g}"
        )
        return event

    def _warn_if_not_preserved(self, op: str, before: float, after: float, noise: float) -> None:
        """The operators preserve the function up to rounding: a loss that moved more says why it might have."""
        low = self.args.bf16 or self.args.fp16
        if op.endswith("_copy") or abs(after - before) <= (1e-2 if low else 1e-4) * abs(before):
            return  # (the _copy depth operators copy layers: they change the function by design)
        why = (f"--width_noise {noise:g} is large beside these weights (the split W - E, E cancels inexactly in "
               f"floating point once E nears their scale; 0.01 or less keeps GPT-2-scale weights exact)"
               if op == "width" and noise > 0 else "this is not expected: please report it")
        self.log(f"warning: the growth moved the val-batch loss {before:.4f} -> {after:.4f}; {why}")

    @torch.no_grad()
    def _check_ranks_agree(self, model=None, optimizer=None) -> None:
        """Every rank must hold the same grown weights and AdamW state (DDP would only re-sync weights)."""
        if not self.dist.enabled:
            return
        model = self.model if model is None else model
        optimizer = self.optimizer if optimizer is None else optimizer
        tensors = list(model.parameters())
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        fingerprint = sum(float(t.double().abs().sum()) + float(t.double().sum()) for t in tensors)
        prints = D.gather_objects(fingerprint, self.dist)
        if any(p != prints[0] for p in prints):
            raise RuntimeError(f"ranks disagree after growth (weight/state checksums {prints}); this is a bug.")

    def maybe_grow(self, paused=contextlib.nullcontext) -> None:
        """The growth due at this update, if any, inside `paused()` (off the training clock)."""
        req = self.growths.due(self.iteration)
        if req is not None:
            with paused():
                self.grow(req.op, req.restart_step, req.restart_warmup_steps)

    def on_validation(self, val_loss: float) -> None:
        self.last_val_loss = val_loss
        self.growths.observe(self.step, val_loss)

    # ---------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict:
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        state = dict(
            step=self.step, iteration=self.iteration, tokens=self.tokens, sampler=self.sampler.state_dict(),
            schedule=self.schedule.state_dict(), rng=D.gather_objects(rng, self.dist), scaler=self.scaler.state_dict(),
            last_val_loss=self.last_val_loss, validation_pending=self.validation_pending,
            growth_log=self.growth_log, args=vars(self.args), metrics_lines=self.metrics.lines,
            world_size=self.dist.world_size, **self.growths.state_dict(),
        )
        if getattr(self, "grown_at_iteration", None) is not None:
            state.update(grown_at_iteration=self.grown_at_iteration, grown_with_op=self.grown_with_op,
                         grown_restarted=self.grown_restarted)
        return state

    def save(self) -> Path | None:
        state = self.trainer_state()  # collective (RNG gather): every rank calls it
        path, error = None, None
        if self.fsdp:  # every rank writes its own shards (a collective; raises on every rank if one failed)
            from .sharded import save_sharded

            path = save_sharded(self.run_dir, step=self.iteration, model=self.model, optimizer=self.optimizer,
                                config=self.config, trainer_state=state, info=self.dist,
                                keep_last=self.args.keep_last or None)
            self.last_saved_iteration, self.last_saved_path = self.iteration, path
            return path
        if self.dist.is_main:
            try:
                path = save_checkpoint(
                    self.run_dir, step=self.iteration, model=self.model, config=self.config, optimizer=self.optimizer,
                    trainer_state=state, keep_last=self.args.keep_last or None,
                )
            except CheckpointError as e:  # e.g. disk full: every rank must hear it, or the others wait forever
                error = str(e)
        error = D.broadcast_object(error, self.dist)  # also the barrier after the write
        if error is not None:
            raise CheckpointError(error)
        self.last_saved_iteration, self.last_saved_path = self.iteration, path
        return path

    def rate_window(self) -> RateWindow:
        sync = (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        return RateWindow(self.tokens, sync)

    def log_record(self, loss: torch.Tensor, grad_norm: torch.Tensor, window: RateWindow) -> dict:
        """One metrics record. tokens_per_s is the wall rate since the window's start (validation, growth and
        saves included: staged_vs_direct sums it as wall time); train_tokens_per_s and MFU count training
        time alone, as nanoGPT's per-iteration MFU does."""
        loss = D.all_reduce_mean(loss.detach().float(), self.dist).item()
        tps, train_tps = window.rates(self.tokens)
        rec = dict(
            step=self.step, iteration=self.iteration, loss=loss, lr=self.schedule(max(self.step - 1, 0)),
            tokens=self.tokens, tokens_per_s=tps, train_tokens_per_s=train_tps, grad_norm=float(grad_norm),
            val_loss=self.last_val_loss, n_layer=self.config.n_layer, n_embd=self.config.n_embd,
        )
        if self.peak_flops:
            fpt = flops_per_token(self.config.n_params_non_embedding, self.config.n_layer, self.config.n_embd, self.args.seqlen)
            rec["mfu"] = fpt * train_tps / (self.peak_flops * self.dist.world_size)
        if not math.isfinite(loss):
            self.log(f"warning: loss is {loss} at step {self.step}")
        skipped = int(self.skipped_updates.item())
        if skipped > self.skipped_reported:
            self.log(f"warning: {skipped - self.skipped_reported} update(s) skipped for a non-finite gradient norm "
                     f"since the last log record (up to step {self.step}; {skipped} since the start)")
            self.skipped_reported = skipped
        self.metrics.log(rec)
        return rec

    def close(self) -> None:
        self.metrics.close()


def configure_fp32_matmul(device: torch.device, tf32: bool, amp_dtype, log) -> None:
    """--tf32 on CUDA: fp32 matmuls on TF32 tensor cores (process-wide, as torch's setting is; the flash
    attention kernel's fp32 dots follow it, staged_fast.kernels._common.dot_precision). On the CPU it would
    switch oneDNN's fp32 matmuls to bf16 passes on some CPUs, so it is left alone there."""
    if device.type != "cuda":
        if tf32:
            log("--tf32 has no effect on the CPU: fp32 matmuls stay exact")
        return
    if tf32:
        torch.set_float32_matmul_precision("high")
    elif amp_dtype is None and torch.get_float32_matmul_precision() == "highest":
        log("note: fp32 training on CUDA with exact fp32 matmuls (no tensor cores); --bf16 or --tf32 runs "
            "them on tensor cores, whose datasheet peak is several times higher")


def run(trainer: Trainer, *, progress: bool = True) -> dict:
    """Train until the schedule's step counter reaches --train_steps (or --stop_at_step). The summary's
    `stopped` says what ended it early, on every rank: "SIGTERM" (to any rank), "--stop_at_step N", or None."""
    from tqdm.auto import tqdm

    a = trainer.args
    # the bar counts updates: the step counter moves back at a growth with --restart_steps, the updates do not
    bar = tqdm(total=trainer.updates_total(), initial=trainer.iteration,
               disable=not (progress and trainer.dist.is_main), desc="train", unit="update", dynamic_ncols=True)
    window = trainer.rate_window()
    last = {}
    # A SIGTERM to any rank during the start: all leave before the first update, with nothing new to save
    # (a resumed run's checkpoint is the latest; a fresh folder without one is started afresh next time).
    pending = trainer.validation_pending
    with window.paused():
        finished = trainer.finish_pending_validation()
    if pending and finished:  # the rest of the cut-short update: its growth, if one is due
        trainer.maybe_grow(window.paused)
    if not finished or D.any_rank(trainer.stop_requested, trainer.dist):
        bar.close()
        trainer.log(f"stop requested (SIGTERM) before the first update at step {trainer.step}: leaving without "
                    f"training")
        # the cut-short validation done (and its growth): saved, or the next start would do and log them again
        saved = trainer.save() if pending and finished else trainer.last_saved_path
        return dict(checkpoint=str(saved) if saved else None, growths=trainer.growth_log, stopped="SIGTERM")
    stop, stopped, vote = False, None, D.StopVote(trainer.dist)
    profiler = UpdateProfiler(parse_window(a.profile) if a.profile else None, trainer.run_dir,
                              rank=trainer.dist.rank, device=trainer.device, log=trainer.log)
    try:
        while trainer.step < a.train_steps and not stop:
            profiler.before_update(trainer.iteration + 1)
            loss, grad_norm = trainer.train_step()
            it = trainer.iteration
            validated = True
            if it % a.val_every == 0 or trainer.step >= a.train_steps:
                with window.paused():
                    validated = trainer.validate()
            if it % a.log_rate == 0 or trainer.step >= a.train_steps:
                last = trainer.log_record(loss, grad_norm, window)
                window.restart(trainer.tokens)
                bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{last['lr']:.2e}",
                                size=trainer.config.shape_str(), tok_s=f"{last['train_tokens_per_s']:.0f}")
            if validated:  # else the resumed run validates, then grows (finish_pending_validation)
                trainer.maybe_grow(window.paused)
            bar.total, bar.n = trainer.updates_total(), trainer.iteration  # a growth can change the total
            bar.refresh()
            # a SIGTERM reaches one rank, or ranks at different updates: all agree on stopping at one update
            # (an all-reduce of the flag, read one update later in a multi-rank run so that no update waits for
            # the GPU), so all save the same one checkpoint and leave the loop together. The flag is read here,
            # never written back: a SIGTERM handled while the all-reduce is in flight sets it after it was read,
            # and writing the result over it lost the request (the job trained on).
            # --stop_at_step is the same on every rank: no vote, no lag.
            if not validated:  # every rank agreed on the SIGTERM within the validation: stop at once
                stop, stopped = True, "SIGTERM"
            elif vote(trainer.stop_requested):
                stop, stopped = True, "SIGTERM"
            elif a.stop_at_step is not None and it >= a.stop_at_step:
                stop, stopped = True, f"--stop_at_step {a.stop_at_step}"
            if it % a.save_every == 0 or stop:
                with window.paused():
                    path = trainer.save()
            profiler.after_update(it)  # a profiled step spans the update and its validation, log and save
    finally:
        profiler.close()
    bar.close()
    if trainer.last_saved_iteration != trainer.iteration:
        path = trainer.save()
    else:
        path = trainer.last_saved_path
    return dict(last, checkpoint=str(path) if path else None, growths=trainer.growth_log, stopped=stopped)
