"""The Qwen-VL path on the CPU: `arrcoc train` samples/s against a bare Hugging Face loop, and the visual-token
reduction at the default budget.

Both sides train the same tiny random Qwen2-VL (trainer/tiny_vlm.py) with the same LoRA on its language model,
on the same PNG + JSONL scenes and batches (VlmCollator), in this process, one after the other. The bare loop is
the plain Hugging Face recipe: the model's own forward over input_ids + pixel_values with labels, so its LM
reads every visual token; the trainer adds the adapter (texture, scorers, allocator), reads only the tokens its
level-of-detail allocation buys (full and coarse regions), and does what a real run needs (evaluation with
generation, checkpoints, metric lines).

    .venv/bin/python bench/vlm_throughput.py [--steps 40] [--batch-size 8] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import markdown_table

from trainer.config import TrainConfig
from trainer.tiny_vlm import build_tiny_vlm
from trainer.train import lr_lambda
from trainer.vlm import LM_LINEAR, kept_count, load_processors, lod_count
from trainer.vqa import VqaSource, write_scene_jsonl


def bare_loop(cfg: TrainConfig) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from trainer.vlm import VlmCollator

    torch.manual_seed(cfg.seed)
    base = AutoModelForImageTextToText.from_pretrained(cfg.base_model, dtype=torch.float32, local_files_only=True)
    for p in base.parameters():
        p.requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                            target_modules=LM_LINEAR))
    tokenizer, image_processor = load_processors(cfg.base_model)
    collate = VlmCollator(tokenizer, image_processor, base.config, base.model.get_rope_index)
    source = VqaSource(cfg.train_data, collate, cfg.max_bad_fraction)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    began = time.perf_counter()
    for step in range(cfg.steps):
        batch = source.batch(range(step * cfg.batch_size, (step + 1) * cfg.batch_size))
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for i, start in enumerate(batch["prompt_lengths"]):
            labels[i, :start] = -100  # loss on the answer only, as the trainer's
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                     mm_token_type_ids=(batch["input_ids"] == base.config.image_token_id).int(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return cfg.steps * cfg.batch_size / (time.perf_counter() - began)


def trainer_rate(cfg: TrainConfig) -> float:
    """The samples/s the trainer reports: from its first step to its last, evaluation (with generation) and
    checkpoints included; model and data loading excluded, as in the bare loop."""
    import contextlib
    import io

    from trainer.train import run

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(**{**cfg.to_dict(), "out": tmp, "resume": "never"})
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = run(cfg)
        if code != 0:
            raise RuntimeError(f"training exited {code}: {err.getvalue()[-2000:]}")
        return float(err.getvalue().split("throughput: ")[1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # both sides on one core, so other load on the machine matters less
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_vlm(Path(tmp) / "qwen2_vl", "qwen2_vl")
        train = write_scene_jsonl(Path(tmp) / "train", 256, seed=0)
        evals = write_scene_jsonl(Path(tmp) / "eval", 32, seed=0, offset=1_000_000_000)
        # The trainer's defaults except one evaluation (of 16 questions) at the end and a one-point curve
        # (written after the throughput is measured, so not in it).
        cfg = TrainConfig(base_model=str(base), train_data=str(train), eval_data=str(evals), steps=args.steps,
                          batch_size=args.batch_size, eval_every=args.steps, eval_size=16, budget_curve="0.25")
        bare, trainer = [], []
        for _ in range(args.repeats):  # interleaved pairs: shared CPUs drift between runs
            bare.append(bare_loop(cfg))
            trainer.append(trainer_rate(cfg))
        ratios = sorted(t / b for t, b in zip(trainer, bare))
        grid = (8, 8)  # a 64x64 scene: 16x16 patches of 4 pixels, merged 2x2
        tokens, kept = grid[0] * grid[1], lod_count(grid, kept_count(cfg, grid[0] * grid[1]))
    print(markdown_table(["loop", "samples/s (median)", "vs bare loop (median of pairs)", "visual tokens read"], [
        ["bare Hugging Face loop (all visual tokens)", statistics.median(bare), 1.0, tokens],
        ["arrcoc train (adapter, eval, checkpoints)", statistics.median(trainer), statistics.median(ratios), kept],
    ]))
    print(f"visual-token reduction at the default budget (token_fraction={cfg.token_fraction}): "
          f"{tokens / kept:.1f}x; trainer/bare ratio {statistics.median(ratios):.3f} (pairs {ratios[0]:.3f}-"
          f"{ratios[-1]:.3f}; {args.steps} steps, batch {args.batch_size}, 1 thread, {args.repeats} pairs)")


if __name__ == "__main__":
    main()
