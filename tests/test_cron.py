"""Cron validation as KFP's scheduler (robfig/cron, seconds first) reads expressions."""
from __future__ import annotations

import pytest

from pipelines.ops.cron import CronError, validate_cron

VALID = [
    ("0 0 2 * * *", "0 0 2 * * *"),  # nightly at 02:00
    ("0  30   9 * * MON-FRI", "0 30 9 * * MON-FRI"),  # spacing normalised so re-applies compare equal
    ("0 0 9 ? * 2-6", "0 0 9 ? * 2-6"),  # the SDK docstring's own example
    ("*/15 * * * * *", "*/15 * * * * *"),
    ("0 0 0 1,15 jan,jul sun", "0 0 0 1,15 jan,jul sun"),
    ("0 5/10 8-18/2 * * *", "0 5/10 8-18/2 * * *"),
    ("@daily", "@daily"),
    ("@Hourly", "@hourly"),
]

INVALID = [
    # (expression, fragments the one-line message must contain)
    ("0 2 * * *", ["5 fields", 'did you mean "0 0 2 * * *"']),
    ("30 4 * * 1-5", ['did you mean "0 30 4 * * 1-5"']),
    ("", ["empty", "6 fields"]),
    ("0 0 2 * * * 2027", ["7 fields", "expected 6"]),
    ("60 0 2 * * *", ['seconds "60"', "out of range", "0-59"]),
    ("0 0 24 * * *", ['hours "24"', "0-23"]),
    ("0 0 2 0 * *", ['day-of-month "0"', "1-31"]),
    ("0 0 2 * 13 *", ['month "13"', "1-12 or JAN-DEC"]),
    ("0 0 2 * * 7", ['day-of-week "7"', "0-6 or SUN-SAT"]),
    ("0 0 2 * * FUNDAY", ['"FUNDAY"', "not a number or name"]),
    ("0 0 5-2 * * *", ['"5-2"', "starts after it ends"]),
    ("*/0 * * * * *", ["step of 0"]),
    ("*/x * * * * *", ["step that is not a whole number"]),
    ("0 0 1,,2 * * *", ['hours ""']),
    ("0 0 -1 * * *", ['hours "-1"']),
    ("@every 1h", ["unknown descriptor", "@daily"]),
    ("@fortnightly", ["unknown descriptor"]),
]


@pytest.mark.parametrize(("expression", "expected"), VALID)
def test_valid_crons_are_accepted_and_normalised(expression: str, expected: str) -> None:
    assert validate_cron(expression) == expected


@pytest.mark.parametrize(("expression", "fragments"), INVALID)
def test_invalid_crons_are_refused_with_one_line(expression: str, fragments: list[str]) -> None:
    with pytest.raises(CronError) as caught:
        validate_cron(expression)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert caught.value.exit_code == 2
