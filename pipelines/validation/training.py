"""`arrcoc validate` findings for PyTorchJobs: the rules of pipelines/jobs/rules.py, which the builder and the
local runner enforce too, reported at their place in the document."""
from __future__ import annotations

from collections.abc import Iterator

from pipelines.jobs.rules import pytorchjob_problems
from pipelines.validation.findings import Doc, Finding


def check_pytorchjob(doc: Doc, job: dict, prefix: list) -> Iterator[Finding]:
    for path, message in pytorchjob_problems(job):
        yield doc.finding(prefix + path, message)
