"""`make bench`: every benchmark in turn, each printing its own table (ratios against a baseline run in
the same process or command). Slow on 2 cores (tens of minutes in all); run one script to see one number."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "throughput.py",  # trainer overhead vs a bare torch loop
    "learning.py",  # 300-step learning bar vs untrained and random allocation
    "tension_sweep.py",  # do the tensions matter
    "device_texture.py",  # batched textures on the training device vs the notes' per-image float64 loop
    "input_pipeline.py",  # DataLoader samples/s vs what the trainer consumes
    "gpu_step.py",  # samples/s, tokens/s, MFU, peak memory (on a CPU: a tiny run that says so)
    "pipeline_bench.py",  # compile time and local demo wall time
    "preemption_drill.py",  # SIGTERM/SIGKILL of a replica: steps lost, recovery time, final metrics
    "katib_bo_vs_random.py",  # trials to 95% of the grid's best, Bayesian vs random
    "image_bench.py",  # image build times and size, start-up and job wall time in containers vs processes
]


def main() -> int:
    failed = []
    for script in SCRIPTS:
        if not (HERE / script).is_file():
            print(f"## {script}: missing", flush=True)
            failed.append(script)
            continue
        print(f"\n## {script}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script)], cwd=HERE.parent).returncode != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
