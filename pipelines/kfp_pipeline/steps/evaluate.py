"""The evaluate step's work: the adapter's metrics on the prepared eval set (every example once), the
random-allocation floor on the same set, the report and the value the gate compares with its threshold.
What to draw is the adapter's task's business (trainer/task.py Task.review)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from trainer.errors import UserError

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


def evaluate_adapter(adapter_dir: str | Path, eval_dir: str | Path, report_samples: int,
                     threshold: float, gate_metric: str = GATE_METRICS[0]
                     ) -> tuple[dict[str, float], dict[str, float], str, str, dict[str, Any]]:
    """(metrics, random-allocation baseline, HTML page, Markdown summary, tensions) of the adapter on every example
    of the eval set once. The metrics hold gate_metric (GateMetricError otherwise, raised before the baseline and
    the pictures)."""
    from pipelines.kfp_pipeline.report import html_report, load_curves, markdown_summary
    from trainer.tasks import load_adapter

    check_gate_metric(gate_metric)  # before minutes of evaluation
    # The adapter's config names the paths the replicas read; here the eval set is this step's input.
    model, task = load_adapter(adapter_dir, eval_data=str(eval_dir))
    cfg = model.cfg = dataclasses.replace(model.cfg, eval_size=task.eval_set_size(model.cfg)).validate()
    metrics = task.evaluate(model, cfg)
    gate_value(metrics, gate_metric)
    review = task.review(model, cfg, metrics, report_samples)
    tensions = cfg.tensions()
    page = html_report(metrics, review.baseline, tensions, review.facts, review.examples, review.unlabeled,
                       curves=load_curves(adapter_dir), budget_curve=review.budget_curve)
    summary = markdown_summary(metrics, review.baseline, tensions, threshold, budget_curve=review.budget_curve,
                               gate_metric=gate_metric)
    return {**metrics, **review.extra_metrics}, review.baseline, page, summary, tensions
