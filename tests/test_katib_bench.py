"""bench/katib_bo_vs_random.py: the exact random-search baseline and the seed options (no training runs)."""
from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

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
    exact = [bench.random_quantile(q, hits, points, budget) for q in (0.25, 0.5, 0.75)]
    for s, e in zip(simulated, exact):
        assert abs(s - e) <= max(1, 0.1 * e), (simulated, exact)


def test_negative_first_seed_is_a_usage_error(monkeypatch, capsys) -> None:
    bench = _bench()
    monkeypatch.setattr(sys, "argv", ["katib_bo_vs_random.py", "--first-seed", "-1"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2
    assert "--first-seed >= 0" in capsys.readouterr().err
