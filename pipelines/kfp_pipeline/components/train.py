"""train: one PyTorchJob, on the cluster or rehearsed locally; the adapter is the output Model (steps/train.py)."""
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from pipelines.kfp_pipeline.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def train(train_data: Input[Dataset], eval_data: Input[Dataset], adapter: Output[Model], job: Output[Artifact],
          backend: str, run_id: str, image: str, workers: int, nproc_per_node: str, checkpoint_pvc: str,
          timeout_minutes: int, delete_policy: str, data_bucket: bool,
          # the trainer knobs a run sets: trainer/knobs.py PIPELINE_KNOBS (tests/test_knobs.py checks the list)
          steps: int, batch_size: int, lr: float, eval_every: int, eval_size: int, seed: int, strategy: str,
          precision: str, base_model: str, token_fraction: float, token_budget: int, max_bad_fraction: float,
          grad_accum: int, activation_checkpointing: bool, compress_vs_particularize: float,
          exploit_vs_explore: float, focus_vs_diversify: float):
    """Train the adapter as one PyTorchJob (Master + `workers` Workers); the adapter is the output Model.
    data_bucket: the pipeline variant's (compile-time) answer to whether the team has a data bucket."""
    from pipelines.kfp_pipeline.steps.train import train_step
    from trainer.config import TrainConfig

    knobs = TrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every, eval_size=eval_size, seed=seed,
        strategy=strategy, precision=precision, base_model=base_model, token_fraction=token_fraction,
        token_budget=token_budget, max_bad_fraction=max_bad_fraction, grad_accum=grad_accum,
        activation_checkpointing=activation_checkpointing, compress_vs_particularize=compress_vs_particularize,
        exploit_vs_explore=exploit_vs_explore, focus_vs_diversify=focus_vs_diversify)
    train_step(train_data, eval_data, adapter, job, knobs, backend=backend, run_id=run_id, image=image,
               workers=workers, nproc_per_node=nproc_per_node, checkpoint_pvc=checkpoint_pvc,
               timeout_minutes=timeout_minutes, delete_policy=delete_policy, data_bucket=data_bucket)
