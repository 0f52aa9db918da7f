"""The training loop, top to bottom: world, model, optimizer, resume, loop, evaluation, checkpoints.

Preemption safety: SIGTERM/SIGINT only set a flag; after the current step every rank agrees to stop
(one all-reduce), rank 0 saves a checkpoint, and the process exits 128+signal so that a PyTorchJob
with restartPolicy ExitCode retries it. Every batch and every Gumbel draw is a function of
(seed, step, rank), so a resumed run continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

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
from tqdm import tqdm

from . import checkpoint
from .config import ConfigError, TrainConfig
from .data import SceneSource
from .distributed import World, any_rank, barrier, init_world, shutdown
from .evaluation import eval_source, evaluate, report, write_metrics
from .model import ArrCoc, gumbel_noise
from .vlm import ArrCocVLM, vlm_type
from .vqa import VqaSource, budget_curve, write_budget_curve

DEFAULT_DEEPSPEED_CONFIG = Path(__file__).with_name("ds_zero2.json")
# 128 + SIGHUP: this replica lost its peers (a collective broke because another replica died). It is in
# 128-255 so that restartPolicy ExitCode retries it, as it does for the replica that was killed.
PEER_LOST_EXIT = 129
# Fields that may change between an interrupted run and its resumption; anything else must match.
RUN_CONTROL = {"steps", "eval_every", "eval_size", "checkpoint_every", "keep_checkpoints", "log_every", "out", "resume",
               "budget_curve", "max_answer_tokens"}


def lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def step_seed(cfg: TrainConfig, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([cfg.seed, step, rank]).generate_state(1)[0])


def build_optimization(model: ArrCoc, cfg: TrainConfig, world: World):
    """(engine, optimizer, scheduler): engine is what the loop calls forward on."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    if cfg.strategy == "deepspeed":
        import deepspeed

        ds_config = json.loads(Path(cfg.deepspeed_config or DEFAULT_DEEPSPEED_CONFIG).read_text())
        ds_config.update(train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=1,
                         gradient_clipping=cfg.grad_clip)
        os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            dist_init_required=not world.distributed)
        return engine, optimizer, scheduler
    engine = DistributedDataParallel(model) if world.distributed else model
    return engine, optimizer, scheduler


def train_step(engine, model: ArrCoc, optimizer, scheduler, batch, noise, cfg: TrainConfig) -> float:
    out = engine(batch, noise=noise)
    if cfg.strategy == "deepspeed":
        engine.backward(out["loss"])
        engine.step()  # clips, steps the optimizer and the scheduler
    else:
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return out["loss"].item()


def save_checkpoint(root: Path, step: int, engine, model, optimizer, scheduler, history, cfg, world) -> None:
    if world.is_main:
        checkpoint.begin(root, step)
    if cfg.strategy == "deepspeed":
        barrier(world)  # every rank writes its optimizer partition into the staged folder
        engine.save_checkpoint(str(checkpoint.staging_dir(root, step)), tag="deepspeed")
        barrier(world)
    if world.is_main:
        state = {"step": step, "config": cfg.to_dict(), "history": history, "model": model.trainable_state(),
                 "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}}
        if cfg.strategy == "ddp":
            state["optimizer"], state["scheduler"] = optimizer.state_dict(), scheduler.state_dict()
        checkpoint.save_state(checkpoint.staging_dir(root, step), state)
        checkpoint.commit(root, step, cfg.keep_checkpoints)


def resume_from(cfg: TrainConfig, root: Path) -> Path | None:
    if cfg.resume == "never":
        return None
    return checkpoint.latest(root) if cfg.resume == "auto" else Path(cfg.resume)


def restore(src: Path, engine, model, optimizer, scheduler, cfg: TrainConfig) -> tuple[int, list]:
    state = checkpoint.load_state(src)
    theirs = state["config"]
    for key, value in cfg.to_dict().items():
        if key not in RUN_CONTROL and theirs.get(key) != value:
            raise ConfigError(f"resume: checkpoint {src} was made with {key}={theirs.get(key)!r}, this run has "
                              f"{key}={value!r}; use --resume never or another --out")
    model.load_trainable_state(state["model"])
    if cfg.strategy == "deepspeed":
        engine.load_checkpoint(str(src), tag="deepspeed")
    else:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    return state["step"], state["history"]


def save_adapter(model: ArrCoc, out: Path) -> Path:
    """OUT/adapter, replaced atomically: a reader sees the old adapter or the new one, never half."""
    final, tmp = out / "adapter", out / ".adapter-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_adapter(tmp)
    return checkpoint.replace_dir(tmp, final)


def run(cfg: TrainConfig) -> int:
    """Train; return the process exit code (0, or 128+signal after a checkpoint-on-signal)."""
    requested: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: requested.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    world = World()
    try:
        world = init_world()
        return _run(cfg, world, requested)
    except RuntimeError as exc:  # torch.distributed errors are RuntimeErrors (DistError and gloo's plain ones)
        if not peer_lost(exc):
            raise
        print(f"lost the other replicas ({str(exc).splitlines()[0][:200]}); exiting {PEER_LOST_EXIT} so the "
              f"restart policy retries this replica", file=sys.stderr, flush=True)
        return PEER_LOST_EXIT
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        shutdown(world)


def peer_lost(exc: RuntimeError) -> bool:
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        marker in text for marker in ("Connection reset", "Connection closed", "Broken pipe", "gloo/transport"))


