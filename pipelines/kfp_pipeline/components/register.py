"""register: copy the gated adapter and its model card into the model store (work: steps/register.py)."""
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model

from pipelines.kfp_pipeline.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def register(adapter: Input[Model], metrics: Input[Metrics], train_data: Input[Dataset], eval_data: Input[Dataset],
             model_store: str, run_id: str, threshold: float, gate_metric: str) -> str:
    """Copy the adapter and its model card to <model_store>/<run_id>; returns that path."""
    from pipelines.kfp_pipeline.steps.register import register_model

    # Artifact metadata numbers come back as floats (protobuf Values): the seed is an int again here.
    lineage = {"adapter_artifact": adapter.uri, "train_data_artifact": train_data.uri,
               "eval_data_artifact": eval_data.uri, "data_source": train_data.metadata.get("source", ""),
               "data_seed": int(train_data.metadata.get("seed", -1)),
               "pytorchjob": adapter.metadata.get("pytorchjob", "")}
    values = {k: float(v) for k, v in metrics.metadata.items() if isinstance(v, (int, float))}
    path = register_model(adapter.path, model_store, run_id, values, threshold, lineage, gate_metric=gate_metric)
    print(f"registered: {path}")
    return str(path)
