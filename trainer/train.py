"""The training loop, top to bottom: world, task (model, data, evaluation), optimizer, resume, loop, checkpoints.

Preemption: SIGTERM/SIGINT only set a flag; the ranks agree every STOP_CHECK_EVERY steps whether to stop, rank 0
saves a checkpoint, and the process exits 128+signal (restartPolicy ExitCode retries it). Every batch and every
Gumbel draw is a function of (seed, step, rank), so a resumed run continues exactly (docs/preemption.md). The
loop never asks which model family it trains: trainer/tasks.py picks the task, the task provides the rest.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import checkpoint
from .config import ConfigError, TrainConfig
from .curves import TRAINING_CURVES, Curves
from .data import ShardSampler, loader_batches, quiet_worker
from .distributed import World, any_rank, barrier, init_world, shutdown
from .evaluation import report, write_metrics
from .files import replace_dir, write_json_atomic
from .monitoring import TrainingMetrics
from .task import RunParts, Task
from .tasks import task_for

DEFAULT_DEEPSPEED_CONFIG = Path(__file__).with_name("ds_zero2.json")
# 128 + SIGHUP: this replica lost its peers (a collective broke because another replica died). It is in
# 128-255 so that restartPolicy ExitCode retries it, as it does for the replica that was killed.
PEER_LOST_EXIT = 129
# Fields that may change between an interrupted run and its resumption; anything else must match.
RUN_CONTROL = {"steps", "eval_every", "eval_size", "checkpoint_every", "keep_checkpoints", "log_every", "out", "resume",
               "num_workers", "dist_timeout", "compile", "metrics_port", "budget_curve", "max_answer_tokens"}
# Optimizer steps between two stop-on-signal agreements of a multi-replica run (each is a host sync). At a few
# steps per second this answers a SIGTERM within a second or two, well inside GKE spot's ~15 s notice; a base
# slow enough that STOP_CHECK_EVERY steps take more than ~5 s should lower it.
STOP_CHECK_EVERY = 4
# Training samples the DataLoader keeps ready per worker, ahead of the loop.
PREFETCH_BATCHES = 4


def build_run(cfg: TrainConfig, world: World) -> tuple[Task, torch.nn.Module, RunParts]:
    """The task --base-model picks, its model on this rank's device, and the run's data and evaluation. Every input
    is read here, before the run writes anything, so bad input leaves --out as it was."""
    task = task_for(cfg)
    torch.manual_seed(cfg.seed)  # the trainable modules start identical on every rank
    model = task.build_model(cfg).to(world.device)
    return task, model, task.run_parts(cfg, world, model)


def lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def step_seed(cfg: TrainConfig, step: int, rank: int, micro: int = 0) -> int:
    return int(np.random.SeedSequence([cfg.seed, step, rank, micro]).generate_state(1)[0])


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The base model's repeated blocks (what transformers itself never splits across devices)."""
    base = model.base
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in base.modules() if type(m).__name__ in names]


def build_optimization(model: torch.nn.Module, cfg: TrainConfig, world: World):
    """(engine, optimizer, scheduler): engine is what the loop calls forward on."""
    if cfg.strategy == "fsdp" and world.distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(world.device.type, (world.world_size,))
        # bf16: the frozen base is stored in bf16 and the fp32 adapters are gathered in bf16 beside it (FSDP2
        # gathers one dtype per group); gradients are reduced, and the sharded trainable weights kept, in fp32.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if cfg.precision == "bf16" else MixedPrecisionPolicy()
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if cfg.strategy == "deepspeed":
        import deepspeed

        ds_config = json.loads(Path(cfg.deepspeed_config or DEFAULT_DEEPSPEED_CONFIG).read_text())
        ds_config.update(train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
                         gradient_clipping=cfg.grad_clip)
        # --precision bf16 is torch autocast with fp32 trainable weights, not DeepSpeed's bf16 mode (which would
        # store the trainable weights in bf16 too); the model autocasts its own forward either way.
        ds_config["bf16"] = {"enabled": False}
        ds_config["torch_autocast"] = {"enabled": cfg.precision == "bf16", "dtype": "bfloat16"}
        os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=not world.distributed)
        return engine, optimizer, scheduler
    engine = DistributedDataParallel(model) if world.distributed and cfg.strategy == "ddp" else model
    return engine, optimizer, scheduler


