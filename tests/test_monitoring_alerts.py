"""The alert rules: the generated Rules / ClusterRules files are current, and their rule groups, taken from those
very files, pass `promtool test rules` (tests/alerts/*.yaml; Debian's `prometheus` package ships promtool), where
every alert has a case that fires and one that stays quiet. A rule with another threshold fails the same tests."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.monitoring import alerts

TESTS = Path(__file__).parent / "alerts"
# promtool test file -> (rule file name it reads, the generated object file that ships the rules)
SUITES = {"team.yaml": ("team-rules.yaml", alerts.TEAM_RULES),
          "platform.yaml": ("platform-rules.yaml", alerts.PLATFORM_RULES)}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install "
                                                             "prometheus); the alert unit tests need it")


def test_generated_rule_files_are_current():
    for path, text in alerts.generated().items():
        assert path.read_text() == text, f"{path} is stale: run `arrcoc compile`"


def promtool_test(tmp_path: Path, suite: str, obj: dict) -> subprocess.CompletedProcess:
    rule_name, _ = SUITES[suite]
    (tmp_path / rule_name).write_text(yaml.safe_dump(alerts.rule_file(obj)))
    shutil.copy(TESTS / suite, tmp_path / suite)
    return subprocess.run([PROMTOOL, "test", "rules", suite], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


@needs_promtool
@pytest.mark.parametrize("suite", sorted(SUITES))
def test_the_shipped_rules_pass_their_promtool_tests(tmp_path, suite):
    shipped = yaml.safe_load(SUITES[suite][1].read_text())
    result = promtool_test(tmp_path, suite, shipped)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_alert_has_a_case_that_fires_and_one_that_stays_quiet(suite):
    shipped = yaml.safe_load(SUITES[suite][1].read_text())
    names = {rule["alert"] for group in shipped["spec"]["groups"] for rule in group["rules"]}
    cases = [case for test in yaml.safe_load((TESTS / suite).read_text())["tests"] for case in test["alert_rule_test"]]
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert names == fires == quiet


@needs_promtool
@pytest.mark.parametrize("suite, thresholds", [
    ("team.yaml", alerts.Thresholds(stall_seconds=1200)),
    ("team.yaml", alerts.Thresholds(gpu_idle_percent=1)),
    ("team.yaml", alerts.Thresholds(resumes_per_hour=3)),
    ("platform.yaml", alerts.Thresholds(nightly_window_hours=50)),
])
def test_a_rule_with_another_threshold_fails_the_tests(tmp_path, suite, thresholds):
    obj = alerts.team_rules(thresholds) if suite == "team.yaml" else alerts.platform_rules(alerts.schedule_names(),
                                                                                          thresholds)
    assert promtool_test(tmp_path, suite, obj).returncode != 0


def test_workflow_names_of_a_recurring_run_match_its_pattern():
    import re

    pattern = re.compile(alerts.workflow_pattern("Nightly Train!"))  # KFP lower-cases and drops what it cannot use
    assert pattern.fullmatch("nightlytrainq7x2k-12-3312498812")
    assert not pattern.fullmatch("nightlytrain-big7x2k-1-3312498812")  # another schedule sharing the prefix
    assert not pattern.fullmatch("nightlytrainq7x2k")  # the ScheduledWorkflow itself
    assert alerts.workflow_pattern("a" * 40).startswith("a" * 25 + "[")
