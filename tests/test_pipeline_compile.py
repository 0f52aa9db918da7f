"""The compiled pipeline: the checked-in file is current, and its Kubernetes settings are the ones we mean."""
from __future__ import annotations

import pytest
import yaml

from pipelines.cli import main
from pipelines.compile import COMPILED_DIR, PIPELINES, compile_to, documents
from pipelines.jobs.pytorchjob import GCSFUSE_POD_ANNOTATIONS
from pipelines.jobs.team_config import DATA_CLAIM, DATA_MOUNT, ENV_NAMES, OPTIONAL_KEYS, SPOT_LABEL
from pipelines.kfp_pipeline.components import BASE_IMAGE

CHECKED_IN = COMPILED_DIR / "arrcoc_train.yaml"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> list[dict]:
    path = compile_to(tmp_path_factory.mktemp("compiled") / "arrcoc_train.yaml", PIPELINES["arrcoc_train.yaml"])
    return documents(path.read_text())


def test_checked_in_pipeline_is_current(fresh):
    assert CHECKED_IN.is_file(), "pipelines/kfp_pipeline/compiled/arrcoc_train.yaml is missing: run `arrcoc compile`"
    assert documents(CHECKED_IN.read_text()) == fresh, \
        "pipelines/kfp_pipeline/compiled/arrcoc_train.yaml is stale: run `arrcoc compile` and commit the diff"


