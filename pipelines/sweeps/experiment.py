"""A Katib v1beta1 Experiment, read the way Katib v0.19 reads it.

What this module reproduces, and where Katib does it (kubeflow/katib, read through the search tool):
- validation: the experiment webhook (pkg/webhook/v1beta1/experiment/validator/validator.go) for names,
  budget, objective, parameters and trial parameters; the skopt suggestion service
  (pkg/suggestion/v1beta1/skopt/service.py) and the optuna service (pkg/suggestion/v1beta1/optuna/service.py)
  for the algorithm settings: SETTINGS below is the one table `arrcoc validate` and the rehearsal both use.
- defaults: experiment_defaults.go (parallelTrialCount 3, resumePolicy Never, StdOut collector, metric
  strategies: objective AND additional metrics follow the objective type, max for maximize, min for minimize).
- substitution: the trial template is rendered to JSON text, `${trialParameters.<name>}` is replaced by the
  assignment (or the trial's metadata for references like `${trialSpec.Name}`) and parsed back.
- metrics: the StdOut collector (file-metricscollector.go) keeps lines that contain a metric name, applies
  the filter regex, and the trial controller (trial_controller_util.go getMetrics) keeps min, max and latest;
  status_util.go getObjectiveMetricValue picks one by the metric's strategy.

Bad input raises ExperimentError (exit code 2) with one line naming the file and the field.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.yaml_files import load_documents
from trainer.errors import UserError

# Katib's default StdOut filter (pkg/metricscollector/v1beta1/common/const.go DefaultFilter).
DEFAULT_METRICS_FORMAT = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"
UNAVAILABLE = "unavailable"

PARAMETER_TYPES = ("double", "int", "discrete", "categorical")
DISTRIBUTIONS = ("uniform", "logUniform", "normal", "logNormal")
OBJECTIVE_TYPES = ("maximize", "minimize")
METRIC_STRATEGIES = ("min", "max", "latest")
RESUME_POLICIES = ("Never", "LongRunning", "FromVolume")
COLLECTOR_KINDS = ("StdOut", "File", "TensorFlowEvent", "PrometheusMetric", "Custom", "None", "Push")
# Algorithms a Katib v0.19 install serves (katib-config suggestion images).
KATIB_ALGORITHMS = (
    "random", "grid", "bayesianoptimization", "tpe", "multivariate-tpe", "cmaes", "sobol",
    "hyperband", "pbt", "enas", "darts",
)
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_PARAM_PLACEHOLDER_RE = re.compile(r"\$\{trialParameters\..+?\}")
_META_REF_RE = re.compile(r"^\$\{trialSpec\.(.+?)\}$")
_META_INDEX_RE = re.compile(r"^(.+)\[(.+)]$")
_META_KEYS = ("Name", "Namespace", "Kind", "APIVersion", "Labels", "Annotations")


class ExperimentError(UserError):
    """A manifest Katib would reject, or that the local rehearsal cannot run: one line, exit code 2."""


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str  # one of PARAMETER_TYPES
    min: float | None = None
    max: float | None = None
    step: float | None = None
    values: tuple[str, ...] = ()
    distribution: str = "uniform"

    def format(self, value: Any) -> str:
        """The string Katib puts in the trial's parameterAssignments."""
        if self.type == "int":
            return str(int(value))
        if self.type == "double":
            return repr(float(value))
        return str(value)


SKOPT_ALGORITHM = "bayesianoptimization"
OPTUNA_ALGORITHMS = ("tpe", "multivariate-tpe", "cmaes", "random")
LOCAL_ALGORITHMS = (SKOPT_ALGORITHM, *OPTUNA_ALGORITHMS)
# skopt's Real(..., "log-uniform") over more than this ratio puts most draws in the lowest decades.
LOG_UNIFORM_WARN_RATIO = 10.0


