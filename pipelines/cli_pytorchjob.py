"""`arrcoc pytorchjob render|run`: print the PyTorchJob the builder makes, or run a PyTorchJob manifest
locally (a rehearsal: pipelines/local_runner.py) or on the cluster (pipelines/launcher.py)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


from pipelines.pytorchjob import DEFAULT_IMAGE
from pipelines.yaml_files import load_documents

DELETE_CHOICES = ("always", "on-success", "never")


class CliError(ValueError):
    exit_code = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="{render,run}", required=True)

    render = sub.add_parser("render", help="print the PyTorchJob YAML the builder makes")
    render.add_argument("--team-config", metavar="FILE",
                        help="YAML holding the team-config ConfigMap (e.g. kubectl kustomize output); "
                             "default: the laptop's (no GPU, emptyDir checkpoints)")
    render.add_argument("--name", default="arrcoc-train", help="job name (DNS-1035)")
    render.add_argument("--namespace", help="default: the team's name")
    render.add_argument("--image", default=DEFAULT_IMAGE, help=f"trainer image with a tag or digest (default {DEFAULT_IMAGE})")
    render.add_argument("--workers", type=int, default=1, help="Worker replicas besides the one Master (default 1)")
    render.add_argument("--nproc-per-node", help="auto|cpu|gpu|N (default: the team's GPUs per replica, at least 1)")
    render.add_argument("--run-id", help="checkpoint directory name under the mount (default: the job name)")
    render.add_argument("--active-deadline-seconds", type=int)
    render.add_argument("--output", "-o", metavar="FILE", help="write the YAML here instead of stdout")
    render.add_argument("trainer_args", nargs="*", metavar="-- TRAINER ARGS",
                        help="flags for python -m trainer (everything after --); --out is set by the builder")

    run = sub.add_parser("run", help="run a PyTorchJob manifest locally (--local) or on the cluster")
    run.add_argument("file", metavar="FILE.yaml")
    run.add_argument("--local", action="store_true", help="run every replica as a local process (a rehearsal)")
    run.add_argument("--workdir", type=Path, help="local: logs and volumes (default runs/pytorchjob/<name>)")
    run.add_argument("--timeout", type=float, help="seconds before giving up (cluster default: 24 h)")
    run.add_argument("--namespace", help="cluster: default the pod's own namespace, then the manifest's")
    run.add_argument("--delete", choices=DELETE_CHOICES, default="on-success", help="cluster: when to delete the job")
    run.add_argument("--poll-interval", type=float, default=15.0, help="cluster: seconds between status reads")


def run(args: argparse.Namespace) -> int:
    if args.action == "render":
        return _render(args)
    return _run(args)


def _render(args: argparse.Namespace) -> int:
    from pipelines.pytorchjob import build_pytorchjob, to_yaml
    from pipelines.team_config import TeamConfig

    team = TeamConfig.from_file(args.team_config) if args.team_config else TeamConfig.local_default()
    job = build_pytorchjob(
        args.name, team=team, image=args.image, trainer_args=args.trainer_args, namespace=args.namespace,
        workers=args.workers, nproc_per_node=args.nproc_per_node, run_id=args.run_id,
        active_deadline_seconds=args.active_deadline_seconds,
    )
    text = to_yaml(job)
    if args.output:
        _write_atomic(Path(args.output), text)
    else:
        sys.stdout.write(text)
    return 0


def _run(args: argparse.Namespace) -> int:
    manifest = _read_manifest(Path(args.file))
    if args.timeout is not None and args.timeout <= 0:
        raise CliError(f"--timeout={args.timeout:g} must be > 0")
    if args.local:
        from pipelines.local_runner import run_local

        workdir = args.workdir or Path("runs") / "pytorchjob" / manifest["metadata"]["name"]
        result = run_local(manifest, workdir, timeout=args.timeout)
        final = result.final
        if result.succeeded:
            print(f"PyTorchJob {result.name} Succeeded; master log: {result.master_log}")
            return 0
        print(f"PyTorchJob {result.name} Failed: {final.get('reason')}: {final.get('message')}", file=sys.stderr)
        return 1

    from pipelines.launcher import PyTorchJobFailed, launch

    try:
        result = launch(manifest, namespace=args.namespace, timeout=args.timeout or 24 * 3600,
                        poll_interval=args.poll_interval, delete=args.delete)
    except PyTorchJobFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"PyTorchJob {result.namespace}/{result.name} Succeeded")
    return 0


def _read_manifest(path: Path) -> dict:
    from pipelines.pytorchjob import check_manifest

    docs = load_documents(path, CliError)
    if len(docs) != 1:
        raise CliError(f"{path}: expected one PyTorchJob document, found {len(docs)}")
    check_manifest(docs[0], source=str(path))
    return docs[0]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

