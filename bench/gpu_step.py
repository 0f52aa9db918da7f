"""The trainer's step on a GPU: samples/s, tokens/s, model FLOPs utilization, peak memory, and scaling.

It times the trainer's own code (build_run, build_optimization, the DataLoader, train_step), not a copy.

    make bench-gpu                                  # every GPU of the node (torchrun), or the CPU path
    .venv/bin/python bench/gpu_step.py --precision bf16 --batch-size 32 --base-model Qwen/Qwen2.5-0.5B
    torchrun --nproc-per-node 8 bench/gpu_step.py --strategy fsdp

MFU. Model FLOPs per optimizer step = tokens x (4 x N_frozen + 6 x N_trainable): a matmul weight costs 2 FLOPs
per token forward and 2 for the input gradient backward; only trainable weights add the 2 of the weight
gradient. N counts the LM's weights (frozen base and LoRA); attention's sequence-squared term, the scorers and
the projector are left out (small next to the LM at these sequence lengths), so MFU is slightly understated.
tokens = samples x sequence length (BOS + selected cells + 2 query words + SEP + ANSWER). The peak is the
dense (no sparsity) tensor-core figure of the GPU's datasheet for the precision run: PEAK_TFLOPS below.

Scaling (several GPUs): rank 0 first times the same step alone, without DDP/FSDP, while the others wait;
efficiency = (samples/s of the job / GPUs) / samples/s of one GPU alone, both measured in this run.

On a machine without a GPU it runs the same code for a few steps at the tiny size on the CPU and says so:
those figures are not GPU figures.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import PRECISIONS, STRATEGIES, TrainConfig  # noqa: E402
from trainer.distributed import World, barrier, init_world, shutdown  # noqa: E402
from trainer.files import write_json_atomic  # noqa: E402
from trainer.model import cells_selected  # noqa: E402
from trainer.train import build_optimization, build_run, train_loader, train_step  # noqa: E402

# Dense TFLOPS per GPU from the vendors' datasheets (bf16 tensor core; fp32 without TF32), by name substring.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},  # SXM; the PCIe card is 756 / 51
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L4": {"bf16": 121.0, "fp32": 30.3},
}
QUERY_WORDS = 2  # a query is (QTYPE, COLOUR)


def peak_tflops(device: torch.device, precision: str) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return name, peaks[precision]
    return name, None


def lm_weights(model) -> tuple[int, int]:
    """(frozen, trainable) weights of the LM (base + LoRA): what the FLOP formula counts."""
    frozen = sum(p.numel() for p in model.lm.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.lm.parameters() if p.requires_grad)
    return frozen, trainable


def time_steps(cfg: TrainConfig, world: World, warmup: int, steps: int) -> dict:
    _, model, parts = build_run(cfg, world)
    frozen, trainable = lm_weights(model)
    engine, optimizer, scheduler = build_optimization(model, cfg, world)
    if cfg.compile:
        model.compile()
    batches = iter(train_loader(parts, cfg, world, 0))
    sync = torch.cuda.synchronize if world.device.type == "cuda" else (lambda: None)
    if world.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(world.device)
    began = None
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            barrier(world)
            began = time.perf_counter()
        micro = [{k: v.to(world.device, non_blocking=True) for k, v in next(batches).items()}
                 for _ in range(cfg.grad_accum)]
        generator = torch.Generator(device=world.device).manual_seed(step)
        noises = [model.training_noise(b, generator) for b in micro]
        train_step(engine, model, optimizer, scheduler, micro, noises, cfg)
    sync()
    barrier(world)
    elapsed = time.perf_counter() - began
    samples = steps * cfg.batch_size * cfg.grad_accum * world.world_size
    tokens_per_sample = 1 + cells_selected(cfg) + QUERY_WORDS + 2
    peak_mem = torch.cuda.max_memory_allocated(world.device) / 2 ** 30 if world.device.type == "cuda" else None
    return {"samples_per_s": samples / elapsed, "tokens_per_s": samples * tokens_per_sample / elapsed,
            "flops_per_token": 4 * frozen + 6 * trainable, "peak_memory_gib": peak_mem,
            "lm_weights": {"frozen": frozen, "trainable": trainable}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--strategy", choices=STRATEGIES, default="ddp")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--base-model", default="tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args(argv)
    world = init_world()
    gpu = world.device.type == "cuda"
    steps, warmup, batch = (args.steps, args.warmup, args.batch_size) if gpu else (3, 1, 4)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(precision=args.precision, strategy=args.strategy, batch_size=batch,
                          grad_accum=args.grad_accum, base_model=args.base_model, image_size=args.image_size,
                          activation_checkpointing=args.activation_checkpointing, compile=args.compile,
                          num_workers=4 if gpu else 0, eval_size=max(batch, world.world_size), out=tmp).validate()
        alone = None
        if world.distributed:  # one GPU alone first, in this same run: the baseline of the scaling efficiency
            if world.is_main:
                single = World(device=world.device)
                alone = time_steps(TrainConfig(**{**cfg.to_dict(), "strategy": "ddp"}), single, warmup, steps)
            barrier(world)
        figures = time_steps(cfg, world, warmup, steps)
    if world.is_main:
        name, peak = peak_tflops(world.device, args.precision)
        achieved = figures["tokens_per_s"] * figures["flops_per_token"]
        report = {"device": name, "gpus": world.world_size, "strategy": args.strategy, "precision": args.precision,
                  "batch_per_gpu": batch, "grad_accum": args.grad_accum, "base_model": args.base_model, **figures,
                  "model_tflops": achieved / 1e12, "peak_tflops": peak,
                  "mfu": achieved / (peak * 1e12 * world.world_size) if peak else None,
                  "scaling_efficiency": (figures["samples_per_s"] / world.world_size / alone["samples_per_s"])
                  if alone else None}
        if not gpu:
            print("CPU ONLY: no GPU on this machine; these figures come from a few tiny steps on the CPU and are "
                  "not GPU figures (they only show that the benchmark runs).")
        for key, value in report.items():
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
        if args.json:
            write_json_atomic(args.json, {**report, "gpu": gpu})
    shutdown(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