@dataclass(frozen=True)
class Setting:
    """One algorithmSetting a suggestion service accepts: a fixed set of strings, or a number >= 0."""

    choices: tuple[str, ...] = ()
    number: type | None = None  # int or float

    def problem(self, value: str) -> str | None:
        """None when the service's ValidateAlgorithmSettings accepts `value`, else why not (a phrase)."""
        if self.choices:
            return None if value in self.choices else f"is not supported; allowed: {', '.join(self.choices)}"
        kind = "an integer" if self.number is int else "a number"
        try:
            number = self.number(value)
        except (TypeError, ValueError):
            return f"must be {kind} >= 0"
        return None if number >= 0 and math.isfinite(number) else f"must be {kind} >= 0"


_COUNT = Setting(number=int)
# The one table of the settings each algorithm's service accepts (its ValidateAlgorithmSettings).
SETTINGS: dict[str, dict[str, Setting]] = {
    SKOPT_ALGORITHM: {
        "base_estimator": Setting(("GP", "RF", "ET", "GBRT")),
        "n_initial_points": _COUNT,
        "acq_func": Setting(("gp_hedge", "LCB", "EI", "PI", "EIps", "PIps")),
        "acq_optimizer": Setting(("auto", "sampling", "lbfgs")),
        "random_state": _COUNT,
    },
    "tpe": {"n_startup_trials": _COUNT, "n_ei_candidates": _COUNT, "random_state": _COUNT},
    "multivariate-tpe": {"n_startup_trials": _COUNT, "n_ei_candidates": _COUNT, "random_state": _COUNT},
    "cmaes": {"restart_strategy": Setting(("ipop", "None", "none")), "sigma": Setting(number=float),
              "random_state": _COUNT},
    "random": {"random_state": _COUNT},
}
# OptimizerConfiguration's defaults in Katib's skopt/service.py (skopt's own default acq_func would be the same).
SKOPT_DEFAULTS = {"base_estimator": "GP", "n_initial_points": 10, "acq_func": "gp_hedge", "acq_optimizer": "auto",
                  "random_state": None}


def setting_problem(algorithm: str, name: str, value: str) -> str | None:
    """Why the algorithm's service rejects the setting, or None. Algorithms outside SETTINGS are not checked."""
    table = SETTINGS.get(algorithm)
    if table is None:
        return None
    if name not in table:
        return f"unknown setting {name!r} for {algorithm}; allowed: {', '.join(table)}"
    problem = table[name].problem(value)
    return None if problem is None else f"{name}={value!r} {problem}"


def space_problem(algorithm: str, parameter_types: Sequence[str]) -> str | None:
    """The optuna service's one check on the space: cmaes needs two or more int/double parameters."""
    if algorithm == "cmaes" and sum(t in ("int", "double") for t in parameter_types) < 2:
        return "cmaes needs two or more int or double parameters"
    return None


def skopt_double_problem(low: float, high: float) -> tuple[str, str] | None:
    """("error" | "warning", phrase) for a double under bayesianoptimization, which skopt searches log-uniformly."""
    if low <= 0:
        return "error", f"min={low:g} must be > 0: bayesianoptimization searches every double log-uniformly"
    if high / low > LOG_UNIFORM_WARN_RATIO:
        decades = math.log10(high / low)
        return "warning", (
            f"spans {decades:.1f} decades ({low:g}..{high:g}) and bayesianoptimization draws doubles from a "
            f"log-uniform prior: only {1 / decades:.0%} of draws land in the top decade; use an int passed on "
            f"scaled (e.g. ${{trialParameters.x}}e-2) or a range within one decade"
        )
    return None

@dataclass(frozen=True)
class Objective:
    type: str
    metric: str
    goal: float | None
    additional: tuple[str, ...]
    strategies: dict[str, str]  # metric name -> min | max | latest, defaults filled as Katib does

    @property
    def metric_names(self) -> list[str]:
        """Objective first: the collector reports 'unavailable' for metrics[0] when it is missing."""
        return [self.metric, *self.additional]

    def reached(self, value: float) -> bool:
        if self.goal is None:
            return False
        return value >= self.goal if self.type == "maximize" else value <= self.goal

    def better(self, a: float, b: float) -> bool:
        return a > b if self.type == "maximize" else a < b


