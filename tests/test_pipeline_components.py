"""The work behind each pipeline step, called directly (no KFP): data prep, report, staging rules, model store."""
from __future__ import annotations

import base64
import json
import re
from dataclasses import replace

import cv2
import numpy as np
import pytest

from pipelines.jobs.backends import JobFailed
from pipelines.jobs.team_config import ENV_NAMES, TeamConfig
from pipelines.kfp_pipeline.report import html_report, markdown_summary
from pipelines.kfp_pipeline.steps.prepare_data import DataSource, PrepareError, prepare, read_folder
from pipelines.kfp_pipeline.steps.register import register_model
from pipelines.kfp_pipeline.steps.train import job_name_for, run_training, team_knobs, trainer_args
from trainer.config import TrainConfig
from trainer.data import DATASET_KEYS, EVAL_OFFSET, generate, load_dataset
from trainer.errors import UserError
from trainer.knobs import PIPELINE_KNOBS
from trainer.task import Example


def _png(path, colour, size=(40, 30)):
    image = np.zeros((*size, 3), np.uint8)
    image[:] = colour
    assert cv2.imwrite(str(path), image)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    _png(d / "a.png", (0, 0, 255))
    _png(d / "b.JPG", (0, 255, 0))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    (d / "notes.txt").write_text("not an image, not looked at")
    return d


def test_folder_reports_the_corrupt_file_by_name_and_keeps_the_rest(folder, tmp_path, capsys):
    _, meta = prepare(str(folder), seed=3, train_size=4, eval_size=2, train_dir=tmp_path / "t", eval_dir=tmp_path / "e")
    assert "broken.png" in capsys.readouterr().err
    assert meta["unreadable_files"] == ["broken.png"] and meta["folder_images"] == 2
    with np.load(tmp_path / "e" / "scenes.npz") as data:
        assert data["folder_images"].shape == (2, 64, 64, 3)
        assert list(data["folder_names"]) == ["a.png", "b.JPG"]
        # a.png is pure red in BGR; the dataset holds RGB.
        assert tuple(data["folder_images"][0, 32, 32]) == (255, 0, 0)
    assert json.loads((tmp_path / "e" / "metadata.json").read_text()) == meta


