"""Whole trainer runs as the container runs them (`python -m trainer` subprocesses, CPU, gloo)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.trainer_helpers import (
    FAST,
    REPO,
    clean_env,
    free_port,
    metric_lines,
    read_metrics,
    run_trainer,
    sigterm_after_first_eval,
    trainer_cmd,
)

TENSIONS = ["--compress-vs-particularize", "0.1", "--exploit-vs-explore", "0.7", "--focus-vs-diversify", "0.5"]


def evaluate(*args: str) -> dict[str, float]:
    result = subprocess.run([*trainer_cmd()[:1], "-m", "pipelines.cli", "evaluate", *args], cwd=REPO,
                            env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return {k: float(v) for k, v in (line.split("=") for line in metric_lines(result.stdout))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short learning run shared by the tests below (120 steps; the issue's 300-step bar is in bench/)."""
    out = tmp_path_factory.mktemp("trained")
    result = run_trainer("--steps", "120", "--eval-every", "60", "--eval-size", "128", "--out", str(out), *TENSIONS)
    assert result.returncode == 0, result.stderr
    return out, result


def test_learning_beats_both_baselines(trained):
    out, _ = trained
    final = read_metrics(out)
    untrained = evaluate("--untrained", "--eval-size", "128", *TENSIONS)
    random = evaluate("--random-allocation", "--eval-size", "128", *TENSIONS)
    assert final["relevance_score"] >= untrained["relevance_score"] + 0.15
    assert final["relevance_score"] > random["relevance_score"]
    assert final["recall_at_k"] > untrained["recall_at_k"]


def test_metric_lines_are_katib_stdout_format(trained):
    _, result = trained
    lines = metric_lines(result.stdout)
    assert len(lines) == 8  # two evaluations x four metrics
    for line in lines:
        name, value = line.split("=")
        float(value)
    assert "it/s" not in result.stderr  # no progress bar when stderr is not a terminal


def test_saved_adapter_reproduces_the_final_metrics(trained):
    out, _ = trained
    final = read_metrics(out)
    again = evaluate("--adapter", str(out / "adapter"))
    for name, value in again.items():
        assert abs(value - final[name]) < 1e-5, name
    files = {p.name for p in (out / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "arrcoc_modules.pt", "arrcoc_config.json"} <= files
    assert json.loads((out / "adapter" / "arrcoc_config.json").read_text())["focus_vs_diversify"] == 0.5


@pytest.mark.slow  # three trainer runs; test_trainer_gpu's bf16 + accumulation SIGTERM/resume test covers this loop
def test_sigterm_checkpoints_and_resume_is_exact(tmp_path):
    common = ["--steps", "40", *FAST, "--seed", "5"]
    straight = tmp_path / "straight"
    assert run_trainer(*common, "--out", str(straight)).returncode == 0

    interrupted = tmp_path / "interrupted"
    # SIGTERM once the first evaluation (step 10) is printed: midway
    code, err, stopped = sigterm_after_first_eval(trainer_cmd(*common, "--out", str(interrupted)), timeout=60)
    assert code == 128 + signal.SIGTERM, err
    assert 10 <= stopped < 40
    assert (interrupted / "checkpoints" / f"step-{stopped:08d}" / "COMPLETE").is_file()

    resumed = run_trainer(*common, "--out", str(interrupted))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and f"at step {stopped}" in resumed.stderr
    assert read_metrics(interrupted) == read_metrics(straight)


def test_resume_refuses_a_checkpoint_of_other_tensions(tmp_path):
    out = tmp_path / "run"
    assert run_trainer("--steps", "10", *FAST, "--out", str(out)).returncode == 0
    result = run_trainer("--steps", "20", *FAST, "--out", str(out), "--focus-vs-diversify", "0.9")
    assert result.returncode == 2
    assert "focus_vs_diversify=0.5" in result.stderr and "--resume never" in result.stderr


def test_two_processes_with_the_operator_env_train_together(tmp_path):
    """Exactly what the Training Operator injects for one process per pod: no LOCAL_RANK."""
    out = tmp_path / "ddp"
    port = str(free_port())
    procs = [subprocess.Popen(trainer_cmd("--steps", "20", *FAST, "--out", str(out)), cwd=REPO,
                              env=clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(r),
                                            PET_NNODES="2", PET_NODE_RANK=str(r), PET_NPROC_PER_NODE="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert len(metric_lines(outs[0][0])) == 8
    assert metric_lines(outs[1][0]) == []
    assert read_metrics(out)["step"] == 20
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_pretrained_base_model_loads_by_path(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path / "tiny-llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(base)
    out = tmp_path / "run"
    result = run_trainer("--steps", "4", *FAST, "--base-model", str(base), "--out", str(out))
    assert result.returncode == 0, result.stderr
    cfg = json.loads((out / "adapter" / "arrcoc_config.json").read_text())
    assert cfg["base_model"] == str(base)
    assert set(evaluate("--adapter", str(out / "adapter"))) == {"relevance_score", "recall_at_k", "answer_accuracy",
                                                               "eval_loss"}


def test_progress_bar_only_on_a_terminal(tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real terminal has a size
    proc = subprocess.Popen(trainer_cmd("--steps", "3", *FAST, "--out", str(tmp_path / "tty")), cwd=REPO,
                            env=clean_env(), stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=120)
    assert proc.returncode == 0
    assert b"3/3" in b"".join(chunks)


def test_several_processes_per_pod_go_through_torchrun(tmp_path):
    """nprocPerNode > 1: the pod runs torchrun, which reads the operator's PET_* variables (one node here)."""
    out = tmp_path / "torchrun"
    port = str(free_port())
    env = clean_env(PET_NNODES="1", PET_NODE_RANK="0", PET_NPROC_PER_NODE="2", PET_MASTER_ADDR="127.0.0.1",
                    PET_MASTER_PORT=port)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "-m", "trainer", "--steps", "10",
                             *FAST, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(metric_lines(result.stdout)) == 4  # rank 0 only, one evaluation
    assert "[rank 1] step 10/10" in result.stderr
    assert read_metrics(out)["step"] == 10


def test_the_builders_torchrun_exits_with_codes_restart_policy_exitcode_reads(tmp_path):
    """trainer/torchrun.py: torchrun alone exits 1 both for a SIGTERM (after its worker checkpointed and exited 143)
    and for a worker's bad-input exit 2; the builder's command passes on 143 (retried) and 2 (not)."""
    env = clean_env(PET_NNODES="1", PET_NODE_RANK="0", PET_NPROC_PER_NODE="1", PET_MASTER_ADDR="127.0.0.1",
                    PET_MASTER_PORT=str(free_port()))
    command = [sys.executable, "-m", "trainer.torchrun", "-m", "trainer"]
    bad = subprocess.run([*command, "--steps", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2, bad.stderr[-2000:]
    env["PET_MASTER_PORT"] = str(free_port())
    proc = subprocess.Popen([*command, "--steps", "5000", *FAST, "--checkpoint-every", "1000", "--log-every", "1",
                             "--out", str(tmp_path / "out")], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "step 3/5000" in line:
            break
    proc.send_signal(signal.SIGTERM)  # the kubelet's SIGTERM to PID 1, or the preStop hook's
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopping on signal 15" in err
