"""`arrcoc pipeline upload|run|schedule` take the team's pipeline variant from its team-config (rendered from its
overlay) and refuse the other one, before any request. Driven against tests/kfp_stub.py (no KFP exists here);
the teams are the repository's overlays and one written with a data bucket (tests/bucket_overlay.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kfp.client import client as kfp_client_module

from pipelines.cli import main
from pipelines.kfp_pipeline.variants import compiled_file
from pipelines.ops import kfp_operations
from tests.bucket_overlay import write_bucket_overlay
from tests.kfp_stub import KfpStub

TOKEN = "t0ken"
UPLOAD = "/apis/v2beta1/pipelines/upload"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("KFP_HOST", "KFP_TOKEN", "KFP_NAMESPACE", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kfp_client_module.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))


@pytest.fixture(scope="module")
def bucket_team(tmp_path_factory) -> str:
    """An overlay folder: team-vision with dataBucket set and the data-bucket component."""
    return str(write_bucket_overlay(tmp_path_factory.mktemp("bucket")))


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch):
    with KfpStub(token=TOKEN, multi_user=True) as kfp:
        monkeypatch.setenv("KFP_HOST", kfp.url)
        monkeypatch.setenv("KFP_TOKEN", TOKEN)
        yield kfp


def arrcoc(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["pipeline", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("data_bucket", [False, True])
def test_upload_takes_the_teams_variant(stub: KfpStub, capsys, bucket_team: str, data_bucket: bool) -> None:
    team = bucket_team if data_bucket else "team-vision"
    code, _, err = arrcoc(capsys, "upload", "--namespace", "team-vision", "--team", team, "--version", "v1")
    assert code == 0, err
    [create] = stub.calls("POST", UPLOAD)
    assert create.query["name"] == ("arrcoc-train-data-bucket" if data_bucket else "arrcoc-train")
    assert create.files["uploadfile"][1] == compiled_file(data_bucket).read_bytes()


def test_the_namespace_names_the_team(stub: KfpStub, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFP_NAMESPACE", "team-research")  # as CI sets it; kustomize/overlays/team-research
    code, _, err = arrcoc(capsys, "upload", "--version", "v1")
    assert code == 0, err
    assert stub.calls("POST", UPLOAD)[0].query["name"] == "arrcoc-train"


@pytest.mark.parametrize("argv, where", [
    (["upload", str(compiled_file(False)), "--version", "v1"], str(compiled_file(False))),
    (["run", "--pipeline", "arrcoc-train", "--experiment", "e"], "--pipeline"),
    (["schedule", "nightly", "--cron", "0 0 2 * * *", "--experiment", "e", "--pipeline", "arrcoc-train"],
     "--pipeline"),
])
def test_the_other_variant_is_refused_before_any_request(stub: KfpStub, capsys, bucket_team: str,
                                                         argv: list[str], where: str) -> None:
    code, _, err = arrcoc(capsys, *argv, "--namespace", "team-vision", "--team", bucket_team)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{where}: pipeline 'arrcoc-train' is the variant for teams without a data bucket" in err
    assert "sets dataBucket='vision-data': use 'arrcoc-train-data-bucket'" in err
    assert stub.requests == []


def test_a_schedule_file_naming_the_other_variant_is_refused(stub: KfpStub, capsys, tmp_path: Path) -> None:
    folder = tmp_path / "schedules"
    folder.mkdir()
    (folder / "nightly.yaml").write_text(yaml.safe_dump({"name": "nightly", "cron": "0 0 2 * * *",
                                                         "experiment": "e", "pipeline": "arrcoc-train-data-bucket"}))
    code, _, err = arrcoc(capsys, "schedule", "--from", str(folder), "--team", "team-vision", "--dry-run")
    assert code == 2 and err.count("\n") == 1
    assert f"{folder / 'nightly.yaml'}: pipeline 'arrcoc-train-data-bucket' is the variant for teams with a data " \
           "bucket, and team-vision's team-config sets no dataBucket: use 'arrcoc-train'" in err
    assert stub.requests == []


@pytest.mark.parametrize("data_bucket", [False, True])
def test_the_shipped_schedules_run_the_teams_variant_and_fit_its_parameters(capsys, bucket_team: str,
                                                                            data_bucket: bool) -> None:
    """What CI's dry run checks: every schedule file, for the team, against that variant's compiled parameters."""
    code, out, err = arrcoc(capsys, "schedule", "--from", str(kfp_operations.SCHEDULES), "--dry-run",
                            "--team", bucket_team if data_bucket else "team-vision")
    assert code == 0, err
    name = "arrcoc-train-data-bucket" if data_bucket else "arrcoc-train"
    assert f'nightly-train: cron "0 0 2 * * *" -> {name}@latest' in out


def test_without_a_team_a_default_cannot_be_chosen(capsys) -> None:
    code, _, err = arrcoc(capsys, "upload", "--version", "v1")
    assert code == 2 and "upload: name PIPELINE_YAML, or the team" in err
    code, _, err = arrcoc(capsys, "upload", "--team", "team-nobody", "--version", "v1")
    assert code == 2 and "--team team-nobody: neither an overlay folder nor a team of kustomize/overlays" in err
    assert "team-research, team-vision" in err