def test_folder_without_readable_images_fails_and_writes_nothing(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(PrepareError, match=r"x\.jpg"):
        prepare(str(d), 0, 4, 2, tmp_path / "t", tmp_path / "e")
    assert not (tmp_path / "t").exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize("text, kind, vqa", [
    ("synthetic", "synthetic", False), ("vqa-synthetic", "vqa-synthetic", True),
    ("vqav2:{tmp}", "vqav2", True), ("gqa:{tmp}", "gqa", True), ("{tmp}", "folder", False),
])
def test_a_data_source_is_parsed_once_into_a_typed_value(tmp_path, text, kind, vqa):
    source = DataSource.parse(text.format(tmp=tmp_path))
    assert (source.kind, source.vqa, str(source)) == (kind, vqa, text.format(tmp=tmp_path))
    assert source.folder == (tmp_path if "{tmp}" in text else None)


@pytest.mark.parametrize("text, message", [
    ("{tmp}/nope", "source '{tmp}/nope' is neither a source name nor an existing folder; allowed: synthetic, "
                   "vqa-synthetic, vqav2:DIR, gqa:DIR or an image folder"),
    ("vqav2:{tmp}/nope", "source vqav2:{tmp}/nope: '{tmp}/nope' is not a folder"),
    ("gqa:/data/gqa", "source gqa:/data/gqa: '/data/gqa' is not a folder (/data holds the team's dataBucket only "
                      "when team-config sets it"),
    ("coco:{tmp}", "source 'coco:{tmp}' is neither a source name nor an existing folder"),
])
def test_a_bad_source_is_one_line_naming_what_is_allowed(tmp_path, text, message):
    with pytest.raises(PrepareError) as caught:
        prepare(text.format(tmp=tmp_path), 0, 4, 2, tmp_path / "t", tmp_path / "e")
    assert str(caught.value).startswith(message.format(tmp=tmp_path)) and "\n" not in str(caught.value)
    assert not (tmp_path / "t").exists() and not (tmp_path / "e").exists()


def test_an_image_folder_without_images_is_one_line(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(PrepareError, match=r"no image files \(allowed: \.jpg, \.jpeg, \.png\)"):
        read_folder(tmp_path / "src")


def test_synthetic_datasets_are_the_trainers_own_streams(tmp_path):
    train_meta, eval_meta = prepare("synthetic", 5, 6, 3, tmp_path / "t", tmp_path / "e")
    assert (train_meta["count"], eval_meta["count"]) == (6, 3)
    assert train_meta["seed"] == eval_meta["seed"] == 5 and train_meta["source"] == "synthetic"
    train, evaluation = load_dataset(tmp_path / "t"), load_dataset(tmp_path / "e")  # what --train-data reads
    np.testing.assert_array_equal(train["images"], generate(5, 0, 6)["images"])
    np.testing.assert_array_equal(evaluation["relevance"], generate(5, 0, 3, EVAL_OFFSET)["relevance"])
    with np.load(tmp_path / "t" / "scenes.npz") as data:  # textures are the trainer's, computed on its device
        assert sorted(data.files) == sorted(DATASET_KEYS)


def test_sizes_must_be_positive(tmp_path):
    with pytest.raises(PrepareError, match="train_size=0"):
        prepare("synthetic", 0, 0, 3, tmp_path / "t", tmp_path / "e")


def _row(truth: bool, label: str) -> Example:
    rng = np.random.default_rng(0)
    tokens = np.zeros((8, 8))
    tokens[2:4, 3:5] = [[9, 6], [4, 2]]
    return Example(image=rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), question="Which shape is the red object?",
               relevance=rng.random((8, 8)), tokens=tokens, truth=rng.random((8, 8)) if truth else None,
               answer="disk" if truth else None, predicted="disk", label=label)


def test_report_embeds_one_png_per_row_and_says_what_has_no_ground_truth():
    metrics = {"relevance_score": 0.61, "recall_at_k": 0.9, "answer_accuracy": 0.3, "eval_loss": 2.4}
    page = html_report(metrics, {k: 0.1 for k in metrics}, {"focus_vs_diversify": 0.5}, {"seed": 0},
                       [_row(True, "eval scene 0"), _row(True, "eval scene 1")], [_row(False, "cat.jpg")])
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3
    assert all(base64.b64decode(b).startswith(b"\x89PNG\r\n\x1a\n") for b in images)
    assert "cat.jpg: Which shape is the red object?" in page
    assert "Image folder (1 queries)" in page and "0.6100" in page


def test_markdown_summary_states_the_gate_both_ways():
    metrics = {"relevance_score": 0.5, "recall_at_k": 0.9, "answer_accuracy": 0.3, "eval_loss": 2.4}
    assert "passes the gate (threshold 0.4)" in markdown_summary(metrics, {}, {}, 0.4)
    assert "does not pass the gate (threshold 0.6)" in markdown_summary(metrics, {}, {}, 0.6)


def test_a_metric_the_baseline_lacks_is_shown_as_a_dash_not_nan():
    """lod_full / lod_coarse: the random-selection baseline reads no regions."""
    metrics = {"vqa_accuracy": 0.5, "lod_full": 2.0}
    baseline = {"vqa_accuracy": 0.25}
    summary = markdown_summary(metrics, baseline, {}, 0.4, gate_metric="vqa_accuracy")
    assert "| vqa_accuracy | 0.5000 | 0.2500 |" in summary and "| lod_full | 2.0000 | - |" in summary
    page = html_report(metrics, baseline, {}, {}, [], [])
    assert "nan" not in summary + page and "random allocation: 0.2500" in page


def _adapter(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"compress_vs_particularize": 0.1, "exploit_vs_explore": 0.7, "focus_vs_diversify": 0.5, "steps": 3,
              "batch_size": 2, "lr": 0.01, "seed": 0, "base_model": "tiny", "strategy": "ddp"}
    (adapter / "arrcoc_config.json").write_text(json.dumps(config))
    (adapter / "arrcoc_modules.pt").write_bytes(b"weights")
    return adapter


def test_register_writes_adapter_and_card_whole(tmp_path):
    store = tmp_path / "store"
    path, markdown = register_model(_adapter(tmp_path), store, "run-1", {"relevance_score": 0.7}, 0.4,
                                    {"train_data_artifact": "minio://x/train_data"})
    assert path == store / "run-1" and (path / "adapter" / "arrcoc_modules.pt").read_bytes() == b"weights"
    card = json.loads((path / "model_card.json").read_text())
    assert card["metrics"] == {"relevance_score": 0.7} and card["tensions"]["focus_vs_diversify"] == 0.5
    assert card["lineage"] == {"run_id": "run-1", "train_data_artifact": "minio://x/train_data"}
    assert "run-1" in markdown and markdown == (path / "MODEL_CARD.md").read_text()  # the pipeline's card output
    retry = tmp_path / "retry"
    retry.mkdir()
    register_model(_adapter(retry), store, "run-1", {"relevance_score": 0.8}, 0.4, {})  # a retried step's entry wins
    assert json.loads((path / "model_card.json").read_text())["metrics"]["relevance_score"] == 0.8
    assert sorted(p.name for p in store.iterdir()) == ["run-1"]


def test_register_refuses_a_directory_that_is_not_an_adapter(tmp_path):
    with pytest.raises(ValueError, match="arrcoc_config.json"):
        register_model(tmp_path, tmp_path / "store", "run-1", {}, 0.4, {})
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("run_id", ["3f2a9c1e-77aa-4b5e-9d2f-1234567890ab", "63146553", "Run_ID.x"])
def test_job_names_are_dns_1035(run_id):
    assert re.fullmatch(r"[a-z][-a-z0-9]{0,19}", job_name_for(run_id))


# A pipeline run's knobs at their defaults: "" where the team-config decides (trainer/knobs.py).
RUN = replace(TrainConfig(), **{k.name: k.pipeline_default for k in PIPELINE_KNOBS})


def test_trainer_args_are_the_runs_knobs_as_trainer_flags():
    args = trainer_args(replace(RUN, batch_size=8, focus_vs_diversify=0.25, strategy="fsdp"), "/c/r/t", "/c/r/e")
    assert args[-4:] == ["--train-data", "/c/r/t", "--eval-data", "/c/r/e"]
    assert args[args.index("--batch-size") + 1] == "8" and args[args.index("--strategy") + 1] == "fsdp"
    assert "--no-activation-checkpointing" in args  # an on/off knob is one flag
    assert {a for a in args if a.startswith("--")} == {k.flag for k in PIPELINE_KNOBS if k.type is not bool} | {
        "--no-activation-checkpointing", "--train-data", "--eval-data"}
    from trainer.config import parse_config  # the trainer reads them back

    cfg = parse_config([*args, "--precision", "fp32", "--base-model", "tiny"])  # "" knobs: the team-config fills them
    assert (cfg.batch_size, cfg.focus_vs_diversify, cfg.strategy, cfg.eval_every) == (8, 0.25, "fsdp", RUN.eval_every)


@pytest.mark.parametrize("team, strategy, precision, base_model", [
    (TeamConfig.local_default(), "ddp", "fp32", "tiny"),
    (replace(TeamConfig.local_default(), gpu_type="nvidia-l4", gpus_per_replica=1, base_model="/data/m"),
     "ddp", "bf16", "/data/m"),
    (replace(TeamConfig.local_default(), train_strategy="fsdp", train_precision="fp32"), "fsdp", "fp32", "tiny"),
])
def test_knobs_a_run_leaves_empty_come_from_the_team_config(team, strategy, precision, base_model):
    assert (lambda k: (k.strategy, k.precision, k.base_model))(team_knobs(RUN, team)) == (strategy, precision,
                                                                                           base_model)
    chosen = replace(RUN, strategy="deepspeed", precision="bf16", base_model="other")
    assert team_knobs(chosen, team) == chosen  # a run's own choice wins


@pytest.mark.parametrize("bucket, data_bucket", [("vision-data", False), ("", True)])
def test_a_run_of_the_other_teams_variant_fails_before_any_job(monkeypatch, tmp_path, bucket, data_bucket):
    from types import SimpleNamespace

    from pipelines.kfp_pipeline.steps.train import train_step

    _cluster_env(monkeypatch, dataBucket=bucket)
    artifact = SimpleNamespace(path=str(tmp_path / "x"), uri="x", metadata={})
    with pytest.raises(UserError, match="arrcoc pipeline upload picks it") as caught:
        train_step(artifact, artifact, artifact, artifact, RUN, backend="cluster", run_id="r1", image="i", workers=1,
                   nproc_per_node="", checkpoint_pvc="checkpoints", timeout_minutes=5, delete_policy="always",
                   data_bucket=data_bucket)
    wanted = "arrcoc-train-data-bucket" if bucket else "arrcoc-train"
    assert str(caught.value).endswith(f"run {wanted} (arrcoc pipeline upload picks it)")
    assert not (tmp_path / "x").exists()


def _cluster_env(monkeypatch, **changes):
    data = TeamConfig.local_default().to_configmap_data()
    data.update({"checkpointPVC": "checkpoints", **changes})
    for key, env in ENV_NAMES.items():
        monkeypatch.setenv(env, data[key])


@pytest.mark.parametrize("changes, pvc, message", [
    ({}, "other", "volume 'checkpoints' of the PyTorchJob is PVC 'checkpoints' at /checkpoints, but this step "
                  "mounts PVC 'other' at /checkpoints"),
    ({"checkpointPVC": "", "checkpointBucket": "team-bucket"}, "checkpoints", "is of type csi at /checkpoints"),
])
def test_cluster_staging_needs_the_teams_pvc(monkeypatch, tmp_path, changes, pvc, message):
    _cluster_env(monkeypatch, **changes)
    with pytest.raises(UserError, match=re.escape(message)):
        run_training(backend="cluster", run_id="r1", train_dir=str(tmp_path), eval_dir=str(tmp_path),
                     adapter_dir=str(tmp_path / "a"), job_dir=str(tmp_path / "j"), knobs=RUN, checkpoint_pvc=pvc)
    assert not (tmp_path / "j").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "docker"}, "backend='docker' is not one of cluster, local"),  # BackendError: a UserError too
    ({"backend": "local", "timeout_minutes": 0}, "train_timeout_minutes=0 must be in 1..1440"),
    ({"backend": "local", "delete_policy": "sometimes"}, "delete_job='sometimes' is not one of always, on-success"),
])
def test_train_step_inputs_are_checked(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        run_training(run_id="r1", train_dir=str(tmp_path), eval_dir=str(tmp_path), adapter_dir=str(tmp_path / "a"),
                     job_dir=str(tmp_path / "j"), knobs=RUN, **kwargs)


def test_cluster_branch_stages_data_launches_one_job_and_collects_the_adapter(monkeypatch, tmp_path):
    """The cluster path with the API calls faked: what the backend is handed, and what the step makes of it."""
    import pipelines.jobs.cluster
    import pipelines.jobs.pytorchjob
    from pipelines.jobs.backends import JobResult

    mount = tmp_path / "checkpoints"  # stands in for the PVC mounted at /checkpoints in the step's pod
    monkeypatch.setattr(pipelines.jobs.pytorchjob, "CHECKPOINT_MOUNT", str(mount))
    _cluster_env(monkeypatch, baseModel="/data/models/qwen2.5-vl-3b", dataBucket="vision-models")
    prepare("synthetic", 0, 4, 2, tmp_path / "t", tmp_path / "e")
    seen = {}

    def fake_run(self, job, workdir, *, timeout, log_stream):
        seen.update(job=job, timeout=timeout, delete=self.options.delete)
        out = mount / "run-7"  # what the trainer writes under --out
        (out / "adapter").mkdir()
        (out / "adapter" / "arrcoc_config.json").write_text("{}")
        (out / "metrics.json").write_text(json.dumps({"step": 3, "relevance_score": 0.5}))
        (workdir / "logs").mkdir(parents=True)
        (workdir / "logs" / "master-0.log").write_text("relevance_score=0.5\n")
        return JobResult(name=job["metadata"]["name"], namespace="team", succeeded=True, conditions=[],
                         master_log=workdir / "logs" / "master-0.log")

    monkeypatch.setattr(pipelines.jobs.cluster.ClusterBackend, "run", fake_run)
    metrics = run_training(backend="cluster", run_id="run-7", train_dir=str(tmp_path / "t"),
                           eval_dir=str(tmp_path / "e"), adapter_dir=str(tmp_path / "adapter"),
                           job_dir=str(tmp_path / "job"), knobs=replace(RUN, steps=3), workers=2,
                           checkpoint_pvc="checkpoints", timeout_minutes=5, delete_policy="always")
    assert metrics["relevance_score"] == 0.5
    assert seen["timeout"] == 300 and seen["delete"] == "always"
    spec = seen["job"]["spec"]
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    args = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--train-data") + 1] == f"{mount}/run-7/data/train"
    assert args[args.index("--out") + 1] == f"{mount}/run-7"
    # base_model "" is the team-config's baseModel, which the replicas read from the team's bucket at /data
    assert args[args.index("--base-model") + 1] == "/data/models/qwen2.5-vl-3b"
    mounts = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in mounts
    assert load_dataset(mount / "run-7" / "data" / "train")["images"].shape[0] == 4  # staged before launch
    assert (tmp_path / "adapter" / "arrcoc_config.json").is_file()
    assert (tmp_path / "job" / "master.log").read_text() == "relevance_score=0.5\n"


def test_a_failed_local_job_fails_the_step_with_its_reason(tmp_path):
    prepare("synthetic", 0, 4, 2, tmp_path / "t", tmp_path / "e")
    # The trainer rejects steps=0 with exit code 2: permanent under restartPolicy ExitCode, so no retries.
    reason = r"PyTorchJob \w+/arrcoc-r1 failed: PyTorchJobFailed: .*exit code 2.*replica logs"
    with pytest.raises(JobFailed, match=reason):
        run_training(backend="local", run_id="r1", train_dir=str(tmp_path / "t"), eval_dir=str(tmp_path / "e"),
                     adapter_dir=str(tmp_path / "task" / "adapter"), job_dir=str(tmp_path / "task" / "job"),
                     knobs=replace(RUN, steps=0), workers=0)
    assert "steps=0" in (tmp_path / "task" / "job" / "master.log").read_text()
    assert not (tmp_path / "task" / "adapter").exists()


def test_gate_reads_the_chosen_metric_and_names_a_missing_one():
    from pipelines.kfp_pipeline.steps.evaluate import GateMetricError, gate_value

    synthetic = {"relevance_score": 0.61, "answer_accuracy": 0.3}
    vqav2 = {"vqa_accuracy": 0.42, "visual_tokens": 64.0}  # VQAv2: no boxes, so no relevance_score
    assert gate_value(synthetic, "relevance_score") == 0.61
    assert gate_value(vqav2, "vqa_accuracy") == 0.42
    for metrics, metric, says in ((vqav2, "relevance_score", "vqa_accuracy"),
                                  ({**vqav2, "relevance_score": float("nan")}, "relevance_score", "vqa_accuracy"),
                                  (synthetic, "vqa_accuracy", "relevance_score"),
                                  (synthetic, "accuracy", "relevance_score, vqa_accuracy")):
        with pytest.raises(GateMetricError) as caught:
            gate_value(metrics, metric)
        message = str(caught.value)
        assert message.startswith(f"gate_metric={metric!r}") and says in message and "\n" not in message
        assert caught.value.exit_code == 2
    summary = markdown_summary(vqav2, {}, {}, 0.4, gate_metric="vqa_accuracy")
    assert "vqa_accuracy **0.4200** passes the gate (threshold 0.4)" in summary


def test_model_card_names_the_gate_metric(tmp_path):
    path, _ = register_model(_adapter(tmp_path), tmp_path / "store", "run-1", {"vqa_accuracy": 0.5}, 0.4, {},
                          gate_metric="vqa_accuracy")
    assert json.loads((path / "model_card.json").read_text())["gate"] == {"metric": "vqa_accuracy", "threshold": 0.4}
    assert "Gate: vqa_accuracy >= 0.4." in (path / "MODEL_CARD.md").read_text()
