"""Katib Experiment checks the swagger schema cannot make, and the trial spec with its
${trialParameters.x} placeholders replaced the way the Katib controller does it."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator

from pipelines.sweeps.experiment import (
    OBJECTIVE_TYPES,
    PARAMETER_TYPES,
    RESUME_POLICIES,
    SKOPT_ALGORITHM,
    TrialParameter,
    setting_problem,
    skopt_double_problem,
    space_problem,
    substitute_trial_parameters,
)
from pipelines.validation.findings import Doc, Finding

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
            yield doc.finding(here + ["parameterType"],
                              f"{ptype!r} is not allowed; allowed: {', '.join(PARAMETER_TYPES)}")
        space = param.get("feasibleSpace") or {}
        if algorithm == SKOPT_ALGORITHM and ptype == "double":
            try:
                low, high = float(space.get("min", "nan")), float(space.get("max", "nan"))
            except ValueError:
                low = high = math.nan
            finite = math.isfinite(low) and math.isfinite(high)
            found = skopt_double_problem(low, high) if finite else ("error", "min and max must be numbers")
            if found:
                level, message = found
                where = here + ["feasibleSpace"] + ([] if level == "warning" else ["min"])
                yield doc.finding(where, f"{param.get('name')}: {message}", warning=level == "warning")
    problem = space_problem(algorithm, [str(p.get("parameterType")) for p in spec.get("parameters") or []])
    if problem:
        yield doc.finding(["spec", "parameters"], problem)
    objective = (spec.get("objective") or {}).get("type")
    if objective is not None and objective not in OBJECTIVE_TYPES:
        yield doc.finding(["spec", "objective", "type"],
                          f"{objective!r} is not allowed; allowed: {', '.join(OBJECTIVE_TYPES)}")
    resume = spec.get("resumePolicy")
    if resume is not None and resume not in RESUME_POLICIES:
        yield doc.finding(["spec", "resumePolicy"], f"{resume!r} is not allowed; allowed: {', '.join(RESUME_POLICIES)}")
    for index, setting in enumerate((spec.get("algorithm") or {}).get("algorithmSettings") or []):
        problem = setting_problem(str(algorithm), str(setting.get("name")), str(setting.get("value")))
        if problem:
            yield doc.finding(["spec", "algorithm", "algorithmSettings", index], problem)
    template = spec.get("trialTemplate") or {}
    declared = {}
    for index, tp in enumerate(template.get("trialParameters") or []):
        if tp.get("reference") not in params and not _TRIAL_META.fullmatch(str(tp.get("reference"))):
            yield doc.finding(["spec", "trialTemplate", "trialParameters", index, "reference"],
                              f"{tp.get('reference')!r} is not a parameter of this experiment")
        declared[tp.get("name")] = params.get(tp.get("reference"), {})
    text = json.dumps(template.get("trialSpec") or {})
    for used in sorted(set(_PLACEHOLDER.findall(text)) - set(declared)):
        yield doc.finding(["spec", "trialTemplate", "trialSpec"],
                          f"${{trialParameters.{used}}} is not declared in trialTemplate.trialParameters")


def substituted_trial_spec(doc: Doc) -> dict | None:
    """The trial spec as a trial would receive it, substituted by the runtime's own function with a
    plausible value per parameter; None when there is no trial spec or a placeholder cannot be filled."""
    spec = doc.obj.get("spec") or {}
    template = spec.get("trialTemplate") or {}
    trial = template.get("trialSpec")
    if not isinstance(trial, dict):
        return None
    params = {p.get("name"): p for p in spec.get("parameters") or [] if isinstance(p, dict)}
    declared = [TrialParameter(str(tp.get("name")), str(tp.get("reference")))
                for tp in template.get("trialParameters") or [] if isinstance(tp, dict)]
    values = {name: _sample(p) for name, p in params.items()}
    known = [tp for tp in declared if tp.reference in values or _TRIAL_META.fullmatch(tp.reference)]
    try:
        job = substitute_trial_parameters(trial, known, values, f"{doc.name}-trial0", doc.namespace or "default")
    except json.JSONDecodeError:
        return None
    # Placeholders check_experiment reports as undeclared get a stand-in, so the rest is still checked.
    return json.loads(_PLACEHOLDER.sub("x", json.dumps(job)))
