"""`arrcoc pytorchjob render|run`: print the PyTorchJob the builder makes, or run a PyTorchJob manifest through
a job backend (pipelines/jobs/backends.py): here (--local, a rehearsal) or on the cluster."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.jobs.cluster import DELETE_POLICIES
from pipelines.jobs.pytorchjob import DEFAULT_IMAGE
from pipelines.yaml_files import load_documents
from trainer.errors import UserError
from trainer.files import write_text_atomic


class CliError(UserError):
    pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="{render,run}", required=True)

    render = sub.add_parser("render", help="print the PyTorchJob YAML the builder makes")
    render.add_argument("--team-config", metavar="FILE",
                        help="YAML holding the team-config ConfigMap (e.g. kubectl kustomize output); "
                             "default: the laptop's (no GPU, emptyDir checkpoints)")
    render.add_argument("--name", default="arrcoc-train", help="job name (DNS-1035)")
    render.add_argument("--namespace", help="default: the team's name")
    render.add_argument("--image", default=DEFAULT_IMAGE,
                        help=f"trainer image with a tag or digest (default {DEFAULT_IMAGE})")
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
    run.add_argument("--containers", action="store_true",
                     help="with --local: each replica as a podman container of the manifest's image (make image)")
    run.add_argument("--workdir", type=Path, help="logs (and, locally, volumes); default runs/pytorchjob/<name>")
    run.add_argument("--timeout", type=float, help="seconds before giving up (cluster default: 24 h)")
    run.add_argument("--namespace", help="cluster: default the pod's own namespace, then the manifest's")
    run.add_argument("--delete", choices=DELETE_POLICIES, default="on-success", help="cluster: when to delete the job")
    run.add_argument("--poll-interval", type=float, default=15.0, help="cluster: seconds between status reads")


def run(args: argparse.Namespace) -> int:
    if args.action == "render":
        return _render(args)
    return _run(args)


def _render(args: argparse.Namespace) -> int:
    from pipelines.jobs.pytorchjob import build_pytorchjob, to_yaml
    from pipelines.jobs.team_config import TeamConfig

    team = TeamConfig.from_file(args.team_config) if args.team_config else TeamConfig.local_default()
    job = build_pytorchjob(
        args.name, team=team, image=args.image, trainer_args=args.trainer_args, namespace=args.namespace,
        workers=args.workers, nproc_per_node=args.nproc_per_node, run_id=args.run_id,
        active_deadline_seconds=args.active_deadline_seconds,
    )
    text = to_yaml(job)
    if args.output:
        write_text_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipelines.jobs.backends import ClusterOptions
    from pipelines.jobs.client import backend_for

    manifest = _read_manifest(Path(args.file))
    if args.timeout is not None and args.timeout <= 0:
        raise CliError(f"--timeout={args.timeout:g} must be > 0")
    if args.poll_interval <= 0:
        raise CliError(f"--poll-interval={args.poll_interval:g} must be > 0")
    if args.containers and not args.local:
        raise CliError("--containers runs replicas here as containers: it needs --local")
    jobs = backend_for("local" if args.local else "cluster", ClusterOptions(
        namespace=args.namespace, delete=args.delete, poll_interval=args.poll_interval), containers=args.containers)
    workdir = args.workdir or Path("runs") / "pytorchjob" / manifest["metadata"]["name"]
    # A JobFailed (exit code 1) or bad input (exit code 2) is printed as one line by pipelines/cli.py.
    result = jobs.run(manifest, workdir, timeout=args.timeout, log_stream=sys.stdout)
    print(f"PyTorchJob {result.namespace}/{result.name} Succeeded; master log: {result.master_log}")
    return 0


def _read_manifest(path: Path) -> dict:
    from pipelines.jobs.pytorchjob import check_manifest

    docs = load_documents(path, CliError)
    if len(docs) != 1:
        raise CliError(f"{path}: expected one PyTorchJob document, found {len(docs)}")
    check_manifest(docs[0], source=str(path))
    return docs[0]