def test_compile_command_writes_every_pipeline(tmp_path, capsys):
    assert main(["compile", "--out-dir", str(tmp_path), "--pipelines-only"]) == 0
    for name in PIPELINES:
        spec = next(yaml.safe_load_all((tmp_path / name).read_text()))
        assert spec["pipelineInfo"]["name"] == "arrcoc-train"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def executors(fresh) -> dict:
    assert len(fresh) == 2, "expected the pipeline spec and the Kubernetes platform spec"
    return fresh[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def branch_executors(fresh) -> dict[bool, dict[str, str]]:
    """{mounts the data bucket: {step: executor}}: the two branches of the pipeline, told apart by their
    trigger conditions (team-data-bucket's output "" or not), not by KFP's naming."""
    spec = fresh[0]
    components = spec["components"]
    branches = components[spec["root"]["dag"]["tasks"]["condition-branches-1"]["componentRef"]["name"]]["dag"]
    found: dict[bool, dict[str, str]] = {}

    def steps_under(component: str) -> dict[str, str]:
        steps = {}
        for sub in components[component]["dag"]["tasks"].values():
            ref = sub["componentRef"]["name"]
            steps.update(steps_under(ref) if "dag" in components[ref]
                         else {sub["taskInfo"]["name"]: components[ref]["executorLabel"]})
        return steps

    for task in branches["tasks"].values():
        condition = task["triggerPolicy"]["condition"]
        assert "team-data-bucket-Output'] == ''" in condition
        found[condition.startswith("!")] = steps_under(task["componentRef"]["name"])
    assert set(found) == {True, False}
    return found


def step_name(executor: str) -> str:
    return executor.removeprefix("exec-").removesuffix("-2")


def test_team_config_reaches_the_train_and_bucket_steps_as_env(fresh):
    ex = executors(fresh)
    for executor in ("exec-train", "exec-train-2", "exec-team-data-bucket"):
        required, optional = ex[executor]["configMapAsEnv"]
        assert required["configMapName"] == optional["configMapName"] == "team-config"
        assert not required.get("optional", False) and optional["optional"] is True
        to_env = [{e["configMapKey"]: e["envVar"] for e in m["keyToEnv"]} for m in (required, optional)]
        assert {**to_env[0], **to_env[1]} == ENV_NAMES
        assert set(to_env[1]) == set(OPTIONAL_KEYS)  # a ConfigMap without them still starts the pod


@pytest.mark.parametrize("mounts_bucket", [False, True])
@pytest.mark.parametrize("step", ["train", "register", "prepare-data"])
def test_checkpoint_pvc_is_mounted_where_the_replicas_mount_it(fresh, step, mounts_bucket):
    mounts = executors(fresh)[branch_executors(fresh)[mounts_bucket][step]]["pvcMount"]
    (mount,) = [m for m in mounts if m["mountPath"] == "/checkpoints"]
    assert mount["pvcNameParameter"]["componentInputParameter"].endswith("checkpoint_pvc")


def test_only_the_bucket_branch_mounts_the_data_claim_on_prepare_data_and_evaluate(fresh):
    ex = executors(fresh)
    branches = branch_executors(fresh)
    assert set(branches[True]) == set(branches[False]) == {"prepare-data", "train", "evaluate", "register"}
    for mounts_bucket, steps in branches.items():
        for step, executor in steps.items():
            spec = ex[executor]
            data = [m for m in spec.get("pvcMount", []) if m["mountPath"] == DATA_MOUNT]
            annotations = spec["podMetadata"].get("annotations", {})
            if mounts_bucket and step in ("prepare-data", "evaluate"):
                assert [m["pvcNameParameter"]["runtimeValue"]["constant"] for m in data] == [DATA_CLAIM], executor
                assert annotations == GCSFUSE_POD_ANNOTATIONS, executor  # the replicas' sidecar settings
            else:
                # train's replicas mount the bucket themselves; a pod naming a missing claim would never start
                assert not data and not annotations, executor


def test_scheduling_per_step(fresh):
    ex = executors(fresh)
    spot = {"key": SPOT_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    for suffix in ("", "-2"):
        assert ex[f"exec-prepare-data{suffix}"]["tolerations"] == [spot]
        assert ex[f"exec-evaluate{suffix}"]["tolerations"] == [spot]
        assert "tolerations" not in ex[f"exec-train{suffix}"], "the launcher must not sit on a spot node"
        assert ex[f"exec-train{suffix}"]["nodeAffinity"] == [
            {"matchExpressions": [{"key": SPOT_LABEL, "operator": "DoesNotExist"}]}]
    assert ex["exec-team-data-bucket"]["tolerations"] == [spot]
    for name, spec in ex.items():
        assert spec["nodeSelector"]["labels"] == {"kubernetes.io/arch": "amd64"}, name
        assert spec["podMetadata"]["labels"]["arrcoc.dev/pipeline"] == "arrcoc-train", name
        assert spec["podMetadata"]["labels"]["arrcoc.dev/step"] == step_name(name), name
        assert int(spec["activeDeadlineSeconds"]) > 0, name
    assert int(ex["exec-train"]["activeDeadlineSeconds"]) > 24 * 3600  # outlives the longest job it waits for


def test_hf_token_secret_is_optional_env_on_evaluate(fresh):
    for executor in ("exec-evaluate", "exec-evaluate-2"):
        (secret,) = executors(fresh)[executor]["secretAsEnv"]
        assert secret["secretName"] == "hf-token" and secret["optional"] is True
        assert secret["keyToEnv"] == [{"secretKey": "token", "envVar": "HF_TOKEN"}]


def test_gate_guards_register_in_both_branches(fresh):
    spec = fresh[0]
    components = spec["components"]
    branches = components["comp-condition-branches-1"]["dag"]["tasks"]
    assert {t["taskInfo"]["name"] for t in branches.values()} == {"without-data-bucket", "with-data-bucket"}
    for branch in branches.values():
        tasks = components[branch["componentRef"]["name"]]["dag"]["tasks"]
        (gate,) = [t for t in tasks.values() if t["taskInfo"]["name"] == "relevance-gate"]
        evaluate = next(name for name in tasks if name.startswith("evaluate"))
        assert gate["triggerPolicy"]["condition"] == (
            f"inputs.parameter_values['pipelinechannel--{evaluate}-Output'] >= "
            "inputs.parameter_values['pipelinechannel--threshold']")
        assert not any(name.startswith("register") for name in tasks)
        assert any(name.startswith("register") for name in components[gate["componentRef"]["name"]]["dag"]["tasks"])
        # the gate compares the evaluate step's return, which is the pipeline's gate_metric
        assert tasks[evaluate]["inputs"]["parameters"]["gate_metric"]["componentInputParameter"].endswith(
            "gate_metric")
    assert spec["root"]["inputDefinitions"]["parameters"]["gate_metric"]["defaultValue"] == "relevance_score"


def test_base_model_defaults_to_the_team_config(fresh):
    # "" = team-config's baseModel (tiny when unset): a team's base applies without passing it on every run
    assert fresh[0]["root"]["inputDefinitions"]["parameters"]["base_model"]["defaultValue"] == ""


def test_components_run_offline_in_the_trainer_image(fresh):
    for name, executor in fresh[0]["deploymentSpec"]["executors"].items():
        container = executor["container"]
        assert container["image"] == BASE_IMAGE, name
        assert "pip install" not in " ".join(container["command"]), f"{name} would need the network"
        assert container["resources"]["cpuRequest"] > 0 and container["resources"]["memoryRequest"] > 0, name


def test_train_and_prepare_data_are_never_cached(fresh):
    """train would skip its PyTorchJob; prepare-data would keep a dataset whose folder changed under the same name."""
    components = fresh[0]["components"]
    for step in ("train", "prepare-data"):
        tasks = [t for c in components.values() for name, t in (c.get("dag") or {}).get("tasks", {}).items()
                 if name.removesuffix("-2") == step]
        assert len(tasks) == 2, step
        for task in tasks:
            assert task["cachingOptions"].get("enableCache") in (None, False), step
    evaluates = [t for c in components.values() for name, t in (c.get("dag") or {}).get("tasks", {}).items()
                 if name.removesuffix("-2") == "evaluate"]
    assert [t["cachingOptions"].get("enableCache") for t in evaluates] == [True, True]
    # its only input is the backend: a cached dataBucket would outlive a change of team-config
    bucket = fresh[0]["root"]["dag"]["tasks"]["team-data-bucket"]
    assert bucket["cachingOptions"].get("enableCache") in (None, False)

