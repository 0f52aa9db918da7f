"""register: copy the gated adapter and its model card into the model store; not-registered: the card's place
when the gate is closed (work: steps/register.py)."""
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model

from pipelines.kfp_pipeline.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def register(adapter: Input[Model], metrics: Input[Metrics], train_data: Input[Dataset], eval_data: Input[Dataset],
             model_store: str, run_id: str, threshold: float, gate_metric: str) -> NamedTuple("Outputs", path=str,
                                                                                               card=str):
    """Copy the adapter and its model card to <model_store>/<run_id>; returns that path and the card (Markdown)."""
    from collections import namedtuple

    from pipelines.kfp_pipeline.steps.register import register_model

    # Artifact metadata numbers come back as floats (protobuf Values): the seed is an int again here.
    lineage = {"adapter_artifact": adapter.uri, "train_data_artifact": train_data.uri,
               "eval_data_artifact": eval_data.uri, "data_source": train_data.metadata.get("source", ""),
               "data_seed": int(train_data.metadata.get("seed", -1)),
               "pytorchjob": adapter.metadata.get("pytorchjob", "")}
    values = {k: float(v) for k, v in metrics.metadata.items() if isinstance(v, (int, float))}
    path, card = register_model(adapter.path, model_store, run_id, values, threshold, lineage, gate_metric=gate_metric)
    print(f"registered: {path}")
    return namedtuple("Outputs", ["path", "card"])(str(path), card)


@dsl.component(**COMPONENT_OPTIONS)
def not_registered(value: float, threshold: float, gate_metric: str) -> str:
    """The run's model card when the gate is closed: one line saying why nothing was registered."""
    from pipelines.kfp_pipeline.steps.register import below_threshold

    return below_threshold(value, threshold, gate_metric)
