"""evaluate: dsl.Metrics, the HTML report and the Markdown summary; returns the gate metric's value
(work: scoring.py, pictures: pipelines/report.py)."""
from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from pipelines.kfp_pipeline.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def evaluate(adapter: Input[Model], eval_data: Input[Dataset], metrics: Output[Metrics], report: Output[HTML],
             summary: Output[Markdown], report_samples: int, threshold: float, gate_metric: str) -> float:
    """Log the metrics, draw the report; return gate_metric (relevance_score | vqa_accuracy) for the gate."""
    import json

    from pipelines.kfp_pipeline.steps.evaluate import evaluate_adapter, gate_value

    values, baseline, page, markdown, _ = evaluate_adapter(adapter.path, eval_data.path, report_samples, threshold,
                                                           gate_metric)
    for name, value in values.items():
        metrics.log_metric(name, float(value))
    # the floor for the gated metric, on the same eval set (evaluate_adapter has checked that it has that metric)
    metrics.log_metric(f"random_allocation_{gate_metric}", float(baseline[gate_metric]))
    # The UI reads the metadata; the file is for people and scripts that fetch the artifact itself.
    with open(metrics.path, "w", encoding="utf-8") as fh:
        json.dump(dict(metrics.metadata), fh, indent=2, sort_keys=True)
    with open(report.path, "w", encoding="utf-8") as fh:
        fh.write(page)
    with open(summary.path, "w", encoding="utf-8") as fh:
        fh.write(markdown)
    return gate_value(values, gate_metric)
