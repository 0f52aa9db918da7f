"""Preemption drill: a local 2-replica PyTorchJob (Master + 1 Worker, restartPolicy ExitCode) whose
master or worker is killed with SIGTERM or SIGKILL at a chosen step, next to an uninterrupted run with
the same seed. Reports steps lost, time to recover, restarts and the final metrics.

    .venv/bin/python bench/preemption_drill.py                       # all scenarios, table on stdout
    .venv/bin/python bench/preemption_drill.py --only master:SIGTERM --at-step 25
    .venv/bin/python bench/preemption_drill.py --write docs/preemption.md

The job is the one the pipeline launches (pipelines/jobs/pytorchjob.py), run by the local runner
(pipelines/jobs/local.py), which restarts the whole replica group on a retryable exit.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, markdown_table

from pipelines.jobs.local import Chaos, run_local
from pipelines.jobs.pytorchjob import build_pytorchjob, to_manifest
from pipelines.jobs.team_config import TeamConfig

SCENARIOS = ["master:SIGTERM", "worker:SIGTERM", "master:SIGKILL", "worker:SIGKILL"]
REPLICA = {"master": "master-0", "worker": "worker-0"}
RANK = {"master": 0, "worker": 1}


def job(name: str, steps: int, checkpoint_every: int) -> dict:
    args = ["--steps", str(steps), "--batch-size", "16", "--eval-every", str(steps // 2), "--eval-size", "128",
            "--checkpoint-every", str(checkpoint_every), "--log-every", "1", "--seed", "7"]
    manifest = build_pytorchjob(name, team=TeamConfig.local_default(), trainer_args=args, workers=1,
                                nproc_per_node="1", env={"OMP_NUM_THREADS": "1"})
    return to_manifest(manifest)


def metrics_of(workdir: Path) -> dict:
    found = sorted(workdir.rglob("metrics.json"))
    return json.loads(found[0].read_text()) if found else {}


def drill(scenario: str | None, steps: int, every: int, at_step: int, workdir: Path) -> dict:
    chaos = []
    if scenario:
        who, sig = scenario.split(":")
        pattern = rf"^\[rank {RANK[who]}\] step {at_step}/"
        chaos = [Chaos(replica=REPLICA[who], signal=getattr(signal, sig), log_pattern=pattern,
                       recovery_pattern=r"^\[rank 0\] step \d+/")]
    began = time.perf_counter()
    result = run_local(job("drill", steps, every), workdir, timeout=1200, log_stream=None, chaos=chaos)
    wall = time.perf_counter() - began
    log = result.master_log.read_text()
    resumed = [int(m) for m in re.findall(r"resumed from .* at step (\d+)", log)]
    event = result.chaos[0] if result.chaos else None
    # the last step the master finished before the group restarted, from its log before the first resume
    before = log.split("resumed from")[0]
    done_before = max((int(m) for m in re.findall(r"^\[rank 0\] step (\d+)/", before, re.M)), default=0)
    return {
        "scenario": scenario or "uninterrupted", "succeeded": result.succeeded,
        "reason": result.final.get("reason", ""),
        "restarts": sum(result.restarts.values()) and max(result.restarts.values()),
        "exit_codes": result.exit_codes, "resumed_from": resumed[-1] if resumed else None,
        "steps_lost": (done_before - resumed[-1]) if (event and resumed) else (None if event else 0),
        "recovery_s": event.recovery_seconds if event else None, "wall_s": wall, "metrics": metrics_of(workdir),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--at-step", type=int, default=25)
    parser.add_argument("--only", choices=SCENARIOS, action="append")
    parser.add_argument("--write", help="also write the table to this Markdown file (relative to the repo)")
    args = parser.parse_args()
    rows, failures = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        base = drill(None, args.steps, args.checkpoint_every, args.at_step, Path(tmp) / "base")
        results = [base] + [drill(s, args.steps, args.checkpoint_every, args.at_step, Path(tmp) / s.replace(":", "-"))
                            for s in (args.only or SCENARIOS)]
    for r in results:
        same = r["metrics"] == base["metrics"] and bool(r["metrics"])
        failures += not (r["succeeded"] and same)
        rows.append([r["scenario"], "Succeeded" if r["succeeded"] else f"Failed ({r['reason']})", r["restarts"],
                     "-" if r["resumed_from"] is None else r["resumed_from"],
                     "-" if r["steps_lost"] is None else r["steps_lost"],
                     "-" if r["recovery_s"] is None else round(r["recovery_s"], 1),
                     r["metrics"].get("relevance_score", float("nan")), "yes" if same else "NO"])
    table = markdown_table(["scenario", "job", "restarts", "resumed from step", "steps lost", "recovery s",
                            "final relevance_score", "metrics.json == uninterrupted"], rows)
    summary = (f"{args.steps} steps, checkpoint every {args.checkpoint_every}, kill at step {args.at_step}; "
               f"2 replicas on this machine's CPU, gloo. Recovery = from the kill to the restarted master's first "
               f"training step (includes process start-up and resume).")
    print(table)
    print(summary)
    if args.write:
        (REPO / args.write).write_text("# Preemption drill (bench/preemption_drill.py)\n\n"
                                       + table + "\n\n" + summary + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
