"""The whole pipeline under kfp.local (what `make demo` does), with tiny settings, both variants, and the gate both
ways."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from pipelines.cli import main
from pipelines.kfp_pipeline.demo import DemoInputError, run_demo

TINY = {"steps": 3, "batch_size": 4, "train_size": 16, "eval_size": 8, "report_samples": 2}


@pytest.fixture(scope="module")
def passed(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo-pass")
    return workdir, run_demo(workdir, threshold=0.0, workers=1, **TINY)


def test_gate_open_registers_adapter_with_lineage(passed):
    workdir, result = passed
    assert result.registered is not None and result.registered.parent == workdir / "models"
    card = json.loads((result.registered / "model_card.json").read_text())
    run_id = result.registered.name
    assert card["lineage"]["run_id"] == run_id
    assert card["lineage"]["train_data_artifact"] == str(result.run_dir / "prepare-data" / "train_data")
    assert card["metrics"]["relevance_score"] == pytest.approx(result.relevance_score)
    assert (result.registered / "adapter" / "arrcoc_modules.pt").is_file()


def test_train_ran_one_two_replica_pytorchjob_on_staged_data(passed):
    _, result = passed
    manifest = yaml.safe_load((result.job_dir / "pytorchjob.yaml").read_text())
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 1)
    args = replicas["Master"]["template"]["spec"]["containers"][0]["args"]
    run_id = result.registered.name
    assert args[args.index("--train-data") + 1] == f"/checkpoints/{run_id}/data/train"
    assert args[args.index("--steps") + 1] == "3"
    assert args[args.index("--metrics-port") + 1] == "9400"  # the exporter is on by default: `arrcoc demo`
    assert re.search(r"^relevance_score=\d", (result.job_dir / "master.log").read_text(), re.M)
    # The trainer read the copy staged on the (locally mapped) checkpoint volume, not the artifact itself.
    config = json.loads((result.adapter / "arrcoc_config.json").read_text())
    assert config["train_data"].endswith(f"volumes/checkpoints/{run_id}/data/train")


def test_report_and_metrics(passed):
    _, result = passed
    assert result.report.suffix == ".html"
    assert result.report.read_bytes() == (result.run_dir / "evaluate" / "report").read_bytes()
    page = result.report.read_text()
    assert len(re.findall(r'src="data:image/png;base64,', page)) == TINY["report_samples"]
    metrics = json.loads(result.metrics.read_text())
    assert 0.0 <= metrics["relevance_score"] <= 1.0
    assert set(metrics) >= {"relevance_score", "recall_at_k", "answer_accuracy", "eval_loss"}
    assert "passes the gate" in result.summary.read_text()


def test_the_pipeline_outputs_are_the_runs_metrics_report_adapter_and_card(passed):
    """kfp.local resolves the pipeline's declared outputs (the card through dsl.OneOf of the two gate branches)."""
    _, result = passed
    assert result.metrics.parent.parent == result.run_dir and result.metrics.parent.name == "evaluate"
    assert result.adapter == result.run_dir / "train" / "adapter"
    assert result.model_card == (result.registered / "MODEL_CARD.md").read_text()


def test_a_single_evaluation_is_a_table_in_the_report(passed):
    """TINY trains 3 steps and evaluates every 25 (the demo's setting): one evaluation, at the end."""
    _, result = passed
    page = result.report.read_text()
    assert "Evaluation during training" in page and "<td>3</td>" in page


def _ran(result) -> set[str]:
    return {p.name for p in result.run_dir.iterdir() if p.is_dir()}


def test_without_a_data_bucket_the_plain_variant_runs(passed):
    _, result = passed
    assert result.pipeline == "arrcoc-train"
    assert _ran(result) == {"prepare-data", "train", "evaluate", "register"}


def test_gate_closed_registers_nothing_in_the_data_bucket_variant(tmp_path):
    """A team-config with dataBucket runs the variant whose prepare-data and evaluate mount the bucket on a cluster
    (kfp.local ignores the mount); the replicas mount it inline either way."""
    from dataclasses import replace

    from pipelines.jobs.team_config import TeamConfig

    team = replace(TeamConfig.local_default(), data_bucket="vision-data", checkpoint_pvc="checkpoints")
    team_file = tmp_path / "team-config.yaml"
    team_file.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "team-config"},
                                         "data": team.to_configmap_data()}))
    result = run_demo(tmp_path / "run", threshold=1.1, workers=0, team_config=str(team_file), metrics=False, **TINY)
    assert result.pipeline == "arrcoc-train-data-bucket"
    assert _ran(result) == {"prepare-data", "train", "evaluate", "not-registered"}
    assert result.registered is None
    assert result.model_card.startswith("Not registered: relevance_score ") and "threshold 1.1" in result.model_card
    assert not (tmp_path / "run" / "models").exists() or not any((tmp_path / "run" / "models").iterdir())
    master = yaml.safe_load((result.job_dir / "pytorchjob.yaml").read_text())["spec"]["pytorchReplicaSpecs"]["Master"]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in master["template"]["spec"]["containers"][0][
        "volumeMounts"]
    # `arrcoc demo --no-metrics`: no exporter, no metrics port
    assert "--metrics-port" not in master["template"]["spec"]["containers"][0]["args"]
    assert [p["name"] for p in master["template"]["spec"]["containers"][0]["ports"]] == ["pytorchjob-port"]
    assert "does not pass the gate (threshold 1.1)" in result.summary.read_text()


def test_demo_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--source", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--source" in err and "nope" in err
    with pytest.raises(DemoInputError, match="--steps=0 must be >= 1"):
        run_demo(tmp_path, steps=0)
    assert not (tmp_path / "pipeline-root").exists()


def test_image_folder_pictures_are_drawn_under_every_colour_query(passed, tmp_path):
    import cv2
    import numpy as np

    from pipelines.kfp_pipeline.steps.evaluate import evaluate_adapter
    from pipelines.kfp_pipeline.steps.prepare_data import prepare
    from trainer.data import COLOURS

    _, result = passed
    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "street.jpg"), np.full((120, 90, 3), 90, np.uint8))
    prepare(str(folder), 0, 4, 3, tmp_path / "t", tmp_path / "e")
    metrics, _, page, _, _ = evaluate_adapter(result.adapter, tmp_path / "e", report_samples=1, threshold=0.4)
    assert 0.0 <= metrics["relevance_score"] <= 1.0  # scored on the synthetic eval scenes, not on the photo
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 1 + len(COLOURS)
    assert all(f"street.jpg: Which shape is the {c} object?" in page for c in COLOURS)
