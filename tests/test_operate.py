"""`arrcoc pipeline ...` driving the real kfp.Client against a stub of KFP's v2beta1 REST API.

No cluster exists where these tests run, so tests/kfp_stub.py serves the API on 127.0.0.1 (a real HTTP
server in a thread) and records each request; the tests assert what kfp.Client sent on our behalf:
methods, paths, query strings, bodies (cron_schedule, max_concurrency, no_catchup, namespace, ...) and
the Authorization header. The pipelines uploaded are tiny ones compiled here with kfp.compiler.
"""
# No `from __future__ import annotations` here: kfp.dsl reads the component's annotations as types.
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl, kubernetes
from kfp.client import client as kfp_client_module

from pipelines.cli import main
from pipelines.ops import kfp_operations
from tests.kfp_stub import KfpStub

TOKEN = "team-a-token"
NS = "team-a"
UPLOAD = "/apis/v2beta1/pipelines/upload"
UPLOAD_VERSION = "/apis/v2beta1/pipelines/upload_version"
RECURRING = "/apis/v2beta1/recurringruns"


@dsl.container_component
def _echo(msg: str, n: int):
    return dsl.ContainerSpec(image="busybox:1.36", command=["echo"], args=[msg, n])


def _compile(path: Path, default_msg: str) -> Path:
    @dsl.pipeline(name="tiny-train")
    def tiny(msg: str = default_msg, n: int = 2, threshold: float = 0.5) -> None:
        task = _echo(msg=msg, n=n)
        kubernetes.add_pod_label(task, "team", "vision")

    compiler.Compiler().compile(tiny, str(path))
    return path


@pytest.fixture(scope="module")
def pipelines_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("compiled")
    _compile(where / "tiny.yaml", "hello")
    _compile(where / "tiny-changed.yaml", "changed")
    return where


