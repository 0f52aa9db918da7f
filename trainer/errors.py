"""The one base class for bad user input: the CLIs print its message as one line and exit with `exit_code`."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (a flag, a file, a manifest): one line naming the field or file and the allowed
    values. Subclasses name the area (ConfigError, DatasetError, ...); those that stand for a failure outside the
    user's input (a cluster API error, a failed job) set exit_code = 1."""

    exit_code = 2