@dataclass(frozen=True)
class TrialParameter:
    name: str
    reference: str


@dataclass
class Experiment:
    name: str
    namespace: str | None
    parameters: list[Parameter]
    objective: Objective
    algorithm: str
    settings: dict[str, str]
    max_trials: int | None
    parallel: int
    max_failed: int | None
    resume_policy: str
    collector_kind: str
    metrics_formats: list[str]
    primary_container: str
    primary_pod_labels: dict[str, str]
    success_condition: str
    failure_condition: str
    trial_parameters: list[TrialParameter]
    trial_spec: dict
    source: str = "<manifest>"
    manifest: dict = field(default_factory=dict, repr=False)

    def parameter(self, name: str) -> Parameter:
        return next(p for p in self.parameters if p.name == name)


def load_manifest(path: str | Path) -> dict:
    """The one Experiment in a YAML file (a single manifest or a rendered multi-document build)."""
    path = Path(path)
    docs = load_documents(path, ExperimentError)
    experiments = [d for d in docs if isinstance(d, dict) and d.get("kind") == "Experiment"]
    if len(experiments) != 1:
        kinds = ", ".join(sorted({str(d.get("kind")) for d in docs if isinstance(d, dict)})) or "none"
        raise ExperimentError(
            f"{path}: expected exactly one document of kind Experiment (kubeflow.org/v1beta1), "
            f"found {len(experiments)} (kinds: {kinds})"
        )
    doc = experiments[0]
    if doc.get("apiVersion") != "kubeflow.org/v1beta1":
        raise ExperimentError(f"{path}: apiVersion={doc.get('apiVersion')!r}; allowed: kubeflow.org/v1beta1")
    return doc


def read_experiment(path: str | Path) -> Experiment:
    return parse_experiment(load_manifest(path), source=str(path))


def _require(mapping: Any, key: str, where: str, source: str) -> Any:
    if not isinstance(mapping, dict) or mapping.get(key) in (None, ""):
        raise ExperimentError(f"{source}: {where}.{key} is required")
    return mapping[key]


def _int_field(spec: dict, key: str, source: str, minimum: int) -> int | None:
    if spec.get(key) is None:
        return None
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ExperimentError(f"{source}: spec.{key}={value!r} must be an integer")
    if value < minimum:
        relation = "greater than 0" if minimum == 1 else "not less than 0"
        raise ExperimentError(f"{source}: spec.{key}={value} must be {relation}")
    return value


def _float(value: Any, where: str, source: str) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ExperimentError(f"{source}: {where}={value!r} is not a number") from None
    if not math.isfinite(result):
        raise ExperimentError(f"{source}: {where}={value!r} must be finite")
    return result


def _objective(spec: dict, source: str) -> Objective:
    obj = spec.get("objective")
    if not isinstance(obj, dict):
        raise ExperimentError(f"{source}: spec.objective is required (type, objectiveMetricName, goal)")
    kind = obj.get("type")
    if kind not in OBJECTIVE_TYPES:
        raise ExperimentError(f"{source}: spec.objective.type={kind!r}; allowed: {', '.join(OBJECTIVE_TYPES)}")
    metric = _require(obj, "objectiveMetricName", "spec.objective", source)
    additional = tuple(obj.get("additionalMetricNames") or ())
    if metric in additional:
        raise ExperimentError(
            f"{source}: spec.objective.additionalMetricNames should not contain objectiveMetricName {metric!r}"
        )
    goal = obj.get("goal")
    goal = None if goal is None else _float(goal, "spec.objective.goal", source)
    given: dict[str, str] = {}
    for i, strategy in enumerate(obj.get("metricStrategies") or []):
        name, value = (strategy or {}).get("name"), (strategy or {}).get("value")
        if value not in METRIC_STRATEGIES:
            raise ExperimentError(
                f"{source}: spec.objective.metricStrategies[{i}].value={value!r}; "
                f"allowed: {', '.join(METRIC_STRATEGIES)}"
            )
        given[str(name)] = value
    # experiment_defaults.go: every metric without a strategy follows the objective type.
    default = "max" if kind == "maximize" else "min"
    strategies = {name: given.get(name, default) for name in (metric, *additional)}
    return Objective(type=kind, metric=metric, goal=goal, additional=additional, strategies=strategies)


