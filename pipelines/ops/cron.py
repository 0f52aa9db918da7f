"""Cron expressions as KFP's scheduler reads them: 6 fields, seconds first (robfig/cron). A 5-field crontab line
would be read as seconds-first and run hourly, so anything but the 6-field form (or a robfig descriptor) is
refused before any request (docs/operations.md)."""
from __future__ import annotations

from dataclasses import dataclass

from trainer.errors import UserError


class CronError(UserError):
    """A cron expression KFP would reject or misread: one line, exit code 2."""


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()  # names[i] stands for low + i

    def allowed(self) -> str:
        text = f"{self.low}-{self.high}"
        if self.names:
            text += f" or {self.names[0]}-{self.names[-1]}"
        return text


FIELDS = (
    _Field("seconds", 0, 59),
    _Field("minutes", 0, 59),
    _Field("hours", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")),
    _Field("day-of-week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")),
)
# robfig/cron's fixed descriptors; '@every <duration>' is left out: a recurring run has interval_second for that.
DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
FORM = "seconds minutes hours day-of-month month day-of-week"


def validate_cron(expression: str) -> str:
    """Return the expression with single spaces between fields, or raise CronError saying what is wrong."""
    if not isinstance(expression, str) or not expression.strip():
        raise CronError(f"cron {expression!r} is empty; expected 6 fields: {FORM}, e.g. \"0 0 2 * * *\"")
    parts = expression.split()
    if parts[0].startswith("@"):
        if len(parts) == 1 and parts[0].lower() in DESCRIPTORS:
            return parts[0].lower()
        raise CronError(f"cron \"{expression}\": unknown descriptor; allowed: {', '.join(DESCRIPTORS)}")
    if len(parts) == 5:
        # The hint is the same schedule as a crontab user meant it: fire at second 0.
        raise CronError(
            f"cron \"{expression}\" has 5 fields but KFP reads 6, seconds first ({FORM}), "
            f"and would take it as seconds={parts[0]} minutes={parts[1]}: did you mean \"0 {' '.join(parts)}\"?"
        )
    if len(parts) != 6:
        raise CronError(f"cron \"{expression}\" has {len(parts)} fields; expected 6: {FORM}")
    for field, text in zip(FIELDS, parts):
        for item in text.split(","):
            _check_item(expression, field, item)
    return " ".join(parts)


def _check_item(expression: str, field: _Field, item: str) -> None:
    def fail(reason: str) -> CronError:
        return CronError(
            f"cron \"{expression}\": {field.name} \"{item}\" {reason} (allowed: {field.allowed()}, "
            f"*, ?, ranges a-b, steps */n or a-b/n, lists a,b)"
        )

    span, slash, step = item.partition("/")
    if slash:
        if not step.isdigit():
            raise fail("has a step that is not a whole number")
        if int(step) == 0:
            raise fail("has a step of 0")
    if span in ("*", "?"):
        return
    low_text, dash, high_text = span.partition("-")
    low = _value(field, low_text)
    high = _value(field, high_text) if dash else low
    if low is None or (dash and high is None):
        raise fail("is not a number or name")
    assert high is not None
    if not field.low <= low <= field.high or not field.low <= high <= field.high:
        raise fail("is out of range")
    if low > high:
        raise fail("starts after it ends")


def _value(field: _Field, text: str) -> int | None:
    if text.isdigit():
        return int(text)
    upper = text.upper()
    if upper in field.names:
        return field.low + field.names.index(upper)
    return None
