"""The compiled pipelines: the checked-in files are current, one per variant (without and with the team's data
bucket), and their outputs and Kubernetes settings are the ones we mean."""
from __future__ import annotations

import pytest
import yaml

from pipelines.cli import main
from pipelines.compile import COMPILED_DIR, compile_to, documents
from pipelines.jobs.pytorchjob import GCSFUSE_POD_ANNOTATIONS
from pipelines.jobs.team_config import DATA_CLAIM, DATA_MOUNT, ENV_NAMES, OPTIONAL_KEYS, SPOT_LABEL
from pipelines.kfp_pipeline.components import BASE_IMAGE
from pipelines.kfp_pipeline.variants import VARIANTS, compiled_file, pipeline_name

STEPS = {"prepare-data", "train", "evaluate", "register", "not-registered"}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict[bool, list[dict]]:
    """{data_bucket: the variant's documents (pipeline spec, platform spec)}, compiled now."""
    where = tmp_path_factory.mktemp("compiled")
    return {v: documents(compile_to(where, v).read_text()) for v in VARIANTS}


@pytest.mark.parametrize("data_bucket", VARIANTS)
def test_checked_in_pipelines_are_current(fresh, data_bucket):
    checked_in = compiled_file(data_bucket)
    assert checked_in.is_file(), f"{checked_in} is missing: run `arrcoc compile`"
    assert documents(checked_in.read_text()) == fresh[data_bucket], \
        f"{checked_in} is stale: run `arrcoc compile` and commit the diff"


def test_compile_command_writes_one_file_per_variant(tmp_path):
    assert main(["compile", "--out-dir", str(tmp_path), "--pipelines-only"]) == 0
    names = {p.name: next(yaml.safe_load_all(p.read_text()))["pipelineInfo"]["name"] for p in tmp_path.iterdir()}
    assert names == {compiled_file(v).name: pipeline_name(v) for v in VARIANTS}
    assert sorted(p.name for p in COMPILED_DIR.glob("*.yaml")) == sorted(names), "a stale variant is checked in"


def executors(docs) -> dict:
    assert len(docs) == 2, "expected the pipeline spec and the Kubernetes platform spec"
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def tasks(docs) -> dict[str, dict]:
    """Every task of the pipeline, inside conditions too, by name."""
    found = {}
    for component in [docs[0]["root"], *docs[0]["components"].values()]:
        found.update((component.get("dag") or {}).get("tasks", {}))
    return found


@pytest.mark.parametrize("data_bucket", VARIANTS)
def test_each_step_is_one_task_with_one_name(fresh, data_bucket):
    """The chain is written once: one executor per step, no -2 copies, the task name is the step's display name."""
    docs = fresh[data_bucket]
    assert {name.removeprefix("exec-") for name in executors(docs)} == STEPS
    assert set(docs[0]["deploymentSpec"]["executors"]) == {f"exec-{s}" for s in STEPS}
    steps = {name: t for name, t in tasks(docs).items() if not name.startswith("condition")}
    assert set(steps) == STEPS and all(t["taskInfo"]["name"] == name for name, t in steps.items())


@pytest.mark.parametrize("data_bucket", VARIANTS)
def test_the_pipeline_declares_its_outputs(fresh, data_bucket):
    root = fresh[data_bucket][0]["root"]
    outputs = root["outputDefinitions"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outputs["artifacts"].items()} == {
        "metrics": "system.Metrics", "report": "system.HTML", "adapter": "system.Model"}
    assert outputs["parameters"] == {"model_card": {"parameterType": "STRING"}}
    produced = root["dag"]["outputs"]
    assert produced["artifacts"]["report"]["artifactSelectors"] == [
        {"outputArtifactKey": "report", "producerSubtask": "evaluate"}]
    # the card: register's when the gate opens, not-registered's line when it does not (dsl.OneOf)
    branches = fresh[data_bucket][0]["components"]["comp-condition-branches-1"]
    assert produced["parameters"]["model_card"]["valueFromParameter"]["producerSubtask"] == "condition-branches-1"
    selectors = branches["dag"]["outputs"]["parameters"]
    (oneof,) = selectors.values()
    assert len(oneof["valueFromOneof"]["parameterSelectors"]) == 2


@pytest.mark.parametrize("data_bucket", VARIANTS)
def test_team_config_reaches_the_train_step_as_env(fresh, data_bucket):
    required, optional = executors(fresh[data_bucket])["exec-train"]["configMapAsEnv"]
    assert required["configMapName"] == optional["configMapName"] == "team-config"
    assert not required.get("optional", False) and optional["optional"] is True
    to_env = [{e["configMapKey"]: e["envVar"] for e in m["keyToEnv"]} for m in (required, optional)]
    assert {**to_env[0], **to_env[1]} == ENV_NAMES
    assert set(to_env[1]) == set(OPTIONAL_KEYS)  # a ConfigMap without them still starts the pod


@pytest.mark.parametrize("data_bucket", VARIANTS)
@pytest.mark.parametrize("step", ["train", "register", "prepare-data"])
def test_checkpoint_pvc_is_mounted_where_the_replicas_mount_it(fresh, step, data_bucket):
    mounts = executors(fresh[data_bucket])[f"exec-{step}"]["pvcMount"]
    (mount,) = [m for m in mounts if m["mountPath"] == "/checkpoints"]
    assert mount["pvcNameParameter"]["componentInputParameter"].endswith("checkpoint_pvc")


