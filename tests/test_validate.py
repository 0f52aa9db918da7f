"""`arrcoc validate`: the real overlays pass, and broken copies are each caught with the right field path.

No cluster exists here: objects are rendered with `kubectl kustomize` and checked offline against
the upstream schemas in $ARRCOC_CRD_DIR (tests/conftest.py) or .arrcoc/crds.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from pipelines import cli
from pipelines.validation.findings import Doc
from pipelines.validation.loading import Loaded, pin_problem, render
from pipelines.validation.run import REPO, check, crd_dir, validate
from pipelines.validation.schemas import SchemaSet, strict
from tests.bucket_overlay import write_bucket_overlay

FIXTURES = Path(__file__).parent / "fixtures" / "validate"
# the pipeline variant for teams with a data bucket: its prepare-data and evaluate mount it
COMPILED = REPO / "pipelines" / "kfp_pipeline" / "compiled" / "arrcoc_train_data_bucket.yaml"


@pytest.fixture(scope="session")
def schemas() -> SchemaSet:
    return SchemaSet(crd_dir())


@pytest.fixture(scope="session")
def default_run(schemas: SchemaSet) -> tuple[Loaded, list]:
    return validate([], schemas)


@pytest.fixture(scope="session")
def team_vision() -> list[Doc]:
    loaded = Loaded()
    render(REPO / "kustomize" / "overlays" / "team-vision", "team-vision", loaded)
    assert not loaded.findings
    return loaded.docs


def _fixture_docs() -> list[Doc]:
    return [Doc(name, yaml.safe_load((FIXTURES / name).read_text())) for name in ("pytorchjob.yaml", "experiment.yaml")]


def test_everything_we_apply_passes(default_run: tuple[Loaded, list]) -> None:
    loaded, findings = default_run
    assert [str(f) for f in findings] == []
    kinds = {d.kind for d in loaded.docs}
    assert {"Namespace", "Profile", "ResourceQuota", "ClusterQueue", "PriorityClass", "ClusterRole"} <= kinds


def test_fixtures_pass_next_to_their_team(schemas: SchemaSet, team_vision: list[Doc]) -> None:
    findings = check(team_vision + _fixture_docs(), schemas)
    assert [str(f) for f in findings if not f.warning] == []
    # The fixture's lr spans two decades: fine for a learning rate, but Katib's skopt draws it log-uniformly.
    (warning,) = [str(f) for f in findings]
    assert warning.startswith("warning: ") and "spec.parameters[0].feasibleSpace: lr:" in warning
    assert "log-uniform prior" in warning and warning.count("\n") == 0


def _obj(docs: list[Doc], kind: str, name: str | None = None) -> dict:
    return next(d.obj for d in docs if d.kind == kind and (name is None or d.name == name))


def _trial_pod(docs: list[Doc]) -> dict:
    trial = _obj(docs, "Experiment")["spec"]["trialTemplate"]["trialSpec"]
    return trial["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]


def _job_pod(docs: list[Doc], rtype: str = "Master") -> dict:
    return _obj(docs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]


def _drop(kind: str) -> Callable[[list[Doc]], list[Doc]]:
    return lambda docs: [d for d in docs if d.kind != kind]


def _edit(fn: Callable[[list[Doc]], None]) -> Callable[[list[Doc]], list[Doc]]:
    def apply(docs: list[Doc]) -> list[Doc]:
        fn(docs)
        return docs

    return apply


def _team_config(docs: list[Doc]) -> dict:
    return _obj(docs, "ConfigMap", "team-config")["data"]


def _unalias_worker(docs: list[Doc]) -> None:
    # the fixture shares one pod template between Master and Worker through a YAML anchor
    spec = _obj(docs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]
    spec["Worker"]["template"] = copy.deepcopy(spec["Worker"]["template"])


def _drop_worker_spot_toleration(docs: list[Doc]) -> None:
    _unalias_worker(docs)
    pod = _job_pod(docs, "Worker")
    pod["tolerations"] = [t for t in pod["tolerations"] if t["key"] != "cloud.google.com/gke-spot"]


# (case, breakage, expected object, expected field path, words of the message)
CASES = [
    ("typo'd core field", _edit(lambda d: _obj(d, "ResourceQuota")["spec"].update(hardd={})),
     "ResourceQuota/team-vision/team-quota", "spec", "hardd"),
    ("typo'd CR field", _edit(lambda d: _obj(d, "Experiment")["spec"].update(paralelTrialCount=3)),
     "Experiment/team-vision/sweep", "spec", "paralelTrialCount"),
    ("typo'd trial template field", _edit(lambda d: _trial_pod(d).update(tolerationz=[])),
     "Experiment/team-vision/sweep", "spec.trialTemplate.trialSpec.spec.pytorchReplicaSpecs.Master.template.spec",
     "tolerationz"),
    ("wrong Katib enum", _edit(lambda d: _obj(d, "Experiment")["spec"]["objective"].update(type="maximise")),
     "Experiment/team-vision/sweep", "spec.objective.type", "maximise"),
    ("wrong restartPolicy",
     _edit(lambda d: _obj(d, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Master"].update(restartPolicy="Sometimes")),
     "PyTorchJob/team-vision/arrcoc-train-1", "spec.pytorchReplicaSpecs.Master.restartPolicy", "Sometimes"),
    ("wrong cleanPodPolicy", _edit(lambda d: _obj(d, "PyTorchJob")["spec"]["runPolicy"].update(cleanPodPolicy="Some")),
     "PyTorchJob/team-vision/arrcoc-train-1", "spec.runPolicy.cleanPodPolicy", "All, Running, None"),
    ("Master with 2 replicas",
     _edit(lambda d: _obj(d, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2)),
     "PyTorchJob/team-vision/arrcoc-train-1", "spec.pytorchReplicaSpecs.Master.replicas", "must be 1"),
    ("Master with 2 replicas in a trial",
     _edit(lambda d: _obj(d, "Experiment")["spec"]["trialTemplate"]["trialSpec"]["spec"]["pytorchReplicaSpecs"][
         "Master"].update(replicas=2)),
     "Experiment/team-vision/sweep", "spec.trialTemplate.trialSpec.spec.pytorchReplicaSpecs.Master.replicas",
     "must be 1"),
    ("unknown replica type", _edit(lambda d: _obj(d, "PyTorchJob")["spec"]["pytorchReplicaSpecs"].update(Chief={})),
     "PyTorchJob/team-vision/arrcoc-train-1", "spec.pytorchReplicaSpecs.Chief", "Master, Worker"),
    ("no container named pytorch", _edit(lambda d: _job_pod(d)["containers"][0].update(name="train")),
     "PyTorchJob/team-vision/arrcoc-train-1", "spec.pytorchReplicaSpecs.Master.template.spec.containers", "'pytorch'"),
    ("job name not DNS-1035", _edit(lambda d: _obj(d, "PyTorchJob")["metadata"].update(name="1st.job")),
     "PyTorchJob/team-vision/1st.job", "metadata.name", "DNS-1035"),
    ("privileged container", _edit(lambda d: _job_pod(d)["containers"][0]["securityContext"].update(privileged=True)),
     "PyTorchJob/team-vision/arrcoc-train-1",
     "spec.pytorchReplicaSpecs.Master.template.spec.containers[0].securityContext.privileged", "restricted"),
    ("privileged trial container",
     _edit(lambda d: _trial_pod(d)["containers"][0]["securityContext"].update(privileged=True)),
     "Experiment/team-vision/sweep",
     "spec.trialTemplate.trialSpec.spec.pytorchReplicaSpecs.Master.template.spec.containers[0].securityContext.privileged",
     "restricted"),
    ("root trial pod", _edit(lambda d: _trial_pod(d)["securityContext"].update(runAsUser=0)),
     "Experiment/team-vision/sweep",
     "spec.trialTemplate.trialSpec.spec.pytorchReplicaSpecs.Master.template.spec.securityContext.runAsUser",
     "must not be 0"),
    ("hostPath volume", _edit(lambda d: _job_pod(d)["volumes"].append({"name": "h", "hostPath": {"path": "/"}})),
     "PyTorchJob/team-vision/arrcoc-train-1", "spec.pytorchReplicaSpecs.Master.template.spec.volumes[1].hostPath",
     "not allowed"),
    ("missing quota", _drop("ResourceQuota"),
     "Namespace//team-vision", "(namespace)", "no ResourceQuota"),
    ("missing network policy", _drop("NetworkPolicy"),
     "Namespace//team-vision", "(namespace)", "no NetworkPolicy"),
    (":latest image", _edit(lambda d: _job_pod(d)["containers"][0].update(image="ghcr.io/example/trainer:latest")),
     "PyTorchJob/team-vision/arrcoc-train-1", "spec.pytorchReplicaSpecs.Master.template.spec.containers[0].image",
     ":latest"),
    ("untagged trial image", _edit(lambda d: _trial_pod(d)["containers"][0].update(image="ghcr.io/example/trainer")),
     "Experiment/team-vision/sweep",
     "spec.trialTemplate.trialSpec.spec.pytorchReplicaSpecs.Master.template.spec.containers[0].image", "no tag"),
    ("missing limits", _edit(lambda d: _job_pod(d)["containers"][0]["resources"].pop("limits")),
     "PyTorchJob/team-vision/arrcoc-train-1",
     "spec.pytorchReplicaSpecs.Master.template.spec.containers[0].resources.limits", "cpu and memory"),
    ("missing toleration", _edit(_drop_worker_spot_toleration),
     "PyTorchJob/team-vision/arrcoc-train-1", "spec.pytorchReplicaSpecs.Worker.template.spec.tolerations",
     "cloud.google.com/gke-spot"),
    ("wrong team-config capacity", _edit(lambda d: _team_config(d).update(capacity="preemptible")),
     "ConfigMap/team-vision/team-config", "data.capacity", "spot, on-demand"),
    ("team-config nodeSelector off gpuType",
     _edit(lambda d: _team_config(d).update(nodeSelector='{"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}')),
     "ConfigMap/team-vision/team-config", "data.nodeSelector", "contradicts gpuType"),
    ("no checkpoint PVC for the pipeline", _drop("PersistentVolumeClaim"),
     "ConfigMap/team-vision/team-config", "data.checkpointPVC", "stage data"),
    ("namespace without Kubeflow's profile label",
     _edit(lambda d: _obj(d, "Namespace")["metadata"]["labels"].update({"app.kubernetes.io/part-of": "arrcoc"})),
     "Namespace//team-vision", 'metadata.labels["app.kubernetes.io/part-of"]', "kubeflow-profile"),
    ("no egress to the GKE metadata server", lambda docs: [d for d in docs if d.name != "allow-gke-metadata-server"],
     "Namespace//team-vision", "(NetworkPolicy egress)", "169.254.169.254:80"),
    ("KFP steps without egress to the GKE metadata server",
     _edit(lambda d: _obj(d, "NetworkPolicy", "allow-gke-metadata-server")["spec"].update(podSelector={
         "matchExpressions": [{"key": "training.kubeflow.org/job-name", "operator": "Exists"}]})),
     "Namespace//team-vision", "(NetworkPolicy egress)", "kfp-step pod -> GKE metadata server 169.254.169.254:80"),
    ("no egress to Kubeflow", lambda docs: [d for d in docs if d.name != "allow-kubeflow-and-istio"],
     "Namespace//team-vision", "(NetworkPolicy egress)", "kubeflow/ml-pipeline:8887"),
    ("GCS FUSE replica without sidecar limits",
     _edit(lambda d: _obj(d, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Master"]["template"].setdefault(
         "metadata", {}).setdefault("annotations", {}).update({"gke-gcsfuse/volumes": "true"})),
     "PyTorchJob/team-vision/arrcoc-train-1",
     'spec.pytorchReplicaSpecs.Master.template.metadata.annotations["gke-gcsfuse/cpu-limit"]',
     "limits.*"),
    ("GCS FUSE replica running as default",
     _edit(lambda d: _obj(d, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Master"]["template"].setdefault(
         "metadata", {}).setdefault("annotations", {}).update({"gke-gcsfuse/volumes": "true"})),
     "PyTorchJob/team-vision/arrcoc-train-1", "spec.pytorchReplicaSpecs.Master.template.spec.serviceAccountName",
     "Workload Identity"),
    ("sweep larger than the quota", _edit(lambda d: _obj(d, "Experiment")["spec"].update(parallelTrialCount=13)),
     "Experiment/team-vision/sweep", "spec.parallelTrialCount", "at most 11 trials fit at once"),
    # 12 trials of 2 CPU fill 24 CPU exactly, but each primary pod also gets Katib's metrics collector (50m) and
    # the Experiment a suggestion pod (50m): katib-config's defaults, counted too
    ("sweep that fits only without Katib's own pods",
     _edit(lambda d: _obj(d, "Experiment")["spec"].update(parallelTrialCount=12)),
     "Experiment/team-vision/sweep", "spec.parallelTrialCount", "requests.cpu 24.65 > 24"),
    ("job larger than the quota",
     _edit(lambda d: _obj(d, "ResourceQuota")["spec"]["hard"].update({"requests.cpu": "3"})),
     "PyTorchJob/team-vision/arrcoc-train-1", "spec.pytorchReplicaSpecs", "requests.cpu"),
    ("cluster-scoped Profile with a namespace",
     _edit(lambda d: _obj(d, "Profile")["metadata"].update(namespace="team-vision")),
     "Profile/team-vision/team-vision", "metadata.namespace", "cluster-scoped"),
    ("Namespace owner differs from Profile",
     _edit(lambda d: _obj(d, "Namespace")["metadata"]["annotations"].update(owner="x@example.com")),
     "Namespace//team-vision", 'metadata.annotations.owner', "vision-lead@example.com"),
    ("double from 0 under bayesianoptimization",
     _edit(lambda d: _obj(d, "Experiment")["spec"]["parameters"][0]["feasibleSpace"].update(min="0")),
     "Experiment/team-vision/sweep", "spec.parameters[0].feasibleSpace.min", "log-uniform"),
    ("fsGroup on the checkpoint claim re-chowned at every start",
     _edit(lambda d: _job_pod(d)["securityContext"].update(fsGroup=1000)),
     "PyTorchJob/team-vision/arrcoc-train-1", "spec.pytorchReplicaSpecs.Master.template.spec.securityContext."
     "fsGroupChangePolicy", "OnRootMismatch"),
    ("ownership Job without OnRootMismatch",
     _edit(lambda d: _obj(d, "Job", "checkpoints-owner")["spec"]["template"]["spec"]["securityContext"].pop(
         "fsGroupChangePolicy")),
     "Job/team-vision/checkpoints-owner", "spec.template.spec.securityContext.fsGroupChangePolicy", "every start"),
    ("RoleBinding to an account nobody creates",
     _edit(lambda d: _obj(d, "RoleBinding", "arrcoc-pipelines-ci")["subjects"][0].update(name="github-ci")),
     "RoleBinding/team-vision/arrcoc-pipelines-ci", "subjects[0]", "team-vision/github-ci"),
    ("undeclared trial parameter",
     _edit(lambda d: _trial_pod(d)["containers"][0]["command"].append("${trialParameters.momentum}")),
     "Experiment/team-vision/sweep", "spec.trialTemplate.trialSpec", "momentum"),
]


@pytest.mark.parametrize(("case", "breakage", "obj", "path", "words"), CASES, ids=[c[0] for c in CASES])
def test_broken_copy_is_caught(schemas, team_vision, case, breakage, obj, path, words) -> None:
    docs = breakage(copy.deepcopy(team_vision + _fixture_docs()))
    findings = check(docs, schemas)
    matching = [f for f in findings
                if f"{f.kind}/{f.namespace}/{f.name}" == obj and f.path == path and words in f.message]
    assert matching, f"{case}: expected {obj} {path} ~{words!r}, got: " + "; ".join(map(str, findings))


def test_trial_placeholders_are_substituted_before_the_schema(schemas, team_vision) -> None:
    """An int placeholder standing alone stays a string, as in Katib: the PyTorchJob schema rejects it."""
    docs = copy.deepcopy(team_vision + _fixture_docs())
    experiment = _obj(docs, "Experiment")
    experiment["spec"]["trialTemplate"]["trialParameters"].append({"name": "workers", "reference": "workers"})
    master = experiment["spec"]["trialTemplate"]["trialSpec"]["spec"]["pytorchReplicaSpecs"]["Master"]
    master["replicas"] = "${trialParameters.workers}"
    findings = [f for f in check(docs, schemas) if f.kind == "Experiment"]
    assert any(f.path.endswith("pytorchReplicaSpecs.Master.replicas") and "'1' is not of type 'integer'" in f.message
               for f in findings), findings


def test_kueue_config_must_enable_pytorchjob(schemas, default_run) -> None:
    docs = copy.deepcopy(default_run[0].docs)
    config = _obj(docs, "ConfigMap", "kueue-manager-config")
    key = "controller_manager_config.yaml"
    config["data"][key] = config["data"][key].replace("- kubeflow.org/pytorchjob", "")
    findings = check(docs, schemas)
    assert [f.path for f in findings if "kubeflow.org/pytorchjob" in f.message] == [
        'data["controller_manager_config.yaml"]']


def test_kueue_must_not_borrow_past_the_namespace_quota(schemas, default_run) -> None:
    docs = copy.deepcopy(default_run[0].docs)
    queue = _obj(docs, "ClusterQueue", "team-vision")
    for flavor in queue["spec"]["resourceGroups"][0]["flavors"]:
        for resource in flavor["resources"]:
            resource.pop("borrowingLimit")
    findings = [f for f in check(docs, schemas) if f.kind == "ClusterQueue"]
    assert findings and all("borrowing from cohort arrcoc is unbounded" in f.message for f in findings), findings
    assert {f.name for f in findings} == {"team-vision"}


@pytest.mark.parametrize(
    ("entry", "pinned"),
    [
        ("https://github.com/kubeflow/manifests/applications/katib/upstream/installs/katib-with-kubeflow?ref=26.03", True),  # noqa: E501  (a URL)
        ("github.com/kubeflow/manifests/common/cert-manager/base?ref=v1.10.0", True),
        ("https://github.com/kubeflow/manifests/common/x?ref=" + "a" * 40, True),
        ("https://github.com/kubernetes-sigs/kueue/releases/download/v0.19.2/manifests.yaml", True),
        ("https://github.com/kubeflow/manifests/common/x?ref=master", False),
        ("https://github.com/kubeflow/manifests/common/x?ref=latest", False),
        ("https://github.com/kubeflow/manifests/common/x", False),
        ("https://github.com/kubernetes-sigs/kueue/releases/latest/download/manifests.yaml", False),
    ],
)
def test_remote_refs_must_be_pinned(entry: str, pinned: bool) -> None:
    assert (pin_problem(entry) is None) is pinned


def test_strict_rejects_unknown_fields_but_keeps_preserved_objects() -> None:
    schema = strict({"type": "object", "properties": {
        "a": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"b": {}}}}})
    assert schema["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["a"]


def test_cli_prints_file_object_and_path_and_exits_1(tmp_path: Path, capsys) -> None:
    job = yaml.safe_load((FIXTURES / "pytorchjob.yaml").read_text())
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    broken = tmp_path / "job.yaml"
    broken.write_text(yaml.safe_dump(job))
    assert cli.main(["validate", str(broken)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert (f"{broken}: PyTorchJob/team-vision/arrcoc-train-1: spec.pytorchReplicaSpecs.Master.replicas: "
            "Master replicas must be 1, got 2") in out


def test_cli_ok_line_and_user_errors(capsys, monkeypatch, tmp_path: Path) -> None:
    assert cli.main(["validate", str(FIXTURES / "pytorchjob.yaml")]) == 0
    assert capsys.readouterr().out.startswith("arrcoc validate: OK: 1 target(s), 1 object(s)")
    assert cli.main(["validate", str(tmp_path / "nowhere")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    monkeypatch.setenv("ARRCOC_CRD_DIR", str(tmp_path / "no-crds"))
    assert cli.main(["validate", str(FIXTURES)]) == 2
    assert "make crds" in capsys.readouterr().err


def test_broken_kustomization_is_reported_on_its_directory(tmp_path: Path, schemas) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    loaded, findings = validate([tmp_path], schemas)
    assert len(findings) == 1 and findings[0].path == "(build)" and "kubectl kustomize failed" in findings[0].message


def test_crd_download_check_catches_a_changed_file(tmp_path: Path) -> None:
    """Only the checksum part runs here: there is no network."""
    from pipelines.validation import crds

    sums = crds.expected_sums()
    assert {f.local for f in crds.FILES} == set(sums)  # every pinned file has its digest, and no digest is orphaned
    assert crds.verify(crd_dir()) == []
    name = "katib-v0.19.0/swagger.json"
    copy_dir = tmp_path / "crds"
    (copy_dir / "katib-v0.19.0").mkdir(parents=True)
    data = json.loads((crd_dir() / name).read_text())
    data["info"] = {"title": "tampered"}
    (copy_dir / name).write_text(json.dumps(data))
    cohorts = "kueue-v0.19.2/kueue.x-k8s.io_cohorts.yaml"
    problems = crds.verify(copy_dir, {name: sums[name], cohorts: sums[cohorts]})
    assert len(problems) == 2
    assert "does not match" in problems[0] and problems[1].endswith("missing")


@pytest.fixture(scope="session")
def bucket_team(tmp_path_factory) -> list[Doc]:
    """team-vision with dataBucket set and kustomize/components/data-bucket in its overlay."""
    loaded = Loaded()
    render(write_bucket_overlay(tmp_path_factory.mktemp("bucket")), "bucket-overlay", loaded)
    assert not loaded.findings
    return loaded.docs


def test_a_team_with_a_data_bucket_passes_with_the_compiled_pipeline(schemas, bucket_team) -> None:
    findings = check(copy.deepcopy(bucket_team), schemas, [COMPILED])
    assert [str(f) for f in findings if not f.warning] == []
    assert {d.kind for d in bucket_team} >= {"PersistentVolume", "PersistentVolumeClaim"}


def _volume(docs: list[Doc]) -> dict:
    return _obj(docs, "PersistentVolume")["spec"]


def _data_claim(docs: list[Doc]) -> dict:
    return _obj(docs, "PersistentVolumeClaim", "data-bucket")["spec"]


BUCKET_CASES = [
    ("volume without a bucket", _edit(lambda d: _volume(d)["csi"].update(volumeHandle="")),
     "PersistentVolume//team-vision-data-bucket", "spec.csi.volumeHandle", "dataBucket 'vision-data'"),
    ("volume of another bucket", _edit(lambda d: _volume(d)["csi"].update(volumeHandle="other-data")),
     "PersistentVolume//team-vision-data-bucket", "spec.csi.volumeHandle", "got 'other-data'"),
    ("writable volume", _edit(lambda d: _volume(d)["csi"].update(readOnly=False)),
     "PersistentVolume//team-vision-data-bucket", "spec.csi.readOnly", "must be true"),
    ("another CSI driver", _edit(lambda d: _volume(d)["csi"].update(driver="pd.csi.storage.gke.io")),
     "PersistentVolume//team-vision-data-bucket", "spec.csi.driver", "gcsfuse.csi.storage.gke.io"),
    ("volume reserved for another namespace's claim",
     _edit(lambda d: _volume(d)["claimRef"].update(namespace="team-research")),
     "PersistentVolume//team-vision-data-bucket", "spec.claimRef", "team-vision/data-bucket"),
    ("claim on the default storage class", _edit(lambda d: _data_claim(d).pop("storageClassName")),
     "PersistentVolumeClaim/team-vision/data-bucket", "spec.storageClassName", "default StorageClass"),
    ("claim of a volume not in the build", _edit(lambda d: _data_claim(d).update(volumeName="elsewhere")),
     "PersistentVolumeClaim/team-vision/data-bucket", "spec.volumeName", "'elsewhere'"),
    ("writable claim", _edit(lambda d: _data_claim(d).update(accessModes=["ReadWriteMany"])),
     "PersistentVolumeClaim/team-vision/data-bucket", "spec.accessModes", "ReadOnlyMany"),
    ("dataBucket without the component",
     lambda docs: [d for d in docs if d.kind != "PersistentVolume" and d.name != "data-bucket"],
     "ConfigMap/team-vision/team-config", "data.dataBucket", "kustomize/components/data-bucket"),
    ("the component without dataBucket", _edit(lambda d: _team_config(d).update(dataBucket="")),
     "PersistentVolumeClaim/team-vision/data-bucket", "(root)", "sets no dataBucket"),
    ("claims beyond the storage quota",
     _edit(lambda d: _obj(d, "ResourceQuota")["spec"]["hard"].update({"requests.storage": "1Ti"})),
     "ResourceQuota/team-vision/team-quota", "spec.hard", "requests.storage 1025Gi > 1Ti"),
]


@pytest.mark.parametrize(("case", "breakage", "obj", "path", "words"), BUCKET_CASES, ids=[c[0] for c in BUCKET_CASES])
def test_broken_data_bucket_is_caught(schemas, bucket_team, case, breakage, obj, path, words) -> None:
    findings = check(breakage(copy.deepcopy(bucket_team)), schemas)
    matching = [f for f in findings
                if f"{f.kind}/{f.namespace}/{f.name}" == obj and f.path == path and words in f.message]
    assert matching, f"{case}: expected {obj} {path} ~{words!r}, got: " + "; ".join(map(str, findings))


@pytest.mark.parametrize("dropped", ["gke-gcsfuse/volumes", "gke-gcsfuse/memory-limit"])
def test_a_step_mounting_the_bucket_without_the_sidecar_annotations_is_caught(schemas, bucket_team, tmp_path,
                                                                              dropped) -> None:
    spec, platform = yaml.safe_load_all(COMPILED.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounting = [name for name, e in executors.items() if any(m["mountPath"] == "/data" for m in e.get("pvcMount", []))]
    assert sorted(mounting) == ["exec-evaluate", "exec-prepare-data"]
    del executors["exec-prepare-data"]["podMetadata"]["annotations"][dropped]
    broken = tmp_path / "arrcoc_train_data_bucket.yaml"
    broken.write_text(yaml.safe_dump_all([spec, platform]))
    findings = [str(f) for f in check(copy.deepcopy(bucket_team), schemas, [broken]) if not f.warning]
    assert len(findings) == 1, findings
    assert f'KfpExecutorPod//exec-prepare-data: podMetadata.annotations["{dropped}"]: must be' in findings[0]
    assert "GCS FUSE sidecar" in findings[0]


def test_katib_suggestion_claim_counts_against_the_quota(schemas, team_vision) -> None:
    """resumePolicy FromVolume makes Katib's suggestion controller create a claim <experiment>-<algorithm> in the
    team's namespace (1Gi unless katib-config sizes it): the quota must hold it beside the team's own claims."""
    docs = copy.deepcopy(team_vision + _fixture_docs())
    experiment = _obj(docs, "Experiment")
    hard = _obj(docs, "ResourceQuota")["spec"]["hard"]
    own = [d.name for d in docs if d.kind == "PersistentVolumeClaim"]
    hard["persistentvolumeclaims"] = str(len(own))

    def claim_findings() -> list[str]:
        return [str(f) for f in check(docs, schemas) if "the claims of team-vision" in f.message]

    assert claim_findings() == []  # resumePolicy Never (Katib's default): no claim
    experiment["spec"]["resumePolicy"] = "FromVolume"
    [finding] = claim_findings()
    assert "sweep-bayesianoptimization" in finding and f"persistentvolumeclaims {len(own) + 1} > {len(own)}" in finding

    hard["persistentvolumeclaims"] = str(len(own) + 1)
    assert claim_findings() == []
    katib_config = {"apiVersion": "config.kubeflow.org/v1beta1", "kind": "KatibConfig", "runtime": {"suggestions": [
        {"algorithmName": "bayesianoptimization", "image": "skopt:v0.19.0",
         "persistentVolumeClaimSpec": {"resources": {"requests": {"storage": "500Gi"}}}}]}}
    docs.append(Doc("katib", {"apiVersion": "v1", "kind": "ConfigMap",
                              "metadata": {"name": "katib-config", "namespace": "kubeflow"},
                              "data": {"katib-config.yaml": yaml.safe_dump(katib_config)}}))
    [finding] = claim_findings()
    assert "requests.storage" in finding and "> 1200Gi" in finding


def test_the_pipelines_training_job_counts_its_train_step_and_sidecars(schemas, team_vision) -> None:
    """The pipeline's job: the builder's replicas (2 x 4 CPU for team-vision) plus the train step that waits on
    them (500m); a team that mounts a bucket adds the GCS FUSE sidecar to every replica (500m each)."""
    from pipelines.validation import quota

    docs = copy.deepcopy(team_vision)
    _obj(docs, "ResourceQuota")["spec"]["hard"]["requests.cpu"] = "8"
    found = [str(f) for f in check(docs, schemas, [COMPILED]) if "pipeline's training job" in f.message]
    assert len(found) == 1 and "requests.cpu 8.5 > 8" in found[0] and "train step" in found[0]
    sidecar = quota.template_usage({"metadata": {"annotations": {"gke-gcsfuse/volumes": "true",
                                                                 "gke-gcsfuse/cpu-limit": "500m",
                                                                 "gke-gcsfuse/memory-limit": "1Gi"}},
                                    "spec": {"containers": [{"resources": {"requests": {"cpu": "1", "memory": "1Gi"},
                                                                           "limits": {"cpu": "1", "memory": "1Gi"}}}]}})
    assert (sidecar["requests.cpu"], sidecar["limits.memory"], sidecar["pods"]) == (Decimal("1.5"), 2 * 2**30, 1)
