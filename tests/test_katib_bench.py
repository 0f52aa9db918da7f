"""bench/katib_bo_vs_random.py: the exact random-search baselines, the grids and the seed options (no training runs)."""
from __future__ import annotations

import importlib.util
import itertools
import statistics
import sys
from pathlib import Path

import pytest

from pipelines.sweeps.experiment import read_experiment

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("katib_bo_vs_random", ROOT / "bench" / "katib_bo_vs_random.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("hits", "points", "budget"), [(2, 64, 64), (5, 125, 125), (1, 8, 4)])
def test_exact_random_quantiles_match_simulated_searches(hits: int, points: int, budget: int) -> None:
    """The closed form the ratio divides by agrees with random_trials itself, over many seeded searches."""
    bench = _bench()
    scores = {i: 1.0 if i < hits else 0.0 for i in range(points)}
    counts = [bench.random_trials(seed, scores, 0.5, budget) for seed in range(4000)]
    simulated = statistics.quantiles(counts, n=4)
    exact = [bench.random_quantile(q, hits / points, budget) for q in (0.25, 0.5, 0.75)]
    for s, e in zip(simulated, exact):
        assert abs(s - e) <= max(1, 0.1 * e), (simulated, exact)


def test_negative_first_seed_is_a_usage_error(monkeypatch, capsys) -> None:
    bench = _bench()
    monkeypatch.setattr(sys, "argv", ["katib_bo_vs_random.py", "--first-seed", "-1"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    assert "--first-seed >= 0" in capsys.readouterr().err


@pytest.mark.parametrize(("grid", "values"),
                         [("cells", [0.125, 0.375, 0.625, 0.875]), ("ends", [0.01, 0.34, 0.67, 1.0])])
def test_grid_layouts(grid: str, values: list[float]) -> None:
    assert _bench().grid_values(4, grid) == values


def test_katib_random_counts_the_ints_that_snap_to_each_grid_value() -> None:
    """The shipped Experiment's ints 0..100 pass through the trial template as `<int>e-2` and snap to the grid.

    On the ends grid 0.01 owns ints 0..17 (18 of 101) and 0.67 owns 51..83 (33); on the cells grid every value
    owns 25 or 26 ints, so Katib's random search and a uniform draw of grid points nearly agree.
    """
    bench = _bench()
    experiment = read_experiment(ROOT / "katib" / "base" / "experiment.yaml")
    ends = bench.grid_values(4, "ends")
    scores = {point: 0.0 for point in itertools.product(ends, repeat=3)}
    scores[(0.01, 0.67, 0.67)] = 1.0
    assert bench.katib_random_hit(experiment, scores, ends, 0.9) == pytest.approx(18 * 33 * 33 / 101**3)
    scores[(1.0, 0.34, 0.67)] = 1.0  # 84..100 (17) x 18..50 (33) x 33
    assert bench.katib_random_hit(experiment, scores, ends, 0.9) == pytest.approx((18 + 17) * 33 * 33 / 101**3)

    cells = bench.grid_values(4, "cells")
    scores = {point: 0.0 for point in itertools.product(cells, repeat=3)}
    for corner in ((0.125, 0.125, 0.125), (0.875, 0.875, 0.875)):
        scores[corner] = 1.0
        share = bench.katib_random_hit(experiment, scores, cells, 0.9)
        assert abs(share - 1 / 64) < 0.002, share
        scores[corner] = 0.0
