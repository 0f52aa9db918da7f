"""The PyTorchJob builder: the spec's contents, its validity against the upstream CRD and restricted Pod
Security (through `arrcoc validate`'s checks), input errors, and the example kept in git."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pipelines import cli
from pipelines.jobs.pytorchjob import (
    KATIB_TRIAL_NAME,
    ManifestError,
    build_pytorchjob,
    check_manifest,
    from_manifest,
    to_manifest,
    to_yaml,
)
from pipelines.jobs.team_config import TeamConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "pipelines" / "jobs" / "examples" / "pytorchjob-tiny.yaml"
# The command that wrote EXAMPLE (docs/pytorchjob.md says how to regenerate it).
EXAMPLE_ARGV = ["pytorchjob", "render", "--name", "arrcoc-tiny", "--workers", "1",
                "--image", "ghcr.io/arrcoc/arrcoc-trainer:0.1.0",
                "--", "--steps", "20", "--batch-size", "8", "--eval-every", "10", "--eval-size", "32",
                "--checkpoint-every", "5", "--seed", "0"]

TEAM_DATA = {
    "team": "team-vision", "capacity": "spot", "gpuType": "nvidia-l4", "gpusPerReplica": "2", "cpuPerReplica": "8",
    "memoryPerReplica": "32Gi", "nodeSelector": "{}",
    "tolerations": '[{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", '
                   '"effect": "NoSchedule"}]',
    "kueueQueue": "team-vision", "checkpointBucket": "", "checkpointPVC": "checkpoints", "backoffLimit": "6",
    "priorityClassName": "arrcoc-training",
}
PVC_TEAM = TeamConfig.from_configmap(TEAM_DATA)
BUCKET_TEAM = TeamConfig.from_configmap({**TEAM_DATA, "checkpointBucket": "vision-ckpt", "checkpointPVC": ""})
LOCAL_TEAM = TeamConfig.local_default()


def replicas(manifest: dict) -> dict:
    return manifest["spec"]["pytorchReplicaSpecs"]


def pod(manifest: dict, rtype: str = "Master") -> dict:
    return replicas(manifest)[rtype]["template"]


def container(manifest: dict, rtype: str = "Master") -> dict:
    return pod(manifest, rtype)["spec"]["containers"][0]


def test_master_and_workers_share_one_template() -> None:
    m = to_manifest(build_pytorchjob("train-a", team=PVC_TEAM, workers=3, image="trainer:1.2.3",
                                     trainer_args=["--steps", "100"], run_id="run-7"))
    assert (m["apiVersion"], m["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert m["metadata"]["namespace"] == "team-vision"
    assert replicas(m)["Master"]["replicas"] == 1 and replicas(m)["Worker"]["replicas"] == 3
    assert {r["restartPolicy"] for r in replicas(m).values()} == {"ExitCode"}
    assert pod(m, "Master") == pod(m, "Worker")
    c = container(m)
    assert c["name"] == "pytorch" and c["image"] == "trainer:1.2.3"
    # the builder owns --out (the stable run directory on the checkpoint volume) and --metrics-port (the port the pod
    # declares for the team's PodMonitoring)
    assert c["args"] == ["--steps", "100", "--out", "/checkpoints/run-7", "--metrics-port", "9400"]
    assert c["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456},
                          {"name": "metrics", "containerPort": 9400}]
    assert {"mountPath": "/checkpoints", "name": "checkpoints"} in c["volumeMounts"]


def test_metrics_port_zero_leaves_out_the_exporter() -> None:
    c = container(to_manifest(build_pytorchjob("train-a", team=PVC_TEAM, metrics_port=0)))
    assert "--metrics-port" not in c["args"]
    assert [p["name"] for p in c["ports"]] == ["pytorchjob-port"]


@pytest.mark.parametrize("kwargs, message", [
    ({"metrics_port": 80}, "metrics_port=80 must be 0 (no exporter) or a port in 1025..65535 other than the "
                           "rendezvous port 23456"),
    ({"metrics_port": 23456}, "other than the rendezvous port 23456"),
    ({"trainer_args": ["--metrics-port", "9500"]}, "trainer args must not set --metrics-port"),
])
def test_the_metrics_port_belongs_to_the_builder(kwargs, message) -> None:
    with pytest.raises(ManifestError, match=re.escape(message)):
        build_pytorchjob("train-a", team=PVC_TEAM, **kwargs)


def test_resources_scheduling_and_labels_come_from_the_team() -> None:
    m = to_manifest(build_pytorchjob("train-a", team=PVC_TEAM, labels={"experiment": "e1"}))
    c, spec = container(m), pod(m)["spec"]
    expected = {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert c["resources"] == {"requests": expected, "limits": expected}
    assert spec["tolerations"] == [{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                                    "effect": "NoSchedule"}]
    assert spec["nodeSelector"] == {"cloud.google.com/gke-spot": "true",
                                    "cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert spec["priorityClassName"] == "arrcoc-training"
    assert m["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-vision"
    assert m["metadata"]["labels"]["experiment"] == "e1" and pod(m)["metadata"]["labels"]["experiment"] == "e1"
    assert m["spec"]["runPolicy"]["backoffLimit"] == 6
    assert spec["volumes"][0] == {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "checkpoints"}}


def test_bucket_checkpoints_mount_through_gcs_fuse() -> None:
    m = to_manifest(build_pytorchjob("train-a", team=BUCKET_TEAM))
    volume = pod(m)["spec"]["volumes"][0]
    assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
    assert volume["csi"]["volumeAttributes"]["bucketName"] == "vision-ckpt"
    assert pod(m)["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
    pvc_pod = pod(to_manifest(build_pytorchjob("train-a", team=PVC_TEAM)))
    assert "gke-gcsfuse/volumes" not in pvc_pod["metadata"]["annotations"]


def test_bucket_jobs_run_as_the_workload_identity_account_with_sidecar_limits(schemas) -> None:
    """In a Profile's namespace whose quota limits limits.*, `arrcoc validate` admits the builder's bucket job;
    the same job with the builder's account or sidecar limits taken away is refused, so the check can fail."""
    import copy

    from pipelines.validation.findings import Doc
    from pipelines.validation.run import check

    namespace = BUCKET_TEAM.team
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "q", "namespace": namespace},
             "spec": {"hard": {"limits.cpu": "64", "limits.memory": "512Gi"}}}
    profile = {"apiVersion": "kubeflow.org/v1", "kind": "Profile", "metadata": {"name": namespace},
               "spec": {"owner": {"kind": "User", "name": "owner@example.com"}}}
    job = to_manifest(build_pytorchjob("train-a", team=BUCKET_TEAM, workers=1, active_deadline_seconds=3600))
    for rtype in ("Master", "Worker"):
        assert pod(job, rtype)["spec"]["serviceAccountName"] == "default-editor"
        annotations = pod(job, rtype)["metadata"]["annotations"]
        for key in ("gke-gcsfuse/cpu-limit", "gke-gcsfuse/memory-limit", "gke-gcsfuse/ephemeral-storage-limit"):
            assert annotations[key]

    def gcsfuse_findings(manifest: dict) -> list[str]:
        docs = [Doc("rendered", quota), Doc("rendered", profile), Doc("rendered", manifest)]
        return [str(f) for f in check(docs, schemas) if "gcsfuse" in str(f) or "serviceAccountName" in str(f)]

    assert gcsfuse_findings(job) == []
    stripped = copy.deepcopy(job)
    del pod(stripped)["spec"]["serviceAccountName"]
    del pod(stripped)["metadata"]["annotations"]["gke-gcsfuse/memory-limit"]
    found = gcsfuse_findings(stripped)
    assert any("serviceAccountName" in f for f in found) and any("gke-gcsfuse/memory-limit" in f for f in found)
    # Without a bucket there is no sidecar: the pods keep the namespace's default account and no limits.
    pvc_pod = pod(to_manifest(build_pytorchjob("train-a", team=PVC_TEAM)))
    assert "serviceAccountName" not in pvc_pod["spec"]
    assert not [k for k in pvc_pod["metadata"]["annotations"] if k.startswith("gke-gcsfuse/")]


