"""The `arrcoc` console command.

Each subcommand lives next to the code it runs: the module named here defines
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only for the
subcommand being run, so `arrcoc validate` never pays for importing torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from trainer.config import OneLineParser

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("trainer.cli_train", "train the ARR-COC adapter (same flags as `python -m trainer`)"),
    "evaluate": ("trainer.cli_evaluate", "print Katib metric lines for an adapter or a baseline"),
    "validate": ("pipelines.validation.run",
                 "render and check offline every manifest we apply (schemas, webhooks, Pod Security, team invariants)"),
    "pipeline": ("pipelines.ops.kfp_operations", "upload, run and schedule the pipeline on a real KFP (kfp.Client)"),
    "sweep": ("pipelines.sweeps.search",
              "run a Katib Experiment: --local rehearses it here, otherwise create it in the cluster"),
    "pytorchjob": ("pipelines.jobs.cli",
                   "render the PyTorchJob the builder makes, or run one locally (--local) or on the cluster"),
    "compile": ("pipelines.compile",
                "compile the KFP pipeline into pipelines/kfp_pipeline/compiled/ (the files uploaded in the KFP UI)"),
    "image": ("pipelines.image.build",
              "build the trainer image with podman (make image), or its build context for another builder"),
    "demo": ("pipelines.kfp_pipeline.demo",
             "run the whole pipeline here with kfp.local: data, 2-replica local PyTorchJob, report, gate"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arrcoc",
        description="Train the ARR-COC adapter on Kubeflow, or rehearse it all locally.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser = _top_parser()
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0 if argv else 2
        parser.error(f"unknown command {argv[0]!r}; choose from: {', '.join(SUBCOMMANDS)}")
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = OneLineParser(prog=f"arrcoc {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except Exception as exc:  # errors meant for the user carry an exit code; others keep their traceback
        code = getattr(exc, "exit_code", None)
        if code is None:
            raise
        print(f"arrcoc {name}: error: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
