"""Katib v0.19's suggestion services as the local rehearsal and the benchmark run them, and their setting rules.

Sources (kubeflow/katib at v0.19.0; read, not copied):
- bayesianoptimization: pkg/suggestion/v1beta1/skopt/service.py (OptimizerConfiguration: which settings exist,
  their defaults and checks) and pkg/suggestion/v1beta1/skopt/base_service.py (create_optimizer: every `int` is
  a uniform skopt Integer, every `double` a log-uniform Real WHATEVER its `distribution`, lists are
  Categorical; getSuggestions: tell() the succeeded trials it has not seen, then ask(n_points=<requested>)).
- tpe, multivariate-tpe, cmaes, random: pkg/suggestion/v1beta1/optuna/service.py (the setting conversion:
  random_state -> seed, sigma -> sigma0, constant_liar for both TPEs, multivariate for multivariate-tpe) and
  pkg/suggestion/v1beta1/optuna/base_service.py (the distributions; tell() by matching assignments to the
  study's asked trials).
- which trials a service sees: pkg/suggestion/v1beta1/internal/trial.py (Trial.convert keeps Succeeded and
  EarlyStopped trials that carry the objective metric). Failed trials are never told: skopt never learns
  about them, and after its initial points it proposes the same point again until a new trial succeeds.

kubeflow/manifests 26.03's katib-config routes `random` and `tpe` to the hyperopt image and `cmaes` to goptuna;
only `multivariate-tpe` and `grid` reach the Optuna service. For those three the rehearsal is Katib's Optuna
service, with its setting names, not the exact draws the cluster makes (katib/README.md).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pipelines.sweeps.experiment import LOCAL_ALGORITHMS, OPTUNA_ALGORITHMS, SKOPT_ALGORITHM, SKOPT_DEFAULTS, Parameter


@dataclass(frozen=True)
class Observed:
    """A trial the service is told about: Succeeded (or EarlyStopped) with the objective metric."""

    name: str
    assignments: dict[str, str]
    value: float


class SuggestionService(Protocol):
    def get_suggestions(self, trials: Sequence[Observed], count: int) -> list[dict[str, str]]: ...


# ---------------------------------------------------------------- skopt (bayesianoptimization)


def skopt_config(settings: dict[str, str]) -> dict[str, Any]:
    """OptimizerConfiguration.convert_algorithm_spec: the five settings, ints parsed, defaults kept."""
    config = dict(SKOPT_DEFAULTS)
    for name, value in settings.items():
        config[name] = int(value) if name in ("n_initial_points", "random_state") else value
    return config


def skopt_dimensions(parameters: Sequence[Parameter]) -> list[Any]:
    """create_optimizer's space: uniform Integer, log-uniform Real (distribution and step ignored), Categorical."""
    import skopt

    dims = []
    for p in parameters:
        if p.type == "int":
            dims.append(skopt.space.Integer(int(p.min), int(p.max), name=p.name))
        elif p.type == "double":
            dims.append(skopt.space.Real(float(p.min), float(p.max), "log-uniform", name=p.name))
        else:
            dims.append(skopt.space.Categorical(list(p.values), name=p.name))
    return dims


class SkoptService:
    """One Suggestion's skopt service: the optimizer lives as long as the suggestion, as in Katib."""

    def __init__(self, parameters: Sequence[Parameter], settings: dict[str, str], maximize: bool):
        import skopt

        self.parameters = list(parameters)
        self.maximize = maximize
        self.optimizer = skopt.Optimizer(skopt_dimensions(self.parameters), **skopt_config(settings))
        self.succeeded = 0
        self.recorded: set[str] = set()

    def get_suggestions(self, trials: Sequence[Observed], count: int) -> list[dict[str, str]]:
        # Katib re-tells only when the number of succeeded trials grew (or none has yet).
        if len(trials) > self.succeeded or self.succeeded == 0:
            self.succeeded = len(trials)
            points, losses = [], []
            for trial in trials:
                if trial.name in self.recorded:
                    continue
                self.recorded.add(trial.name)
                points.append([self._parse(p, trial.assignments[p.name]) for p in self.parameters])
                losses.append(-trial.value if self.maximize else trial.value)
            if points:
                self.optimizer.tell(points, losses)
        asked = self.optimizer.ask(n_points=count)
        # Assignment.generate sends str(value).
        return [{p.name: str(v) for p, v in zip(self.parameters, point)} for point in asked]

    @staticmethod
    def _parse(parameter: Parameter, value: str) -> Any:
        if parameter.type == "int":
            return int(value)
        if parameter.type == "double":
            return float(value)
        return value


