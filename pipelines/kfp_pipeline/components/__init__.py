"""The pipeline's components. Each step is two modules: a small @dsl.component (prepare_data, train, evaluate,
register) and the plain code that does its work (the module of the same name in steps/).

Why the split: KFP copies only a component function's own source into the container, so the body must import
its work from our package (preinstalled in the trainer image, as on the laptop); and at run time KFP sets
_KFP_RUNTIME=true, under which kfp.dsl has no `component` decorator, so the work must live in modules that
do not decorate anything. The work modules are what the tests exercise directly. The component modules do
not use `from __future__ import annotations`: kfp 2.17 reads component signatures at decoration time and
rejects string annotations.
"""

# Every component runs in the trainer image: our package, torch and kfp are already there, so nothing is
# pip-installed at run time (clusters may have no PyPI access, laptops no network).
from pipelines.jobs.pytorchjob import DEFAULT_IMAGE as BASE_IMAGE  # noqa: E402  (one place names the image)

COMPONENT_OPTIONS = {"base_image": BASE_IMAGE, "install_kfp_package": False}
