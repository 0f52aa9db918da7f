"""Katib's Bayesian search against random search over the three tensions, on short real training runs.

Question: how many trials does Katib v0.19's bayesianoptimization need to reach 95% of the best relevance_score
that a dense grid finds, against random search? Goal: Bayesian <= 0.5x random (medians).

Design, for two shared CPU cores:
- Every point of a POINTS**3 grid over the tensions is trained once (`python -m trainer`, STEPS steps, fixed
  seed) and cached (--cache), keyed by the tensions and every trainer flag; re-running the bench with the same
  flags trains nothing. --grid cells (default) puts the values at the centres of POINTS equal cells of [0, 1]
  (0.125, 0.375, 0.625, 0.875), so snapping gives every grid value an equal share of the Experiment's range;
  --grid ends spreads them from 0.01 to 1.0 (the first measurements), where the two end values own half-width
  cells.
- Bayesian: the suggestion service Katib runs (pipelines/sweeps/suggestion.py, scikit-optimize configured as
  Katib's skopt service configures it) with the space, settings and parallelTrialCount of the Experiment
  (--experiment, default katib/base/experiment.yaml; --setting overrides one setting), asked round by round as
  Katib's controller asks it; random_state is the search seed. Each suggestion is rendered into the trial
  template as Katib renders it, the trainer's tension flags are read back (so the template's value encoding is
  what is measured) and snapped to the nearest grid value.
- Random: uniform draws of grid points, seeded searches and their exact distribution (geometric), which has no
  sampling noise. Also exact: Katib's own `random` algorithm, a uniform draw from each parameter's feasible
  space (every int of min..max, every list value), rendered and snapped as the Bayesian suggestions are; it
  differs from the grid draw where the grid values own unequal shares of the range (--grid ends). A search
  that never reaches the target within the budget counts as budget + 1 ("never").
- Limits: 64 points of which few reach the target, snapped suggestions (a GP that proposes 0.5 scores a grid
  neighbour), 60-step runs that rank the tensions differently from the 300-step trials of the Experiment
  (--steps 300 checks that run length: there the top of the landscape is flat and the target easy), one trainer
  seed per point (no noise between repeats).

Choosing the best of several settings on the same seeds flatters it; --first-seed confirms the choice on a fresh
set (Bayesian random_state and random-search seeds both start there).

Run: .venv/bin/python bench/katib_bo_vs_random.py [--points 4] [--grid cells] [--bo-seeds 15] [--random-seeds 201]
     [--first-seed 0] [--experiment FILE] [--setting n_initial_points=6] [--cache FILE]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.sweeps.experiment import observe, read_experiment, render_trial  # noqa: E402
from pipelines.sweeps.suggestion import Observed, make_service  # noqa: E402
from trainer.files import write_json_atomic  # noqa: E402

TENSIONS = ("compress_vs_particularize", "exploit_vs_explore", "focus_vs_diversify")
LOW, HIGH = 0.01, 1.0
GRIDS = ("cells", "ends")


def grid_values(points: int, grid: str = "cells") -> list[float]:
    """The values each tension takes on the grid (see the module docstring for the two layouts)."""
    if grid == "cells":
        return [round((i + 0.5) / points, 6) for i in range(points)]
    step = (HIGH - LOW) / (points - 1)
    return [round(LOW + i * step, 6) for i in range(points)]


def trainer_flags(args: argparse.Namespace) -> list[str]:
    return ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--eval-every", str(args.steps),
            "--eval-size", str(args.eval_size), "--checkpoint-every", str(args.steps), "--seed", str(args.seed),
            "--resume", "never", "--base-model", "tiny"]


def key(point: tuple[float, ...], flags: list[str]) -> str:
    return ",".join(f"{v:.6f}" for v in point) + "|" + " ".join(flags)


def load_cache(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def save_cache(path: Path, cache: dict) -> None:
    write_json_atomic(path, cache)


def train(point: tuple[float, ...], flags: list[str], objective) -> dict:
    with tempfile.TemporaryDirectory(prefix="katib-bench-") as out:
        command = [sys.executable, "-m", "trainer", *flags, "--out", out]
        for name, value in zip(TENSIONS, point):
            command += ["--" + name.replace("_", "-"), repr(value)]
        started = time.monotonic()
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"trainer failed at {point} (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
    obs = observe(proc.stdout, objective)
    return {"metrics": {n: o.latest for n, o in obs.items()}, "seconds": round(time.monotonic() - started, 2)}


def evaluate_grid(args: argparse.Namespace, objective) -> dict[tuple[float, ...], float]:
    flags = trainer_flags(args)
    cache_path = Path(args.cache)
    cache = load_cache(cache_path)
    points = list(itertools.product(grid_values(args.points, args.grid), repeat=3))
    missing = [p for p in points if key(p, flags) not in cache]
    print(f"grid: {len(points)} points, {len(points) - len(missing)} cached, training {len(missing)}", flush=True)
    if missing:
        from concurrent.futures import ThreadPoolExecutor

        env_threads = {"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {}
        os.environ.update(env_threads)
        with ThreadPoolExecutor(args.jobs) as pool:
            for i, (p, result) in enumerate(zip(missing, pool.map(lambda q: train(q, flags, objective), missing)), 1):
                cache[key(p, flags)] = result
                save_cache(cache_path, cache)
                score = result["metrics"][objective.metric]
                print(f"  [{i}/{len(missing)}] {p} {objective.metric}={score} ({result['seconds']} s)", flush=True)
    return {p: float(cache[key(p, flags)]["metrics"][objective.metric]) for p in points}


def tension_values(experiment, assignments: dict[str, str]) -> tuple[float, ...]:
    """The tensions a trial's trainer would read: the trial rendered as Katib renders it, the flags parsed."""
    job = render_trial(experiment, "bench", assignments)
    command = primary_command(experiment, job)
    return tuple(float(command[command.index("--" + t.replace("_", "-")) + 1]) for t in TENSIONS)


