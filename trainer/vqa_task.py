"""The VQA task: ArrCocVLM in front of a Qwen-VL checkpoint, JSONL image-question-answer data (trainer/vqa.py),
scored as vqa_accuracy, relevance_score, visual_tokens, lod_full, lod_coarse and eval_loss, with the accuracy vs
visual-token budget curve at the end of a run."""
from __future__ import annotations

import sys
from pathlib import Path

from .config import TrainConfig
from .distributed import World
from .task import Review, RunParts, Task
from .vlm import ArrCocVLM
from .vqa import VqaDataset, VqaSource, budget_curve, evaluate_vqa, write_budget_curve


class VqaTask(Task):
    name = "vqa"

    def build_model(self, cfg: TrainConfig, adapter_dir: Path | None = None) -> ArrCocVLM:
        return ArrCocVLM(cfg, adapter_dir)

    def run_parts(self, cfg: TrainConfig, world: World, model: ArrCocVLM) -> RunParts:
        train_data = VqaDataset(cfg.train_data, cfg.max_bad_fraction)
        evals = VqaSource(cfg.eval_data, model.collate, cfg.max_bad_fraction)
        if world.is_main:
            for dataset in (train_data, evals.dataset):
                print(dataset.bad_summary(), file=sys.stderr, flush=True)

        def finish(m: ArrCocVLM, out: Path) -> None:
            curve = budget_curve(m, cfg, evals, world)  # every rank scores its shard
            if world.is_main:
                write_budget_curve(curve, out)
                print(f"budget curve: {out / 'budget_curve.png'}", file=sys.stderr, flush=True)

        return RunParts(train_data, model.collate, evaluate=lambda m: evaluate_vqa(m, cfg, evals, world=world),
                        pictures=lambda m: None, finish=finish)

    def evaluate(self, model: ArrCocVLM, cfg: TrainConfig, random_allocation: bool = False) -> dict[str, float]:
        source = VqaSource(cfg.eval_data, model.collate, cfg.max_bad_fraction)
        return evaluate_vqa(model, cfg, source, "random" if random_allocation else "relevance")

    def eval_set_size(self, cfg: TrainConfig) -> int:
        return len(VqaDataset(cfg.eval_data, cfg.max_bad_fraction))

    def review(self, model: ArrCocVLM, cfg: TrainConfig, metrics: dict[str, float], samples: int) -> Review:
        baseline = self.evaluate(model, cfg, random_allocation=True)
        curve = budget_curve(model, cfg, VqaSource(cfg.eval_data, model.collate, cfg.max_bad_fraction))
        facts = {"eval questions": cfg.eval_size, "base model": cfg.base_model, "seed": cfg.seed,
                 "visual tokens read (mean)": metrics["visual_tokens"]}
        # the curve's points as metrics too: comparable across runs in the KFP UI
        extra = {f"vqa_accuracy_budget_{row['fraction']:g}_{name}": row[key] for row in curve["rows"]
                 for key, name in (("relevance", "arrcoc"), ("random", "random"), ("uniform", "uniform"))}
        extra["vqa_accuracy_all_tokens"] = curve["all_tokens"]
        return Review(baseline, facts, budget_curve=curve, extra_metrics=extra)
