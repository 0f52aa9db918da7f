"""`arrcoc validate [PATH...]`: render and check, offline, everything we apply to a cluster.

With no PATH: manifests/ (offline parts rendered, remote refs checked for pinning; with --platform the
Kubeflow install in manifests/kubeflow is rendered from its remote refs too), every kustomize/overlays/*, every
katib/overlays/* and every YAML file under pipelines/jobs/examples/; the compiled pipelines in
pipelines/kfp_pipeline/compiled/ feed the model of the pods KFP builds. Besides each object on its own, the
objects are checked together: team namespaces and their quotas (validation.invariants, validation.quota), the
connections their workloads need under every NetworkPolicy (validation.reachability), what the monitoring objects
watch and whether their alert rules parse (validation.monitoring), and Pod Security
"restricted" on the pods Kubeflow's controllers build (validation.controller_pods).
Each error prints as `<file>: <Kind>/<namespace>/<name>: <field.path>: <message>`; any error
exits 1, otherwise one OK line. Warnings print the same way after `warning: ` and do not fail.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from pipelines.validation import (
    controller_pods,
    gke,
    invariants,
    katib,
    login,
    monitoring,
    quota,
    reachability,
    training,
    upstream_changes,
)
from pipelines.validation.findings import Doc, Finding
from pipelines.validation.loading import Loaded, load_path, load_tree, render
from pipelines.validation.podsecurity import check_restricted, pod_specs
from pipelines.validation.schemas import SchemaSet

REPO = Path(__file__).resolve().parents[2]


PLATFORM_LABEL = "manifests/kubeflow"  # the Kubeflow install, as findings name it
COMPILED = REPO / "pipelines" / "kfp_pipeline" / "compiled"


def crd_dir() -> Path:
    """$ARRCOC_CRD_DIR, else the git-ignored cache inside the checkout that `make crds` fills."""
    configured = os.environ.get("ARRCOC_CRD_DIR")
    return Path(configured) if configured else REPO / ".arrcoc" / "crds"


def _label_of(base: Path) -> Callable[[Path], str]:
    def label(path: Path) -> str:
        try:
            return str(path.resolve().relative_to(base))
        except ValueError:
            return str(path)

    return label


def load_defaults(repo: Path, out: Loaded, platform: bool = False) -> None:
    label = _label_of(repo)
    if (repo / "manifests").is_dir():
        load_tree(repo / "manifests", label, out, render_remote={repo / PLATFORM_LABEL} if platform else set())
    for parent in ("kustomize/overlays", "katib/overlays"):
        for overlay in sorted((repo / parent).glob("*/")) if (repo / parent).is_dir() else []:
            render(overlay, label(overlay), out)
    examples = repo / "pipelines" / "jobs" / "examples"
    if examples.is_dir():
        load_path(examples, label, out)


def _pytorchjobs(doc: Doc) -> Iterator[tuple[list, dict]]:
    """(path prefix, PyTorchJob) for the object itself or a Katib trial template."""
    if doc.kind == "PyTorchJob":
        yield [], doc.obj
    elif doc.kind == "Experiment":
        trial = katib.substituted_trial_spec(doc)
        if trial and trial.get("kind") == "PyTorchJob":
            yield ["spec", "trialTemplate", "trialSpec"], trial


def check(docs: list[Doc], schemas: SchemaSet, compiled: list[Path] = ()) -> list[Finding]:
    findings: list[Finding] = []
    configs = invariants.team_configs(docs)
    quotas = {d.namespace: (d.obj.get("spec") or {}).get("hard") or {} for d in docs if d.kind == "ResourceQuota"}
    profiles = {d.name for d in docs if d.kind == "Profile"}
    for doc in docs:
        schemas.add_crd(doc.obj)
    for doc in docs:
        findings.extend(schemas.check(doc))
        templates = list(pod_specs(doc.obj))
        if doc.kind == "Experiment":
            findings.extend(katib.check_experiment(doc))
            trial = katib.substituted_trial_spec(doc)
            if trial is not None:
                prefix = ["spec", "trialTemplate", "trialSpec"]
                trial_doc = Doc(doc.source,
                                {**trial, "metadata": {**(trial.get("metadata") or {}), "namespace": doc.namespace}})
                # The trial job is checked against its own CRD, but reported on the Experiment.
                for error in schemas.check(trial_doc):
                    if error.path != "apiVersion" or trial.get("kind") not in (None, ""):
                        findings.append(doc.finding(".".join(filter(None, [*map(str, prefix), error.path]))
                                                    if error.path != "(root)" else ".".join(prefix), error.message))
                templates.extend(pod_specs(trial, prefix))
        for prefix, job in _pytorchjobs(doc):
            findings.extend(training.check_pytorchjob(doc, job, prefix))
            findings.extend(invariants.check_job_scheduling(doc, job, prefix, configs))
            findings.extend(invariants.check_gcsfuse(doc, job, prefix, quotas, profiles))
        # Kubeflow's own workloads run in its system namespaces, which are not "restricted" and carry no team quota:
        # of our pod rules only the pinned-image one applies to them.
        upstream = doc.source == PLATFORM_LABEL
        for path, spec in templates:
            if not upstream:
                findings.extend(check_restricted(doc, path, spec))
            findings.extend(invariants.check_pod_spec(doc, path, spec, images_only=upstream))
    findings.extend(invariants.check_namespaces(docs))
    findings.extend(invariants.check_data_buckets(docs))
    for path in compiled:
        findings.extend(invariants.check_pipeline_bucket_mounts(docs, path, _label_of(REPO)(path)))
    findings.extend(quota.check_quotas(docs, list(compiled)))
    findings.extend(reachability.check_reachability(docs))
    findings.extend(login.check_login(docs))
    findings.extend(gke.check_cloud(docs))
    findings.extend(monitoring.check_monitoring(docs))
    findings.extend(_controller_pod_findings(docs, compiled))
    return findings


def _controller_pod_findings(docs: list[Doc], compiled: list[Path]) -> Iterator[Finding]:
    modelled = list(controller_pods.katib_pods(docs))
    for path in compiled:
        modelled.extend(controller_pods.kfp_pods(docs, path, _label_of(REPO)(path), "(team namespaces)"))
    for doc, spec in modelled:
        yield from check_restricted(doc, [], spec)


def validate(paths: list[Path], schemas: SchemaSet, platform: bool = False) -> tuple[Loaded, list[Finding]]:
    loaded = Loaded()
    compiled: list[Path] = []
    if paths:
        for path in paths:
            load_path(path, _label_of(Path.cwd()), loaded)
    else:
        load_defaults(REPO, loaded, platform)
        compiled = sorted(COMPILED.glob("*.yaml"))
        if platform:
            loaded.findings.extend(_upstream_change_findings(loaded))
    return loaded, loaded.findings + check(loaded.docs, schemas, compiled)


def _upstream_change_findings(loaded: Loaded) -> list[Finding]:
    """What manifests/kubeflow's patches take away from upstream, against its reviewed list (a second render of
    the same pinned refs without our patches)."""
    directory = REPO / PLATFORM_LABEL
    label = f"{PLATFORM_LABEL}/{upstream_changes.DECLARATIONS}"
    try:
        upstream = upstream_changes.render_upstream(directory)
    except RuntimeError as error:
        return [Finding(label, "Kustomization", "", PLATFORM_LABEL, "(build)", str(error))]
    patched = [d.obj for d in loaded.docs if d.source == PLATFORM_LABEL]
    return list(upstream_changes.check(directory / upstream_changes.DECLARATIONS, label, patched, upstream))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths", nargs="*", type=Path, metavar="PATH",
        help="kustomization directories, trees of them, or YAML files (default: manifests/, "
        "kustomize/overlays/*, katib/overlays/*, pipelines/jobs/examples/)",
    )
    parser.add_argument(
        "--platform", action="store_true",
        help="also render the Kubeflow install (manifests/kubeflow) from its remote refs, which needs the network "
        "(about a minute), and check it with the rest",
    )


def run(args: argparse.Namespace) -> int:
    schemas = SchemaSet(crd_dir())
    loaded, findings = validate(list(args.paths), schemas, args.platform)
    for finding in findings:
        print(finding)
    errors = [f for f in findings if not f.warning]
    if errors:
        print(f"arrcoc validate: {len(errors)} error(s) in {loaded.targets} target(s)", file=sys.stderr)
        return 1
    print(f"arrcoc validate: OK: {loaded.targets} target(s), {len(loaded.docs)} object(s)")
    return 0
