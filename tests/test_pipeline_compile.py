"""The compiled pipeline: the checked-in file is current, and its Kubernetes settings are the ones we mean."""
from __future__ import annotations

import pytest
import yaml

from pipelines.cli import main
from pipelines.compile import COMPILED_DIR, PIPELINES, compile_to, documents
from pipelines.jobs.team_config import ENV_NAMES, OPTIONAL_KEYS, SPOT_LABEL
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


def test_team_config_reaches_the_train_step_as_env(fresh):
    train = executors(fresh)["exec-train"]
    required, optional = train["configMapAsEnv"]
    assert required["configMapName"] == optional["configMapName"] == "team-config"
    assert not required.get("optional", False) and optional["optional"] is True
    to_env = [{e["configMapKey"]: e["envVar"] for e in m["keyToEnv"]} for m in (required, optional)]
    assert {**to_env[0], **to_env[1]} == ENV_NAMES
    assert set(to_env[1]) == set(OPTIONAL_KEYS)  # a ConfigMap without them still starts the pod


@pytest.mark.parametrize("executor", ["exec-train", "exec-register", "exec-prepare-data"])
def test_checkpoint_pvc_is_mounted_where_the_replicas_mount_it(fresh, executor):
    (mount,) = executors(fresh)[executor]["pvcMount"]
    assert mount["mountPath"] == "/checkpoints"
    assert mount["pvcNameParameter"]["componentInputParameter"].endswith("checkpoint_pvc")


def test_scheduling_per_step(fresh):
    ex = executors(fresh)
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
    (secret,) = executors(fresh)["exec-evaluate"]["secretAsEnv"]
    assert secret["secretName"] == "hf-token" and secret["optional"] is True
    assert secret["keyToEnv"] == [{"secretKey": "token", "envVar": "HF_TOKEN"}]


def test_gate_guards_register(fresh):
    spec = fresh[0]
    gate = spec["root"]["dag"]["tasks"]["condition-1"]
    assert gate["taskInfo"]["name"] == "relevance-gate"
    condition = gate["triggerPolicy"]["condition"]
    assert condition == ("inputs.parameter_values['pipelinechannel--evaluate-Output'] >= "
                         "inputs.parameter_values['pipelinechannel--threshold']")
    assert "register" in spec["components"]["comp-condition-1"]["dag"]["tasks"]
    assert "register" not in spec["root"]["dag"]["tasks"]
    # the gate compares the evaluate step's return, which is the pipeline's gate_metric
    assert spec["root"]["inputDefinitions"]["parameters"]["gate_metric"]["defaultValue"] == "relevance_score"
    gated = spec["root"]["dag"]["tasks"]["evaluate"]["inputs"]["parameters"]["gate_metric"]
    assert gated["componentInputParameter"] == "gate_metric"


def test_components_run_offline_in_the_trainer_image(fresh):
    for name, executor in fresh[0]["deploymentSpec"]["executors"].items():
        container = executor["container"]
        assert container["image"] == BASE_IMAGE, name
        assert "pip install" not in " ".join(container["command"]), f"{name} would need the network"
        assert container["resources"]["cpuRequest"] > 0 and container["resources"]["memoryRequest"] > 0, name


def test_train_is_never_cached(fresh):
    assert fresh[0]["root"]["dag"]["tasks"]["train"]["cachingOptions"].get("enableCache") in (None, False)

