"""Katib Experiment checks the swagger schema cannot make, and the trial spec with its
${trialParameters.x} placeholders replaced the way the Katib controller does it."""
from __future__ import annotations

import json
import re
from typing import Iterator

from pipelines.validation.findings import Doc, Finding

PARAMETER_TYPES = ("int", "double", "categorical", "discrete")
OBJECTIVE_TYPES = ("minimize", "maximize")
RESUME_POLICIES = ("Never", "LongRunning", "FromVolume")
BAYES_SETTINGS = {
    "base_estimator": ("GP", "RF", "ET", "GBRT"),
    "acq_func": ("gp_hedge", "LCB", "EI", "PI", "EIps", "PIps"),
    "acq_optimizer": ("auto", "sampling", "lbfgs"),
    "n_initial_points": None,  # int >= 0
    "random_state": None,
}
_PLACEHOLDER = re.compile(r"\$\{trialParameters\.([^}]+)\}")
# Trial metadata a trial parameter may reference instead of a search parameter.
_TRIAL_META = re.compile(r"\$\{trialSpec\.(Name|Namespace|Kind|APIVersion|Labels\[[^]]+\]|Annotations\[[^]]+\])\}")


def _sample(parameter: dict) -> str:
    """A plausible value of the parameter's type, as Katib would put it into the template."""
    space = parameter.get("feasibleSpace") or {}
    if parameter.get("parameterType") in ("categorical", "discrete"):
        return str((space.get("list") or ["x"])[0])
    if space.get("min") is not None:
        return str(space["min"])
    return "1" if parameter.get("parameterType") == "int" else "0.5"


def check_experiment(doc: Doc) -> Iterator[Finding]:
    spec = doc.obj.get("spec") or {}
    params = {p.get("name"): p for p in spec.get("parameters") or [] if isinstance(p, dict)}
    algorithm = (spec.get("algorithm") or {}).get("algorithmName")
    for index, param in enumerate(spec.get("parameters") or []):
        here = ["spec", "parameters", index]
        ptype = param.get("parameterType")
        if ptype not in PARAMETER_TYPES:
            yield doc.finding(here + ["parameterType"], f"{ptype!r} is not allowed; allowed: {', '.join(PARAMETER_TYPES)}")
        space = param.get("feasibleSpace") or {}
        if algorithm == "bayesianoptimization" and ptype == "double":
            try:
                low = float(space.get("min", "nan"))
            except ValueError:
                low = float("nan")
            if not low > 0:
                yield doc.finding(here + ["feasibleSpace", "min"], "bayesianoptimization samples doubles log-uniformly: min must be > 0")
    objective = (spec.get("objective") or {}).get("type")
    if objective is not None and objective not in OBJECTIVE_TYPES:
        yield doc.finding(["spec", "objective", "type"], f"{objective!r} is not allowed; allowed: {', '.join(OBJECTIVE_TYPES)}")
    resume = spec.get("resumePolicy")
    if resume is not None and resume not in RESUME_POLICIES:
        yield doc.finding(["spec", "resumePolicy"], f"{resume!r} is not allowed; allowed: {', '.join(RESUME_POLICIES)}")
    if algorithm == "bayesianoptimization":
        for index, setting in enumerate((spec.get("algorithm") or {}).get("algorithmSettings") or []):
            name, value = setting.get("name"), str(setting.get("value"))
            here = ["spec", "algorithm", "algorithmSettings", index]
            if name not in BAYES_SETTINGS:
                yield doc.finding(here + ["name"], f"{name!r} is not allowed; allowed: {', '.join(BAYES_SETTINGS)}")
            elif BAYES_SETTINGS[name] is None and not value.isdigit():
                yield doc.finding(here + ["value"], f"{name} must be an integer >= 0, got {value!r}")
            elif BAYES_SETTINGS[name] is not None and value not in BAYES_SETTINGS[name]:
                yield doc.finding(here + ["value"], f"{value!r} is not allowed; allowed: {', '.join(BAYES_SETTINGS[name])}")
    template = spec.get("trialTemplate") or {}
    declared = {}
    for index, tp in enumerate(template.get("trialParameters") or []):
        if tp.get("reference") not in params and not _TRIAL_META.fullmatch(str(tp.get("reference"))):
            yield doc.finding(["spec", "trialTemplate", "trialParameters", index, "reference"], f"{tp.get('reference')!r} is not a parameter of this experiment")
        declared[tp.get("name")] = params.get(tp.get("reference"), {})
    text = json.dumps(template.get("trialSpec") or {})
    for used in sorted(set(_PLACEHOLDER.findall(text)) - set(declared)):
        yield doc.finding(["spec", "trialTemplate", "trialSpec"], f"${{trialParameters.{used}}} is not declared in trialTemplate.trialParameters")


def substituted_trial_spec(doc: Doc) -> dict | None:
    """The trial spec as a trial would receive it: placeholders replaced inside the JSON text, so a
    placeholder standing for a whole field stays a string, exactly as in Katib."""
    spec = doc.obj.get("spec") or {}
    template = spec.get("trialTemplate") or {}
    trial = template.get("trialSpec")
    if not isinstance(trial, dict):
        return None
    params = {p.get("name"): p for p in spec.get("parameters") or [] if isinstance(p, dict)}
    meta = {
        "Name": f"{doc.name}-trial0",
        "Namespace": doc.namespace or "default",
        "Kind": str(trial.get("kind", "")),
        "APIVersion": str(trial.get("apiVersion", "")),
    }

    def value(reference: str) -> str:
        if reference in params:
            return _sample(params[reference])
        match = _TRIAL_META.fullmatch(reference)
        return meta.get(match.group(1), "x") if match else "x"

    values = {tp.get("name"): value(str(tp.get("reference"))) for tp in template.get("trialParameters") or []}
    text = json.dumps(trial)
    text = _PLACEHOLDER.sub(lambda m: json.dumps(values.get(m.group(1), "x"))[1:-1], text)
    text = _TRIAL_META.sub(lambda m: json.dumps(meta.get(m.group(1), "x"))[1:-1], text)
    return json.loads(text)
