"""prepare-data: train and eval Dataset artifacts with texture arrays (the work is in steps/prepare_data.py)."""
from kfp import dsl
from kfp.dsl import Dataset, Output

from pipelines.kfp_pipeline.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def prepare_data(source: str, seed: int, train_size: int, eval_size: int,
                 train_data: Output[Dataset], eval_data: Output[Dataset]):
    """Synthetic scenes (or an image folder for the report), with opencv texture arrays."""
    from pipelines.kfp_pipeline.steps.prepare_data import prepare

    train_meta, eval_meta = prepare(source, seed, train_size, eval_size, train_data.path, eval_data.path)
    train_data.metadata.update(train_meta)
    eval_data.metadata.update(eval_meta)
