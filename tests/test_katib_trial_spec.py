"""The Katib trial template is generated from the PyTorchJob builder: the checked-in file is current, and
`arrcoc compile` rewrites every generated file."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipelines import compile as compile_module
from pipelines.cli import main
from pipelines.jobs.pytorchjob import build_pytorchjob, to_manifest
from pipelines.jobs.team_config import TeamConfig
from pipelines.sweeps import trial_spec
from pipelines.sweeps.experiment import read_experiment, render_trial
from trainer.config import TrainConfig

EXPERIMENT = trial_spec.EXPERIMENT


def test_checked_in_trial_template_is_current() -> None:
    text = EXPERIMENT.read_text()
    assert trial_spec.generate(text) == text, \
        "katib/base/experiment.yaml's trialSpec is stale: run `arrcoc compile` and commit the diff"


def test_checked_in_team_patches_are_current() -> None:
    teams = trial_spec.team_overlays()
    assert teams == ["team-research", "team-vision"]
    _, head = trial_spec.split(EXPERIMENT.read_text())
    for team in teams:
        path = trial_spec.OVERLAYS / team / trial_spec.TEAM_PATCH
        fresh = trial_spec.team_patch(head, trial_spec.rendered_team_config(team))
        assert path.read_text() == fresh, f"{path} is stale: run `arrcoc compile` and commit the diff"


def test_a_teams_trial_reads_its_base_model_and_data_from_team_config() -> None:
    """baseModel, trainData, evalData become trainer flags; dataBucket a read-only /data mount on every replica,
    with the Workload Identity account and sidecar limits; all of it lands in the team's patch."""
    _, head = trial_spec.split(EXPERIMENT.read_text())
    base = TeamConfig.from_file(trial_spec.BASE_TEAM_CONFIG)
    data = {**base.to_configmap_data(), "baseModel": "/data/models/qwen2.5-vl-3b", "dataBucket": "team-models",
            "trainData": "/data/vqav2/train", "evalData": "/data/vqav2/eval", "trainStrategy": "fsdp"}
    team = TeamConfig.from_configmap(data)
    ops = yaml.safe_load(trial_spec.team_patch(head, team))
    for rtype in ("Master", "Worker"):
        prefix = f"/spec/trialTemplate/trialSpec/spec/pytorchReplicaSpecs/{rtype}/template"
        value = {op["path"].removeprefix(prefix): op["value"] for op in ops if op["path"].startswith(prefix)}
        args = value["/spec/containers/0/args"]
        flags = dict(zip(args[::2], args[1::2]))
        assert flags["--base-model"] == "/data/models/qwen2.5-vl-3b"
        assert (flags["--train-data"], flags["--eval-data"]) == ("/data/vqav2/train", "/data/vqav2/eval")
        assert args.count("--base-model") == 1
        # strategy as team-config sets it; precision as it defaults for the base's L4 (bf16 tensor cores)
        assert (flags["--strategy"], flags["--precision"]) == ("fsdp", "bf16")
        assert {"name": "data", "mountPath": "/data", "readOnly": True} in value["/spec/containers/0/volumeMounts"]
        assert any(v.get("csi", {}).get("volumeAttributes", {}).get("bucketName") == "team-models"
                   for v in value["/spec/volumes"])
        assert value["/spec/serviceAccountName"] == "default-editor"
        assert value["/metadata/annotations"]["gke-gcsfuse/memory-limit"]
    # the base team-config sets none of it: synthetic scenes, the tiny base, no bucket
    plain = trial_spec.trial_spec(head)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    plain_args = plain["spec"]["containers"][0]["args"]
    assert "--train-data" not in plain_args
    assert plain_args[plain_args.index("--precision") + 1] == base.trainer_precision() == "bf16"
    fp32 = TeamConfig.from_configmap({**base.to_configmap_data(), "trainPrecision": "fp32"})
    fp32_args = trial_spec.trainer_args(head, fp32)
    assert fp32_args[fp32_args.index("--precision") + 1] == "fp32"
    assert "serviceAccountName" not in plain["spec"]


