"""The ARR-COC training pipeline: prepare-data -> train (one PyTorchJob) -> evaluate -> gate -> register.

`_chain` writes the steps once; `build_pipeline(data_bucket)` makes the variant for teams with or without a data
bucket (pipelines/kfp_pipeline/variants.py), which `arrcoc compile` compiles and kfp.local runs. Its parameters
are the fields of RunParameters. Why each task-level Kubernetes setting is there: docs/pipeline.md.
"""
# No `from __future__ import annotations`: KFP reads the parameters' types from RunParameters' annotations.
import inspect
from dataclasses import dataclass
from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import HTML, Metrics, Model

from pipelines.jobs.pytorchjob import CHECKPOINT_MOUNT, GCSFUSE_POD_ANNOTATIONS, RUN_AS_USER
from pipelines.jobs.team_config import CONFIGMAP_NAME, DATA_CLAIM, DATA_MOUNT, ENV_NAMES, OPTIONAL_KEYS, SPOT_LABEL
from pipelines.kfp_pipeline.components import BASE_IMAGE
from pipelines.kfp_pipeline.components.evaluate import evaluate
from pipelines.kfp_pipeline.components.prepare_data import prepare_data
from pipelines.kfp_pipeline.components.register import not_registered, register
from pipelines.kfp_pipeline.components.train import train
from pipelines.kfp_pipeline.steps.train import MAX_TIMEOUT_MINUTES
from pipelines.kfp_pipeline.variants import BASE_NAME, pipeline_name
from trainer.config import TrainConfig
from trainer.knobs import PIPELINE_KNOBS

DEFAULTS = TrainConfig()  # one place defines a training default
DEFAULT_THRESHOLD = 0.4  # an untrained adapter scores ~0.11 and random allocation ~0.08 (docs/pipeline.md)
STEP_LABEL = "arrcoc.dev/step"
PIPELINE_LABEL = "arrcoc.dev/pipeline"
HF_SECRET = "hf-token"


@dataclass(frozen=True)
class RunParameters:
    """A run's parameters, as the KFP UI shows them: the pipeline's signature is made from this class. The
    trainer knobs among them are trainer/knobs.py's PIPELINE_KNOBS, with TrainConfig's defaults ("" where the
    team-config decides)."""

    source: str = "synthetic"
    seed: int = DEFAULTS.seed
    train_size: int = 2048
    eval_size: int = DEFAULTS.eval_size
    steps: int = DEFAULTS.steps
    batch_size: int = DEFAULTS.batch_size
    lr: float = DEFAULTS.lr
    eval_every: int = DEFAULTS.eval_every
    compress_vs_particularize: float = DEFAULTS.compress_vs_particularize
    exploit_vs_explore: float = DEFAULTS.exploit_vs_explore
    focus_vs_diversify: float = DEFAULTS.focus_vs_diversify
    base_model: str = ""  # "": the team-config's baseModel (tiny unless set)
    strategy: str = ""  # "": the team-config's trainStrategy (ddp unless set)
    precision: str = ""  # "": the team-config's trainPrecision (bf16 on GPUs that have it, else fp32)
    grad_accum: int = DEFAULTS.grad_accum
    activation_checkpointing: bool = DEFAULTS.activation_checkpointing
    token_fraction: float = DEFAULTS.token_fraction
    token_budget: int = DEFAULTS.token_budget
    max_bad_fraction: float = DEFAULTS.max_bad_fraction
    workers: int = 1
    nproc_per_node: str = ""
    image: str = BASE_IMAGE
    backend: str = "cluster"
    checkpoint_pvc: str = "checkpoints"
    train_timeout_minutes: int = 720
    delete_job: str = "on-success"
    threshold: float = DEFAULT_THRESHOLD
    gate_metric: str = "relevance_score"
    model_store: str = CHECKPOINT_MOUNT + "/models"
    report_samples: int = 8


# What a run shows as its own outputs: the evaluate step's metrics and report, the trained adapter, and the
# registered model's card (Markdown; below the threshold, the line saying why nothing was registered).
class Outputs(NamedTuple):
    metrics: Metrics
    report: HTML
    adapter: Model
    model_card: str


def _common(task: dsl.PipelineTask, step: str, cpu: str, memory: str, timeout_s: int) -> dsl.PipelineTask:
    task.set_display_name(step)
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    kubernetes.add_pod_label(task, PIPELINE_LABEL, BASE_NAME)
    kubernetes.add_pod_label(task, STEP_LABEL, step)
    kubernetes.add_node_selector(task, "kubernetes.io/arch", "amd64")
    kubernetes.set_timeout(task, timeout_s)
    kubernetes.set_security_context(task, run_as_user=RUN_AS_USER, run_as_group=RUN_AS_USER, run_as_non_root=True)
    return task


