"""`arrcoc sweep FILE.yaml [--local]`: run a Katib Experiment here, or create it in the cluster.

--local rehearses what Katib v0.19 does with the same manifest (pipelines/sweeps/experiment.py reads it):
- proposals come from the suggestion service Katib runs for the algorithm, configured as Katib configures it
  (pipelines/sweeps/suggestion.py): scikit-optimize for bayesianoptimization (every double log-uniform, every
  setting honoured), Optuna for tpe, multivariate-tpe, cmaes and random with Katib's setting mapping. The
  service is asked for as many trials as there are free slots and told each trial that succeeded; failed
  trials are never told, as in Katib. The same random_state gives the same first trials as the cluster.
- at most parallelTrialCount trials run at once and at most maxTrialCount are created; each trial's job is
  the trialSpec with ${trialParameters.*} substituted, run by the local PyTorchJob runner; its success and
  failure conditions are read from the job's conditions, its metrics from the master's log with the
  collector's regex, the objective taken by the metric strategy (default: max for maximize).
- the experiment stops as Katib's status_util.go decides, in its order: goal reached (Succeeded), failed
  trials >= maxFailedTrialCount where a trial without the objective metric counts as failed (Failed),
  completed trials >= maxTrialCount (Succeeded). Trials already running finish; on a cluster Katib kills them.

Outputs in --workdir: results.csv, results.json, objective_per_trial.png, objective_vs_<parameter>.png, and
one folder per trial (the runner's workdir, with its logs).
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.sweeps.experiment import (
    LOCAL_ALGORITHMS,
    SETTINGS,
    SKOPT_ALGORITHM,
    Experiment,
    load_manifest,
    metric_value,
    observe,
    parse_experiment,
    render_trial,
)
from pipelines.sweeps.suggestion import Observed, SuggestionService, make_service
from trainer.errors import UserError
from trainer.files import write_atomic, write_text_atomic

KATIB_GROUP, KATIB_VERSION, KATIB_PLURAL = "kubeflow.org", "v1beta1", "experiments"
_CONDITION_RE = re.compile(r'^status\.conditions\.#\(type=="([^"]+)"\)#\|#\(status=="([^"]+)"\)#$')

Runner = Callable[..., Any]  # a JobBackend's run(manifest, workdir, timeout=, log_stream=): pipelines/jobs/backends.py


class SweepError(UserError):
    """Bad sweep input: one line, exit code 2."""


class ClusterError(UserError):
    """The API server refused the Experiment: one line, exit code 1."""

    exit_code = 1


# ---------------------------------------------------------------- overrides on the manifest


def _trainer_fields() -> tuple[str, ...]:
    from dataclasses import fields

    from trainer.config import TrainConfig

    return tuple(f.name for f in fields(TrainConfig))


def _primary_containers(node: Any, name: str) -> list[dict]:
    """Every container named `name` anywhere in the trial spec (Master and Worker of a PyTorchJob alike)."""
    found: list[dict] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "containers" and isinstance(value, list):
                found += [c for c in value if isinstance(c, dict) and c.get("name") == name]
            else:
                found += _primary_containers(value, name)
    elif isinstance(node, list):
        for item in node:
            found += _primary_containers(item, name)
    return found


def _set_flag(container: dict, flag: str, value: str) -> None:
    for key in ("args", "command"):
        tokens = container.get(key) or []
        for i, token in enumerate(tokens):
            if token == flag and i + 1 < len(tokens):
                tokens[i + 1] = value
                return
            if token.startswith(flag + "="):
                tokens[i] = f"{flag}={value}"
                return
    key = "args" if container.get("args") else "command"
    container.setdefault(key, []).extend([flag, value])


def apply_overrides(
    doc: dict,
    *,
    algorithm: str | None = None,
    max_trials: int | None = None,
    parallel: int | None = None,
    sets: list[str] = (),
    namespace: str | None = None,
) -> tuple[dict, list[str]]:
    """A copy of the Experiment with the command line's overrides, and notes on what was dropped."""
    doc = copy.deepcopy(doc)
    spec = doc.setdefault("spec", {})
    notes: list[str] = []
    if namespace:
        doc.setdefault("metadata", {})["namespace"] = namespace
    if max_trials is not None:
        spec["maxTrialCount"] = max_trials
        # Katib rejects parallel > max and maxFailed > max; a short rehearsal shrinks them with the budget.
        if isinstance(spec.get("maxFailedTrialCount"), int) and spec["maxFailedTrialCount"] > max_trials:
            spec["maxFailedTrialCount"] = max_trials
        if (parallel is None and isinstance(spec.get("parallelTrialCount"), int)
                and spec["parallelTrialCount"] > max_trials):
            spec["parallelTrialCount"] = max_trials
    if parallel is not None:
        spec["parallelTrialCount"] = parallel
    if algorithm is not None:
        algo = spec.setdefault("algorithm", {})
        if algo.get("algorithmName") != algorithm:
            allowed = SETTINGS.get(algorithm, {})
            kept, dropped = [], []
            for s in algo.get("algorithmSettings") or []:
                (kept if s.get("name") in allowed else dropped).append(s)
            if dropped:
                notes.append(f"--algorithm {algorithm}: dropped settings "
                             f"{', '.join(str(s.get('name')) for s in dropped)}")
            algo["algorithmName"] = algorithm
            algo["algorithmSettings"] = kept
    if sets:
        tt = spec.get("trialTemplate") or {}
        containers = _primary_containers(tt.get("trialSpec"), tt.get("primaryContainerName") or "")
        if not containers:
            raise SweepError("--set: spec.trialTemplate.trialSpec has no container named by primaryContainerName")
        fields = _trainer_fields()
        for item in sets:
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in fields:
                raise SweepError(f"--set {item!r}: expected KEY=VALUE with KEY a trainer flag; "
                                 f"allowed: {', '.join(fields)}")
            flag = "--" + key.replace("_", "-")
            for c in containers:
                tokens = [*(c.get("command") or []), *(c.get("args") or [])]
                for i, token in enumerate(tokens):
                    current = tokens[i + 1] if token == flag and i + 1 < len(tokens) else (
                        token.split("=", 1)[1] if token.startswith(flag + "=") else "")
                    if "${trialParameters." in current:
                        raise SweepError(f"--set {key}: {flag} is a trial parameter ({current}); the search chooses it")
                _set_flag(c, flag, value)
    return doc, notes