def _algorithm(spec: dict, source: str) -> tuple[str, dict[str, str]]:
    algo = spec.get("algorithm")
    name = algo.get("algorithmName") if isinstance(algo, dict) else None
    if not name:
        raise ExperimentError(f"{source}: spec.algorithm.algorithmName is required; "
                              f"allowed: {', '.join(KATIB_ALGORITHMS)}")
    if name not in KATIB_ALGORITHMS:
        raise ExperimentError(f"{source}: spec.algorithm.algorithmName={name!r}; "
                              f"allowed: {', '.join(KATIB_ALGORITHMS)}")
    settings: dict[str, str] = {}
    for i, setting in enumerate(algo.get("algorithmSettings") or []):
        key = (setting or {}).get("name")
        value = (setting or {}).get("value")
        if not key:
            raise ExperimentError(f"{source}: spec.algorithm.algorithmSettings[{i}].name is required")
        settings[str(key)] = "" if value is None else str(value)
    validate_settings(name, settings, source)
    return name, settings


def validate_settings(algorithm: str, settings: dict[str, str], source: str) -> None:
    """Reject what Katib's suggestion service rejects (ValidateAlgorithmSettings), by the SETTINGS table."""
    for key, value in settings.items():
        problem = setting_problem(algorithm, key, value)
        if problem:
            raise ExperimentError(f"{source}: spec.algorithm.algorithmSettings: {problem}")


def _parameters(spec: dict, source: str) -> list[Parameter]:
    raw = spec.get("parameters")
    if not raw:
        raise ExperimentError(f"{source}: spec.parameters is required (the search space)")
    params: list[Parameter] = []
    for i, p in enumerate(raw):
        where = f"spec.parameters[{i}]"
        name = _require(p, "name", where, source)
        kind = p.get("parameterType")
        if kind not in PARAMETER_TYPES:
            raise ExperimentError(f"{source}: {where}.parameterType={kind!r}; allowed: {', '.join(PARAMETER_TYPES)}")
        space = p.get("feasibleSpace") or {}
        if not space:
            raise ExperimentError(f"{source}: {where}.feasibleSpace is required")
        distribution = space.get("distribution") or "uniform"
        if distribution not in DISTRIBUTIONS:
            raise ExperimentError(
                f"{source}: {where}.feasibleSpace.distribution={distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}"
            )
        if kind in ("double", "int"):
            if space.get("list"):
                raise ExperimentError(f"{source}: {where}.feasibleSpace.list is not supported for parameterType {kind}")
            if space.get("min") in (None, "") or space.get("max") in (None, ""):
                raise ExperimentError(f"{source}: {where}.feasibleSpace.min and .max "
                                      f"are required for parameterType {kind}")
            low = _float(space["min"], f"{where}.feasibleSpace.min", source)
            high = _float(space["max"], f"{where}.feasibleSpace.max", source)
            if low >= high:
                raise ExperimentError(f"{source}: {where}.feasibleSpace: min={low} must be less than max={high}")
            step = space.get("step")
            step = None if step in (None, "") else _float(step, f"{where}.feasibleSpace.step", source)
            params.append(Parameter(name, kind, low, high, step, (), distribution))
        else:
            if any(space.get(k) not in (None, "") for k in ("min", "max", "step")):
                raise ExperimentError(f"{source}: {where}.feasibleSpace .min, .max and .step "
                                      f"are not supported for {kind}")
            values = tuple(str(v) for v in space.get("list") or ())
            if not values:
                raise ExperimentError(f"{source}: {where}.feasibleSpace.list is required for parameterType {kind}")
            params.append(Parameter(name, kind, values=values, distribution=distribution))
    names = [p.name for p in params]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ExperimentError(f"{source}: spec.parameters: duplicate names {', '.join(duplicates)}")
    return params