def primary_command(experiment, job: dict) -> list[str]:
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    container = next(c for c in master if c["name"] == experiment.primary_container)
    return [*(container.get("command") or []), *(container.get("args") or [])]


def snap(value: float, values: list[float]) -> float:
    return min(values, key=lambda v: abs(v - value))


def bayesian_trials(experiment, seed: int, scores: dict, values: list[float], target: float, budget: int) -> int:
    """Trials until one reaches `target`, Katib's service asked as its controller asks it.

    The first request is for parallelTrialCount suggestions; trials take equally long, so they finish in
    creation order, and each finished trial is told before one replacement is asked for. Every suggestion is
    snapped to the nearest grid value (the grid is all we trained).
    """
    settings = {**experiment.settings, "random_state": str(seed)}
    maximize = experiment.objective.type == "maximize"
    service = make_service(experiment.algorithm, experiment.parameters, settings, maximize)
    running = list(service.get_suggestions([], min(experiment.parallel, budget)))
    observed: list[Observed] = []
    created = len(running)
    while running:
        assignments = running.pop(0)
        point = tuple(snap(v, values) for v in tension_values(experiment, assignments))
        score = scores[point]
        observed.append(Observed(f"trial-{len(observed)}", assignments, score))
        if score >= target:
            return len(observed)
        if created < budget:
            running += service.get_suggestions(observed, 1)
            created += 1
    return budget + 1


def random_trials(seed: int, scores: dict, target: float, budget: int) -> int:
    """Random search over the same grid: each trial a uniformly drawn grid point."""
    rng = random.Random(seed)
    points = sorted(scores)
    for n in range(1, budget + 1):
        if scores[rng.choice(points)] >= target:
            return n
    return budget + 1


def random_quantile(q: float, hit: float, budget: int) -> int:
    """The exact q-quantile of a random search whose every draw reaches the target with probability `hit`.

    Draws with replacement are geometric, P(N > n) = (1 - hit)^n: for random_trials, hit = hits / grid points.
    It has no sampling noise, unlike the median of --random-seeds searches, so the ratio to it is the steadier one.
    """
    miss = 1 - hit
    for n in range(1, budget + 1):
        if 1 - miss ** n >= q:
            return n
    return budget + 1


def katib_random_hit(experiment, scores: dict, values: list[float], target: float) -> float | None:
    """The chance that one draw of Katib's `random` algorithm over the Experiment's space scores >= target.

    Each parameter is drawn on its own, uniformly from its feasible values (every int of min..max, every list
    value), so the chance of a grid point is the product of the shares of each tension's values that render and
    snap to it. None for a `double` parameter (no finite set of values to count).
    """
    if any(p.type == "double" for p in experiment.parameters):
        return None
    base = {p.name: p.format(p.min) if p.type == "int" else p.values[0] for p in experiment.parameters}
    shares: list[dict[float, float]] = [{} for _ in TENSIONS]
    for p in experiment.parameters:
        i = TENSIONS.index(p.name)  # the Experiment's parameters are named after the tensions they feed
        choices = [p.format(v) for v in range(int(p.min), int(p.max) + 1)] if p.type == "int" else list(p.values)
        for choice in choices:
            value = snap(tension_values(experiment, {**base, p.name: choice})[i], values)
            shares[i][value] = shares[i].get(value, 0.0) + 1 / len(choices)
    return sum(math.prod(shares[i].get(v, 0.0) for i, v in enumerate(point))
               for point, score in scores.items() if score >= target)


