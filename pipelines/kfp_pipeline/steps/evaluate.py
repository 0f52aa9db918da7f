"""The evaluate step's work: the adapter's metrics on the prepared eval set, and the pictures to look at.

The gate metric it returns (relevance_score or vqa_accuracy) is what the gate compares with the threshold. The eval
set is the one prepare-data wrote (every scene counted once); a random-allocation baseline on the same scenes gives
the floor.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import UserError

MAX_FOLDER_IMAGES = 4  # each image folder picture is drawn under every colour query: 6 rows apiece


# What the gate may compare with its threshold. relevance_score needs ground-truth boxes in the eval set (synthetic,
# vqa-synthetic, GQA); VQAv2 has none, so a VQAv2 run gates on vqa_accuracy.
GATE_METRICS = ("relevance_score", "vqa_accuracy")


class GateMetricError(UserError):
    """The gate metric is not one we know, or this eval set does not produce it: one line, exit code 2."""


def check_gate_metric(gate_metric: str) -> None:
    if gate_metric not in GATE_METRICS:
        raise GateMetricError(f"gate_metric={gate_metric!r} is not one of {', '.join(GATE_METRICS)}")


def gate_value(metrics: dict[str, float], gate_metric: str) -> float:
    """The value the gate compares with the threshold; a one-line error when this eval set has no such metric."""
    check_gate_metric(gate_metric)
    value = metrics.get(gate_metric)
    if value is None or value != value:  # absent, or NaN: a VLM eval set without boxes has no relevance_score
        present = ", ".join(m for m in GATE_METRICS if metrics.get(m) is not None and metrics[m] == metrics[m])
        raise GateMetricError(f"gate_metric={gate_metric!r}: this eval set does not produce it (it has: "
                              f"{present or 'none of ' + ', '.join(GATE_METRICS)}); VQAv2 has no boxes, so gate "
                              f"it on vqa_accuracy")
    return float(value)


def _rows(model, batch: dict[str, np.ndarray], labels: list[str], with_truth: bool) -> list:
    import torch

    from pipelines.kfp_pipeline.report import Row
    from trainer.data import VOCAB
    from trainer.model import cells_selected

    cfg = model.cfg
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
    with torch.no_grad():
        out = model(tensors)
    total_tokens = cells_selected(cfg) * (1 + cfg.max_tokens_per_cell) / 2  # the allocator's fixed total
    grid = cfg.grid
    rows = []
    for i, label in enumerate(labels):
        query = batch["queries"][i]
        rows.append(Row(
            image=batch["images"][i], qtype=VOCAB[query[0]], colour=VOCAB[query[1]],
            relevance=out["relevance"][i].reshape(grid, grid).numpy(),
            tokens=(out["share"][i] * total_tokens).reshape(grid, grid).numpy(),
            truth=batch["relevance"][i] if with_truth else None,
            answer=VOCAB[int(batch["answers"][i])] if with_truth else None,
            predicted=VOCAB[int(out["prediction"][i])], label=label,
        ))
    return rows


def _folder_batch(images: np.ndarray, names: np.ndarray) -> tuple[dict[str, np.ndarray], list[str]]:
    """Every picture under every colour query (SHAPE?); no ground truth, so relevance and answers are zeros."""
    from trainer.data import COLOURS, TOKEN

    images, names = images[:MAX_FOLDER_IMAGES], names[:MAX_FOLDER_IMAGES]
    n, k = len(images), len(COLOURS)
    queries = np.array([[TOKEN["SHAPE?"], TOKEN[c]] for c in COLOURS] * n, dtype=np.int64)
    batch = {"images": np.repeat(images, k, axis=0), "queries": queries,
             "answers": np.full(n * k, TOKEN["square"], dtype=np.int64),
             "relevance": np.zeros((n * k, 8, 8), np.float32)}
    return batch, [str(name) for name in np.repeat(names, k)]


def evaluate_adapter(adapter_dir: str | Path, eval_dir: str | Path, report_samples: int,
                     threshold: float, gate_metric: str = GATE_METRICS[0]
                     ) -> tuple[dict[str, float], dict[str, float], str, str, dict[str, Any]]:
    """(metrics, random-allocation baseline, HTML page, Markdown summary, tensions). The metrics hold gate_metric
    (GateMetricError otherwise, raised before the report is drawn)."""
    import torch

    from pipelines.kfp_pipeline.report import html_report, load_curves, markdown_summary
    from trainer.evaluation import eval_source, evaluate
    from trainer.model import ArrCoc, cells_selected

    check_gate_metric(gate_metric)  # before minutes of evaluation
    eval_dir = Path(eval_dir)
    if (eval_dir / "data.jsonl").is_file():  # prepare-data's JSONL for a Qwen-VL base
        return _evaluate_vlm_adapter(adapter_dir, eval_dir, threshold, gate_metric)
    with np.load(eval_dir / "scenes.npz") as data:
        arrays = {key: data[key] for key in data.files}
    count = len(arrays["images"])
    meta = json.loads((eval_dir / "metadata.json").read_text())
    # The adapter's config names the paths the replicas read; here the eval set is this step's input.
    model = ArrCoc.from_adapter(Path(adapter_dir), eval_data=str(eval_dir), eval_size=count)
    cfg = model.cfg.validate()
    cpu = torch.device("cpu")
    metrics = evaluate(model, cfg, eval_source(cfg), cpu)
    gate_value(metrics, gate_metric)
    baseline = evaluate(model, cfg, eval_source(cfg), cpu, random_allocation=True)
    model.eval()

    n = min(int(report_samples), count)
    scene_batch = {k: arrays[k][:n] for k in ("images", "queries", "answers", "relevance")}
    scene_rows = _rows(model, scene_batch, [f"eval scene {i}" for i in range(n)], with_truth=True)
    folder_rows = []
    if "folder_images" in arrays and len(arrays["folder_images"]):
        batch, labels = _folder_batch(arrays["folder_images"], arrays["folder_names"])
        folder_rows = _rows(model, batch, labels, with_truth=False)
    tensions = cfg.tensions()
    facts = {"eval scenes": count, "data source": meta.get("source", "?"), "seed": cfg.seed,
             "base model": cfg.base_model, "cells selected (K)": cells_selected(cfg)}
    page = html_report(metrics, baseline, tensions, facts, scene_rows, folder_rows, curves=load_curves(adapter_dir))
    summary = markdown_summary(metrics, baseline, tensions, threshold, gate_metric=gate_metric)
    return metrics, baseline, page, summary, tensions


def _evaluate_vlm_adapter(adapter_dir: Path | str, eval_dir: Path, threshold: float, gate_metric: str):
    """A Qwen-VL adapter: VQA metrics, the random-selection baseline, and the accuracy vs budget curve."""
    from pipelines.kfp_pipeline.report import html_report, markdown_summary
    from trainer.evaluation import eval_source, evaluate
    from trainer.model import ArrCoc
    from trainer.vqa import budget_curve

    # The adapter's config names the paths the replicas read; here the eval set is this step's input.
    model = ArrCoc.from_adapter(Path(adapter_dir), eval_data=str(eval_dir))
    source = eval_source(model.cfg, model)
    cfg = model.cfg = dataclasses.replace(model.cfg, eval_size=len(source)).validate()  # every question once
    metrics = evaluate(model, cfg, source, None)
    gate_value(metrics, gate_metric)
    baseline = evaluate(model, cfg, source, None, random_allocation=True)
    curve = budget_curve(model, cfg, source)
    tensions = cfg.tensions()
    facts = {"eval questions": len(source), "base model": cfg.base_model, "seed": cfg.seed,
             "visual tokens read (mean)": metrics["visual_tokens"]}
    page = html_report(metrics, baseline, tensions, facts, [], [], budget_curve=curve)
    summary = markdown_summary(metrics, baseline, tensions, threshold, budget_curve=curve, gate_metric=gate_metric)
    # the curve's points also go to KFP Metrics (the evaluate step logs every value): comparable across runs
    for row in curve["rows"]:
        for key, name in (("relevance", "arrcoc"), ("random", "random"), ("uniform", "uniform")):
            metrics[f"vqa_accuracy_budget_{row['fraction']:g}_{name}"] = row[key]
    metrics["vqa_accuracy_all_tokens"] = curve["all_tokens"]
    return metrics, baseline, page, summary, tensions
