"""The ARR-COC training pipeline: team-data-bucket -> prepare-data -> train (one PyTorchJob) -> evaluate -> gate ->
register.

The same function runs on a cluster (compiled by `arrcoc compile`, uploaded in the KFP UI, backend "cluster")
and on a laptop (`arrcoc demo`: kfp.local, backend "local"). Task-level Kubernetes settings (kfp.kubernetes)
compile into the platform spec, the second YAML document; kfp.local ignores them. Why each one is there:

- team-config as env on train and team-data-bucket: the PyTorchJob builder reads the team's scheduling from it
  (TeamConfig.from_env), team-data-bucket its dataBucket;
  its optional keys come through a second mapping marked optional, which leaves a key the ConfigMap lacks unset
  instead of failing the pod (KFP's driver copies `optional` onto each configMapKeyRef:
  backend/src/v2/driver/k8s.go).
- base_model "" (the default) takes the team-config's baseModel (tiny when that is empty too), so a team's
  choice applies without anyone passing it; a run can still name another base.
- the team's data bucket (team-config dataBucket) on prepare-data and evaluate: they read the models, images and
  JSONL files under /data that the PyTorchJob replicas read. The replicas mount the bucket inline; kfp-kubernetes
  2.17 has no CSI volume, so these steps mount the claim kustomize/components/data-bucket binds to the bucket
  (DATA_CLAIM, read-only by its PersistentVolume) with the gcsfuse sidecar's annotations. A team without a bucket
  has no such claim, and a pod naming a missing claim never starts, so the mount must be decided per run:
  a first step reads dataBucket from team-config and dsl.If/dsl.Else run the steps with or without it (a
  parameter naming the claim alone could not leave the mount out; a dsl.If on a pipeline parameter would make
  every run repeat what team-config already says). Each branch holds the whole chain from prepare-data to
  register: handing artifacts out of a branch needs dsl.OneOf, which kfp.local 2.17 cannot resolve for artifacts
  ("Expected 1 artifact in ArtifactSelectorSpec"), and the demo must run. Only one branch runs; KFP names the
  second branch's tasks with a -2 suffix, their display names and labels are the same. The pipeline therefore
  declares no outputs of its own: the evaluate step's Metrics, HTML report and Markdown summary are where the
  UI shows them. Steps run as the profile's default-editor (KFP multi-user), the account Workload Identity gives
  bucket access.
- the checkpoint PVC on train, register and prepare-data: train stages the datasets where the replicas read
  them (see components/train.py), register writes the model store, prepare-data can read an image folder
  kept on the team volume.
- node selector kubernetes.io/arch=amd64 everywhere: the trainer image is built for amd64 only, and GKE
  clusters may have Arm node pools.
- prepare-data is never cached: its source may be a folder whose files change under the same name.
- prepare-data and evaluate tolerate spot nodes and retry: cheap, restartable steps. train must not sit on a
  spot node (node affinity: not spot): a preempted launcher would leave its PyTorchJob running unwatched.
- an optional Secret hf-token (key token) as HF_TOKEN on evaluate, which rebuilds the base model when
  base_model is a Hugging Face hub id; teams without the secret are unaffected.
- cpu/memory requests: the team namespace's ResourceQuota rejects pods that declare none.
- runAsNonRoot with the image's uid on every step: KFP 2.16 gives the executor's main container no runAsNonRoot of
  its own (backend/src/v2/compiler/argocompiler/security_context.go), and team namespaces enforce Pod Security
  "restricted", which refuses a pod without it.
"""
from typing import Any

from kfp import dsl, kubernetes

from pipelines.jobs.pytorchjob import CHECKPOINT_MOUNT, GCSFUSE_POD_ANNOTATIONS, RUN_AS_USER
from pipelines.jobs.team_config import CONFIGMAP_NAME, DATA_CLAIM, DATA_MOUNT, ENV_NAMES, OPTIONAL_KEYS, SPOT_LABEL
from pipelines.kfp_pipeline.components import BASE_IMAGE
from pipelines.kfp_pipeline.components.evaluate import evaluate
from pipelines.kfp_pipeline.components.prepare_data import prepare_data
from pipelines.kfp_pipeline.components.register import register
from pipelines.kfp_pipeline.components.team_data_bucket import team_data_bucket
from pipelines.kfp_pipeline.components.train import train
from pipelines.kfp_pipeline.steps.train import MAX_TIMEOUT_MINUTES
from trainer.config import TrainConfig

PIPELINE_NAME = "arrcoc-train"
DEFAULTS = TrainConfig()  # one place defines a training default
DEFAULT_THRESHOLD = 0.4  # an untrained adapter scores ~0.11 and random allocation ~0.08 (docs/pipeline.md)
STEP_LABEL = "arrcoc.dev/step"
PIPELINE_LABEL = "arrcoc.dev/pipeline"
HF_SECRET = "hf-token"


def _common(task: dsl.PipelineTask, step: str, cpu: str, memory: str, timeout_s: int) -> dsl.PipelineTask:
    task.set_display_name(step)
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    kubernetes.add_pod_label(task, PIPELINE_LABEL, PIPELINE_NAME)
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


