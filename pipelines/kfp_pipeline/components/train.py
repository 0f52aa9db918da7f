"""train: one PyTorchJob, on the cluster or rehearsed locally; the adapter is the output Model (work: training.py)."""
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from pipelines.kfp_pipeline.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def train(train_data: Input[Dataset], eval_data: Input[Dataset], adapter: Output[Model], job: Output[Artifact],
          backend: str, run_id: str, image: str, workers: int, nproc_per_node: str, checkpoint_pvc: str,
          timeout_minutes: int, delete_policy: str, steps: int, batch_size: int, lr: float, eval_size: int,
          seed: int, compress_vs_particularize: float, exploit_vs_explore: float, focus_vs_diversify: float,
          base_model: str, strategy: str, precision: str, grad_accum: int, activation_checkpointing: bool,
          token_fraction: float, token_budget: int, max_bad_fraction: float):
    """Train the adapter as one PyTorchJob (Master + `workers` Workers); the adapter is the output Model.
    strategy and precision "" take the team-config's choice for its GPU type (TeamConfig.trainer_*); base_model ""
    the team-config's baseModel (in run_training)."""
    from pipelines.kfp_pipeline.steps.train import job_name_for, run_training, team_config

    team = team_config(backend)

    # eval_every = steps: the trainer evaluates once, at the end; the evaluate step does the rest.
    params = {"steps": steps, "batch_size": batch_size, "lr": lr, "eval_size": eval_size,
              "eval_every": steps, "seed": seed, "compress_vs_particularize": compress_vs_particularize,
              "exploit_vs_explore": exploit_vs_explore, "focus_vs_diversify": focus_vs_diversify,
              "base_model": base_model, "strategy": strategy or team.trainer_strategy(),
              "precision": precision or team.trainer_precision(), "grad_accum": grad_accum,
              "activation_checkpointing": activation_checkpointing, "token_fraction": token_fraction,
              "token_budget": token_budget, "max_bad_fraction": max_bad_fraction}
    metrics = run_training(backend=backend, run_id=run_id, train_dir=train_data.path, eval_dir=eval_data.path,
                           adapter_dir=adapter.path, job_dir=job.path, params=params, image=image,
                           workers=workers, nproc_per_node=nproc_per_node, checkpoint_pvc=checkpoint_pvc,
                           timeout_minutes=timeout_minutes, delete_policy=delete_policy)
    adapter.metadata.update({
        "framework": "arrcoc (peft LoRA + ARR-COC modules)", "pytorchjob": job_name_for(run_id), "run_id": run_id,
        "step": metrics["step"], "train_relevance_score": metrics["relevance_score"],
        "tensions": metrics["tensions"], "train_data": train_data.uri,
    })
    job.metadata.update({"pytorchjob": job_name_for(run_id), "backend": backend, "workers": workers})