def test_data_bucket_is_mounted_read_only_at_the_same_path_in_every_replica() -> None:
    team = TeamConfig.from_configmap({**TEAM_DATA, "dataBucket": "vision-models"})
    job = to_manifest(build_pytorchjob("train-a", team=team, workers=2))
    for rtype in ("Master", "Worker"):
        volumes = {v["name"]: v for v in pod(job, rtype)["spec"]["volumes"]}
        assert volumes["data"]["csi"]["readOnly"] is True
        assert volumes["data"]["csi"]["volumeAttributes"]["bucketName"] == "vision-models"
        assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "checkpoints"
        mounts = {m["name"]: m for m in container(job, rtype)["volumeMounts"]}
        assert mounts["data"] == {"name": "data", "mountPath": "/data", "readOnly": True}
        assert pod(job, rtype)["spec"]["serviceAccountName"] == "default-editor"
        assert pod(job, rtype)["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
    with pytest.raises(ManifestError, match="dataBucket"):
        build_pytorchjob("train-a", team=team, checkpoint_mount="/data")


def test_local_team_uses_an_empty_dir_and_no_gpu() -> None:
    m = to_manifest(build_pytorchjob("train-a", team=LOCAL_TEAM, workers=0))
    assert "Worker" not in replicas(m)
    assert pod(m)["spec"]["volumes"][0] == {"name": "checkpoints", "emptyDir": {}}
    assert "nvidia.com/gpu" not in container(m)["resources"]["limits"]
    assert "kueue.x-k8s.io/queue-name" not in m["metadata"]["labels"]


def test_pod_is_restricted_istio_free_and_has_shared_memory() -> None:
    m = to_manifest(build_pytorchjob("train-a", team=PVC_TEAM))
    spec, c = pod(m)["spec"], container(m)
    assert pod(m)["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    # the kubelet re-chowns the checkpoint share only when its root lacks the group, not at every replica start
    assert (spec["securityContext"]["fsGroup"], spec["securityContext"]["fsGroupChangePolicy"]) == (
        1000, "OnRootMismatch")
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                    "readOnlyRootFilesystem": True}
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    assert {"mountPath": "/dev/shm", "name": "dshm"} in c["volumeMounts"]
    # the read-only root's one writable place: the image's HOME and caches (trainer/Dockerfile ENV) are under /tmp
    scratch = next(v for v in spec["volumes"] if v["name"] == "tmp")
    assert "medium" not in scratch["emptyDir"] and scratch["emptyDir"]["sizeLimit"]
    assert {"mountPath": "/tmp", "name": "tmp"} in c["volumeMounts"]


@pytest.mark.parametrize("nproc, command", [
    ("1", ["python", "-m", "trainer"]),
    ("2", ["python", "-m", "trainer.torchrun", "-m", "trainer"]),
    ("auto", ["python", "-m", "trainer.torchrun", "-m", "trainer"]),
])
def test_several_processes_per_pod_go_through_torchrun(nproc: str, command: list[str]) -> None:
    m = to_manifest(build_pytorchjob("train-a", team=PVC_TEAM, nproc_per_node=nproc))
    assert m["spec"]["nprocPerNode"] == nproc
    assert container(m)["command"] == command


def test_nproc_defaults_to_the_team_gpus() -> None:
    assert to_manifest(build_pytorchjob("a", team=PVC_TEAM))["spec"]["nprocPerNode"] == "2"
    assert to_manifest(build_pytorchjob("a", team=LOCAL_TEAM))["spec"]["nprocPerNode"] == "1"


def test_katib_trial_name_is_a_valid_run_id() -> None:
    m = to_manifest(build_pytorchjob("a", team=PVC_TEAM, run_id=KATIB_TRIAL_NAME))
    args = container(m)["args"]
    assert args[args.index("--out") + 1] == "/checkpoints/${trialParameters.trialName}"


@pytest.mark.parametrize("kwargs, fragment", [
    ({"name": "Train"}, "DNS-1035"),
    ({"name": "1train"}, "DNS-1035"),
    ({"name": "a" * 60, "workers": 2}, "63"),
    ({"namespace": "Team"}, "namespace"),
    ({"image": "trainer"}, "tag or a digest"),
    ({"image": "registry:5000/trainer"}, "tag or a digest"),
    ({"image": "trainer:latest"}, "latest"),
    ({"image": "trainer@sha256:abc"}, "digest"),
    ({"workers": -1}, "workers"),
    ({"nproc_per_node": "many"}, "nproc_per_node"),
    ({"nproc_per_node": "4"}, "gpusPerReplica"),
    ({"trainer_args": ["--out", "/tmp/x"]}, "--out"),
    ({"trainer_args": ["--out=/tmp/x"]}, "--out"),
    ({"run_id": "a/b"}, "run id"),
    ({"clean_pod_policy": "Sometimes"}, "clean_pod_policy"),
    ({"labels": {"bad key!": "x"}}, "label"),
    ({"checkpoint_mount": "relative"}, "checkpoint mount"),
])
def test_bad_inputs_raise_one_line(kwargs: dict, fragment: str) -> None:
    args = {"name": "train-a", "team": PVC_TEAM, **kwargs}
    with pytest.raises(ManifestError) as info:
        build_pytorchjob(**args)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_pinned_images_are_accepted() -> None:
    digest = "trainer@sha256:" + "0" * 64
    assert container(to_manifest(build_pytorchjob("a", team=PVC_TEAM, image=digest)))["image"] == digest
    registry_image = "reg:5000/trainer:1"
    assert container(to_manifest(build_pytorchjob("a", team=PVC_TEAM, image=registry_image)))["image"] == registry_image


def test_manifest_round_trips_through_the_training_client_model() -> None:
    m = to_manifest(build_pytorchjob("train-a", team=BUCKET_TEAM, workers=2))
    assert to_manifest(from_manifest(m)) == m
    assert yaml.safe_load(to_yaml(m)) == m


@pytest.fixture(scope="module")
def schemas():
    from pipelines.validation.run import crd_dir
    from pipelines.validation.schemas import CrdDirError, SchemaSet

    try:
        return SchemaSet(crd_dir())  # seconds to load: once per module
    except CrdDirError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("team", [LOCAL_TEAM, PVC_TEAM, BUCKET_TEAM], ids=["local", "pvc", "bucket"])
def test_rendered_jobs_pass_arrcoc_validate(team: TeamConfig, schemas) -> None:
    """The upstream CRD schema (strict), restricted Pod Security and the webhook rules, as `arrcoc validate`."""
    from pipelines.validation.findings import Doc
    from pipelines.validation.run import check

    manifest = to_manifest(build_pytorchjob("train-a", team=team, workers=2, active_deadline_seconds=3600))
    assert [str(f) for f in check([Doc("rendered", manifest)], schemas)] == []


@pytest.mark.parametrize("path, value, fragment", [
    (["kind"], "TFJob", "apiVersion/kind"),
    (["spec", "pytorchReplicaSpecs", "Chief"], {"replicas": 1}, "Chief"),
    (["spec", "pytorchReplicaSpecs", "Master", "replicas"], 2, "Master replicas must be 1"),
    (["spec", "pytorchReplicaSpecs", "Worker", "restartPolicy"], "Sometimes", "restartPolicy"),
    (["spec", "pytorchReplicaSpecs", "Master", "template", "spec", "containers", 0, "name"], "main", "pytorch"),
    (["spec", "runPolicy", "cleanPodPolicy"], "Some", "cleanPodPolicy"),
    (["spec", "runPolicy", "backoffLimit"], -1, "backoffLimit"),
    (["spec", "nprocPerNode"], "0", "nprocPerNode"),
    # training-operator v1.9.2 validatePyTorchReplicaSpecs: an unset Master count is refused, a Worker's must be >= 1
    (["spec", "pytorchReplicaSpecs", "Master", "replicas"], None, "Master replicas must be 1, got None"),
    (["spec", "pytorchReplicaSpecs", "Worker", "replicas"], 0, "Worker replicas must be an integer >= 1"),
    # ValidateReplicaSpecs: every container needs an image; validateSpec: elastic jobs need Workers
    (["spec", "pytorchReplicaSpecs", "Master", "template", "spec", "containers", 0, "image"], "", "needs an image"),
    (["spec", "pytorchReplicaSpecs", "Worker"], None, "Worker"),
    (["spec", "runPolicy", "managedBy"], "someone/else", "managedBy"),
])
def test_check_manifest_enforces_the_webhook_rules(path: list, value: object, fragment: str) -> None:
    manifest = to_manifest(build_pytorchjob("train-a", team=LOCAL_TEAM, workers=1))
    check_manifest(manifest)
    target = manifest
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    if path[-1] == "Worker" and value is None:  # a job whose Workers were dropped, but that asks for elasticity
        del target["Worker"]
        manifest["spec"]["elasticPolicy"] = {"minReplicas": 1, "maxReplicas": 2}
    with pytest.raises(ManifestError, match=fragment):
        check_manifest(manifest, source="job.yaml")


@pytest.mark.parametrize("path, value", [
    (["spec", "pytorchReplicaSpecs", "Master", "replicas"], None),
    (["spec", "pytorchReplicaSpecs", "Worker", "replicas"], 0),
    (["spec", "pytorchReplicaSpecs", "Master", "template", "spec", "containers", 0, "image"], "trainer:latest"),
])
def test_the_builder_check_manifest_and_arrcoc_validate_agree(path: list, value: object, schemas) -> None:
    """One rule table (pipelines/jobs/rules.py): what the runtime refuses, `arrcoc validate` reports, at its path."""
    from pipelines.validation.findings import Doc
    from pipelines.validation.run import check

    manifest = to_manifest(build_pytorchjob("train-a", team=LOCAL_TEAM, workers=1))
    target = manifest
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ManifestError) as refused:
        check_manifest(manifest, source="job.yaml") if value != "trainer:latest" else build_pytorchjob(
            "train-a", team=LOCAL_TEAM, image=value)
    findings = [str(f) for f in check([Doc("job.yaml", manifest)], schemas)]
    reason = str(refused.value).rsplit(": ", 1)[-1]
    assert any(reason in f for f in findings), (str(refused.value), findings)


