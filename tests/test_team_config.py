"""team-config: the ConfigMap contract with kustomize/, read from a manifest, a file and the environment."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.jobs.team_config import ENV_NAMES, KEYS, OPTIONAL_KEYS, TeamConfig, TeamConfigError

REPO = Path(__file__).resolve().parents[1]

GOOD = {
    "team": "team-vision",
    "capacity": "spot",
    "gpuType": "nvidia-l4",
    "gpusPerReplica": "1",
    "cpuPerReplica": "4",
    "memoryPerReplica": "16Gi",
    "nodeSelector": '{"pool": "training"}',
    "tolerations": '[{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", '
                   '"effect": "NoSchedule"}]',
    "kueueQueue": "team-vision",
    "checkpointBucket": "",
    "checkpointPVC": "checkpoints",
    "backoffLimit": "6",
    "priorityClassName": "arrcoc-training",
}


def configmap(data: dict) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "team-config"}, "data": data}


def test_reads_every_key_typed() -> None:
    cfg = TeamConfig.from_configmap(configmap(GOOD))
    assert (cfg.team, cfg.capacity, cfg.gpu_type, cfg.gpus_per_replica) == ("team-vision", "spot", "nvidia-l4", 1)
    assert (cfg.cpu_per_replica, cfg.memory_per_replica, cfg.backoff_limit) == ("4", "16Gi", 6)
    assert cfg.node_selector == {"pool": "training"}
    assert cfg.tolerations[0]["key"] == "cloud.google.com/gke-spot"
    assert (cfg.kueue_queue, cfg.checkpoint_pvc, cfg.priority_class_name) == (
        "team-vision", "checkpoints", "arrcoc-training")
    # spot capacity and the GPU type become GKE node selectors next to the explicit ones
    assert cfg.pod_node_selector() == {"pool": "training", "cloud.google.com/gke-spot": "true",
                                       "cloud.google.com/gke-accelerator": "nvidia-l4"}


def test_data_mapping_and_round_trip() -> None:
    cfg = TeamConfig.from_configmap(GOOD)
    assert TeamConfig.from_configmap(cfg.to_configmap_data()) == cfg


def test_env_names_cover_every_key_with_one_prefix() -> None:
    assert set(ENV_NAMES) == set(KEYS)  # the optional ones too: the pipeline maps those with optional=True
    assert ENV_NAMES["gpusPerReplica"] == "ARRCOC_TEAM_GPUS_PER_REPLICA"
    assert ENV_NAMES["checkpointPVC"] == "ARRCOC_TEAM_CHECKPOINT_PVC"
    assert len(set(ENV_NAMES.values())) == len(ENV_NAMES)


def test_trainer_precision_and_strategy_follow_the_gpu_type_unless_set() -> None:
    l4 = TeamConfig.from_configmap(GOOD)
    assert (l4.trainer_precision(), l4.trainer_strategy()) == ("bf16", "ddp")
    t4 = TeamConfig.from_configmap({**GOOD, "gpuType": "nvidia-tesla-t4", "nodeSelector": "{}"})
    assert t4.trainer_precision() == "fp32"
    assert TeamConfig.local_default().trainer_precision() == "fp32"
    chosen = TeamConfig.from_configmap({**GOOD, "trainPrecision": "fp32", "trainStrategy": "fsdp"})
    assert (chosen.trainer_precision(), chosen.trainer_strategy()) == ("fp32", "fsdp")
    with pytest.raises(TeamConfigError, match="trainStrategy='zero9' is not one of ddp, deepspeed, fsdp"):
        TeamConfig.from_configmap({**GOOD, "trainStrategy": "zero9"})


def test_from_env() -> None:
    environ = {ENV_NAMES[k]: v for k, v in GOOD.items()}
    assert TeamConfig.from_env(environ) == TeamConfig.from_configmap(GOOD)
    del environ["ARRCOC_TEAM_BACKOFF_LIMIT"]
    with pytest.raises(TeamConfigError, match="ARRCOC_TEAM_BACKOFF_LIMIT .*backoffLimit"):
        TeamConfig.from_env(environ)


def test_local_default() -> None:
    cfg = TeamConfig.local_default()
    assert (cfg.gpus_per_replica, cfg.cpu_per_replica, cfg.memory_per_replica, cfg.backoff_limit) == (0, "1", "2Gi", 3)
    assert cfg.tolerations == [] and cfg.pod_node_selector() == {}
    assert not cfg.checkpoint_bucket and not cfg.checkpoint_pvc


@pytest.mark.parametrize("change, key", [
    ({"capacity": "preemptible"}, "capacity"),
    ({"gpusPerReplica": "one"}, "gpusPerReplica"),
    ({"gpusPerReplica": "-1"}, "gpusPerReplica"),
    ({"backoffLimit": "3.5"}, "backoffLimit"),
    ({"cpuPerReplica": "four"}, "cpuPerReplica"),
    ({"memoryPerReplica": "0"}, "memoryPerReplica"),
    ({"nodeSelector": "{pool: training}"}, "nodeSelector"),
    ({"nodeSelector": "[]"}, "nodeSelector"),
    ({"nodeSelector": '{"cloud.google.com/gke-spot": "false"}'}, "nodeSelector"),
    ({"nodeSelector": '{"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}'}, "nodeSelector"),
    ({"tolerations": "{}"}, "tolerations"),
    ({"tolerations": '[{"key": "a", "operator": "Maybe"}]'}, "tolerations"),
    ({"tolerations": '[{"key": "a", "effect": "Sometimes"}]'}, "tolerations"),
    ({"tolerations": '[{"key": "a", "colour": "red"}]'}, "tolerations"),
    ({"checkpointBucket": "gs://bucket"}, "checkpointBucket"),
    ({"checkpointBucket": "", "checkpointPVC": ""}, "checkpointPVC"),
    ({"gpuType": ""}, "gpuType"),
    ({"team": "Team_Vision"}, "team"),
    ({"backoffLimit": 3}, "backoffLimit"),
    ({"color": "blue"}, "color"),
    ({"dataBucket": "gs://models"}, "dataBucket"),
    ({"baseModel": "/data/my model"}, "baseModel"),
    ({"dataBucket": "models", "trainData": "/checkpoints/train"}, "trainData"),
    ({"evalData": "/data/vqav2/eval"}, "evalData"),  # no dataBucket mounted there
])
def test_bad_values_name_the_key(change: dict, key: str) -> None:
    with pytest.raises(TeamConfigError) as info:
        TeamConfig.from_configmap(configmap({**GOOD, **change}))
    message = str(info.value)
    assert key in message and "\n" not in message


def test_missing_key_is_named() -> None:
    data = {k: v for k, v in GOOD.items() if k != "kueueQueue"}
    with pytest.raises(TeamConfigError, match="missing key 'kueueQueue'"):
        TeamConfig.from_configmap(data)


def test_from_file_picks_the_configmap_out_of_a_stream(tmp_path: Path) -> None:
    path = tmp_path / "rendered.yaml"
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-vision"}},
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other"}, "data": {"x": "y"}},
            {**configmap(GOOD), "metadata": {"name": "team-config-5f6k9c7h2b"}}]  # kustomize's hash suffix
    path.write_text(yaml.safe_dump_all(docs))
    assert TeamConfig.from_file(path) == TeamConfig.from_configmap(GOOD)


@pytest.mark.parametrize("text, fragment", [
    ("a: [unclosed", "not valid YAML"),
    ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: other}\ndata: {}\n", "no ConfigMap named team-config"),
])
def test_from_file_errors(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TeamConfigError, match=fragment):
        TeamConfig.from_file(path)
    with pytest.raises(TeamConfigError, match="cannot read"):
        TeamConfig.from_file(tmp_path / "absent.yaml")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
def test_every_team_overlay_renders_a_readable_team_config(tmp_path: Path) -> None:
    overlays = sorted(p for p in (REPO / "kustomize" / "overlays").glob("*") if (p / "kustomization.yaml").exists())
    if not overlays:
        pytest.skip("no kustomize overlays in this checkout")
    for overlay in overlays:
        rendered = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True)
        path = tmp_path / f"{overlay.name}.yaml"
        path.write_text(rendered.stdout)
        cfg = TeamConfig.from_file(path)
        assert cfg.team == overlay.name
        assert cfg.checkpoint_bucket or cfg.checkpoint_pvc


def test_model_and_data_keys_are_optional_and_reach_the_train_step_env() -> None:
    """A ConfigMap without the optional keys reads as before; with them, from_env (the KFP train step) sees them
    under their ENV_NAMES, and without them in the environment it still reads."""
    plain = TeamConfig.from_configmap(configmap(GOOD))
    assert (plain.base_model, plain.data_bucket, plain.train_data, plain.eval_data) == ("", "", "", "")
    assert not plain.uses_gcsfuse()
    data = {**GOOD, "baseModel": "/data/models/qwen2.5-vl-3b", "dataBucket": "team-vision-models",
            "trainData": "/data/vqav2/train", "evalData": "/data/vqav2/eval"}
    full = TeamConfig.from_configmap(configmap(data))
    assert full.uses_gcsfuse() and full.base_model == "/data/models/qwen2.5-vl-3b"
    assert set(OPTIONAL_KEYS) <= set(ENV_NAMES)
    assert TeamConfig.from_env({ENV_NAMES[k]: v for k, v in data.items()}) == full
    assert TeamConfig.from_env({ENV_NAMES[k]: v for k, v in GOOD.items()}) == plain
    assert TeamConfig.from_configmap(full.to_configmap_data()) == full
    # trainPrecision and trainStrategy travel the same way into the KFP train step
    chosen = {**GOOD, "trainPrecision": "fp32", "trainStrategy": "fsdp"}
    from_env = TeamConfig.from_env({ENV_NAMES[k]: v for k, v in chosen.items()})
    assert (from_env.trainer_precision(), from_env.trainer_strategy()) == ("fp32", "fsdp")
