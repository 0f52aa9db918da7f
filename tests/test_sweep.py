"""`arrcoc sweep`: the local Katib rehearsal and the cluster submission.

Trials are real PyTorchJobs run by the local runner (pipelines/jobs/local.py: Master and Worker processes),
whose command is a fake trial (`python -c` printing metric lines computed from the tensions) instead of the
trainer, so a sweep of several trials takes seconds. The cluster path talks to kmock, a fake Kubernetes API
server, because no cluster exists here: it checks what the kubernetes client sends, not what Katib does next.
"""
from __future__ import annotations

import asyncio
import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.cli import main
from pipelines.sweeps import search
from pipelines.sweeps.experiment import parse_experiment

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "katib" / "base" / "experiment.yaml"
TENSIONS = ("compress_vs_particularize", "exploit_vs_explore", "focus_vs_diversify")

# A smooth bowl with its top at (0.2, 0.7, 0.5); argv carries the three tensions, as the trainer's flags do.
SCORE = """
import os, sys
c, e, f = (float(v) for v in sys.argv[1:4])
os.makedirs(sys.argv[sys.argv.index("--out") + 1], exist_ok=True)
score = 1 - ((c - 0.2) ** 2 + (e - 0.7) ** 2 + (f - 0.5) ** 2)
print("relevance_score=%.4f" % (score - 0.1))
print("relevance_score=%.4f recall_at_k=%.3f" % (score, score / 2))
print("answer_accuracy=0.5 eval_loss=%.3f" % (1 - score))
"""
EXIT_1 = "import sys; print('boom'); sys.exit(1)"
SILENT = "print('trained, but reported nothing')"