# ---------------------------------------------------------------- Katib's suggestion service


def suggestion_service(experiment: Experiment) -> SuggestionService:
    """The service Katib starts for the experiment's algorithm (pipelines/sweeps/suggestion.py)."""
    if experiment.algorithm not in LOCAL_ALGORITHMS:
        raise SweepError(
            f"{experiment.source}: spec.algorithm.algorithmName={experiment.algorithm!r}: the local rehearsal runs "
            f"{', '.join(LOCAL_ALGORITHMS)} (pass --algorithm)"
        )
    if experiment.algorithm != SKOPT_ALGORITHM:
        # Katib's optuna service leaves normal/logNormal parameters out of the space: no value for the template.
        for p in experiment.parameters:
            if p.type in ("int", "double") and p.distribution in ("normal", "logNormal"):
                raise SweepError(f"{experiment.source}: parameter {p.name}: distribution {p.distribution} is not "
                                 f"searched by Katib's {experiment.algorithm}; allowed: uniform, logUniform")
    return make_service(experiment.algorithm, experiment.parameters, experiment.settings,
                        experiment.objective.type == "maximize")


# ---------------------------------------------------------------- one trial


@dataclass
class TrialRecord:
    name: str
    index: int
    parameters: dict[str, str]
    status: str = "Running"  # Succeeded | Failed | MetricsUnavailable
    objective: float | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    observation: dict[str, dict[str, str]] = field(default_factory=dict)
    reason: str = ""
    message: str = ""
    duration_s: float = 0.0
    master_log: str = ""


def _condition_matches(expression: str, conditions: list[dict], where: str) -> bool:
    match = _CONDITION_RE.match(expression.strip())
    if not match:
        raise SweepError(
            f'{where}={expression!r}: the local rehearsal reads conditions of the form '
            f'status.conditions.#(type=="TYPE")#|#(status=="STATUS")#'
        )
    kind, status = match.groups()
    return any(c.get("type") == kind and str(c.get("status")) == status for c in conditions or [])


