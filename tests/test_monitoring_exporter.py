"""The trainer's Prometheus exporter (trainer/monitoring.py): what a scrape of a running trainer returns, what a
resumed run reports, and the one-line errors of a bad --metrics-port."""
from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from trainer_helpers import FAST, REPO, clean_env, free_port, run_trainer, trainer_cmd

from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.distributed import World
from trainer.monitoring import HISTORY_CHECKPOINT_TIME, HISTORY_RESUMES, TrainingMetrics


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape, parsed by prometheus_client's own parser."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_a_running_trainer_serves_progress_loss_evaluations_and_checkpoints(tmp_path):
    port = free_port()
    out = tmp_path / "run"
    proc = subprocess.Popen(trainer_cmd("--steps", "400", *FAST, "--log-every", "5", "--num-workers", "0",
                                        "--out", str(out), "--metrics-port", str(port)),
                            cwd=REPO, env=clean_env(POD_IP="127.0.0.1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline, samples = time.monotonic() + 120, {}
        while time.monotonic() < deadline:
            try:
                samples = scrape(url)
            except OSError:
                samples = {}
            if samples.get(("arrcoc_eval_step", ())) and samples.get(("arrcoc_checkpoint_last_step", ())):
                break
            time.sleep(0.5)
        assert samples, "the exporter never answered"
        step = value(samples, "arrcoc_train_step")
        assert step >= 10 and value(samples, "arrcoc_train_target_steps") == 400
        assert value(samples, "arrcoc_train_steps_total") == step  # a fresh run: every step was this process's
        assert value(samples, "arrcoc_train_samples_total") == 16 * step
        assert 0 < value(samples, "arrcoc_train_loss") < 10
        assert value(samples, "arrcoc_eval_metric", metric="relevance_score") > 0
        assert value(samples, "arrcoc_eval_step") % 10 == 0
        assert value(samples, "arrcoc_checkpoint_duration_seconds_count") >= 1
        assert time.time() - value(samples, "arrcoc_train_progress_timestamp_seconds") < 60
        assert value(samples, "arrcoc_train_data_wait_seconds_total") > 0
        assert value(samples, "arrcoc_train_resumes_total") == 0
        assert ("process_start_time_seconds", ()) in samples
        assert not any(name.endswith("_created") for name, _ in samples)
        assert not any(name.startswith("arrcoc_gpu_") for name, _ in samples)  # CPU run: no GPU series
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode == 143  # checkpoint on SIGTERM, as ever
    with pytest.raises(OSError):  # the server went with the process
        urllib.request.urlopen(url, timeout=2)


def test_each_resume_is_counted_in_the_checkpoint_and_restores_the_checkpoint_time(tmp_path):
    metrics = TrainingMetrics(TrainConfig(steps=30), World())
    history = {"eval": [], "loss": [], "window": [0.0, 0]}
    metrics.resumed(0, history)  # a fresh start is not a resume
    assert HISTORY_RESUMES not in history
    with metrics.checkpoint(10, history):
        saved_at = history[HISTORY_CHECKPOINT_TIME]
    later = TrainingMetrics(TrainConfig(steps=30), World())
    history = {**history, HISTORY_RESUMES: 2}
    later.resumed(10, history)
    assert history[HISTORY_RESUMES] == 3
    assert later.resumes._value.get() == 3
    assert later.checkpoint_time._value.get() == saved_at
    assert later.checkpoint_step._value.get() == 10


def test_the_resume_count_travels_through_real_checkpoints(tmp_path):
    out = tmp_path / "run"
    for steps in ("10", "20", "30"):  # each run resumes the previous one's last checkpoint
        done = run_trainer("--steps", steps, *FAST, "--num-workers", "0", "--out", str(out))
        assert done.returncode == 0, done.stderr
    state = checkpoint.load_state(checkpoint.complete_checkpoints(out / "checkpoints")[-1])
    assert state["history"][HISTORY_RESUMES] == 2
    assert HISTORY_CHECKPOINT_TIME in state["history"]


def test_a_port_in_use_is_a_one_line_error_before_anything_is_written(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_trainer("--steps", "5", "--out", str(tmp_path / "run"), "--metrics-port", str(port),
                           env=clean_env(POD_IP="127.0.0.1"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith(
        f"metrics_port={port}: cannot listen on 127.0.0.1:{port} (Address already in use); choose a free port, "
        f"or 0 to turn the exporter off")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("port", ["-1", "65536"])
def test_a_port_out_of_range_is_refused(tmp_path, port):
    done = run_trainer("--steps", "5", "--out", str(tmp_path / "run"), "--metrics-port", port)
    assert done.returncode == 2 and "metrics_port" in done.stderr and "65535" in done.stderr


def test_on_a_gpu_the_allocators_counters_are_read_at_scrape_time(monkeypatch):
    """No GPU here: torch.cuda's counters are replaced by numbers; what is checked is that a CUDA world exports
    them per GPU when scraped, and reads them then (not in the loop)."""
    import torch
    from prometheus_client import generate_latest

    reads = []
    for name, value in (("memory_allocated", 3 << 30), ("memory_reserved", 4 << 30), ("max_memory_allocated", 5 << 30)):
        monkeypatch.setattr(torch.cuda, name, lambda device, v=value, n=name: reads.append(n) or v)
    metrics = TrainingMetrics(TrainConfig(steps=10), World(device=torch.device("cuda", 1)))
    assert reads == []
    samples = {(s.name, tuple(s.labels.items())): s.value for family in text_string_to_metric_families(
        generate_latest(metrics.registry).decode()) for s in family.samples}
    assert samples[("arrcoc_gpu_memory_allocated_bytes", (("gpu", "1"),))] == 3 << 30
    assert samples[("arrcoc_gpu_memory_reserved_bytes", (("gpu", "1"),))] == 4 << 30
    assert samples[("arrcoc_gpu_memory_max_allocated_bytes", (("gpu", "1"),))] == 5 << 30
    assert len(reads) == 3