def _spot_tolerant(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.add_toleration(task, key=SPOT_LABEL, operator="Equal", value="true", effect="NoSchedule")
    task.set_retry(num_retries=2)
    return task


def _team_config_env(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.use_config_map_as_env(task, config_map_name=CONFIGMAP_NAME, config_map_key_to_env={
        key: env for key, env in ENV_NAMES.items() if key not in OPTIONAL_KEYS})
    kubernetes.use_config_map_as_env(task, config_map_name=CONFIGMAP_NAME, optional=True,
                                     config_map_key_to_env={key: ENV_NAMES[key] for key in OPTIONAL_KEYS})
    return task


def _mount_data_bucket(task: dsl.PipelineTask) -> dsl.PipelineTask:
    kubernetes.mount_pvc(task, pvc_name=DATA_CLAIM, mount_path=DATA_MOUNT)
    for key, value in GCSFUSE_POD_ANNOTATIONS.items():
        kubernetes.add_pod_annotation(task, key, value)
    return task


def _chain(p: RunParameters, data_bucket: bool) -> Outputs:
    """prepare-data -> train -> evaluate -> gate -> register, with the team's data bucket at /data on prepare-data
    and evaluate when data_bucket (train's replicas mount it themselves)."""
    prep = prepare_data(source=p.source, seed=p.seed, train_size=p.train_size, eval_size=p.eval_size)
    _spot_tolerant(_common(prep, "prepare-data", "1", "2Gi", 3600))
    kubernetes.mount_pvc(prep, pvc_name=p.checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
    # KFP's cache key is the step's inputs, and a source that names a folder (on the bucket or the team volume)
    # stays the same string when its files change: a cached prepare-data would train on the old data.
    prep.set_caching_options(False)

    trained = train(
        train_data=prep.outputs["train_data"], eval_data=prep.outputs["eval_data"], backend=p.backend,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, image=p.image, workers=p.workers, nproc_per_node=p.nproc_per_node,
        checkpoint_pvc=p.checkpoint_pvc, timeout_minutes=p.train_timeout_minutes, delete_policy=p.delete_job,
        data_bucket=data_bucket, **{knob.name: getattr(p, knob.name) for knob in PIPELINE_KNOBS})
    # The launcher only waits; its own timeout outlives the job's longest allowed deadline.
    _team_config_env(_common(trained, "train", "500m", "1Gi", (MAX_TIMEOUT_MINUTES + 30) * 60))
    kubernetes.mount_pvc(trained, pvc_name=p.checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
    kubernetes.add_node_affinity(trained, match_expressions=[{"key": SPOT_LABEL, "operator": "DoesNotExist"}])
    # A cached train step would skip the PyTorchJob; the run id input already differs per run, this says so.
    trained.set_caching_options(False)

    scored = evaluate(adapter=trained.outputs["adapter"], eval_data=prep.outputs["eval_data"],
                      report_samples=p.report_samples, threshold=p.threshold, gate_metric=p.gate_metric)
    _spot_tolerant(_common(scored, "evaluate", "2", "4Gi", 3600))
    kubernetes.use_secret_as_env(scored, secret_name=HF_SECRET, secret_key_to_env={"token": "HF_TOKEN"}, optional=True)
    if data_bucket:
        _mount_data_bucket(prep)
        _mount_data_bucket(scored)

    with dsl.If(scored.outputs["Output"] >= p.threshold, name="relevance-gate"):
        registered = register(adapter=trained.outputs["adapter"], metrics=scored.outputs["metrics"],
                              train_data=prep.outputs["train_data"], eval_data=prep.outputs["eval_data"],
                              model_store=p.model_store, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                              threshold=p.threshold, gate_metric=p.gate_metric)
        _common(registered, "register", "500m", "1Gi", 900)
        kubernetes.mount_pvc(registered, pvc_name=p.checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
    with dsl.Else(name="below-threshold"):
        skipped = not_registered(value=scored.outputs["Output"], threshold=p.threshold, gate_metric=p.gate_metric)
        _common(skipped, "not-registered", "100m", "256Mi", 300)
    # A parameter, not an artifact: kfp.local 2.17 resolves dsl.OneOf of parameters only.
    return Outputs(metrics=scored.outputs["metrics"], report=scored.outputs["report"],
                   adapter=trained.outputs["adapter"],
                   model_card=dsl.OneOf(registered.outputs["card"], skipped.output))


def build_pipeline(data_bucket: bool):
    """The pipeline for teams with (data_bucket) or without a data bucket, as a @dsl.pipeline function whose
    parameters are RunParameters' fields."""
    def arrcoc_train(*parameters) -> Outputs:  # KFP passes one argument per parameter, in signature order
        return _chain(RunParameters(*parameters), data_bucket)

    arrcoc_train.__signature__ = inspect.signature(RunParameters).replace(return_annotation=Outputs)
    bucket = "The team-config's dataBucket is mounted at /data on prepare-data and evaluate." if data_bucket else \
        "For teams without a data bucket (team-config dataBucket unset)."
    return dsl.pipeline(name=pipeline_name(data_bucket), description=(
        "Prepare data, train the ARR-COC adapter as a PyTorchJob, evaluate it with pictures, and register it when "
        f"gate_metric (relevance_score or vqa_accuracy) >= threshold. {bucket}"))(arrcoc_train)
