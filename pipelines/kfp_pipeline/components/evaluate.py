"""evaluate: dsl.Metrics, the HTML report and the Markdown summary; returns relevance_score for the gate
(work: steps/evaluate.py, pictures: pipelines/kfp_pipeline/report.py)."""
from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from pipelines.kfp_pipeline.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def evaluate(adapter: Input[Model], eval_data: Input[Dataset], metrics: Output[Metrics], report: Output[HTML],
             summary: Output[Markdown], report_samples: int, threshold: float) -> float:
    """Log the metrics, draw the report; return relevance_score for the gate."""
    import json

    from pipelines.kfp_pipeline.steps.evaluate import evaluate_adapter

    values, baseline, page, markdown, _ = evaluate_adapter(adapter.path, eval_data.path, report_samples, threshold)
    for name, value in values.items():
        metrics.log_metric(name, float(value))
    metrics.log_metric("random_allocation_relevance_score", float(baseline["relevance_score"]))
    # The UI reads the metadata; the file is for people and scripts that fetch the artifact itself.
    with open(metrics.path, "w", encoding="utf-8") as fh:
        json.dump(dict(metrics.metadata), fh, indent=2, sort_keys=True)
    with open(report.path, "w", encoding="utf-8") as fh:
        fh.write(page)
    with open(summary.path, "w", encoding="utf-8") as fh:
        fh.write(markdown)
    return float(values["relevance_score"])