def run_trial(experiment: Experiment, job: dict, record: TrialRecord, workdir: Path, runner: Runner,
              timeout: float | None) -> TrialRecord:
    from pipelines.jobs.backends import JobFailed

    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(workdir / "runner.log", "w") as log_stream:
        try:
            result = runner(job, workdir, timeout=timeout, log_stream=log_stream)
        except JobFailed as failed:  # a failed trial is an outcome here: its conditions decide the trial's status
            result = failed.result
    record.duration_s = round(time.monotonic() - started, 3)
    conditions = list(getattr(result, "conditions", None) or [])
    master_log = getattr(result, "master_log", None)
    record.master_log = str(master_log or "")
    last = conditions[-1] if conditions else {}
    record.reason, record.message = str(last.get("reason") or ""), str(last.get("message") or "")

    if _condition_matches(experiment.failure_condition, conditions, "spec.trialTemplate.failureCondition"):
        record.status = "Failed"
    elif _condition_matches(experiment.success_condition, conditions, "spec.trialTemplate.successCondition"):
        text = Path(master_log).read_text(errors="replace") if master_log and Path(master_log).exists() else ""
        obs = observe(text, experiment.objective, experiment.metrics_formats)
        record.observation = {n: {"min": o.min, "max": o.max, "latest": o.latest} for n, o in obs.items()}
        record.metrics = {n: metric_value(o, experiment.objective.strategies[n]) for n, o in obs.items()}
        record.objective = record.metrics[experiment.objective.metric]
        if record.objective is None:
            record.status = "MetricsUnavailable"
            record.message = f"{experiment.objective.metric} not found in the master's log"
        else:
            record.status = "Succeeded"
    else:
        record.status = "Failed"
        record.message = record.message or "the job ended matching neither successCondition nor failureCondition"
    return record


# ---------------------------------------------------------------- the loop


def _default_runner() -> Runner:
    from pipelines.jobs.client import backend_for

    return backend_for("local").run


@dataclass
class SweepResult:
    experiment: str
    algorithm: str
    status: str  # Succeeded | Failed
    reason: str  # GoalReached | MaxTrialsReached | MaxFailedTrialsReached | SuggestionEndReached
    trials: list[TrialRecord]
    best: TrialRecord | None
    notes: list[str]


def run_sweep(experiment: Experiment, workdir: Path, *, runner: Runner | None = None,
              trial_timeout: float | None = None, out: io.TextIOBase | None = None) -> SweepResult:
    """Katib's loop: ask the service for as many trials as free slots, tell it each trial that succeeded."""
    out = out or sys.stdout
    if experiment.max_trials is None:
        raise SweepError(f"{experiment.source}: spec.maxTrialCount is unset; pass --max-trials N for a local run")
    service = suggestion_service(experiment)
    runner = runner or _default_runner()
    objective = experiment.objective
    workdir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []

    records: list[TrialRecord] = []
    observed: list[Observed] = []  # what Katib passes the service: Succeeded trials with the objective metric
    best: TrialRecord | None = None
    reason = ""
    created = 0
    parallel = min(experiment.parallel, experiment.max_trials)
    pending: dict[Future, TrialRecord] = {}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        while True:
            wanted = min(parallel - len(pending), experiment.max_trials - created)
            if not reason and wanted > 0:
                for assignments in service.get_suggestions(observed, wanted):
                    created += 1
                    name = f"{experiment.name}-{created:03d}"
                    record = TrialRecord(name=name, index=created, parameters=assignments)
                    print(f"trial {name} started: {' '.join(f'{k}={v}' for k, v in assignments.items())}",
                          file=out, flush=True)
                    pending[pool.submit(start_trial, experiment, record, workdir / name, runner,
                                        trial_timeout)] = record
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: pending[f].index):
                record = pending.pop(future)
                future.result()  # a bug in the runner is a bug here too: let it surface
                records.append(record)
                if record.status == "Succeeded":
                    observed.append(Observed(record.name, record.parameters, record.objective))
                    if best is None or objective.better(record.objective, best.objective):
                        best = record
                value = "" if record.objective is None else f" {objective.metric}={record.objective:g}"
                why = f" ({record.message})" if record.status != "Succeeded" and record.message else ""
                print(f"trial {record.name} {record.status}{value}{why}", file=out, flush=True)
            records.sort(key=lambda r: r.index)
            write_results(workdir, experiment, records, best, "Running", "", notes)
            if reason:
                continue
            failed = sum(r.status in ("Failed", "MetricsUnavailable") for r in records)
            if best is not None and objective.reached(best.objective):
                reason = "GoalReached"
            elif experiment.max_failed is not None and failed and failed >= experiment.max_failed:
                reason = "MaxFailedTrialsReached"
            elif len(records) >= experiment.max_trials:
                reason = "MaxTrialsReached"
    status = "Failed" if reason == "MaxFailedTrialsReached" else "Succeeded"
    result = SweepResult(experiment.name, experiment.algorithm, status, reason, records, best, notes)
    write_results(workdir, experiment, records, best, status, reason, notes)
    write_plots(workdir, experiment, records)
    return result


