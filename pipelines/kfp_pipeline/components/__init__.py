"""The pipeline's components: each step is a small @dsl.component here that imports its work from the module of
the same name in steps/ (why the split, and why no `from __future__ import annotations` here: docs/pipeline.md,
"Components and the image")."""

# Every component runs in the trainer image: our package, torch and kfp are already there, so nothing is
# pip-installed at run time (clusters may have no PyPI access, laptops no network).
from pipelines.jobs.pytorchjob import DEFAULT_IMAGE as BASE_IMAGE  # noqa: E402  (one place names the image)

COMPONENT_OPTIONS = {"base_image": BASE_IMAGE, "install_kfp_package": False}