def trial_doc(script: str, **spec: object) -> dict:
    """The base Experiment whose replicas run `script` with the three tension placeholders as argv."""
    doc = yaml.safe_load(BASE.read_text())
    tt = doc["spec"]["trialTemplate"]
    refs = {tp["reference"]: tp["name"] for tp in tt["trialParameters"]}
    for rs in tt["trialSpec"]["spec"]["pytorchReplicaSpecs"].values():
        rs["template"]["spec"]["containers"][0].pop("args", None)
        rs["template"]["spec"]["containers"][0]["command"] = [
            # The base Experiment's encoding: an int 0..100 passed on as <int>e-2.
            sys.executable, "-c", script, *(f"${{trialParameters.{refs[t]}}}e-2" for t in TENSIONS),
            "--out", "/checkpoints/${trialParameters.trialName}", "--steps", "300",
        ]
    doc["spec"].update(spec)
    return doc


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def rows(workdir: Path) -> list[dict]:
    with open(workdir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_random_sweep_runs_the_budget_and_writes_results(tmp_path: Path, capsys) -> None:
    doc = trial_doc(SCORE)
    doc["spec"]["objective"]["goal"] = 2.0  # out of reach: the budget ends the sweep
    path = write(tmp_path, doc)
    workdir = tmp_path / "out"
    code = main(["sweep", str(path), "--local", "--algorithm", "random", "--max-trials", "4", "--parallel", "2",
                 "--workdir", str(workdir)])
    assert code == 0
    table = rows(workdir)
    assert len(table) == 4 and {r["status"] for r in table} == {"Succeeded"}
    for r in table:
        c, e, f = (int(r[t]) / 100 for t in TENSIONS)
        # The max strategy picks the second, higher line the script printed, not the latest or the first.
        assert float(r["relevance_score"]) == pytest.approx(1 - ((c - .2) ** 2 + (e - .7) ** 2 + (f - .5) ** 2),
                                                            abs=1e-4)
        assert 0.0 <= c <= 1.0
    result = json.loads((workdir / "results.json").read_text())
    assert result["status"] == "Succeeded" and result["reason"] == "MaxTrialsReached"
    best = max(table, key=lambda r: float(r["relevance_score"]))
    assert result["best_trial"]["name"] == best["trial"]
    for png in ["objective_per_trial.png", *(f"objective_vs_{t}.png" for t in TENSIONS)]:
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert f"best trial {best['trial']}" in out
    # Each trial's job was the template with its own values substituted, run under the trial's name, and its
    # /checkpoints/<trial> path landed in the runner's volume folder.
    trial_dir = workdir / best["trial"]
    assert f"relevance_score={float(best['relevance_score']):.4f}" in (trial_dir / "logs" / "master-0.log").read_text()
    assert (trial_dir / "volumes" / "checkpoints" / best["trial"]).is_dir()


def test_sweep_stops_when_the_goal_is_reached(tmp_path: Path) -> None:
    doc = trial_doc(SCORE, parallelTrialCount=1, maxTrialCount=6)
    doc["spec"]["objective"]["goal"] = -10.0  # any trial reaches it
    workdir = tmp_path / "out"
    assert main(["sweep", str(write(tmp_path, doc)), "--local", "--algorithm", "random",
                 "--workdir", str(workdir)]) == 0
    result = json.loads((workdir / "results.json").read_text())
    assert result["reason"] == "GoalReached" and len(result["trials"]) == 1


@pytest.mark.parametrize(("script", "status"), [(EXIT_1, "Failed"), (SILENT, "MetricsUnavailable")])
def test_failed_trials_count_against_max_failed(tmp_path: Path, capsys, script: str, status: str) -> None:
    doc = trial_doc(script, parallelTrialCount=1, maxTrialCount=6, maxFailedTrialCount=2)
    workdir = tmp_path / "out"
    assert main(["sweep", str(write(tmp_path, doc)), "--local", "--algorithm", "random",
                 "--workdir", str(workdir)]) == 1
    result = json.loads((workdir / "results.json").read_text())
    assert result["status"] == "Failed" and result["reason"] == "MaxFailedTrialsReached"
    assert [t["status"] for t in result["trials"]] == [status, status]
    assert result["best_trial"] is None
    assert "no trial reported the objective metric" in capsys.readouterr().out


def test_bayesian_sweep_runs_katibs_skopt_service_round_by_round(tmp_path: Path, capsys) -> None:
    """The local sweep asks skopt exactly as Katib does: parallelTrialCount at first, then one per finished trial."""
    import skopt

    doc = trial_doc(SCORE, parallelTrialCount=2)
    doc["spec"]["objective"]["goal"] = 2.0
    doc["spec"]["algorithm"]["algorithmSettings"][1] = {"name": "n_initial_points", "value": "2"}
    workdir = tmp_path / "out"
    assert main(["sweep", str(write(tmp_path, doc)), "--local", "--max-trials", "4", "--workdir", str(workdir)]) == 0
    table = rows(workdir)
    assert len(table) == 4 and {r["status"] for r in table} == {"Succeeded"}
    # Katib's base_service.py configured by hand from the manifest's settings (EI, GP, auto, random_state 42).
    opt = skopt.Optimizer([skopt.space.Integer(0, 100) for _ in TENSIONS], base_estimator="GP", n_initial_points=2,
                          acq_func="EI", acq_optimizer="auto", random_state=42)
    expected = opt.ask(n_points=2)
    assert [[int(r[t]) for t in TENSIONS] for r in table[:2]] == [[int(v) for v in x] for x in expected]
    # Trials finish in any order locally; the GP's later proposals are the skopt ones after those tells.
    assert json.loads((workdir / "results.json").read_text())["algorithm"]["name"] == "bayesianoptimization"


def test_local_sweep_and_cluster_ask_for_the_same_first_trials() -> None:
    """Katib's service (configured from its source as the test writes it out) and ours agree on the first round."""
    import skopt

    from pipelines.sweeps.suggestion import make_service

    exp = parse_experiment(yaml.safe_load(BASE.read_text()))
    ours = make_service(exp.algorithm, exp.parameters, exp.settings, True).get_suggestions([], exp.parallel)
    algorithm = yaml.safe_load(BASE.read_text())["spec"]["algorithm"]
    settings = {s["name"]: s["value"] for s in algorithm["algorithmSettings"]}
    space = [skopt.space.Integer(int(p.min), int(p.max), name=p.name) for p in exp.parameters]
    katib = skopt.Optimizer(space, base_estimator=settings["base_estimator"],
                            n_initial_points=int(settings["n_initial_points"]), acq_func=settings["acq_func"],
                            acq_optimizer=settings["acq_optimizer"], random_state=int(settings["random_state"]))
    assert ours == [{p.name: str(v) for p, v in zip(exp.parameters, x)} for x in katib.ask(n_points=exp.parallel)]


def test_failed_trials_are_not_told_and_skopt_repeats_its_proposal() -> None:
    """Katib tells skopt only succeeded trials: after the initial points, a failure gets the same point again."""
    from pipelines.sweeps.suggestion import Observed, make_service

    exp = parse_experiment(yaml.safe_load(BASE.read_text()))
    service = make_service(exp.algorithm, exp.parameters, {**exp.settings, "n_initial_points": "2"}, True)
    first = service.get_suggestions([], 2)
    observed = [Observed(f"t{i}", a, 0.5 + i / 10) for i, a in enumerate(first)]
    proposal = service.get_suggestions(observed, 1)
    assert service.get_suggestions(observed, 1) == proposal  # the trial failed: nothing new to tell
    observed.append(Observed("t2", proposal[0], 0.1))
    assert service.get_suggestions(observed, 1) != proposal


def test_same_random_state_gives_the_same_trials(tmp_path: Path) -> None:
    path = write(tmp_path, trial_doc(SCORE, parallelTrialCount=1))
    params = []
    for run in ("a", "b"):
        main(["sweep", str(path), "--local", "--algorithm", "random", "--max-trials", "2",
              "--workdir", str(tmp_path / run)])
        params.append([[r[t] for t in TENSIONS] for r in rows(tmp_path / run)])
    assert params[0] == params[1]


def test_set_overrides_trainer_flags_in_every_replica() -> None:
    doc, _ = search.apply_overrides(yaml.safe_load(BASE.read_text()), sets=["steps=60", "eval-every=20", "lr=0.01"])
    for rs in doc["spec"]["trialTemplate"]["trialSpec"]["spec"]["pytorchReplicaSpecs"].values():
        container = rs["template"]["spec"]["containers"][0]
        command = [*container["command"], *container["args"]]
        assert command[command.index("--steps") + 1] == "60"
        assert command[command.index("--eval-every") + 1] == "20"
        assert command.count("--lr") == 1 and command[command.index("--lr") + 1] == "0.01"


def test_algorithm_override_drops_settings_the_new_algorithm_rejects() -> None:
    doc, notes = search.apply_overrides(yaml.safe_load(BASE.read_text()), algorithm="random", max_trials=2)
    exp = parse_experiment(doc)
    assert exp.algorithm == "random" and set(exp.settings) == {"random_state"}
    assert exp.max_trials == 2 and exp.parallel <= 2 and exp.max_failed <= 2
    assert "dropped settings" in notes[0]


BAD = [
    (["--set", "warp=9"], "--set 'warp=9': expected KEY=VALUE with KEY a trainer flag; allowed: steps"),
    (["--set", "focus_vs_diversify=0.5"], "the search chooses it"),
]


@pytest.mark.parametrize(("extra", "message"), BAD)
def test_bad_sweep_input_is_one_line_exit_2(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    code = main(["sweep", str(BASE), "--local", "--workdir", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_bad_manifest_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    doc = trial_doc(SCORE)
    doc["spec"]["algorithm"]["algorithmSettings"].append({"name": "xi", "value": "0.1"})
    code = main(["sweep", str(write(tmp_path, doc)), "--local", "--workdir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown setting 'xi' for bayesianoptimization; allowed:" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_unknown_algorithm_on_the_command_line_is_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["sweep", str(BASE), "--local", "--algorithm", "grid"])
    assert info.value.code == 2
    assert "choose from 'bayesianoptimization', 'tpe', 'multivariate-tpe', 'cmaes', 'random'" in capsys.readouterr().err


# ------------------------------------------------------------------ cluster (kmock)


def kubeconfig(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": url.rstrip("/")}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u"}}],
    }))
    return path


