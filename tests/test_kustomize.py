"""Kustomize layout: overlays differ as the teams do, components stay self-contained and agree
with themselves, and all YAML we own passes yamllint. Rendering uses `kubectl kustomize`; no cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.jobs.team_config import TeamConfig

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
    quotas = {t: next(d for d in docs if d["kind"] == "ResourceQuota")["spec"]["hard"] for t, docs in overlays.items()}
    gpus = "requests.nvidia.com/gpu"
    assert int(quotas["team-vision"][gpus]) < int(quotas["team-research"][gpus])
    for team, docs in overlays.items():
        assert _team_config(docs)["team"] == team
        assert all(isinstance(v, str) for v in _team_config(docs).values())
        binding = next(d for d in docs if d["kind"] == "RoleBinding")
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "default-editor", "namespace": team}]
        assert not any(d["kind"] == "CapacityScheduling" for d in docs), "local-config must not be emitted"


@pytest.mark.parametrize("capacity", ["spot", "on-demand"])
def test_component_strings_match_its_pod_values(capacity: str) -> None:
    """team-config carries the tolerations as a JSON string; pod templates get them from scheduling.yaml."""
    scheduling = yaml.safe_load((COMPONENTS / capacity / "scheduling.yaml").read_text())["spec"]
    patch = yaml.safe_load((COMPONENTS / capacity / "team-config.capacity.yaml").read_text())["data"]
    assert patch["capacity"] == capacity
    assert json.loads(patch["tolerations"]) == scheduling["tolerations"]
    assert "nodeSelector" not in patch  # derived from capacity, never copied


JOB = """\
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata:
  name: {name}
  labels: {labels}
spec:
  pytorchReplicaSpecs:
    Master:
      replicas: 1
      template:
        spec:
          nodeSelector: {{cloud.google.com/gke-accelerator: nvidia-l4}}
          containers: [{{name: pytorch, image: "x:1"}}]
{worker}"""
WORKER = """\
    Worker:
      replicas: 2
      template:
        spec:
          containers: [{name: pytorch, image: "x:1"}]
"""


@pytest.mark.parametrize("capacity", ["spot", "on-demand"])
def test_component_schedules_jobs_without_team_config(tmp_path: Path, capacity: str) -> None:
    """The Katib overlays use the components without team-config: patches with no target are no-ops,
    Master and Worker get the tolerations, and a master-only job gets no invented Worker."""
    (tmp_path / "both.yaml").write_text(JOB.format(name="both", labels="{}", worker=WORKER))
    (tmp_path / "solo.yaml").write_text(JOB.format(name="solo", labels="{arrcoc.io/replicas: master-only}", worker=""))
    (tmp_path / "kustomization.yaml").write_text(
        # kustomize refuses absolute component paths
        f"resources: [both.yaml, solo.yaml]\ncomponents: [{os.path.relpath(COMPONENTS / capacity, tmp_path)}]\n"
    )
    jobs = {d["metadata"]["name"]: d["spec"]["pytorchReplicaSpecs"] for d in build(tmp_path)}
    expected = yaml.safe_load((COMPONENTS / capacity / "scheduling.yaml").read_text())["spec"]
    assert set(jobs["solo"]) == {"Master"}
    for replica in (jobs["both"]["Master"], jobs["both"]["Worker"], jobs["solo"]["Master"]):
        pod = replica["template"]["spec"]
        assert pod["tolerations"] == expected["tolerations"]
        assert pod.get("affinity") == expected.get("affinity")
    assert jobs["both"]["Master"]["template"]["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-l4"}


def test_yamllint_passes_on_all_yaml_we_own() -> None:
    targets = [p for p in ("manifests", "kustomize", "katib", "pipelines", ".github") if (REPO / p).exists()]
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(REPO / ".yamllint"), *targets],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
