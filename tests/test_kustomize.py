"""Kustomize layout: overlays differ as the teams do, components stay self-contained and agree
with themselves, and all YAML we own passes yamllint. Rendering uses `kubectl kustomize`; no cluster."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.jobs.pytorchjob import RUN_AS_USER
from pipelines.jobs.team_config import DATA_CLAIM, TeamConfig
from tests.bucket_overlay import write_bucket_overlay

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = REPO / "kustomize" / "components"


def build(directory: Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=True)
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="session")
def overlays() -> dict[str, list[dict]]:
    return {team: build(REPO / "kustomize" / "overlays" / team) for team in ("team-vision", "team-research")}


def _team_config(docs: list[dict]) -> dict:
    return next(d["data"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "team-config")


def test_teams_differ_in_capacity_gpu_and_quota(overlays) -> None:
    vision, research = (_team_config(overlays[t]) for t in ("team-vision", "team-research"))
    assert (vision["capacity"], vision["gpuType"]) == ("spot", "nvidia-l4")
    assert (research["capacity"], research["gpuType"]) == ("on-demand", "nvidia-tesla-a100")
    # written once: the GKE selectors follow from capacity and gpuType when team-config is read
    assert TeamConfig.from_configmap(vision).pod_node_selector() == {
        "cloud.google.com/gke-accelerator": "nvidia-l4", "cloud.google.com/gke-spot": "true"}
    assert TeamConfig.from_configmap(research).pod_node_selector() == {
        "cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert json.loads(vision["nodeSelector"]) == json.loads(research["nodeSelector"]) == {}
    quotas = {t: next(d for d in docs if d["kind"] == "ResourceQuota")["spec"]["hard"]
              for t, docs in overlays.items()}
    gpus = {team: int(hard["requests.nvidia.com/gpu"]) for team, hard in quotas.items()}
    assert gpus["team-vision"] < gpus["team-research"]
    for team, docs in overlays.items():
        assert _team_config(docs)["team"] == team
        assert all(isinstance(v, str) for v in _team_config(docs).values())
        bindings = {d["metadata"]["name"]: d for d in docs if d["kind"] == "RoleBinding"}
        assert bindings["arrcoc-training"]["subjects"] == [
            {"kind": "ServiceAccount", "name": "default-editor", "namespace": team}]
        # CI's account: the KFP API's verbs only (README step 3)
        ci = {"kind": "ServiceAccount", "name": "ci", "namespace": team}
        assert bindings["arrcoc-pipelines-ci"]["subjects"] == [ci]
        assert bindings["arrcoc-pipelines-ci"]["roleRef"]["name"] == "arrcoc-pipelines-ci"
        assert any(d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "ci" for d in docs)
        assert not any(d["kind"] == "CapacityScheduling" for d in docs), "local-config must not be emitted"


@pytest.mark.parametrize("capacity", ["spot", "on-demand"])
def test_capacity_component_writes_tolerations_once(capacity: str) -> None:
    """team-config's JSON string is the only place a capacity's tolerations are written: the component holds
    nothing else (no pod-template copy), and node selectors are derived from capacity, never copied."""
    files = sorted(p.name for p in (COMPONENTS / capacity).iterdir())
    assert files == ["kustomization.yaml", "team-config.capacity.yaml"]
    patch = yaml.safe_load((COMPONENTS / capacity / "team-config.capacity.yaml").read_text())["data"]
    assert patch["capacity"] == capacity
    tolerations = json.loads(patch["tolerations"])
    assert {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"} in tolerations
    assert any(t["key"] == "cloud.google.com/gke-spot" for t in tolerations) == (capacity == "spot")
    assert "nodeSelector" not in patch


@pytest.mark.parametrize("team", ["team-vision", "team-research"])
def test_katib_trials_schedule_as_the_teams_jobs(overlays, team: str) -> None:
    """The Katib overlay's trial pods get exactly the tolerations and node selector the builder gives the team's
    own PyTorchJobs from its rendered team-config."""
    from pipelines.jobs.pytorchjob import build_pytorchjob, to_manifest

    config = TeamConfig.from_configmap(_team_config(overlays[team]))
    job = to_manifest(build_pytorchjob("x", team=config, workers=1))
    (experiment,) = [d for d in build(REPO / "katib" / "overlays" / team) if d["kind"] == "Experiment"]
    trial = experiment["spec"]["trialTemplate"]["trialSpec"]["spec"]["pytorchReplicaSpecs"]
    for rtype in ("Master", "Worker"):
        pod = trial[rtype]["template"]["spec"]
        want = job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]
        assert pod["tolerations"] == want["tolerations"] == config.tolerations
        assert pod["nodeSelector"] == want["nodeSelector"]
        assert (pod["nodeSelector"].get("cloud.google.com/gke-spot") == "true") == (config.capacity == "spot")


@pytest.mark.parametrize("team", ["team-vision", "team-research"])
def test_checkpoint_share_is_given_to_the_pods_group_once(overlays, team: str) -> None:
    """The Job that makes a new share writable for the uid KFP steps run as (they have no fsGroup): it mounts the
    team's checkpoint claim with fsGroup = that uid, applied only on a root mismatch, and runs the image and uid
    the steps and replicas use."""
    from pipelines.jobs.pytorchjob import DEFAULT_IMAGE, FS_GROUP_CHANGE_POLICY

    docs = overlays[team]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    pod = job["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert (security["fsGroup"], security["runAsUser"], security["runAsGroup"]) == (RUN_AS_USER,) * 3
    assert security["fsGroupChangePolicy"] == FS_GROUP_CHANGE_POLICY == "OnRootMismatch"
    assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]] == [_team_config(docs)["checkpointPVC"]]
    assert pod["containers"][0]["image"] == DEFAULT_IMAGE
    assert job["spec"]["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert job["spec"]["ttlSecondsAfterFinished"] > 0  # a finished Job goes, so a later apply can run a new one


def test_yamllint_passes_on_all_yaml_we_own() -> None:
    targets = [p for p in ("manifests", "kustomize", "katib", "pipelines", ".github") if (REPO / p).exists()]
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(REPO / ".yamllint"), *targets],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _claims_and_volumes(docs: list[dict]) -> tuple[list[dict], list[dict]]:
    return ([d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == DATA_CLAIM],
            [d for d in docs if d["kind"] == "PersistentVolume"])


def test_teams_without_a_data_bucket_get_no_volume_or_claim(overlays) -> None:
    for docs in overlays.values():
        assert TeamConfig.from_configmap(_team_config(docs)).data_bucket == ""
        assert _claims_and_volumes(docs) == ([], [])


@pytest.mark.parametrize("team", ["team-vision", "team-research"])
def test_data_bucket_component_binds_the_teams_bucket_read_only(tmp_path, team: str) -> None:
    """The PersistentVolume is cluster-scoped, so it is named per team; everything in it comes from the team's
    rendered team-config and namespace."""
    docs = build(write_bucket_overlay(tmp_path, team, bucket=f"{team}-data"))
    (claim,), (volume,) = _claims_and_volumes(docs)
    assert claim["metadata"]["namespace"] == team and "namespace" not in volume["metadata"]
    assert volume["metadata"]["name"] == claim["spec"]["volumeName"] == f"{team}-data-bucket"
    assert volume["spec"]["claimRef"] == {"namespace": team, "name": DATA_CLAIM}
    assert volume["spec"]["csi"] == {"driver": "gcsfuse.csi.storage.gke.io", "volumeHandle": f"{team}-data",
                                     "readOnly": True}
    assert volume["spec"]["accessModes"] == claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert volume["spec"]["storageClassName"] == claim["spec"]["storageClassName"] != ""
    # the same uid/gid the replicas' inline mount of the bucket gets (pipelines/jobs/pytorchjob.py)
    assert {f"uid={RUN_AS_USER}", f"gid={RUN_AS_USER}", "implicit-dirs"} <= set(volume["spec"]["mountOptions"])
    # everything else in the team namespace is what the repo's overlay renders
    plain = build(REPO / "kustomize" / "overlays" / team)
    assert [d for d in docs if d["kind"] != "PersistentVolume" and d["metadata"].get("name") != DATA_CLAIM
            and d["kind"] != "ConfigMap"] == [d for d in plain if d["kind"] != "ConfigMap"]


def test_data_bucket_component_without_a_bucket_fails_the_build(tmp_path) -> None:
    overlay = write_bucket_overlay(tmp_path, bucket=None)
    result = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "data.dataBucket" in result.stderr