@pytest.mark.asyncio
async def test_without_local_the_experiment_is_created_in_the_cluster(tmp_path: Path, kmock, capsys) -> None:
    config = kubeconfig(tmp_path, str(kmock.url))
    args = ["sweep", str(BASE), "--kubeconfig", str(config), "--namespace", "team-vision", "--max-trials", "12"]
    # The kubernetes client is synchronous; kmock serves on this event loop.
    assert await asyncio.to_thread(main, args) == 0
    assert len(kmock["post"]) == 1
    post = kmock["post"][0]
    assert post.url.path == "/apis/kubeflow.org/v1beta1/namespaces/team-vision/experiments"
    assert post.data["kind"] == "Experiment" and post.data["metadata"]["namespace"] == "team-vision"
    assert post.data["spec"]["maxTrialCount"] == 12
    assert "created Experiment team-vision/arrcoc-tensions" in capsys.readouterr().out
    stored = [obj for (res, ns, name), obj in kmock.objects.items() if (ns, name) == ("team-vision", "arrcoc-tensions")]
    assert len(stored) == 1 and stored[0]["spec"]["algorithm"]["algorithmName"] == "bayesianoptimization"

    # A second create is a conflict: one line, exit 1.
    assert await asyncio.to_thread(main, args) == 1
    err = capsys.readouterr().err
    assert "HTTP 409" in err and err.count("\n") == 1


def test_cluster_needs_a_namespace(tmp_path: Path, capsys) -> None:
    assert main(["sweep", str(BASE), "--kubeconfig", str(tmp_path / "none")]) == 2
    assert "metadata.namespace is unset; pass --namespace" in capsys.readouterr().err