def start_trial(experiment: Experiment, record: TrialRecord, workdir: Path, runner: Runner,
                timeout: float | None) -> TrialRecord:
    """One trial: its job rendered from the template as Katib renders it, then run. The one call site of the runner."""
    job = render_trial(experiment, record.name, record.parameters)
    return run_trial(experiment, job, record, workdir, runner, timeout)


# ---------------------------------------------------------------- outputs


def write_results(workdir: Path, experiment: Experiment, records: list[TrialRecord], best: TrialRecord | None,
                  status: str, reason: str, notes: list[str]) -> None:
    metric_names = experiment.objective.metric_names
    param_names = [p.name for p in experiment.parameters]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial", "status", *param_names, *metric_names, "duration_s", "message"])
    for r in records:
        metrics = ["" if r.metrics.get(m) is None else r.metrics[m] for m in metric_names]
        writer.writerow([r.name, r.status, *(r.parameters[p] for p in param_names), *metrics, r.duration_s, r.message])
    write_text_atomic(workdir / "results.csv", buf.getvalue())
    payload = {
        "experiment": experiment.name,
        "source": experiment.source,
        "algorithm": {"name": experiment.algorithm, "settings": experiment.settings, "notes": notes},
        "objective": {
            "type": experiment.objective.type,
            "metric": experiment.objective.metric,
            "goal": experiment.objective.goal,
            "strategies": experiment.objective.strategies,
        },
        "budget": {"maxTrialCount": experiment.max_trials, "parallelTrialCount": experiment.parallel,
                   "maxFailedTrialCount": experiment.max_failed},
        "status": status,
        "reason": reason,
        "best_trial": None if best is None else {"name": best.name, "parameters": best.parameters,
                                                  "objective": best.objective, "metrics": best.metrics},
        "trials": [asdict(r) for r in records],
    }
    write_text_atomic(workdir / "results.json", json.dumps(payload, indent=2) + "\n")


def _save_figure(fig: Any, path: Path) -> None:
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")