def test_render_cli_matches_the_example_in_git(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(EXAMPLE_ARGV) == 0
    rendered = capsys.readouterr().out
    assert rendered == EXAMPLE.read_text(), (
        "pipelines/jobs/examples/pytorchjob-tiny.yaml is stale: regenerate it with the command in docs/pytorchjob.md")


def test_render_cli_reads_a_team_config_file_and_writes_atomically(tmp_path: Path) -> None:
    team_file = tmp_path / "team-config.yaml"
    team_file.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                                         "metadata": {"name": "team-config"}, "data": TEAM_DATA}))
    out = tmp_path / "out" / "job.yaml"
    assert cli.main(["pytorchjob", "render", "--team-config", str(team_file), "--name", "vision-1", "--workers", "2",
                     "--image", "trainer:2", "-o", str(out), "--", "--steps", "7"]) == 0
    m = yaml.safe_load(out.read_text())
    assert m["metadata"]["namespace"] == "team-vision" and replicas(m)["Worker"]["replicas"] == 2
    assert container(m)["args"] == ["--steps", "7", "--out", "/checkpoints/vision-1", "--metrics-port", "9400"]
    assert [p.name for p in out.parent.iterdir()] == ["job.yaml"]  # no temp file left behind


def test_render_cli_bad_input_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["pytorchjob", "render", "--image", "trainer:latest"]) == 2
    err = capsys.readouterr().err.strip()
    assert "latest" in err and "\n" not in err
    out = tmp_path / "job.yaml"
    assert cli.main(["pytorchjob", "render", "--name", "Bad_Name", "-o", str(out)]) == 2
    assert not out.exists()