def _train_and_register(p: dict[str, Any], data_bucket: bool) -> None:
    """prepare-data -> train -> evaluate -> gate -> register, with the data bucket at /data on prepare-data and
    evaluate when data_bucket (train's replicas mount it themselves)."""
    prep = prepare_data(source=p["source"], seed=p["seed"], train_size=p["train_size"], eval_size=p["eval_size"])
    _spot_tolerant(_common(prep, "prepare-data", "1", "2Gi", 3600))
    kubernetes.mount_pvc(prep, pvc_name=p["checkpoint_pvc"], mount_path=CHECKPOINT_MOUNT)
    # KFP's cache key is the step's inputs, and a source that names a folder (on the bucket or the team volume)
    # stays the same string when its files change: a cached prepare-data would train on the old data.
    prep.set_caching_options(False)

    trained = train(
        train_data=prep.outputs["train_data"], eval_data=prep.outputs["eval_data"], backend=p["backend"],
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, image=p["image"], workers=p["workers"],
        nproc_per_node=p["nproc_per_node"], checkpoint_pvc=p["checkpoint_pvc"],
        timeout_minutes=p["train_timeout_minutes"], delete_policy=p["delete_job"],
        **{name: p[name] for name in ("steps", "batch_size", "lr", "eval_size", "seed", "compress_vs_particularize",
                                      "exploit_vs_explore", "focus_vs_diversify", "base_model", "strategy",
                                      "precision", "grad_accum", "activation_checkpointing", "token_fraction",
                                      "token_budget", "max_bad_fraction")},
    )
    # The launcher only waits; its own timeout outlives the job's longest allowed deadline.
    _team_config_env(_common(trained, "train", "500m", "1Gi", (MAX_TIMEOUT_MINUTES + 30) * 60))
    kubernetes.mount_pvc(trained, pvc_name=p["checkpoint_pvc"], mount_path=CHECKPOINT_MOUNT)
    kubernetes.add_node_affinity(trained, match_expressions=[{"key": SPOT_LABEL, "operator": "DoesNotExist"}])
    # A cached train step would skip the PyTorchJob; the run id input already differs per run, this says so.
    trained.set_caching_options(False)

    scored = evaluate(adapter=trained.outputs["adapter"], eval_data=prep.outputs["eval_data"],
                      report_samples=p["report_samples"], threshold=p["threshold"], gate_metric=p["gate_metric"])
    _spot_tolerant(_common(scored, "evaluate", "2", "4Gi", 3600))
    kubernetes.use_secret_as_env(scored, secret_name=HF_SECRET, secret_key_to_env={"token": "HF_TOKEN"}, optional=True)
    if data_bucket:
        _mount_data_bucket(prep)
        _mount_data_bucket(scored)

    with dsl.If(scored.outputs["Output"] >= p["threshold"], name="relevance-gate"):
        registered = register(adapter=trained.outputs["adapter"], metrics=scored.outputs["metrics"],
                              train_data=prep.outputs["train_data"], eval_data=prep.outputs["eval_data"],
                              model_store=p["model_store"], run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                              threshold=p["threshold"], gate_metric=p["gate_metric"])
        _common(registered, "register", "500m", "1Gi", 900)
        kubernetes.mount_pvc(registered, pvc_name=p["checkpoint_pvc"], mount_path=CHECKPOINT_MOUNT)


@dsl.pipeline(name=PIPELINE_NAME, description="Prepare data, train the ARR-COC adapter as a PyTorchJob, "
              "evaluate it with pictures, and register it when gate_metric (relevance_score or vqa_accuracy) "
              ">= threshold. The team-config's dataBucket, if set, is mounted at /data on prepare-data and evaluate.")
def arrcoc_train(
    source: str = "synthetic",
    seed: int = DEFAULTS.seed,
    train_size: int = 2048,
    eval_size: int = DEFAULTS.eval_size,
    steps: int = DEFAULTS.steps,
    batch_size: int = DEFAULTS.batch_size,
    lr: float = DEFAULTS.lr,
    compress_vs_particularize: float = DEFAULTS.compress_vs_particularize,
    exploit_vs_explore: float = DEFAULTS.exploit_vs_explore,
    focus_vs_diversify: float = DEFAULTS.focus_vs_diversify,
    base_model: str = "",  # "": the team-config's baseModel (tiny unless set)
    strategy: str = "",  # "": the team-config's trainStrategy (ddp unless set)
    precision: str = "",  # "": the team-config's trainPrecision (bf16 on GPUs that have it, else fp32)
    grad_accum: int = DEFAULTS.grad_accum,
    activation_checkpointing: bool = DEFAULTS.activation_checkpointing,
    token_fraction: float = DEFAULTS.token_fraction,
    token_budget: int = DEFAULTS.token_budget,
    max_bad_fraction: float = DEFAULTS.max_bad_fraction,
    workers: int = 1,
    nproc_per_node: str = "",
    image: str = BASE_IMAGE,
    backend: str = "cluster",
    checkpoint_pvc: str = "checkpoints",
    train_timeout_minutes: int = 720,
    delete_job: str = "on-success",
    threshold: float = DEFAULT_THRESHOLD,
    gate_metric: str = "relevance_score",
    model_store: str = CHECKPOINT_MOUNT + "/models",
    report_samples: int = 8,
) -> None:
    settings = dict(locals())  # every parameter, for the steps of both branches
    bucket = team_data_bucket(backend=backend)
    _spot_tolerant(_team_config_env(_common(bucket, "team-data-bucket", "250m", "512Mi", 600)))
    # Its input never changes: a cached answer would outlive a change of team-config (and mount a claim that is gone).
    bucket.set_caching_options(False)
    with dsl.If(bucket.output == "", name="without-data-bucket"):
        _train_and_register(settings, data_bucket=False)
    with dsl.Else(name="with-data-bucket"):
        _train_and_register(settings, data_bucket=True)

