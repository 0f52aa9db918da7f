"""The preStop hook for Katib-wrapped trainers: the kubelet's SIGTERM reaches only the collector's `sh -c`,
so the hook signals the trainer itself and waits for its checkpoint. Here the wrapper is the exact shell line
Katib's webhook writes, run locally (no cluster, no kubelet: the test plays the kubelet's preStop call)."""
from __future__ import annotations

import re
import subprocess
import sys
import time

from tests.trainer_helpers import FAST, REPO, clean_env, trainer_cmd
from trainer.checkpoint import latest
from trainer.prestop import is_trainer_command


def test_only_trainer_commands_are_targeted():
    assert is_trainer_command(["python", "-m", "trainer", "--steps", "3"])
    assert is_trainer_command(["/usr/bin/python3", "-u", "-m", "trainer", "--out", "x"])  # torchrun's workers
    assert is_trainer_command(["/opt/conda/bin/torchrun", "-m", "trainer"])
    assert is_trainer_command(["python", "-m", "trainer.torchrun", "-m", "trainer"])  # the builder's torchrun
    assert not is_trainer_command(["python", "-m", "trainer.prestop"])
    assert not is_trainer_command(["python", "-m", "pytest", "trainer"])
    assert not is_trainer_command(["./file-metricscollector", "-m", "trainer-metrics"])


def test_hook_lets_a_katib_wrapped_trainer_checkpoint_before_the_pod_dies(tmp_path):
    out, log, done = tmp_path / "out", tmp_path / "metrics.log", tmp_path / "completed.pid"
    command = " ".join([*trainer_cmd(), "--steps", "5000", *FAST, "--checkpoint-every", "1000", "--log-every", "1",
                        "--out", str(out)])
    wrapped = subprocess.Popen(["sh", "-c", f"{command} 1>{log} 2>&1 && echo completed > {done}"], cwd=REPO,
                               env=clean_env())
    try:
        deadline = time.monotonic() + 240
        while not re.search(r"step [3-9]/5000", log.read_text() if log.exists() else ""):
            assert wrapped.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        hook = subprocess.run([sys.executable, "-m", "trainer.prestop", "--under", str(wrapped.pid),
                               "--timeout", "120"], cwd=REPO, capture_output=True, text=True, timeout=180)
        assert hook.returncode == 0
        # the hook returns once the checkpoint is complete, not when the trainer (and with it the pod) is gone
        assert re.search(r"checkpoint \S+/step-\d{8} complete", hook.stderr) and "pids []" not in hook.stderr, \
            hook.stderr
        assert wrapped.wait(timeout=30) == 143  # the trainer's exit code, passed on by sh: ExitCode retries it
    finally:
        wrapped.kill()
    assert not done.exists()  # sh did not report a completed trial
    stopped_at = int(re.findall(r"stopping on signal 15 after step (\d+)", log.read_text())[0])
    checkpoint = latest(out / "checkpoints")
    assert checkpoint is not None and checkpoint.name == f"step-{stopped_at:08d}"  # no completed step lost