# ---------------------------------------------------------------- optuna (tpe, multivariate-tpe, cmaes, random)


def optuna_config(algorithm: str, settings: dict[str, str]) -> dict[str, Any]:
    """OptimizerConfiguration.convert_algorithm_spec of the optuna service: sampler keyword arguments."""
    config: dict[str, Any] = {}
    for name, value in settings.items():
        if name == "random_state":
            config["seed"] = int(value)
        elif name == "sigma":
            config["sigma0"] = float(value)
        elif name == "restart_strategy":
            config["restart_strategy"] = None if value in ("None", "none") else value
        elif name in ("n_startup_trials", "n_ei_candidates"):
            config[name] = int(value)
    if algorithm in ("tpe", "multivariate-tpe"):
        config["constant_liar"] = True
    if algorithm == "multivariate-tpe":
        config["multivariate"] = True
    return config


def optuna_sampler(algorithm: str, settings: dict[str, str]) -> Any:
    import optuna

    config = optuna_config(algorithm, settings)
    if algorithm in ("tpe", "multivariate-tpe"):
        return optuna.samplers.TPESampler(**config)
    if algorithm == "cmaes":
        return optuna.samplers.CmaEsSampler(**config)
    return optuna.samplers.RandomSampler(**config)


def optuna_distributions(parameters: Sequence[Parameter]) -> dict[str, Any]:
    """_get_optuna_search_space: uniform (stepped when a step is given) or log-uniform; lists categorical."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space: dict[str, Any] = {}
    for p in parameters:
        log = p.distribution == "logUniform"
        if p.type == "int":
            # Katib's search_space.py defaults an int's step to 1.
            space[p.name] = (IntDistribution(max(1, int(p.min)), int(p.max), log=True, step=1) if log
                             else IntDistribution(int(p.min), int(p.max), step=int(p.step or 1)))
        elif p.type == "double":
            space[p.name] = (FloatDistribution(max(1e-10, p.min), p.max, log=True) if log
                             else FloatDistribution(p.min, p.max, step=p.step or None))
        else:
            space[p.name] = CategoricalDistribution(list(p.values))
    return space


class OptunaService:
    """One Suggestion's optuna service: a study, asked trials remembered by their assignments."""

    def __init__(self, algorithm: str, parameters: Sequence[Parameter], settings: dict[str, str],
                 maximize: bool):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space = optuna_distributions(parameters)
        self.study = optuna.create_study(sampler=optuna_sampler(algorithm, settings),
                                         direction="maximize" if maximize else "minimize")
        self.numbers: dict[str, list[int]] = defaultdict(list)
        self.recorded: set[str] = set()

    @staticmethod
    def _key(assignments: dict[str, str]) -> str:
        return ",".join(f"{k}:{assignments[k]}" for k in sorted(assignments))

    def get_suggestions(self, trials: Sequence[Observed], count: int) -> list[dict[str, str]]:
        for trial in trials:
            if trial.name in self.recorded:
                continue
            self.recorded.add(trial.name)
            numbers = self.numbers[self._key(trial.assignments)]
            if not numbers:
                raise ValueError(f"trial {trial.name}: not a trial this service suggested")
            self.study.tell(numbers.pop(0), trial.value)
        suggestions = []
        for _ in range(count):
            asked = self.study.ask(fixed_distributions=self.space)
            assignments = {k: str(v) for k, v in asked.params.items()}
            self.numbers[self._key(assignments)].append(asked.number)
            suggestions.append(assignments)
        return suggestions


def make_service(algorithm: str, parameters: Sequence[Parameter], settings: dict[str, str],
                 maximize: bool) -> SuggestionService:
    """The service Katib would start for `algorithm`; ValueError for one the rehearsal does not run."""
    if algorithm == SKOPT_ALGORITHM:
        return SkoptService(parameters, settings, maximize)
    if algorithm in OPTUNA_ALGORITHMS:
        return OptunaService(algorithm, parameters, settings, maximize)
    raise ValueError(f"algorithm {algorithm!r}; the local rehearsal runs: {', '.join(LOCAL_ALGORITHMS)}")