def _is_meta_reference(reference: str) -> bool:
    match = _META_REF_RE.match(reference)
    if not match:
        return False
    key = match.group(1)
    if key in _META_KEYS:
        return True
    indexed = _META_INDEX_RE.match(key)
    return bool(indexed) and indexed.group(1) in ("Labels", "Annotations")


def _trial_template(spec: dict, params: list[Parameter], source: str) -> dict:
    tt = spec.get("trialTemplate")
    if not isinstance(tt, dict):
        raise ExperimentError(f"{source}: spec.trialTemplate is required")
    _require(tt, "primaryContainerName", "spec.trialTemplate", source)
    if not tt.get("successCondition") or not tt.get("failureCondition"):
        raise ExperimentError(f"{source}: spec.trialTemplate.successCondition and failureCondition must be specified")
    if tt.get("trialParameters") is None:
        raise ExperimentError(f"{source}: spec.trialTemplate.trialParameters is required")
    if tt.get("configMap") is not None:
        raise ExperimentError(
            f"{source}: spec.trialTemplate.configMap: the local rehearsal needs an inline spec.trialTemplate.trialSpec"
        )
    trial_spec = tt.get("trialSpec")
    if not isinstance(trial_spec, dict):
        raise ExperimentError(f"{source}: spec.trialTemplate.trialSpec is required")
    if not trial_spec.get("apiVersion") or not trial_spec.get("kind"):
        raise ExperimentError(f"{source}: spec.trialTemplate.trialSpec: apiVersion and kind must be specified")
    meta = trial_spec.get("metadata") or {}
    if meta.get("name") or meta.get("namespace"):
        raise ExperimentError(f"{source}: spec.trialTemplate.trialSpec: "
                              "metadata.name and metadata.namespace must be omitted")

    text = json.dumps(trial_spec)
    param_names = {p.name for p in params}
    seen_names: set[str] = set()
    seen_refs: set[str] = set()
    for i, tp in enumerate(tt["trialParameters"]):
        where = f"spec.trialTemplate.trialParameters[{i}]"
        name, ref = (tp or {}).get("name"), (tp or {}).get("reference")
        if not name or not ref or "{" in name or "}" in name:
            raise ExperimentError(f"{source}: {where}: name and reference must be specified "
                                  "and name must not contain '{' or '}'")
        if name in seen_names:
            raise ExperimentError(f"{source}: {where}.name {name!r} is duplicated")
        if ref in seen_refs:
            raise ExperimentError(f"{source}: {where}.reference {ref!r} is duplicated")
        seen_names.add(name)
        seen_refs.add(ref)
        if not _is_meta_reference(ref) and ref not in param_names:
            raise ExperimentError(
                f"{source}: {where}.reference={ref!r} is neither a spec.parameters name "
                f"({', '.join(sorted(param_names))}) "
                "nor a ${trialSpec.Name|Namespace|Kind|APIVersion|Labels[..]|Annotations[..]}"
            )
        placeholder = f"${{trialParameters.{name}}}"
        if placeholder not in text:
            raise ExperimentError(f"{source}: {where}.name {name!r} is not used in spec.trialTemplate.trialSpec "
                                  f"({placeholder})")
        text = text.replace(placeholder, "test-value")
    leftover = _PARAM_PLACEHOLDER_RE.findall(text)
    if leftover:
        raise ExperimentError(
            f"{source}: spec.trialTemplate.trialSpec uses {', '.join(sorted(set(leftover)))} "
            f"which spec.trialTemplate.trialParameters does not define"
        )
    return tt


