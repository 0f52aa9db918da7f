"""Katib v0.19's suggestion services as the rehearsal configures them: space conversion and settings mapping.

The expected values are read off kubeflow/katib v0.19.0 (skopt/base_service.py create_optimizer,
skopt/service.py OptimizerConfiguration, optuna/service.py and optuna/base_service.py), written out here by
hand so that a change on our side that drifts from Katib fails.
"""
from __future__ import annotations

import pytest

from pipelines.sweeps.experiment import SETTINGS, Parameter, setting_problem, skopt_double_problem, space_problem
from pipelines.sweeps.suggestion import (
    OptunaService,
    SkoptService,
    make_service,
    optuna_config,
    optuna_distributions,
    skopt_config,
    skopt_dimensions,
)

SPACE = [
    Parameter("lr", "double", 0.001, 0.1, distribution="uniform"),
    Parameter("stepped", "double", 0.25, 1.0, step=0.25),
    Parameter("depth", "int", 2, 8),
    Parameter("width", "int", 16, 256, distribution="logUniform"),
    Parameter("act", "categorical", values=("relu", "gelu")),
    Parameter("heads", "discrete", values=("2", "4")),
]


def test_skopt_space_is_katibs_whatever_the_distribution() -> None:
    dims = {d.name: d for d in skopt_dimensions(SPACE)}
    # Every double: Real log-uniform (distribution "uniform" and a step are ignored).
    assert (type(dims["lr"]).__name__, dims["lr"].prior, dims["lr"].bounds) == ("Real", "log-uniform", (0.001, 0.1))
    assert dims["stepped"].prior == "log-uniform"
    # Every int: a uniform Integer, logUniform ignored.
    width = dims["width"]
    assert (type(width).__name__, width.prior, width.bounds) == ("Integer", "uniform", (16, 256))
    assert type(dims["act"]).__name__ == "Categorical" and list(dims["heads"].categories) == ["2", "4"]


@pytest.mark.parametrize(("settings", "expected"), [
    ({}, {"base_estimator": "GP", "n_initial_points": 10, "acq_func": "gp_hedge", "acq_optimizer": "auto",
          "random_state": None}),
    ({"base_estimator": "RF", "n_initial_points": "3", "acq_func": "EI", "acq_optimizer": "sampling",
      "random_state": "7"},
     {"base_estimator": "RF", "n_initial_points": 3, "acq_func": "EI", "acq_optimizer": "sampling", "random_state": 7}),
])
def test_skopt_settings_map_as_katib_maps_them(settings: dict, expected: dict) -> None:
    assert skopt_config(settings) == expected


@pytest.mark.parametrize(("algorithm", "settings", "expected"), [
    ("tpe", {"n_startup_trials": "4", "n_ei_candidates": "12", "random_state": "3"},
     {"n_startup_trials": 4, "n_ei_candidates": 12, "seed": 3, "constant_liar": True}),
    ("multivariate-tpe", {"random_state": "1"}, {"seed": 1, "constant_liar": True, "multivariate": True}),
    ("cmaes", {"restart_strategy": "none", "sigma": "0.3", "random_state": "2"},
     {"restart_strategy": None, "sigma0": 0.3, "seed": 2}),
    ("cmaes", {"restart_strategy": "ipop"}, {"restart_strategy": "ipop"}),
    ("random", {"random_state": "5"}, {"seed": 5}),
])
def test_optuna_settings_map_as_katib_maps_them(algorithm: str, settings: dict, expected: dict) -> None:
    assert optuna_config(algorithm, settings) == expected


@pytest.mark.parametrize(("algorithm", "sampler"), [
    ("tpe", "TPESampler"), ("multivariate-tpe", "TPESampler"), ("cmaes", "CmaEsSampler"), ("random", "RandomSampler"),
    ("bayesianoptimization", None),
])
def test_each_algorithm_gets_its_service(algorithm: str, sampler: str | None) -> None:
    service = make_service(algorithm, SPACE[:4], {"random_state": "0"}, maximize=True)
    if sampler is None:
        assert isinstance(service, SkoptService)
    else:
        assert isinstance(service, OptunaService) and type(service.study.sampler).__name__ == sampler
    suggestions = service.get_suggestions([], 2)
    assert len(suggestions) == 2 and all(set(s) == {"lr", "stepped", "depth", "width"} for s in suggestions)
    assert all(isinstance(v, str) for s in suggestions for v in s.values())


def test_optuna_space_honours_distribution_and_step() -> None:
    space = optuna_distributions(SPACE)
    assert space["lr"].log is False and space["stepped"].step == 0.25  # skopt would ignore both
    assert space["width"].log is True and space["depth"].step == 1
    assert list(space["act"].choices) == ["relu", "gelu"]


@pytest.mark.parametrize(("algorithm", "name", "value", "problem"), [
    ("bayesianoptimization", "acq_func", "EI", None),
    ("bayesianoptimization", "acq_func", "UCB", "acq_func='UCB' is not supported; allowed: gp_hedge, LCB, EI"),
    ("bayesianoptimization", "n_initial_points", "-1", "must be an integer >= 0"),
    ("bayesianoptimization", "xi", "0.1", "unknown setting 'xi' for bayesianoptimization; allowed: base_estimator"),
    ("tpe", "n_ei_candidates", "24", None),
    ("multivariate-tpe", "n_startup_trials", "x", "must be an integer >= 0"),
    ("cmaes", "sigma", "0.5", None),
    ("cmaes", "restart_strategy", "bipop", "allowed: ipop, None, none"),
    ("random", "seed", "1", "unknown setting 'seed' for random; allowed: random_state"),
    ("hyperband", "anything", "1", None),  # its service validates its own settings
])
def test_settings_rule_table(algorithm: str, name: str, value: str, problem: str | None) -> None:
    found = setting_problem(algorithm, name, value)
    assert (found is None) if problem is None else (problem in found)


def test_rule_table_covers_every_local_algorithm() -> None:
    assert set(SETTINGS) == {"bayesianoptimization", "tpe", "multivariate-tpe", "cmaes", "random"}
    assert space_problem("cmaes", ["double", "categorical"]) and space_problem("cmaes", ["int", "double"]) is None


@pytest.mark.parametrize(("low", "high", "level"), [(0.0, 1.0, "error"), (0.01, 1.0, "warning"),
                                                    (0.1, 1.0, None), (0.2, 0.9, None)])
def test_log_uniform_trap(low: float, high: float, level: str | None) -> None:
    found = skopt_double_problem(low, high)
    assert (found and found[0]) == level or (found is None and level is None)