def test_trial_is_the_builders_job_with_katib_placeholders() -> None:
    exp = read_experiment(EXPERIMENT)
    job = render_trial(exp, "arrcoc-tensions-001", {p.name: "37" for p in exp.parameters}, namespace="team-vision")
    team = TeamConfig.from_file(trial_spec.BASE_TEAM_CONFIG)
    built = to_manifest(build_pytorchjob("arrcoc-tensions-001", team=team, workers=1,
                                         trainer_args=["--steps", "300"]))
    for replica in ("Master", "Worker"):
        pod = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]
        same = built["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]
        (container,) = pod["containers"]
        (reference,) = same["containers"]
        for key in ("image", "resources", "securityContext", "volumeMounts", "ports"):
            assert container[key] == reference[key], (replica, key)
        assert pod["volumes"] == same["volumes"] and pod["securityContext"] == same["securityContext"]
        assert pod["priorityClassName"] == "arrcoc-sweep"
        assert container["command"] == ["python", "-m", "trainer.torchrun", "-m", "trainer"]
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["python", "-m", "trainer.prestop"]
        args = container["args"]
        value = dict(zip(args[::2], args[1::2]))
        # The trainer's defaults, and each tension as hundredths the trainer parses as a float.
        defaults = TrainConfig()
        assert value["--steps"] == str(defaults.steps) and value["--lr"] == str(defaults.lr)
        assert value["--exploit-vs-explore"] == "37e-2" and float(value["--exploit-vs-explore"]) == 0.37
        assert value["--out"] == "/checkpoints/arrcoc-tensions-001"
        assert all(" " not in a and '"' not in a for a in [*container["command"], *args])
    assert "metadata" not in exp.trial_spec or not {"name", "namespace"} & set(exp.trial_spec["metadata"])


def test_a_changed_default_makes_the_file_stale(monkeypatch) -> None:
    text = EXPERIMENT.read_text()
    monkeypatch.setattr(trial_spec, "TRIAL_FLAGS", (*trial_spec.TRIAL_FLAGS, "warmup_steps"))
    assert trial_spec.generate(text) != text


def test_compile_regenerates_every_generated_file(tmp_path: Path, monkeypatch, capsys) -> None:
    experiment = tmp_path / "experiment.yaml"
    head, _ = trial_spec.split(EXPERIMENT.read_text())
    experiment.write_text(head + "    trialSpec: {}\n")
    monkeypatch.setattr(trial_spec, "EXPERIMENT", experiment)
    monkeypatch.setattr(compile_module, "EXAMPLES_DIR", tmp_path / "examples")
    overlays = tmp_path / "overlays"
    for team in trial_spec.team_overlays():
        (overlays / team / "wired").mkdir(parents=True)
        (overlays / team / "kustomization.yaml").write_text("{}\n")
    monkeypatch.setattr(trial_spec, "OVERLAYS", overlays)
    assert main(["compile", "--out-dir", str(tmp_path / "compiled")]) == 0
    assert experiment.read_text() == EXPERIMENT.read_text()
    for team in trial_spec.team_overlays():
        generated = (overlays / team / trial_spec.TEAM_PATCH).read_text()
        assert generated == (EXPERIMENT.parents[1] / "overlays" / team / trial_spec.TEAM_PATCH).read_text()
    for name in compile_module.EXAMPLES:
        assert (tmp_path / "examples" / name).read_text() == (compile_module.Path(compile_module.__file__).parent
                                                              / "jobs" / "examples" / name).read_text()
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"


def test_missing_marker_is_one_line_error(tmp_path: Path) -> None:
    doc = yaml.safe_load(EXPERIMENT.read_text())
    try:
        trial_spec.generate(json.dumps(doc))
    except trial_spec.TrialSpecError as exc:
        assert "is missing" in str(exc) and "\n" not in str(exc) and exc.exit_code == 2
    else:
        raise AssertionError("expected TrialSpecError")