def parse_experiment(doc: dict, source: str = "<manifest>") -> Experiment:
    if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
        raise ExperimentError(f"{source}: spec is required")
    meta = doc.get("metadata") or {}
    name = meta.get("name") or ""
    if not _NAME_RE.match(name):
        raise ExperimentError(
            f"{source}: metadata.name={name!r} must be lower case alphanumerics or '-', start with a letter "
            f"and end with an alphanumeric"
        )
    spec = doc["spec"]
    max_failed = _int_field(spec, "maxFailedTrialCount", source, 0)
    max_trials = _int_field(spec, "maxTrialCount", source, 1)
    parallel = _int_field(spec, "parallelTrialCount", source, 1)
    parallel = 3 if parallel is None else parallel  # DefaultTrialParallelCount
    if max_failed is not None and max_trials is not None and max_failed > max_trials:
        raise ExperimentError(f"{source}: spec.maxFailedTrialCount={max_failed} "
                              f"should be <= spec.maxTrialCount={max_trials}")
    if max_trials is not None and parallel > max_trials:
        raise ExperimentError(f"{source}: spec.parallelTrialCount={parallel} "
                              f"should be <= spec.maxTrialCount={max_trials}")

    objective = _objective(spec, source)
    algorithm, settings = _algorithm(spec, source)
    resume = spec.get("resumePolicy") or "Never"
    if resume not in RESUME_POLICIES:
        raise ExperimentError(f"{source}: spec.resumePolicy={resume!r}; allowed: {', '.join(RESUME_POLICIES)}")
    params = _parameters(spec, source)
    problem = space_problem(algorithm, [p.type for p in params])
    if problem:
        raise ExperimentError(f"{source}: spec.parameters: {problem}")
    for i, p in enumerate(params):
        found = skopt_double_problem(p.min, p.max) if algorithm == SKOPT_ALGORITHM and p.type == "double" else None
        if found and found[0] == "error":
            raise ExperimentError(f"{source}: spec.parameters[{i}] ({p.name}): {found[1]}")
    tt = _trial_template(spec, params, source)

    mc = spec.get("metricsCollectorSpec") or {}
    kind = ((mc.get("collector") or {}).get("kind")) or "StdOut"
    if kind not in COLLECTOR_KINDS:
        raise ExperimentError(f"{source}: spec.metricsCollectorSpec.collector.kind={kind!r}; "
                              f"allowed: {', '.join(COLLECTOR_KINDS)}")
    formats = list(((mc.get("source") or {}).get("filter") or {}).get("metricsFormat") or [])
    for i, fmt in enumerate(formats):
        try:
            compiled = re.compile(fmt)
        except re.error as exc:
            raise ExperimentError(f"{source}: spec.metricsCollectorSpec.source.filter.metricsFormat[{i}] "
                                  f"is not a regex ({exc})") from None
        if compiled.groups < 2:
            raise ExperimentError(f"{source}: spec.metricsCollectorSpec.source.filter.metricsFormat[{i}] "
                                  "needs two groups (name, value)")

    return Experiment(
        name=name,
        namespace=meta.get("namespace"),
        parameters=params,
        objective=objective,
        algorithm=algorithm,
        settings=settings,
        max_trials=max_trials,
        parallel=parallel,
        max_failed=max_failed,
        resume_policy=resume,
        collector_kind=kind,
        metrics_formats=formats or [DEFAULT_METRICS_FORMAT],
        primary_container=tt["primaryContainerName"],
        primary_pod_labels=dict(tt.get("primaryPodLabels") or {}),
        success_condition=tt["successCondition"],
        failure_condition=tt["failureCondition"],
        trial_parameters=[TrialParameter(tp["name"], tp["reference"]) for tp in tt["trialParameters"]],
        trial_spec=tt["trialSpec"],
        source=source,
        manifest=doc,
    )


def substitute_trial_parameters(trial_spec: dict, trial_parameters: list[TrialParameter],
                                assignments: dict[str, str], trial_name: str, namespace: str) -> dict:
    """The trial spec with every ${trialParameters.<name>} replaced in its JSON text, as Katib's manifest
    generator does: a parameter reference takes the assignment, a ${trialSpec.*} reference the trial's metadata.
    json.JSONDecodeError when the values break the template."""
    meta = {
        "Name": trial_name,
        "Namespace": namespace,
        "Kind": str(trial_spec.get("kind", "")),
        "APIVersion": str(trial_spec.get("apiVersion", "")),
    }
    text = json.dumps(trial_spec)
    for tp in trial_parameters:
        match = _META_REF_RE.match(tp.reference)
        if match:
            key = match.group(1)
            # Trials carry no labels or annotations of their own in a local rehearsal.
            value = "" if _META_INDEX_RE.match(key) else meta[key]
        else:
            value = assignments[tp.reference]
        text = text.replace(f"${{trialParameters.{tp.name}}}", value)
    return json.loads(text)


