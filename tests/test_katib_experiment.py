"""The team Experiments in katib/ and the reader that interprets them as Katib v0.19 does."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.sweeps.experiment import (
    ExperimentError,
    load_manifest,
    metric_value,
    observe,
    parse_experiment,
    read_experiment,
    render_trial,
)

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "katib" / "base" / "experiment.yaml"
TENSIONS = ("compress_vs_particularize", "exploit_vs_explore", "focus_vs_diversify")
TEAMS = {"team-vision": "nvidia-l4", "team-research": "nvidia-tesla-a100"}


@pytest.fixture()
def base_doc() -> dict:
    return yaml.safe_load(BASE.read_text())


def _pod_specs(trial_spec: dict) -> dict[str, dict]:
    return {k: v["template"] for k, v in trial_spec["spec"]["pytorchReplicaSpecs"].items()}


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


# ------------------------------------------------------------------ the base Experiment


def test_base_experiment_is_a_bayesian_search_over_the_three_tensions() -> None:
    exp = read_experiment(BASE)
    assert exp.algorithm == "bayesianoptimization"
    assert set(exp.settings) <= {"base_estimator", "n_initial_points", "acq_func", "acq_optimizer", "random_state"}
    assert exp.objective.type == "maximize" and exp.objective.metric == "relevance_score"
    assert exp.objective.goal is not None and 0 < exp.objective.goal <= 1
    assert set(exp.objective.additional) == {"recall_at_k", "answer_accuracy", "eval_loss"}
    assert [p.name for p in exp.parameters] == list(TENSIONS)
    for p in exp.parameters:
        # Katib v0.19's skopt makes every double log-uniform; a uniform int scaled by the template is not.
        assert p.type == "int" and (p.min, p.max) == (0, 100)
    assert exp.max_trials and exp.max_failed is not None and 1 <= exp.parallel <= exp.max_trials
    assert exp.resume_policy in ("LongRunning", "FromVolume")
    assert exp.collector_kind == "StdOut"


def test_trial_template_wires_each_tension_and_a_stable_checkpoint_dir() -> None:
    exp = read_experiment(BASE)
    assert exp.primary_container == "pytorch"
    assert exp.primary_pod_labels == {"training.kubeflow.org/job-role": "master"}
    assert exp.success_condition == 'status.conditions.#(type=="Succeeded")#|#(status=="True")#'
    assert exp.failure_condition == 'status.conditions.#(type=="Failed")#|#(status=="True")#'
    refs = {tp.name: tp.reference for tp in exp.trial_parameters}
    for replica, template in _pod_specs(exp.trial_spec).items():
        (container,) = [c for c in template["spec"]["containers"] if c["name"] == "pytorch"]
        command = [*container["command"], *(container.get("args") or [])]
        assert command[:5] == ["python", "-m", "trainer.torchrun", "-m", "trainer"], replica
        for tension in TENSIONS:
            value = _flag(command, "--" + tension.replace("_", "-"))
            name = value.removeprefix("${trialParameters.").removesuffix("}e-2")
            assert refs[name] == tension, (replica, tension)
        out = _flag(command, "--out")
        name = out.rsplit("/", 1)[1].removeprefix("${trialParameters.").removesuffix("}")
        assert refs[name] == "${trialSpec.Name}"
        assert _flag(command, "--resume") == "auto"
        # Katib's collector joins tokens with spaces inside sh -c: a space would split a token.
        assert all(" " not in token for token in command)
        if replica == "Master":  # the collector's sh -c wraps only the primary pod: it needs the SIGTERM relay
            assert container["lifecycle"]["preStop"]["exec"]["command"] == ["python", "-m", "trainer.prestop"]


def test_trial_pods_meet_the_platform_rules() -> None:
    exp = read_experiment(BASE)
    specs = exp.trial_spec["spec"]["pytorchReplicaSpecs"]
    assert set(specs) <= {"Master", "Worker"} and specs["Master"]["replicas"] == 1
    for rs in specs.values():
        assert rs["restartPolicy"] == "ExitCode"
        template = rs["template"]
        assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            assert c["image"] == "ghcr.io/arrcoc/arrcoc-trainer:0.1.0"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] == c["resources"]["limits"]
            assert {"cpu", "memory", "nvidia.com/gpu"} <= set(c["resources"]["requests"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for kustomize) is not installed")
@pytest.mark.parametrize("team", sorted(TEAMS))
def test_team_overlay_renders_a_valid_experiment_in_its_namespace(team: str) -> None:
    if not (ROOT / "kustomize" / "components").is_dir():
        pytest.skip("kustomize/components (another change) is not in this tree")
    def render(path: Path) -> list[dict]:
        out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    docs = render(ROOT / "katib" / "overlays" / team)
    assert [d["kind"] for d in docs] == ["Experiment"]  # the team's config is read, not re-applied
    (config,) = [d for d in render(ROOT / "kustomize" / "overlays" / team) if d["kind"] == "ConfigMap"]
    values = config["data"]
    exp = parse_experiment(docs[0], source=team)
    assert exp.namespace == team
    assert exp.trial_spec["spec"]["nprocPerNode"] == values["gpusPerReplica"]
    for replica, template in _pod_specs(exp.trial_spec).items():
        pod = template["spec"]
        assert pod["nodeSelector"]["cloud.google.com/gke-accelerator"] == TEAMS[team] == values["gpuType"], replica
        assert pod["tolerations"], replica  # from the team's capacity component
        # Sweep trials yield to training runs whatever the team's training PriorityClass is.
        assert pod["priorityClassName"] == "arrcoc-sweep" != values["priorityClassName"]
        (container,) = pod["containers"]
        for kind in ("requests", "limits"):
            assert container["resources"][kind] == {"cpu": values["cpuPerReplica"],
                                                    "memory": values["memoryPerReplica"],
                                                    "nvidia.com/gpu": values["gpusPerReplica"]}, replica


# ------------------------------------------------------------------ validation as Katib does it


def _settings(**values: str) -> list[dict]:
    return [{"name": k, "value": v} for k, v in values.items()]


CASES = [
    ("unknown algorithm", lambda d: d["spec"]["algorithm"].update(algorithmName="hyperopt"),
     "spec.algorithm.algorithmName='hyperopt'; allowed: random, grid, bayesianoptimization"),
    ("missing objective", lambda d: d["spec"].pop("objective"), "spec.objective is required"),
    ("bad objective type", lambda d: d["spec"]["objective"].update(type="max"),
     "spec.objective.type='max'; allowed: maximize, minimize"),
    ("objective among additional", lambda d: d["spec"]["objective"]["additionalMetricNames"].append("relevance_score"),
     "additionalMetricNames should not contain"),
    ("unknown setting", lambda d: d["spec"]["algorithm"].update(algorithmSettings=_settings(n_calls="5")),
     "unknown setting 'n_calls' for bayesianoptimization; allowed: base_estimator, n_initial_points"),
    ("bad acq_func", lambda d: d["spec"]["algorithm"].update(algorithmSettings=_settings(acq_func="UCB")),
     "acq_func='UCB' is not supported; allowed: gp_hedge, LCB, EI, PI, EIps, PIps"),
    ("bad estimator", lambda d: d["spec"]["algorithm"].update(algorithmSettings=_settings(base_estimator="SVM")),
     "allowed: GP, RF, ET, GBRT"),
    ("negative n_initial_points",
     lambda d: d["spec"]["algorithm"].update(algorithmSettings=_settings(n_initial_points="-1")),
     "n_initial_points='-1' must be an integer >= 0"),
    ("random with a skopt setting", lambda d: d["spec"]["algorithm"].update(
        algorithmName="random", algorithmSettings=_settings(acq_func="EI")), "allowed: random_state"),
    ("parallel above max", lambda d: d["spec"].update(parallelTrialCount=50), "parallelTrialCount=50 should be <="),
    ("failed above max", lambda d: d["spec"].update(maxFailedTrialCount=50), "maxFailedTrialCount=50 should be <="),
    ("zero max trials", lambda d: d["spec"].update(maxTrialCount=0), "maxTrialCount=0 must be greater than 0"),
    ("min not below max", lambda d: d["spec"]["parameters"][0]["feasibleSpace"].update(min="100"),
     "min=100.0 must be less than max=100.0"),
    ("bad parameter type", lambda d: d["spec"]["parameters"][0].update(parameterType="float"),
     "parameterType='float'; allowed: double, int, discrete, categorical"),
    ("bad distribution", lambda d: d["spec"]["parameters"][0]["feasibleSpace"].update(distribution="loguniform"),
     "distribution='loguniform'; allowed: uniform, logUniform"),
    ("bad resume policy", lambda d: d["spec"].update(resumePolicy="Always"),
     "resumePolicy='Always'; allowed: Never, LongRunning, FromVolume"),
    ("duplicated reference", lambda d: d["spec"]["trialTemplate"]["trialParameters"].append(
        {"name": "lr", "reference": "compress_vs_particularize"}),
     "reference 'compress_vs_particularize' is duplicated"),
    ("unused trial parameter", lambda d: d["spec"]["trialTemplate"]["trialParameters"].append(
        {"name": "kind", "reference": "${trialSpec.Kind}"}), "name 'kind' is not used in spec.trialTemplate.trialSpec"),
    ("placeholder without parameter", lambda d: d["spec"]["trialTemplate"]["trialParameters"].pop(),
     "${trialParameters.trialName} which spec.trialTemplate.trialParameters does not define"),
    ("reference to nothing", lambda d: d["spec"]["trialTemplate"]["trialParameters"][0].update(reference="c"),
     "reference='c' is neither a spec.parameters name"),
    ("name in trial spec",
     lambda d: d["spec"]["trialTemplate"]["trialSpec"].setdefault("metadata", {}).update(name="x"),
     "metadata.name and metadata.namespace must be omitted"),
    ("bad experiment name", lambda d: d["metadata"].update(name="Arrcoc_Tensions"), "metadata.name='Arrcoc_Tensions'"),
    ("no success condition", lambda d: d["spec"]["trialTemplate"].pop("successCondition"),
     "successCondition and failureCondition must be specified"),
]


@pytest.mark.parametrize(("mutate", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_experiments_are_rejected_naming_the_field(base_doc: dict, mutate, message: str) -> None:
    mutate(base_doc)
    with pytest.raises(ExperimentError) as info:
        parse_experiment(base_doc, source="exp.yaml")
    assert message in str(info.value)
    assert info.value.exit_code == 2
    assert "\n" not in str(info.value)


def test_metric_strategies_default_to_the_objective_type(base_doc: dict) -> None:
    base_doc["spec"]["objective"].pop("metricStrategies")
    assert set(parse_experiment(base_doc).objective.strategies.values()) == {"max"}
    base_doc["spec"]["objective"]["type"] = "minimize"
    assert set(parse_experiment(base_doc).objective.strategies.values()) == {"min"}


def test_manifest_is_found_in_a_rendered_multi_document_build(tmp_path: Path, base_doc: dict) -> None:
    other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump_all([other, base_doc, other]))
    assert load_manifest(path)["metadata"]["name"] == "arrcoc-tensions"
    path.write_text(yaml.safe_dump_all([base_doc, base_doc]))
    with pytest.raises(ExperimentError, match="exactly one document of kind Experiment"):
        load_manifest(path)
    path.write_text("spec: [unclosed\n")
    with pytest.raises(ExperimentError, match="is not valid YAML"):
        load_manifest(path)


# ------------------------------------------------------------------ substitution


def test_render_trial_substitutes_assignments_and_trial_metadata(base_doc: dict) -> None:
    base_doc["spec"]["trialTemplate"]["trialParameters"].append({"name": "ns", "reference": "${trialSpec.Namespace}"})
    base_doc["spec"]["trialTemplate"]["trialSpec"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "containers"][0]["command"] += ["--namespace-tag", "${trialParameters.ns}"]
    exp = parse_experiment(base_doc)
    values = {"compress_vs_particularize": "5", "exploit_vs_explore": "70", "focus_vs_diversify": "33"}
    job = render_trial(exp, "arrcoc-tensions-007", values, namespace="team-vision")
    assert job["metadata"] == {"name": "arrcoc-tensions-007", "namespace": "team-vision"}
    assert "${" not in json.dumps(job)
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    command = [*container["command"], *container["args"]]
    assert _flag(command, "--compress-vs-particularize") == "5e-2"  # the trainer reads 0.05
    assert _flag(command, "--focus-vs-diversify") == "33e-2"
    assert _flag(command, "--out") == "/checkpoints/arrcoc-tensions-007"
    assert _flag(command, "--namespace-tag") == "team-vision"
    # the template itself is untouched for the next trial
    assert "${trialParameters" in json.dumps(exp.trial_spec)


# ------------------------------------------------------------------ metrics as the StdOut collector reads them


def _objective(strategy: str | None = None, kind: str = "maximize"):
    doc = yaml.safe_load(BASE.read_text())
    doc["spec"]["objective"]["type"] = kind
    doc["spec"]["objective"].pop("metricStrategies")
    if strategy:
        doc["spec"]["objective"]["metricStrategies"] = [{"name": "relevance_score", "value": strategy}]
    return parse_experiment(doc).objective


LOG = """\
loading data
step=10 loss=2.31
relevance_score=0.41 recall_at_k=0.5
relevance_score: 0.99
relevance_score = 0.83
eval_loss=1.5e-1 answer_accuracy=0.75
relevance_score=0.62
"""


@pytest.mark.parametrize(("strategy", "kind", "expected"), [
    (None, "maximize", 0.83),  # default for maximize: max
    (None, "minimize", 0.41),  # default for minimize: min
    ("latest", "maximize", 0.62),
])
def test_objective_is_extracted_by_the_metric_strategy(strategy: str | None, kind: str, expected: float) -> None:
    objective = _objective(strategy, kind)
    obs = observe(LOG, objective)
    assert metric_value(obs["relevance_score"], objective.strategies["relevance_score"]) == expected


def test_collector_regex_behaviour() -> None:
    obs = observe(LOG, _objective())
    # `name: value` is not Katib's format, so 0.99 never counts.
    assert obs["relevance_score"].max == "0.83"
    assert obs["eval_loss"].latest == "1.5e-1"
    assert float(obs["answer_accuracy"].latest) == 0.75
    assert obs["recall_at_k"].latest == "0.5"
    missing = observe("nothing here\n", _objective())
    assert missing["relevance_score"].latest == "unavailable"
    assert metric_value(missing["relevance_score"], "max") is None


def test_latest_follows_rfc3339_timestamps_when_lines_carry_them() -> None:
    text = ("2026-01-01T00:00:05Z relevance_score=0.7\n"
            "2026-01-01T00:00:01Z relevance_score=0.2\n")
    assert observe(text, _objective("latest"))["relevance_score"].latest == "0.7"


def test_parsing_does_not_mutate_the_manifest(base_doc: dict) -> None:
    before = copy.deepcopy(base_doc)
    parse_experiment(base_doc)
    assert base_doc == before


def test_an_experiment_may_maximize_vqa_accuracy():
    """A VLM team on VQAv2 (no boxes) swaps the objective to vqa_accuracy; the trainer's metric line feeds it."""
    from pipelines.sweeps.experiment import load_manifest, observe, parse_experiment

    doc = copy.deepcopy(load_manifest(BASE))
    objective = doc["spec"]["objective"]
    objective["objectiveMetricName"] = "vqa_accuracy"
    objective["additionalMetricNames"] = [m for m in objective.get("additionalMetricNames") or []
                                          if m != "relevance_score"]
    objective["metricStrategies"] = [s for s in objective.get("metricStrategies") or []
                                     if s["name"] != "relevance_score"] + [{"name": "vqa_accuracy", "value": "max"}]
    exp = parse_experiment(doc)
    assert exp.objective.metric == "vqa_accuracy" and exp.objective.strategies["vqa_accuracy"] == "max"
    seen = observe("step=10 vqa_accuracy=0.31 visual_tokens=64\nstep=20 vqa_accuracy=0.42\n", exp.objective)
    assert seen["vqa_accuracy"].max == "0.42"