def spread(counts: list[int], budget: int) -> str:
    q = statistics.quantiles(counts, n=4)
    failed = sum(c > budget for c in counts)
    return f"{min(counts)} / {q[0]:g} / {statistics.median(counts):g} / {q[2]:g} / {max(counts)}" + (
        f" ({failed} never)" if failed else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=4, help="grid values per tension (points**3 training runs)")
    parser.add_argument("--grid", choices=GRIDS, default="cells",
                        help="cells: values at the centres of equal cells of [0, 1]; ends: from 0.01 to 1.0")
    parser.add_argument("--bo-seeds", type=int, default=15, help="Bayesian searches (random_state 0..N-1), >= 5")
    parser.add_argument("--random-seeds", type=int, default=201, help="random searches, >= 5")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="first seed of both searches (a fresh set confirms a choice made on 0..N-1), >= 0")
    parser.add_argument("--budget", type=int, default=0, help="trials per search (default: the grid size)")
    parser.add_argument("--experiment", default=str(ROOT / "katib" / "base" / "experiment.yaml"),
                        help="the Experiment whose space, encoding, settings and parallelTrialCount are searched")
    parser.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                        help="override an algorithmSetting (to compare choices; repeatable)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0, help="trainer seed (the same for every point)")
    parser.add_argument("--cache", help="the grid's scores (default runs/bench/katib_cache_<grid>_<N>x<N>x<N>.json); "
                                         "keyed by tensions and flags, not by the trainer's code: after a trainer "
                                         "change, name a new file")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at once")
    args = parser.parse_args()
    if min(args.bo_seeds, args.random_seeds) < 5 or args.points < 2 or args.first_seed < 0:
        parser.error("--bo-seeds and --random-seeds must be >= 5, --points >= 2 and --first-seed >= 0")

    n = args.points
    args.cache = args.cache or str(ROOT / "runs" / "bench" / f"katib_cache_{args.grid}_{n}x{n}x{n}.json")
    experiment = read_experiment(args.experiment)
    for item in args.setting:
        name, _, value = item.partition("=")
        experiment.settings[name] = value
    scores = evaluate_grid(args, experiment.objective)
    best_point, best = max(scores.items(), key=lambda kv: kv[1])
    target = 0.95 * best
    budget = args.budget or len(scores)
    values = grid_values(args.points, args.grid)
    ordered = sorted(scores.values())
    hits = sum(s >= target for s in ordered)
    print(f"\ngrid best {experiment.objective.metric}={best:.4f} at {dict(zip(TENSIONS, best_point))}")
    print(f"grid min {ordered[0]:.4f}, median {statistics.median(ordered):.4f}; target (95% of best) {target:.4f}; "
          f"{hits}/{len(ordered)} points reach it")

    bo_seeds = range(args.first_seed, args.first_seed + args.bo_seeds)
    bo = [bayesian_trials(experiment, seed, scores, values, target, budget) for seed in bo_seeds]
    rnd = [random_trials(seed, scores, target, budget)
           for seed in range(args.first_seed, args.first_seed + args.random_seeds)]
    print(f"\n| search | seeds | trials to 95% of grid best: min / q1 / median / q3 / max (budget {budget}) |")
    print("|---|---|---|")
    print(f"| Katib {experiment.algorithm} | {len(bo)} | {spread(bo, budget)} |")
    print(f"| random over the grid | {len(rnd)} | {spread(rnd, budget)} |")
    ratio = statistics.median(bo) / statistics.median(rnd)
    exact = [random_quantile(q, hits / len(ordered), budget) for q in (0.25, 0.5, 0.75)]
    print(f"random over the grid, exact distribution ({hits}/{len(ordered)} points at target): "
          f"q1 / median / q3 = {exact[0]} / {exact[1]} / {exact[2]}; "
          f"ratio Bayesian / exact random median: {statistics.median(bo) / exact[1]:.2f}")
    if (hit := katib_random_hit(experiment, scores, values, target)) is not None:
        katib = [random_quantile(q, hit, budget) for q in (0.25, 0.5, 0.75)]
        print(f"Katib's random over the Experiment's space, snapped, exact distribution (a draw reaches the target "
              f"with p={hit:.4f}): q1 / median / q3 = {katib[0]} / {katib[1]} / {katib[2]}; "
              f"ratio Bayesian / its median: {statistics.median(bo) / katib[1]:.2f}")
    shown = ", ".join(f"{k}={v}" for k, v in experiment.settings.items() if k != "random_state")
    print(f"\nratio Bayesian / random (medians): {ratio:.2f} (goal <= 0.5); {shown}; "
          f"parallelTrialCount={experiment.parallel}; per-seed Bayesian (random_state {bo_seeds.start}.."
          f"{bo_seeds.stop - 1}): {bo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