def render_trial(
    experiment: Experiment,
    trial_name: str,
    assignments: dict[str, str],
    namespace: str | None = None,
    trial_spec: dict | None = None,
) -> dict:
    """The trial's job manifest, named after the trial. `assignments` maps spec.parameters names to strings."""
    namespace = namespace or experiment.namespace or "default"
    spec = experiment.trial_spec if trial_spec is None else trial_spec
    try:
        job = substitute_trial_parameters(spec, experiment.trial_parameters, assignments, trial_name, namespace)
    except json.JSONDecodeError:
        raise ExperimentError(f"{experiment.source}: trial {trial_name}: "
                              "substituted values break the trial template") from None
    job.setdefault("metadata", {})
    job["metadata"]["name"] = trial_name
    job["metadata"]["namespace"] = namespace
    return job


@dataclass(frozen=True)
class MetricObservation:
    name: str
    min: str = UNAVAILABLE
    max: str = UNAVAILABLE
    latest: str = UNAVAILABLE


_NO_TIME = datetime.min.replace(tzinfo=UTC)  # Katib's time.Time{} for lines without a timestamp


def _timestamp(line: str) -> datetime:
    head = line.split(" ", 1)
    if len(head) != 2:
        return _NO_TIME
    try:
        stamp = datetime.fromisoformat(head[0].replace("Z", "+00:00"))
    except ValueError:
        return _NO_TIME
    return stamp if stamp.tzinfo is not None else _NO_TIME  # RFC 3339 always carries an offset


def collect_metrics(
    log_text: str, metric_names: list[str], formats: list[str] | None = None
) -> list[tuple[datetime, str, str]]:
    """(timestamp, name, value) in log order, as Katib's StdOut/File text collector extracts them."""
    regexes = [re.compile(f) for f in (formats or [DEFAULT_METRICS_FORMAT])]
    found: list[tuple[datetime, str, str]] = []
    for line in log_text.split("\n"):
        # The collector skips lines that mention no metric before trying the regexes.
        if not any(m in line for m in metric_names):
            continue
        stamp = _timestamp(line)
        for regex in regexes:
            for match in regex.finditer(line):
                name, value = match.group(1).strip(), (match.group(2) or "").strip()
                if name in metric_names:
                    found.append((stamp, name, value))
    return found


def observe(log_text: str, objective: Objective, formats: list[str] | None = None) -> dict[str, MetricObservation]:
    """min, max and latest per metric, as the trial controller's getMetrics keeps them."""
    names = objective.metric_names
    state = {n: {"min": UNAVAILABLE, "max": UNAVAILABLE, "latest": UNAVAILABLE, "t": None} for n in names}
    for stamp, name, value in collect_metrics(log_text, names, formats):
        s = state[name]
        try:
            number = float(value)
        except ValueError:
            number = None  # a non-number only ever becomes `latest`
        if number is not None:
            if s["min"] == UNAVAILABLE:
                s["min"] = s["max"] = value
            elif number < float(s["min"]):
                s["min"] = value
            elif number > float(s["max"]):
                s["max"] = value
        # A tie (e.g. no timestamps at all) goes to the later line.
        if s["t"] is None or not s["t"] > stamp:
            s["t"] = stamp
            s["latest"] = value
    return {n: MetricObservation(n, s["min"], s["max"], s["latest"]) for n, s in state.items()}


def metric_value(observation: MetricObservation, strategy: str) -> float | None:
    """The value a strategy extracts (getObjectiveMetricValue); None where Katib has no usable number."""
    if strategy == "min":
        raw = observation.latest if observation.min == UNAVAILABLE else observation.min
    elif strategy == "max":
        raw = observation.latest if observation.max == UNAVAILABLE else observation.max
    else:
        raw = observation.latest
    try:
        return float(raw)
    except ValueError:
        return None