@pytest.fixture
def tiny(pipelines_dir: Path) -> Path:
    return pipelines_dir / "tiny.yaml"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pipelines_dir: Path) -> None:
    for name in ("KFP_HOST", "KFP_TOKEN", "KFP_NAMESPACE", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    # kfp.Client reads a namespace from ~/.config/kfp/context.json; this machine's must not leak in
    monkeypatch.setattr(kfp_client_module.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    # the team's pipeline variant (from its team-config: tests/test_pipeline_variants.py): here, the tiny one
    monkeypatch.setattr(kfp_operations, "team_pipeline", lambda args: kfp_operations.TeamPipeline(
        NS, "", "tiny-train", pipelines_dir / "tiny.yaml"))


@pytest.fixture
def stub() -> KfpStub:
    with KfpStub(token=TOKEN, multi_user=True) as kfp:
        yield kfp


Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def arrcoc(capsys: pytest.CaptureFixture[str]) -> Cli:
    def invoke(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = main(["pipeline", *argv])
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


@pytest.fixture
def kfp_cli(stub: KfpStub, arrcoc: Cli, monkeypatch: pytest.MonkeyPatch) -> Cli:
    """arrcoc pipeline ... pointed at the stub through the environment, as CI does."""
    monkeypatch.setenv("KFP_HOST", stub.url)
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    monkeypatch.setenv("KFP_NAMESPACE", NS)
    return arrcoc


def _ok(result: tuple[int, str, str]) -> str:
    code, out, err = result
    assert code == 0, err
    return out


def _write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _uploaded(kfp_cli: Cli, tiny: Path, version: str = "v1") -> None:
    _ok(kfp_cli("upload", str(tiny), "--version", version))


# ------------------------------------------------------------------ upload
def test_upload_creates_the_pipeline_then_the_named_version(stub: KfpStub, kfp_cli: Cli, tiny: Path) -> None:
    out = _ok(kfp_cli("upload", str(tiny), "--version", "v1"))

    [create] = stub.calls("POST", UPLOAD)
    assert create.query["name"] == "tiny-train"  # pipelineInfo.name of the file
    assert create.query["namespace"] == NS
    assert create.files["uploadfile"][1] == tiny.read_bytes()
    [version] = stub.calls("POST", UPLOAD_VERSION)
    assert version.query["name"] == "v1"
    assert version.query["pipelineid"] == next(iter(stub.pipelines))
    assert version.files["uploadfile"][1] == tiny.read_bytes()
    # every request carries the token, the healthz pre-flight and the SDK's own calls alike
    assert {r.headers.get("authorization") for r in stub.requests} == {f"Bearer {TOKEN}"}
    assert "uploaded pipeline 'tiny-train' version 'v1'" in out


def test_upload_adds_a_version_to_an_existing_pipeline_and_never_duplicates(
        stub: KfpStub, kfp_cli: Cli, pipelines_dir: Path) -> None:
    tiny = pipelines_dir / "tiny.yaml"
    _uploaded(kfp_cli, tiny, "v1")
    out = _ok(kfp_cli("upload", str(pipelines_dir / "tiny-changed.yaml"), "--version", "v2", "--name", "tiny-train"))
    assert len(stub.calls("POST", UPLOAD)) == 1
    assert [r.query["name"] for r in stub.calls("POST", UPLOAD_VERSION)] == ["v1", "v2"]
    assert "version 'v2'" in out

    writes = len(stub.writes())
    out = _ok(kfp_cli("upload", str(tiny), "--version", "v1"))
    assert out.startswith("unchanged")
    assert len(stub.writes()) == writes


def test_upload_refuses_a_version_name_taken_by_a_different_spec(
        stub: KfpStub, kfp_cli: Cli, pipelines_dir: Path) -> None:
    _uploaded(kfp_cli, pipelines_dir / "tiny.yaml", "v1")
    writes = len(stub.writes())
    code, _, err = kfp_cli("upload", str(pipelines_dir / "tiny-changed.yaml"), "--version", "v1")
    assert code == 1
    assert "already has a version 'v1' with a different spec" in err and err.count("\n") == 1
    assert len(stub.writes()) == writes


def test_specs_missing_from_version_lists_are_fetched_one_by_one(arrcoc: Cli, pipelines_dir: Path,
                                                                 tmp_path: Path) -> None:
    with KfpStub(specs_in_lists=False) as kfp:
        host = ["--host", kfp.url]
        _ok(arrcoc("upload", str(pipelines_dir / "tiny.yaml"), "--version", "v1", *host))
        code, _, err = arrcoc("upload", str(pipelines_dir / "tiny-changed.yaml"), "--version", "v1", *host)
        assert code == 1 and "different spec" in err
        params = _write(tmp_path / "params.yaml", {"nn": 1})
        code, _, err = arrcoc("run", "--pipeline", "tiny-train", "--experiment", "e", "--params", str(params), *host)
        assert code == 2 and "unknown parameter 'nn'" in err
        assert kfp.calls("GET", "/apis/v2beta1/pipelines/[^/]+/versions/[^/]+")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_upload_names_the_version_after_the_git_commit(stub: KfpStub, kfp_cli: Cli, tiny: Path,
                                                       tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    pipeline = repo / "tiny.yaml"
    pipeline.write_bytes(tiny.read_bytes())
    _git(repo, "add", "tiny.yaml")
    _git(repo, "commit", "-q", "-m", "tiny")
    commit = _git(repo, "rev-parse", "--short", "HEAD")

    _ok(kfp_cli("upload", str(pipeline)))
    pipeline.write_text(pipeline.read_text().replace("hello", "edited"))
    _ok(kfp_cli("upload", str(pipeline)))

    assert [r.query["name"] for r in stub.calls("POST", UPLOAD_VERSION)] == [commit, f"{commit}-dirty"]


def test_upload_outside_git_without_version_is_refused_before_any_request(
        stub: KfpStub, kfp_cli: Cli, tiny: Path, tmp_path: Path) -> None:
    loose = tmp_path / "loose.yaml"
    loose.write_bytes(tiny.read_bytes())
    code, _, err = kfp_cli("upload", str(loose))
    assert code == 2 and "pass --version" in err
    assert stub.requests == []


# ------------------------------------------------------------------ run
def test_run_starts_the_named_version_with_parameters_in_the_team_experiment(
        stub: KfpStub, kfp_cli: Cli, pipelines_dir: Path, tmp_path: Path) -> None:
    _uploaded(kfp_cli, pipelines_dir / "tiny.yaml", "v1")
    _ok(kfp_cli("upload", str(pipelines_dir / "tiny-changed.yaml"), "--version", "v2"))
    params = _write(tmp_path / "params.yaml", {"msg": "nightly", "n": 3, "threshold": 0.7})

    out = _ok(kfp_cli("run", "--pipeline", "tiny-train", "--version", "v1", "--params", str(params),
                      "--experiment", "smoke"))

    [experiment] = stub.calls("POST", "/apis/v2beta1/experiments")
    assert experiment.body == {"display_name": "smoke", "namespace": NS}
    [run] = stub.calls("POST", "/apis/v2beta1/runs")
    v1 = next(v for v in stub.versions[next(iter(stub.pipelines))] if v["display_name"] == "v1")
    assert run.body["pipeline_version_reference"] == {"pipeline_id": v1["pipeline_id"],
                                                      "pipeline_version_id": v1["pipeline_version_id"]}
    assert run.body["runtime_config"]["parameters"] == {"msg": "nightly", "n": 3, "threshold": 0.7}
    assert run.body["experiment_id"] == next(iter(stub.experiments))
    assert "version 'v1'" in out


def test_run_without_version_takes_the_latest(stub: KfpStub, kfp_cli: Cli, pipelines_dir: Path) -> None:
    _uploaded(kfp_cli, pipelines_dir / "tiny.yaml", "v1")
    _ok(kfp_cli("upload", str(pipelines_dir / "tiny-changed.yaml"), "--version", "v2"))
    _ok(kfp_cli("run", "--pipeline", "tiny-train", "--experiment", "smoke"))
    [run] = stub.calls("POST", "/apis/v2beta1/runs")
    latest = stub.versions[next(iter(stub.pipelines))][-1]
    assert latest["display_name"] == "v2"
    assert run.body["pipeline_version_reference"]["pipeline_version_id"] == latest["pipeline_version_id"]


BAD_PARAMS = [
    ({"mgs": "typo"}, ["unknown parameter 'mgs'", "takes: msg, n, threshold"]),
    ({"n": "three"}, ["parameter 'n'", "expects NUMBER_INTEGER"]),
    (["not", "a", "mapping"], ["must be a mapping"]),
]


@pytest.mark.parametrize(("params", "fragments"), BAD_PARAMS)
def test_run_refuses_parameters_the_pipeline_does_not_take(
        stub: KfpStub, kfp_cli: Cli, tiny: Path, tmp_path: Path, params: object, fragments: list[str]) -> None:
    _uploaded(kfp_cli, tiny)
    path = _write(tmp_path / "params.yaml", params)
    code, _, err = kfp_cli("run", "--pipeline", "tiny-train", "--params", str(path), "--experiment", "smoke")
    assert code == 2 and err.count("\n") == 1
    assert str(path) in err
    for fragment in fragments:
        assert fragment in err
    assert stub.calls("POST", "/apis/v2beta1/runs") == []
    assert stub.calls("POST", "/apis/v2beta1/experiments") == []


@pytest.mark.parametrize("argv", [
    ["run", "--pipeline", "nope", "--experiment", "smoke"],
    ["schedule", "nightly", "--cron", "0 0 2 * * *", "--experiment", "e", "--pipeline", "nope"],
])
def test_unknown_pipeline_is_one_line_and_nothing_is_created(stub: KfpStub, kfp_cli: Cli, tiny: Path,
                                                             argv: list[str]) -> None:
    _uploaded(kfp_cli, tiny)
    writes = len(stub.writes())
    code, _, err = kfp_cli(*argv)
    assert code == 1
    assert err.count("\n") == 1 and "no pipeline named 'nope'" in err and "tiny-train" in err
    assert len(stub.writes()) == writes


def test_unknown_version_is_refused(stub: KfpStub, kfp_cli: Cli, tiny: Path) -> None:
    _uploaded(kfp_cli, tiny)
    code, _, err = kfp_cli("run", "--pipeline", "tiny-train", "--version", "v9", "--experiment", "smoke")
    assert code == 1 and "has no version 'v9'" in err and "v1" in err


# ------------------------------------------------------------------ schedule
def _recurring_bodies(stub: KfpStub) -> list[dict]:
    return [r.body for r in stub.calls("POST", RECURRING)]


def test_schedule_creates_one_enabled_recurring_run_without_catchup(
        stub: KfpStub, kfp_cli: Cli, tiny: Path, tmp_path: Path) -> None:
    _uploaded(kfp_cli, tiny)
    params = _write(tmp_path / "p.yaml", {"n": 5})
    out = _ok(kfp_cli("schedule", "nightly", "--cron", "0 0 2 * * *", "--params", str(params),
                      "--experiment", "nightly"))

    [body] = _recurring_bodies(stub)
    assert body["display_name"] == "nightly"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 2 * * *"}}
    assert body["max_concurrency"] == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["runtime_config"]["parameters"] == {"n": 5}
    assert body["pipeline_version_reference"]["pipeline_version_id"] == stub.versions[body[
        "pipeline_version_reference"]["pipeline_id"]][-1]["pipeline_version_id"]
    [experiment] = stub.calls("POST", "/apis/v2beta1/experiments")
    assert experiment.body["namespace"] == NS
    # looked up in the team namespace before creating
    assert stub.calls("GET", RECURRING)[0].query["namespace"] == NS
    assert "created: schedule 'nightly'" in out


def test_reapplying_an_identical_schedule_changes_nothing(stub: KfpStub, kfp_cli: Cli, tiny: Path) -> None:
    _uploaded(kfp_cli, tiny)
    argv = ["schedule", "nightly", "--cron", "0 0 2 * * *", "--experiment", "nightly"]
    _ok(kfp_cli(*argv))
    writes = len(stub.writes())
    out = _ok(kfp_cli(*argv))
    assert "unchanged" in out
    assert [r.method for r in stub.writes()[writes:]] == []
    assert len(stub.recurring_runs) == 1


CHANGES = [
    ("cron", ["--cron", "0 30 3 * * *"]),
    ("parameters", ["--params", "{params}"]),
    ("experiment", ["--experiment", "other"]),
]


@pytest.mark.parametrize(("what", "change"), CHANGES)
def test_a_changed_schedule_replaces_the_old_recurring_run(
        stub: KfpStub, kfp_cli: Cli, tiny: Path, tmp_path: Path, what: str, change: list[str]) -> None:
    _uploaded(kfp_cli, tiny)
    base = {"--cron": "0 0 2 * * *", "--experiment": "nightly"}
    _ok(kfp_cli("schedule", "nightly", *[x for kv in base.items() for x in kv]))
    [old_id] = stub.recurring_runs
    params = _write(tmp_path / "p.yaml", {"n": 7})
    flags = dict(base, **dict(zip(change[::2], [v.format(params=params) for v in change[1::2]])))

    out = _ok(kfp_cli("schedule", "nightly", *[x for kv in flags.items() for x in kv]))

    assert "replaced" in out
    assert len(stub.calls("POST", RECURRING)) == 2
    [delete] = stub.calls("DELETE", f"{RECURRING}/.*")
    assert delete.path == f"{RECURRING}/{old_id}"
    # created before the old one is deleted, so a failed create leaves the old schedule running
    assert stub.requests.index(stub.calls("POST", RECURRING)[1]) < stub.requests.index(delete)
    [(new_id, new)] = stub.recurring_runs.items()
    assert new_id != old_id


def test_a_new_pipeline_version_moves_schedules_that_follow_the_latest(
        stub: KfpStub, kfp_cli: Cli, pipelines_dir: Path) -> None:
    _uploaded(kfp_cli, pipelines_dir / "tiny.yaml", "v1")
    argv = ["schedule", "--from", str(Path(kfp_operations.SCHEDULES))]
    _ok(kfp_cli(*argv))
    _ok(kfp_cli("upload", str(pipelines_dir / "tiny-changed.yaml"), "--version", "v2"))
    out = _ok(kfp_cli(*argv))
    assert "replaced: schedule 'nightly-train'" in out and "tiny-train@v2" in out
    [(_, recurring)] = stub.recurring_runs.items()
    v2 = stub.versions[recurring["pipeline_version_reference"]["pipeline_id"]][-1]
    assert recurring["pipeline_version_reference"]["pipeline_version_id"] == v2["pipeline_version_id"]


def test_schedule_from_a_directory_applies_every_file(stub: KfpStub, kfp_cli: Cli, tiny: Path,
                                                      tmp_path: Path) -> None:
    _uploaded(kfp_cli, tiny, "v1")
    _uploaded(kfp_cli, tiny.parent / "tiny-changed.yaml", "v2")
    folder = tmp_path / "schedules"
    folder.mkdir()
    _write(folder / "nightly.yaml", {"name": "nightly", "cron": "0 0 2 * * *", "experiment": "nightly",
                                     "parameters": {"n": 4}})
    _write(folder / "weekly.yaml", {"name": "weekly", "cron": "0 0 6 * * SUN", "experiment": "weekly",
                                    "pipeline": "tiny-train", "version": "v1", "enabled": False})
    _ok(kfp_cli("schedule", "--from", str(folder)))

    bodies = {b["display_name"]: b for b in _recurring_bodies(stub)}
    assert bodies["nightly"]["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
    assert bodies["nightly"]["runtime_config"]["parameters"] == {"n": 4}
    assert bodies["weekly"]["mode"] == "DISABLE"
    versions = {v["pipeline_version_id"]: v["display_name"] for vs in stub.versions.values() for v in vs}
    assert versions[bodies["weekly"]["pipeline_version_reference"]["pipeline_version_id"]] == "v1"
    assert versions[bodies["nightly"]["pipeline_version_reference"]["pipeline_version_id"]] == "v2"


BAD_SCHEDULE_FILES = [
    ({"name": "n", "cron": "0 2 * * *", "experiment": "e"}, 'cron: cron "0 2 * * *" has 5 fields',
     'did you mean "0 0 2 * * *"'),
    ({"name": "n", "cron": "0 0 2 * * *"}, "experiment: required", ""),
    ({"name": "n", "cron": "0 0 2 * * *", "experiment": "e", "timezone": "UTC"}, "unknown key 'timezone'",
     "allowed: cron, enabled"),
    ({"name": "n", "cron": "0 0 2 * * *", "experiment": "e", "enabled": "yes please"}, "enabled: must be true or false",
     ""),
    ({"name": "n", "cron": "0 0 2 * * *", "experiment": "e", "parameters": [1]}, "parameters must be a mapping", ""),
]


@pytest.mark.parametrize(("bad", "fragment", "hint"), BAD_SCHEDULE_FILES)
def test_a_bad_schedule_file_stops_everything_before_any_request(
        stub: KfpStub, kfp_cli: Cli, tmp_path: Path, bad: dict, fragment: str, hint: str) -> None:
    folder = tmp_path / "schedules"
    folder.mkdir()
    _write(folder / "a-good.yaml", {"name": "good", "cron": "0 0 1 * * *", "experiment": "e"})
    _write(folder / "b-bad.yaml", bad)
    code, _, err = kfp_cli("schedule", "--from", str(folder))
    assert code == 2 and err.count("\n") == 1
    assert f"{folder / 'b-bad.yaml'}: " in err and fragment in err and hint in err
    assert stub.requests == []


def test_a_five_field_cron_flag_is_refused_with_the_six_field_form(stub: KfpStub, kfp_cli: Cli) -> None:
    code, _, err = kfp_cli("schedule", "nightly", "--cron", "0 2 * * *", "--experiment", "e")
    assert code == 2 and 'did you mean "0 0 2 * * *"' in err
    assert stub.requests == []


def test_duplicate_schedule_names_are_refused(stub: KfpStub, kfp_cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "schedules"
    folder.mkdir()
    for stem in ("a", "b"):
        _write(folder / f"{stem}.yaml", {"name": "same", "cron": "0 0 1 * * *", "experiment": "e"})
    code, _, err = kfp_cli("schedule", "--from", str(folder))
    assert code == 2 and "'same' is also used by" in err
    assert stub.requests == []


def test_a_schedule_whose_parameters_do_not_fit_creates_nothing(stub: KfpStub, kfp_cli: Cli, tiny: Path,
                                                                tmp_path: Path) -> None:
    _uploaded(kfp_cli, tiny)
    folder = tmp_path / "schedules"
    folder.mkdir()
    _write(folder / "a.yaml", {"name": "a", "cron": "0 0 1 * * *", "experiment": "e"})
    _write(folder / "b.yaml", {"name": "b", "cron": "0 0 1 * * *", "experiment": "e", "parameters": {"x": 1}})
    writes = len(stub.writes())
    code, _, err = kfp_cli("schedule", "--from", str(folder))
    assert code == 2 and "b.yaml: unknown parameter 'x'" in err
    assert len(stub.writes()) == writes  # not even schedule a, which was fine


def test_the_shipped_schedules_pass_a_dry_run(arrcoc: Cli) -> None:
    """Every file in pipelines/ops/schedules/ parses, has a valid cron, and fits the compiled pipeline's parameters."""
    out = _ok(arrcoc("schedule", "--from", str(kfp_operations.SCHEDULES), "--dry-run"))
    assert 'nightly-train: cron "0 0 2 * * *" -> tiny-train@latest' in out


# ------------------------------------------------------------------ unschedule and list
def test_unschedule_disables_and_delete_deletes(stub: KfpStub, kfp_cli: Cli, tiny: Path) -> None:
    _uploaded(kfp_cli, tiny)
    _ok(kfp_cli("schedule", "nightly", "--cron", "0 0 2 * * *", "--experiment", "nightly"))
    [recurring_id] = stub.recurring_runs

    assert "disabled" in _ok(kfp_cli("unschedule", "nightly"))
    assert [r.path for r in stub.calls("POST", f"{RECURRING}/.*")] == [f"{RECURRING}/{recurring_id}:disable"]
    assert stub.recurring_runs[recurring_id]["mode"] == "DISABLE"
    assert "already disabled" in _ok(kfp_cli("unschedule", "nightly"))

    _ok(kfp_cli("unschedule", "nightly", "--delete"))
    assert [r.path for r in stub.calls("DELETE")] == [f"{RECURRING}/{recurring_id}"]
    assert stub.recurring_runs == {}

    code, _, err = kfp_cli("unschedule", "nightly")
    assert code == 1 and f"no schedule named 'nightly' in namespace {NS}" in err


def test_reapplying_the_files_re_enables_a_disabled_schedule(stub: KfpStub, kfp_cli: Cli, tiny: Path) -> None:
    _uploaded(kfp_cli, tiny)
    argv = ["schedule", "--from", str(kfp_operations.SCHEDULES)]
    _ok(kfp_cli(*argv))
    _ok(kfp_cli("unschedule", "nightly-train"))
    out = _ok(kfp_cli(*argv))
    assert "enabled: schedule 'nightly-train'" in out
    [(recurring_id, recurring)] = stub.recurring_runs.items()
    assert recurring["mode"] == "ENABLE"
    assert stub.calls("POST", f"{RECURRING}/{recurring_id}:enable")


def test_list_shows_pipelines_versions_and_schedules(stub: KfpStub, kfp_cli: Cli, pipelines_dir: Path) -> None:
    _uploaded(kfp_cli, pipelines_dir / "tiny.yaml", "v1")
    _ok(kfp_cli("upload", str(pipelines_dir / "tiny-changed.yaml"), "--version", "v2"))
    _ok(kfp_cli("schedule", "nightly", "--cron", "0 0 2 * * *", "--experiment", "nightly-exp", "--version", "v1"))
    out = _ok(kfp_cli("list"))
    lines = [line.split() for line in out.splitlines()]
    assert ["PIPELINE", "VERSION", "CREATED", "VERSION", "ID"] == lines[0]
    assert [row[:2] for row in lines[1:4]] == [["tiny-train", "tiny-train"], ["tiny-train", "v1"],
                                               ["tiny-train", "v2"]]
    schedule = next(row for row in lines if row and row[0] == "nightly")
    assert schedule == ["nightly", "0", "0", "2", "*", "*", "*", "enabled", "tiny-train@v1", "nightly-exp"]
    assert all(r.query.get("namespace") == NS for r in stub.calls("GET", "/apis/v2beta1/(pipelines|recurringruns)"))


# ------------------------------------------------------------------ connection and auth
def test_token_file_and_namespace_flags(stub: KfpStub, arrcoc: Cli, tiny: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    _ok(arrcoc("upload", str(tiny), "--version", "v1", "--host", stub.url, "--token-file", str(token),
               "--namespace", "team-b"))
    assert {r.headers.get("authorization") for r in stub.requests} == {f"Bearer {TOKEN}"}
    assert stub.calls("POST", UPLOAD)[0].query["namespace"] == "team-b"


def test_a_rejected_token_fails_at_once_with_one_line(stub: KfpStub, arrcoc: Cli, tiny: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFP_TOKEN", "stolen")
    code, _, err = arrcoc("upload", str(tiny), "--version", "v1", "--host", stub.url, "--namespace", NS)
    assert code == 1
    assert err.count("\n") == 1 and "refused the token (HTTP 401)" in err
    # our single pre-flight, not kfp.Client's five retries five seconds apart
    [only] = stub.requests
    assert (only.method, only.path, only.headers["authorization"]) == ("GET", "/apis/v2beta1/healthz", "Bearer stolen")


def test_no_token_for_a_server_that_needs_one(stub: KfpStub, arrcoc: Cli) -> None:
    code, _, err = arrcoc("list", "--host", stub.url, "--namespace", NS)
    assert code == 1 and "needs a token" in err and "KFP_TOKEN" in err
    assert "authorization" not in stub.requests[0].headers


def test_an_unreachable_host_fails_at_once_with_one_line(arrcoc: Cli) -> None:
    with socket.socket() as sock:  # a port nobody listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err = arrcoc("list", "--host", f"http://127.0.0.1:{port}")
    assert code == 1 and err.count("\n") == 1
    assert f"cannot reach KFP at http://127.0.0.1:{port}" in err


@pytest.mark.parametrize(("argv", "fragment"), [
    (["list"], "no KFP host: pass --host URL, set KFP_HOST, or use --port-forward"),
    (["list", "--host", "kfp.example.com"], "must start with http:// or https://"),
    (["list", "--host", "http://x", "--token-file", "/nonexistent/token"], "--token-file /nonexistent/token"),
])
def test_connection_input_errors(arrcoc: Cli, argv: list[str], fragment: str) -> None:
    code, _, err = arrcoc(*argv)
    assert code == 2 and fragment in err and err.count("\n") == 1


def test_multi_user_kfp_needs_a_namespace(stub: KfpStub, arrcoc: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    code, _, err = arrcoc("list", "--host", stub.url)
    assert code == 2 and "multi-user" in err and "KFP_NAMESPACE" in err


def test_single_user_kfp_needs_no_namespace(arrcoc: Cli, tiny: Path) -> None:
    with KfpStub() as single:
        _ok(arrcoc("upload", str(tiny), "--version", "v1", "--host", single.url))
        assert "namespace" not in single.calls("POST", UPLOAD)[0].query
        assert "authorization" not in single.requests[0].headers


def test_api_errors_after_connecting_are_one_line(stub: KfpStub, kfp_cli: Cli, tiny: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _uploaded(kfp_cli, tiny)
    # the version vanishes between our lookup and the run, as when someone deletes it in the UI
    original = stub.handle

    def lose_versions(request):  # type: ignore[no-untyped-def]
        if request.path == "/apis/v2beta1/runs":
            stub.versions = {pid: [] for pid in stub.versions}
        return original(request)

    monkeypatch.setattr(stub, "handle", lose_versions)
    code, _, err = kfp_cli("run", "--pipeline", "tiny-train", "--experiment", "smoke")
    assert code == 1 and err.count("\n") == 1
    assert "answered HTTP 404" in err and "pipeline version" in err


def test_a_failing_port_forward_is_one_line(arrcoc: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--port-forward runs kubectl; with no cluster here, a stand-in kubectl fails the way a real one does."""
    fake = tmp_path / "bin" / "kubectl"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "error: services \\"ml-pipeline-ui\\" not found" >&2\nexit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    code, _, err = arrcoc("list", "--port-forward")
    assert code == 1 and err.count("\n") == 1
    assert "kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80` exited" in err
    assert 'services "ml-pipeline-ui" not found' in err