def gradient_sync(engine, model, cfg: TrainConfig, last_micro: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an optimizer step."""
    if isinstance(engine, DistributedDataParallel) and not last_micro:
        return engine.no_sync()
    if cfg.strategy == "fsdp" and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last_micro)
    return contextlib.nullcontext()


def train_step(engine, model, optimizer, scheduler, micro_batches, noises, cfg: TrainConfig) -> torch.Tensor:
    """One optimizer step over cfg.grad_accum micro-batches; returns the mean loss as a device tensor (no sync)."""
    total = None
    for i, (batch, noise) in enumerate(zip(micro_batches, noises)):
        last = i == len(micro_batches) - 1
        with gradient_sync(engine, model, cfg, last):
            loss = engine(batch, noise=noise)["loss"]
            if cfg.strategy == "deepspeed":
                engine.backward(loss)  # scaled by 1/grad_accum inside; steps at the accumulation boundary
                engine.step()
            else:
                (loss / cfg.grad_accum).backward()
        total = loss.detach() if total is None else total + loss.detach()
    if cfg.strategy != "deepspeed":
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return total / len(micro_batches)


# --- checkpoints -------------------------------------------------------------------------------------------
SHARDED = "sharded"  # the torch.distributed.checkpoint folder of an fsdp checkpoint


def _dcp_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(ignore_frozen_params=True)  # the frozen base is rebuilt from the base model
    return {"model": get_model_state_dict(model, options=options),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}


def save_checkpoint(root: Path, step: int, engine, model, optimizer, scheduler, history, cfg, world) -> None:
    if world.is_main:
        checkpoint.begin(root, step)
    if cfg.strategy in ("deepspeed", "fsdp"):
        barrier(world)  # every rank writes its part into the staged folder
        if cfg.strategy == "deepspeed":
            engine.save_checkpoint(str(checkpoint.staging_dir(root, step)), tag="deepspeed")
        else:
            import torch.distributed.checkpoint as dcp

            dcp.save(_dcp_state(model, optimizer), checkpoint_id=checkpoint.staging_dir(root, step) / SHARDED)
        barrier(world)
    if world.is_main:
        state = {"step": step, "config": cfg.to_dict(), "history": history, "world_size": world.world_size,
                 "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}}
        if cfg.strategy == "ddp":
            state["model"] = model.trainable_state()
            state["optimizer"], state["scheduler"] = optimizer.state_dict(), scheduler.state_dict()
        elif cfg.strategy == "fsdp":
            state["scheduler"] = scheduler.state_dict()
        else:
            state["model"] = model.trainable_state()
        checkpoint.save_state(checkpoint.staging_dir(root, step), state)
        checkpoint.commit(root, step, cfg.keep_checkpoints)


def resume_candidates(cfg: TrainConfig, root: Path) -> list[Path]:
    """Checkpoints to try, newest first: with auto, every complete one (a corrupt newest one falls back)."""
    if cfg.resume == "never":
        return []
    return list(reversed(checkpoint.complete_checkpoints(root))) if cfg.resume == "auto" else [Path(cfg.resume)]


def restore(src: Path, engine, model, optimizer, scheduler, cfg: TrainConfig, world: World) -> tuple[int, dict]:
    state = checkpoint.load_state(src)
    theirs = state["config"]
    for key, value in cfg.to_dict().items():
        if key not in RUN_CONTROL and theirs.get(key, value) != value:
            raise ConfigError(f"resume: checkpoint {src} was made with {key}={theirs.get(key)!r}, this run has "
                              f"{key}={value!r}; use --resume never or another --out")
    saved_world = state.get("world_size", world.world_size)
    if cfg.strategy == "deepspeed" and saved_world != world.world_size:
        raise ConfigError(f"resume: checkpoint {src} holds ZeRO optimizer partitions of {saved_world} replicas and "
                          f"this job has {world.world_size}; DeepSpeed does not reshard them: run {saved_world} "
                          f"replicas, use --strategy fsdp (resharded on load), or --resume never")
    if cfg.strategy == "fsdp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        # torch.distributed.checkpoint reshards on load: a job of another replica count reads the same folder
        sharded = _dcp_state(model, optimizer)
        dcp.load(sharded, checkpoint_id=src / SHARDED)
        set_state_dict(model, optimizer, model_state_dict=sharded["model"], optim_state_dict=sharded["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))
        scheduler.load_state_dict(state["scheduler"])
    else:
        model.load_trainable_state(state["model"])
        if cfg.strategy == "deepspeed":
            engine.load_checkpoint(str(src), tag="deepspeed")
        else:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    return state["step"], state["history"]


def resume(cfg: TrainConfig, root: Path, engine, model, optimizer, scheduler, world: World):
    """(step, history, skipped): the newest checkpoint that loads. A corrupt one (a truncated state.pt under its
    COMPLETE marker, which a non-HNS GCS FUSE bucket can leave after a preemption) is reported and skipped."""
    skipped = 0
    for src in resume_candidates(cfg, root):
        try:
            step, history = restore(src, engine, model, optimizer, scheduler, cfg, world)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001  (any unreadable checkpoint: torch.load raises many kinds)
            if cfg.resume != "auto":
                raise ConfigError(f"resume={cfg.resume!r}: checkpoint cannot be loaded ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:160]})") from None
            skipped += 1
            if world.is_main:
                print(f"checkpoint {src} cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:160]});"
                      f" falling back to the one before it", file=sys.stderr, flush=True)
            continue
        if world.is_main:
            print(f"resumed from {src} at step {step}", file=sys.stderr, flush=True)
        return step, history, skipped
    return 0, {"eval": [], "loss": [], "window": [0.0, 0]}, skipped


def save_adapter(task: Task, model, cfg: TrainConfig, out: Path, world: World, history: dict) -> Path | None:
    """OUT/adapter, replaced atomically: a reader sees the old adapter or the new one, never half."""
    if cfg.strategy == "fsdp" and world.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # every rank takes part in gathering the sharded weights; rank 0 writes them from a plain copy
        full = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        if not world.is_main:
            return None
        model = task.build_model(cfg)
        model.load_trainable_state(full)
    if not world.is_main:
        return None
    final, tmp = out / "adapter", out / ".adapter-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_adapter(tmp)
    write_json_atomic(tmp / TRAINING_CURVES, {"loss": history["loss"], "eval": history["eval"]})
    return replace_dir(tmp, final)


# --- the run -----------------------------------------------------------------------------------------------
def run(cfg: TrainConfig) -> int:
    """Train; return the process exit code (0, or 128+signal after a checkpoint-on-signal)."""
    requested: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: requested.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    world, monitor = World(), None
    try:
        world = init_world(cfg.dist_timeout)
        monitor = TrainingMetrics(cfg, world)  # start: serves --metrics-port until the run ends
        return _run(cfg, world, requested, monitor)
    except RuntimeError as exc:  # torch.distributed errors are RuntimeErrors (DistError and gloo's plain ones)
        if not peer_lost(exc):
            raise
        print(f"lost the other replicas ({str(exc).splitlines()[0][:200]}); exiting {PEER_LOST_EXIT} so the "
              f"restart policy retries this replica", file=sys.stderr, flush=True)
        return PEER_LOST_EXIT
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if monitor is not None:
            monitor.close()
        shutdown(world)


def peer_lost(exc: RuntimeError) -> bool:
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        marker in text for marker in ("Connection reset", "Connection closed", "Broken pipe", "gloo/transport"))


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on the device (copies overlap compute from pinned memory); other values as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_loader(parts: RunParts, cfg: TrainConfig, world: World, start_step: int) -> DataLoader:
    consumed = start_step * cfg.batch_size * cfg.grad_accum  # samples this rank read before start_step
    sampler = ShardSampler(parts.train_data, world.world_size, world.rank, cfg.seed, skip=consumed)
    workers = cfg.num_workers
    return DataLoader(parts.train_data, batch_size=cfg.batch_size, sampler=sampler, collate_fn=parts.collate,
                      num_workers=workers, pin_memory=world.device.type == "cuda", drop_last=True,
                      worker_init_fn=quiet_worker, persistent_workers=workers > 0,
                      prefetch_factor=PREFETCH_BATCHES if workers else None)


def _run(cfg: TrainConfig, world: World, requested: list[int], monitor: TrainingMetrics) -> int:
    out = Path(cfg.out)
    root = out / "checkpoints"
    task, model, parts = build_run(cfg, world)
    engine, optimizer, scheduler = build_optimization(model, cfg, world)
    if cfg.compile:
        model.compile()
    start, history, skipped = resume(cfg, root, engine, model, optimizer, scheduler, world)
    if isinstance(history, list):  # a checkpoint from before loss curves were kept: its evaluations only
        history = {"eval": history, "loss": [], "window": [0.0, 0]}
    monitor.resumed(start, history)
    if world.is_main:
        print(f"effective batch: {cfg.batch_size} per micro-batch x {cfg.grad_accum} accumulation x "
              f"{world.world_size} replicas = {cfg.batch_size * cfg.grad_accum * world.world_size} samples per "
              f"optimizer step ({cfg.strategy}, {cfg.precision}, {world.device.type})", file=sys.stderr, flush=True)

    curves = Curves(out, enabled=world.is_main and start < cfg.steps)
    # The loader's workers are stopped when the loop ends, not when the iterator happens to be freed: freed at
    # interpreter exit, torch's clean stop is a no-op and the workers (which ignore SIGTERM: data.quiet_worker)
    # would keep multiprocessing's exit join waiting forever.
    with loader_batches(train_loader(parts, cfg, world, start)) as loaded:
        batches = monitor.timed(loaded)
        bar = tqdm(total=cfg.steps, initial=start, file=sys.stderr, dynamic_ncols=True,
                   disable=not (world.is_main and sys.stderr.isatty()))
        began, samples = time.perf_counter(), 0
        # The loss logged every log_every steps is the mean since the last log; the partial window travels in the
        # checkpoint so that a resumed run logs the same curve as an uninterrupted one.
        window_sum, window_steps = history["window"]
        window_start, window_loss = began, torch.tensor(window_sum, device=world.device) if window_steps else None
        model.train()
        for step in range(start, cfg.steps):
            micro_batches, noises = [], []
            for micro in range(cfg.grad_accum):
                micro_batches.append(to_device(next(batches), world.device))
                generator = torch.Generator(device=world.device).manual_seed(step_seed(cfg, step, world.rank, micro))
                noises.append(model.training_noise(micro_batches[-1], generator))
            loss = train_step(engine, model, optimizer, scheduler, micro_batches, noises, cfg)
            window_loss = loss if window_loss is None else window_loss + loss
            window_steps += 1
            samples += cfg.batch_size * cfg.grad_accum * world.world_size
            done = step + 1
            bar.update(1)
            monitor.step_done(done, cfg.batch_size * cfg.grad_accum)
            if done % cfg.log_every == 0 or done == cfg.steps:  # the only per-step host sync: at logging intervals
                now = time.perf_counter()
                mean_loss = (window_loss / window_steps).item()
                rate = window_steps * cfg.batch_size * cfg.grad_accum * world.world_size / (now - window_start)
                lr = scheduler.get_last_lr()[0]
                history["loss"].append({"step": done, "loss": mean_loss})  # one loss per log interval
                curves.scalars(done, {"train/loss": mean_loss, "train/lr": lr, "train/samples_per_s": rate})
                bar.set_postfix(loss=f"{mean_loss:.3f}")
                if bar.disable:  # kubectl logs of every replica: a line, not a bar
                    who = f"[rank {world.rank}] " if world.distributed else ""
                    print(f"{who}step {done}/{cfg.steps} loss {mean_loss:.4f} lr {lr:.2e} {rate:.1f} samples/s",
                          file=sys.stderr, flush=True)
                window_start, window_loss, window_steps = now, None, 0
                monitor.logged(mean_loss, lr)

            if done % cfg.eval_every == 0 or done == cfg.steps:
                metrics = parts.evaluate(model)  # every rank scores its shard
                pictures = parts.pictures(model)  # every rank: a sharded model's forward is a collective
                if world.is_main:
                    history["eval"].append({"step": done, **metrics})
                    report(metrics)
                    monitor.evaluated(done, metrics)
                    write_metrics(out, done, metrics, history["eval"], cfg, history["loss"], skipped)
                    curves.scalars(done, {f"eval/{k}": v for k, v in metrics.items()})
                    curves.images(done, "eval/allocation", pictures)

            # Single process: the flag is local, read every step. Several: an all-reduce, every few steps.
            check = not world.distributed or done % STOP_CHECK_EVERY == 0 or done == cfg.steps
            stop = any_rank(bool(requested), world) if check else False
            if stop or done % cfg.checkpoint_every == 0 or done == cfg.steps:
                history["window"] = [window_loss.item() if window_steps else 0.0, window_steps]
                with monitor.checkpoint(done, history):
                    save_checkpoint(root, done, engine, model, optimizer, scheduler, history, cfg, world)
            if stop:
                signum = requested[0] if requested else signal.SIGTERM
                if world.is_main:
                    print(f"stopping on signal {signum} after step {done}; checkpoint saved", file=sys.stderr,
                          flush=True)
                bar.close()
                curves.close()
                return 128 + int(signum)
    bar.close()
    curves.close()
    elapsed = time.perf_counter() - began  # the loop's rate: first step to last, evaluations and checkpoints in it

    # The loop evaluated and checkpointed at the last step (or a finished run was resumed: nothing to redo).
    adapter = save_adapter(task, model, cfg, out, world, history)
    if world.is_main:
        rate = samples / elapsed if samples else 0.0
        print(f"adapter: {adapter}\nmetrics: {out / 'metrics.json'}\nthroughput: {rate:.1f} samples/s",
              file=sys.stderr, flush=True)
    if start < cfg.steps:
        parts.finish(model, out)
    barrier(world)
    return 0