def _run(cfg: TrainConfig, world: World, requested: list[int]) -> int:
    out = Path(cfg.out)
    root = out / "checkpoints"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)  # the trainable modules start identical on every rank
    vlm = vlm_type(cfg.base_model) is not None  # a Qwen-VL folder: JSONL data, VQA evaluation (trainer/vlm.py)
    model = (ArrCocVLM(cfg) if vlm else ArrCoc(cfg)).to(world.device)
    engine, optimizer, scheduler = build_optimization(model, cfg, world)
    train_data = VqaSource(cfg.train_data, model.collate, cfg.max_bad_fraction) if vlm else SceneSource(
        cfg.seed, 0, cfg.train_data)
    evals = eval_source(cfg, model)
    if vlm and world.is_main:
        for source in (train_data, evals):
            print(source.dataset.bad_summary(), file=sys.stderr, flush=True)

    start, history = 0, []
    src = resume_from(cfg, root)
    if src is not None:
        start, history = restore(src, engine, model, optimizer, scheduler, cfg)
        if world.is_main:
            print(f"resumed from {src} at step {start}", file=sys.stderr, flush=True)

    bar = tqdm(total=cfg.steps, initial=start, file=sys.stderr, dynamic_ncols=True,
               disable=not (world.is_main and sys.stderr.isatty()))
    began, samples = time.perf_counter(), 0
    model.train()
    for step in range(start, cfg.steps):
        first = (step * world.world_size + world.rank) * cfg.batch_size
        batch = train_data.batch(np.arange(first, first + cfg.batch_size))
        if not vlm:
            batch = {k: torch.from_numpy(v).to(world.device) for k, v in batch.items()}
        cells = max(batch["visual_counts"]) if vlm else cfg.grid * cfg.grid
        generator = torch.Generator().manual_seed(step_seed(cfg, step, world.rank))
        noise = gumbel_noise(torch.Size((cfg.batch_size, cells)), cfg, generator)
        loss = train_step(engine, model, optimizer, scheduler, batch,
                          noise if noise is None else noise.to(world.device), cfg)
        samples += cfg.batch_size * world.world_size
        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if bar.disable and done % cfg.log_every == 0:  # kubectl logs of every replica: a line, not a bar
            who = f"[rank {world.rank}] " if world.distributed else ""
            print(f"{who}step {done}/{cfg.steps} loss {loss:.4f} lr {scheduler.get_last_lr()[0]:.2e}",
                  file=sys.stderr, flush=True)

        if world.is_main and (done % cfg.eval_every == 0 or done == cfg.steps):
            metrics = evaluate(model, cfg, evals, world.device)
            history.append({"step": done, **metrics})
            report(metrics)
            write_metrics(out, done, metrics, history, cfg)

        stop = any_rank(bool(requested), world)
        if stop or done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(root, done, engine, model, optimizer, scheduler, history, cfg, world)
        if stop:
            signum = requested[0] if requested else signal.SIGTERM
            if world.is_main:
                print(f"stopping on signal {signum} after step {done}; checkpoint saved", file=sys.stderr, flush=True)
            bar.close()
            return 128 + int(signum)
    bar.close()

    # The loop evaluated and checkpointed at the last step (or a finished run was resumed: nothing to redo).
    if world.is_main:
        adapter = save_adapter(model, out)
        elapsed = time.perf_counter() - began
        rate = samples / elapsed if samples else 0.0
        print(f"adapter: {adapter}\nmetrics: {out / 'metrics.json'}\nthroughput: {rate:.1f} samples/s",
              file=sys.stderr, flush=True)
        if vlm and start < cfg.steps:  # accuracy vs visual-token budget, with its baselines (trainer/vqa.py)
            write_budget_curve(budget_curve(model, cfg, evals), out)
            print(f"budget curve: {out / 'budget_curve.png'}", file=sys.stderr, flush=True)
    barrier(world)
    return 0