@pytest.mark.parametrize("data_bucket", VARIANTS)
def test_only_the_bucket_variant_mounts_the_data_claim_on_prepare_data_and_evaluate(fresh, data_bucket):
    for executor, spec in executors(fresh[data_bucket]).items():
        data = [m for m in spec.get("pvcMount", []) if m["mountPath"] == DATA_MOUNT]
        annotations = spec["podMetadata"].get("annotations", {})
        if data_bucket and executor in ("exec-prepare-data", "exec-evaluate"):
            assert [m["pvcNameParameter"]["runtimeValue"]["constant"] for m in data] == [DATA_CLAIM], executor
            assert annotations == GCSFUSE_POD_ANNOTATIONS, executor  # the replicas' sidecar settings
        else:
            # train's replicas mount the bucket themselves; a pod naming a missing claim would never start
            assert not data and not annotations, executor


@pytest.mark.parametrize("data_bucket", VARIANTS)
def test_the_train_step_knows_its_variant(fresh, data_bucket):
    """train compares it with the team-config's dataBucket (a run of the other team's variant fails there)."""
    train = tasks(fresh[data_bucket])["train"]
    assert train["inputs"]["parameters"]["data_bucket"]["runtimeValue"]["constant"] is data_bucket


@pytest.mark.parametrize("data_bucket", VARIANTS)
def test_scheduling_per_step(fresh, data_bucket):
    ex = executors(fresh[data_bucket])
    spot = {"key": SPOT_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    assert ex["exec-prepare-data"]["tolerations"] == [spot]
    assert ex["exec-evaluate"]["tolerations"] == [spot]
    assert "tolerations" not in ex["exec-train"], "the launcher must not sit on a spot node"
    assert ex["exec-train"]["nodeAffinity"] == [{"matchExpressions": [{"key": SPOT_LABEL, "operator": "DoesNotExist"}]}]
    for name, spec in ex.items():
        assert spec["nodeSelector"]["labels"] == {"kubernetes.io/arch": "amd64"}, name
        assert spec["podMetadata"]["labels"]["arrcoc.dev/pipeline"] == "arrcoc-train", name
        assert spec["podMetadata"]["labels"]["arrcoc.dev/step"] == name.removeprefix("exec-"), name
        assert int(spec["activeDeadlineSeconds"]) > 0, name
    assert int(ex["exec-train"]["activeDeadlineSeconds"]) > 24 * 3600  # outlives the longest job it waits for


def test_hf_token_secret_is_optional_env_on_evaluate(fresh):
    for docs in fresh.values():
        (secret,) = executors(docs)["exec-evaluate"]["secretAsEnv"]
        assert secret["secretName"] == "hf-token" and secret["optional"] is True
        assert secret["keyToEnv"] == [{"secretKey": "token", "envVar": "HF_TOKEN"}]


@pytest.mark.parametrize("data_bucket", VARIANTS)
def test_gate_guards_register(fresh, data_bucket):
    spec = fresh[data_bucket][0]
    components = spec["components"]
    branches = components["comp-condition-branches-1"]["dag"]["tasks"]
    by_name = {t["taskInfo"]["name"]: t for t in branches.values()}
    assert set(by_name) == {"relevance-gate", "below-threshold"}
    assert by_name["relevance-gate"]["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--evaluate-Output'] >= "
        "inputs.parameter_values['pipelinechannel--threshold']")
    assert by_name["below-threshold"]["triggerPolicy"]["condition"].startswith("!(")
    inside = {name: set(components[t["componentRef"]["name"]]["dag"]["tasks"]) for name, t in by_name.items()}
    assert inside == {"relevance-gate": {"register"}, "below-threshold": {"not-registered"}}
    assert "register" not in spec["root"]["dag"]["tasks"]
    # the gate compares the evaluate step's return, which is the pipeline's gate_metric
    assert spec["root"]["dag"]["tasks"]["evaluate"]["inputs"]["parameters"]["gate_metric"][
        "componentInputParameter"] == "gate_metric"
    assert spec["root"]["inputDefinitions"]["parameters"]["gate_metric"]["defaultValue"] == "relevance_score"


def test_base_model_defaults_to_the_team_config(fresh):
    # "" = team-config's baseModel (tiny when unset): a team's base applies without passing it on every run
    for docs in fresh.values():
        assert docs[0]["root"]["inputDefinitions"]["parameters"]["base_model"]["defaultValue"] == ""


def test_components_run_offline_in_the_trainer_image(fresh):
    for docs in fresh.values():
        for name, executor in docs[0]["deploymentSpec"]["executors"].items():
            container = executor["container"]
            assert container["image"] == BASE_IMAGE, name
            assert "pip install" not in " ".join(container["command"]), f"{name} would need the network"
            assert container["resources"]["cpuRequest"] > 0 and container["resources"]["memoryRequest"] > 0, name


def test_train_and_prepare_data_are_never_cached(fresh):
    """train would skip its PyTorchJob; prepare-data would keep a dataset whose folder changed under the same name."""
    for docs in fresh.values():
        found = tasks(docs)
        for step in ("train", "prepare-data"):
            assert found[step]["cachingOptions"].get("enableCache") in (None, False), step
        assert found["evaluate"]["cachingOptions"].get("enableCache") is True