def write_plots(workdir: Path, experiment: Experiment, records: list[TrialRecord]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display here or in CI
    import matplotlib.pyplot as plt

    objective = experiment.objective
    ok = [r for r in records if r.objective is not None]
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([r.index for r in ok], [r.objective for r in ok], label=objective.metric)
    best_so_far, xs, ys = None, [], []
    for r in ok:
        if best_so_far is None or objective.better(r.objective, best_so_far):
            best_so_far = r.objective
        xs.append(r.index)
        ys.append(best_so_far)
    if xs:
        ax.step(xs, ys, where="post", color="tab:orange", label="best so far")
    failed = [r.index for r in records if r.objective is None]
    if failed:
        ax.scatter(failed, [min(ys or [0])] * len(failed), marker="x", color="tab:red", label="failed")
    if objective.goal is not None:
        ax.axhline(objective.goal, linestyle="--", color="gray", label="goal")
    ax.set_xlabel("trial")
    ax.set_ylabel(objective.metric)
    ax.set_title(f"{experiment.name} ({experiment.algorithm})")
    ax.legend(loc="best")
    fig.tight_layout()
    path = workdir / "objective_per_trial.png"
    _save_figure(fig, path)
    plt.close(fig)
    written.append(path)

    for p in experiment.parameters:
        fig, ax = plt.subplots(figsize=(5, 4))
        values = [r.parameters[p.name] for r in ok]
        xs_p = [float(v) for v in values] if p.type in ("double", "int") else values
        ax.scatter(xs_p, [r.objective for r in ok])
        if p.type == "double" and (experiment.algorithm == SKOPT_ALGORITHM or p.distribution == "logUniform"):
            ax.set_xscale("log")  # the scale the optimizer searched
        ax.set_xlabel(p.name)
        ax.set_ylabel(objective.metric)
        fig.tight_layout()
        path = workdir / f"objective_vs_{p.name}.png"
        _save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------- cluster


def create_in_cluster(manifest: dict, api_client: Any) -> dict:
    """Create the Experiment through the API server (CustomObjectsApi; no Katib SDK: its protobuf pin conflicts)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    namespace = (manifest.get("metadata") or {}).get("namespace")
    name = (manifest.get("metadata") or {}).get("name")
    try:
        return client.CustomObjectsApi(api_client).create_namespaced_custom_object(
            group=KATIB_GROUP, version=KATIB_VERSION, namespace=namespace, plural=KATIB_PLURAL, body=manifest)
    except ApiException as exc:
        detail = exc.reason or ""
        try:
            detail = json.loads(exc.body or "{}").get("message") or detail
        except (ValueError, AttributeError):
            pass
        detail = " ".join(str(detail).split())
        raise ClusterError(f"creating Experiment {namespace}/{name} failed: HTTP {exc.status}: {detail}") from None


def _api_client(kubeconfig: str | None, context: str | None) -> Any:
    from kubernetes import config

    try:
        if kubeconfig is None and context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            from kubernetes import client

            return client.ApiClient()
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except config.ConfigException as exc:
        raise SweepError(f"--kubeconfig: no usable cluster configuration ({exc})") from None


# ---------------------------------------------------------------- command line


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE.yaml",
                        help="a Katib Experiment, or a rendered multi-document build with one")
    parser.add_argument("--local", action="store_true", help="run the trials on this machine instead of the cluster")
    parser.add_argument("--max-trials", type=_positive, metavar="N", help="override spec.maxTrialCount")
    parser.add_argument("--parallel", type=_positive, metavar="N", help="override spec.parallelTrialCount")
    parser.add_argument("--algorithm", choices=LOCAL_ALGORITHMS, help="override spec.algorithm.algorithmName")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a trainer flag in the trial template, e.g. --set steps=60 (repeatable)")
    parser.add_argument("--workdir", metavar="DIR", help="local outputs (default: runs/sweep/<experiment>)")
    parser.add_argument("--trial-timeout", type=float, metavar="SECONDS", help="local: fail a trial running longer")
    parser.add_argument("--namespace", help="cluster: namespace (default: the manifest's metadata.namespace)")
    parser.add_argument("--kubeconfig", metavar="FILE",
                        help="cluster: kubeconfig (default: $KUBECONFIG, ~/.kube/config)")
    parser.add_argument("--context", help="cluster: kubeconfig context")


def run(args: argparse.Namespace) -> int:
    doc = load_manifest(args.file)
    doc, notes = apply_overrides(doc, algorithm=args.algorithm, max_trials=args.max_trials, parallel=args.parallel,
                                 sets=args.sets, namespace=args.namespace)
    experiment = parse_experiment(doc, source=args.file)
    if not args.local:
        if not experiment.namespace:
            raise SweepError(f"{args.file}: metadata.namespace is unset; pass --namespace")
        for note in notes:
            print(f"note: {note}")
        created = create_in_cluster(doc, _api_client(args.kubeconfig, args.context))
        meta = created.get("metadata") or {}
        print(f"created Experiment {meta.get('namespace')}/{meta.get('name')}; follow it in the Katib UI or with "
              f"kubectl -n {meta.get('namespace')} get trials -l katib.kubeflow.org/experiment={meta.get('name')}")
        return 0
    workdir = Path(args.workdir or Path("runs") / "sweep" / experiment.name)
    for note in notes:
        print(f"note: {note}")
    result = run_sweep(experiment, workdir, trial_timeout=args.trial_timeout)
    print(f"experiment {result.experiment}: {result.status} ({result.reason}) after {len(result.trials)} trials; "
          f"results in {workdir}")
    if result.best is None:
        print("no trial reported the objective metric")
    else:
        shown = ", ".join(f"{k}={v}" for k, v in result.best.parameters.items())
        print(f"best trial {result.best.name}: {experiment.objective.metric}={result.best.objective:g} with {shown}")
    return 0 if result.status == "Succeeded" else 1
