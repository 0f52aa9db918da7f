"""`arrcoc pipeline upload|run|schedule|unschedule|list`: day-to-day KFP operations through kfp.Client, each safe
to repeat, every input checked before the first request. upload, run and schedule take the team's pipeline
variant (--team, else the namespace; its overlay's team-config says whether it has a data bucket) and refuse the
other one. Where KFP is, the token, the namespace, and what repeating a command does: docs/operations.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.kfp_pipeline.variants import compiled_file, pipeline_name, variant_of
from pipelines.ops.cron import validate_cron

SCHEDULES = Path(__file__).parent / "schedules"
TEAM_OVERLAYS = Path(__file__).parents[2] / "kustomize" / "overlays"
PORT_FORWARD = ["kubectl", "port-forward", "-n", "kubeflow", "svc/ml-pipeline-ui", "8080:80"]
PORT_FORWARD_URL = "http://127.0.0.1:8080"
SCHEDULE_KEYS = {"name", "cron", "experiment", "parameters", "pipeline", "version", "enabled"}
REQUIRED_SCHEDULE_KEYS = ("name", "cron", "experiment")
# KFP parameter types -> the YAML values that fit them (bool is an int in Python: checked first)
PARAMETER_TYPES: dict[str, Callable[[Any], bool]] = {
    "STRING": lambda v: isinstance(v, str),
    "NUMBER_INTEGER": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "NUMBER_DOUBLE": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "BOOLEAN": lambda v: isinstance(v, bool),
    "LIST": lambda v: isinstance(v, list),
    "STRUCT": lambda v: isinstance(v, dict),
}


class OperateError(RuntimeError):
    """KFP said no, or is not there: one line, exit code 1."""

    exit_code = 1


class InputError(OperateError):
    """A flag or file of ours is wrong: one line naming it, exit code 2, nothing sent."""

    exit_code = 2


# ---------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    connection = argparse.ArgumentParser(add_help=False)
    group = connection.add_argument_group("where KFP is")
    group.add_argument("--host", help="KFP API URL (default: $KFP_HOST)")
    group.add_argument("--port-forward", action="store_true",
                       help=f"run `{' '.join(PORT_FORWARD)}` for this command and use {PORT_FORWARD_URL}")
    group.add_argument("--token-file", help="file holding a bearer token (default: $KFP_TOKEN)")
    group.add_argument("--namespace", help="team namespace on multi-user KFP (default: $KFP_NAMESPACE)")
    group.add_argument("--team", metavar="TEAM|DIR", help="the team whose pipeline variant to use: "
                       "kustomize/overlays/TEAM, or an overlay folder (default: the namespace)")

    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = actions.add_parser("upload", parents=[connection], help="upload a compiled pipeline as a new version")
    up.add_argument("pipeline_yaml", metavar="PIPELINE_YAML", nargs="?",
                    help="default: the team's variant in pipelines/kfp_pipeline/compiled/")
    up.add_argument("--name", help="pipeline name (default: pipelineInfo.name in the file)")
    up.add_argument("--version", help="version name (default: short git commit, '-dirty' if the tree is)")
    up.add_argument("--description", default="", help="version description")

    run_p = actions.add_parser("run", parents=[connection], help="start one run of an uploaded version")
    run_p.add_argument("--pipeline", help="default: the team's variant")
    run_p.add_argument("--version", help="version name (default: the latest)")
    run_p.add_argument("--params", help="YAML file: parameter -> value (default: the pipeline's defaults)")
    run_p.add_argument("--experiment", required=True)
    run_p.add_argument("--run-name", help="default: PIPELINE VERSION and the time")

    sched = actions.add_parser("schedule", parents=[connection],
                               help="create or replace a recurring run (one NAME, or every file of --from DIR)")
    sched.add_argument("name", nargs="?", metavar="NAME")
    sched.add_argument("--from", dest="from_dir", metavar="DIR",
                       help=f"apply every *.yaml in DIR (e.g. {_rel(SCHEDULES)}/)")
    sched.add_argument("--cron", help="6 fields, seconds first, e.g. '0 0 2 * * *' (02:00 daily)")
    sched.add_argument("--params", help="YAML file: parameter -> value")
    sched.add_argument("--experiment")
    sched.add_argument("--pipeline", help="default: the team's variant")
    sched.add_argument("--version", help="default: the latest version at apply time")
    sched.add_argument("--dry-run", action="store_true", help="check the schedules and print them; no KFP needed")

    unsched = actions.add_parser("unschedule", parents=[connection], help="disable (default) or delete a schedule")
    unsched.add_argument("name", metavar="NAME")
    unsched.add_argument("--delete", action="store_true", help="delete instead of disabling")

    actions.add_parser("list", parents=[connection], help="pipelines, their versions, and schedules")


def run(args: argparse.Namespace) -> int:
    # Read and check every input before opening a connection: bad input never reaches KFP.
    team = team_pipeline(args) if args.action in ("upload", "run", "schedule") else None
    if args.action == "upload":
        path = Path(args.pipeline_yaml) if args.pipeline_yaml else _required(team, "upload", "PIPELINE_YAML").file
        pipeline_file = PipelineFile.read(path)
        name = args.name or pipeline_file.name
        if team is not None:
            team.check(name, str(path))
        version = args.version or git_version(path)
        with connect(args) as kfp:
            return kfp.upload(pipeline_file, name, version, args.description)
    if args.action == "run":
        pipeline = args.pipeline or _required(team, "run", "--pipeline").name
        if team is not None:
            team.check(pipeline, "--pipeline")
        params = load_params(args.params)
        with connect(args) as kfp:
            return kfp.run(pipeline, args.version, params, args.params, args.experiment, args.run_name)
    if args.action == "schedule":
        schedules = schedules_from_args(args, team)
        if args.dry_run:
            dry_run(schedules)
            return 0
        with connect(args) as kfp:
            return kfp.apply_schedules(schedules)
    if args.action == "unschedule":
        with connect(args) as kfp:
            return kfp.unschedule(args.name, args.delete)
    with connect(args) as kfp:
        return kfp.listing()


# ---------------------------------------------------------------- the team's pipeline variant
@dataclass(frozen=True)
class TeamPipeline:
    """The variant of the pipeline a team runs, from its team-config's dataBucket."""

    team: str
    data_bucket: str  # "" = none
    name: str
    file: Path

    @classmethod
    def of(cls, team: str, data_bucket: str) -> TeamPipeline:
        return cls(team, data_bucket, pipeline_name(bool(data_bucket)), compiled_file(bool(data_bucket)))

    def check(self, pipeline: str, where: str) -> None:
        """Refuse our other variant: its prepare-data and evaluate would (or would not) mount a claim that the
        team does not (or does) have, and its train step fails on the mismatch."""
        other = variant_of(pipeline)
        if other is None or pipeline == self.name:
            return
        has = f"sets dataBucket={self.data_bucket!r}" if self.data_bucket else "sets no dataBucket"
        raise InputError(f"{where}: pipeline {pipeline!r} is the variant for teams "
                         f"{'with' if other else 'without'} a data bucket, and {self.team}'s team-config {has}: "
                         f"use {self.name!r}")


def team_pipeline(args: argparse.Namespace) -> TeamPipeline | None:
    """The pipeline variant of --team (an overlay folder, or kustomize/overlays/TEAM), else of the namespace when
    kustomize/overlays has that team; None when no team is known."""
    from pipelines.jobs.team_config import TeamConfig, TeamConfigError

    team = getattr(args, "team", None)
    if team:
        overlay = Path(team) if Path(team).is_dir() else TEAM_OVERLAYS / team
        if not overlay.is_dir():
            known = ", ".join(sorted(p.name for p in TEAM_OVERLAYS.iterdir() if p.is_dir()))
            raise InputError(f"--team {team}: neither an overlay folder nor a team of kustomize/overlays ({known})")
    else:
        team = args.namespace or os.environ.get("KFP_NAMESPACE")
        overlay = TEAM_OVERLAYS / team if team else None
        if overlay is None or not overlay.is_dir():
            return None
    try:
        return TeamPipeline.of(team, TeamConfig.from_overlay(overlay).data_bucket)
    except TeamConfigError as exc:
        raise InputError(f"--team {team}: {exc}") from None


def _required(team: TeamPipeline | None, action: str, what: str) -> TeamPipeline:
    if team is None:
        raise InputError(f"{action}: name {what}, or the team whose pipeline variant to use (--team TEAM, or "
                         "--namespace / $KFP_NAMESPACE of a team in kustomize/overlays)")
    return team


def _rel(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


# ---------------------------------------------------------------- inputs
@dataclass(frozen=True)
class PipelineFile:
    path: Path
    name: str
    spec: dict  # the shape KFP returns for a version's pipeline_spec
    parameters: dict[str, dict]

    @classmethod
    def read(cls, path: Path) -> PipelineFile:
        try:
            docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        except OSError as exc:
            raise InputError(f"{path}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from None
        main = docs[0] if docs else None
        if not isinstance(main, dict) or not isinstance(main.get("pipelineInfo"), dict) or "root" not in main:
            raise InputError(f"{path}: not a compiled KFP pipeline (no pipelineInfo/root); "
                             "compile it first, e.g. `arrcoc compile`")
        spec = main if len(docs) == 1 else {"pipeline_spec": main, "platform_spec": docs[1]}
        return cls(path, str(main["pipelineInfo"]["name"]), spec, _spec_parameters(spec))


def _spec_parameters(spec: dict | None) -> dict[str, dict]:
    """root.inputDefinitions.parameters of a pipeline spec, in either shape KFP returns it."""
    if not isinstance(spec, dict):
        return {}
    main = spec.get("pipeline_spec", spec)
    return dict((((main.get("root") or {}).get("inputDefinitions") or {}).get("parameters")) or {})


def git_version(path: Path) -> str:
    """The short commit of the checkout holding PATH, with '-dirty' when tracked files differ from it."""
    where = str(path.resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        raise InputError(f"{path}: not in a git checkout with a commit, so no default version name: "
                         "pass --version") from None
    return f"{commit}-dirty" if dirty else commit


def load_params(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from None
    return _params_mapping(data, path)


def _params_mapping(data: Any, where: str) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise InputError(f"{where}: parameters must be a mapping of parameter name -> value")
    return data


@dataclass(frozen=True)
class Schedule:
    name: str
    cron: str
    experiment: str
    parameters: dict[str, Any] = field(default_factory=dict)
    pipeline: str | None = None  # None until _with_pipeline: the team's variant
    version: str | None = None  # None: the latest version when applied
    enabled: bool = True
    source: str = "command line"

    def describe(self) -> str:
        target = f"{self.pipeline}@{self.version or 'latest'}"
        state = "" if self.enabled else ", disabled"
        return f"{self.name}: cron \"{self.cron}\" -> {target} in experiment {self.experiment}{state}, " \
               f"parameters {json.dumps(self.parameters, sort_keys=True)}"


def load_schedule(path: Path) -> Schedule:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping with keys {', '.join(sorted(SCHEDULE_KEYS))}")
    unknown = sorted(set(map(str, data)) - SCHEDULE_KEYS)
    if unknown:
        raise InputError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(SCHEDULE_KEYS))}")
    for key in REQUIRED_SCHEDULE_KEYS:
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise InputError(f"{path}: {key}: required, a non-empty string")
    for key in ("pipeline", "version"):
        if key in data and (not isinstance(data[key], str) or not data[key].strip()):
            raise InputError(f"{path}: {key}: must be a non-empty string when given")
    if not isinstance(data.get("enabled", True), bool):
        raise InputError(f"{path}: enabled: must be true or false")
    try:
        cron = validate_cron(data["cron"])
    except ValueError as exc:
        raise InputError(f"{path}: cron: {exc}") from None
    return Schedule(
        name=data["name"], cron=cron, experiment=data["experiment"],
        parameters=_params_mapping(data.get("parameters"), f"{path}: parameters"),
        pipeline=data.get("pipeline"), version=data.get("version"), enabled=data.get("enabled", True),
        source=str(path),
    )


def load_schedules(directory: Path) -> list[Schedule]:
    if not directory.is_dir():
        raise InputError(f"--from {directory}: not a directory")
    files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])
    if not files:
        raise InputError(f"--from {directory}: no *.yaml schedule files")
    schedules = [load_schedule(path) for path in files]
    seen: dict[str, str] = {}
    for schedule in schedules:
        if schedule.name in seen:
            raise InputError(f"{schedule.source}: name {schedule.name!r} is also used by {seen[schedule.name]}")
        seen[schedule.name] = schedule.source
    return schedules


def schedules_from_args(args: argparse.Namespace, team: TeamPipeline | None) -> list[Schedule]:
    single = [flag for flag, value in (("NAME", args.name), ("--cron", args.cron), ("--params", args.params),
                                       ("--experiment", args.experiment), ("--pipeline", args.pipeline),
                                       ("--version", args.version)) if value]
    if args.from_dir:
        if single:
            raise InputError(f"--from DIR takes everything from its files; drop {', '.join(single)}")
        return [_with_pipeline(s, team) for s in load_schedules(Path(args.from_dir))]
    missing = [flag for flag, value in (("NAME", args.name), ("--cron", args.cron),
                                        ("--experiment", args.experiment)) if not value]
    if missing:
        raise InputError(f"schedule needs {', '.join(missing)} (or --from DIR)")
    try:
        cron = validate_cron(args.cron)
    except ValueError as exc:
        raise InputError(f"--cron: {exc}") from None
    return [_with_pipeline(Schedule(name=args.name, cron=cron, experiment=args.experiment,
                                    parameters=load_params(args.params), pipeline=args.pipeline,
                                    version=args.version, source=args.params or "command line"), team)]


def _with_pipeline(schedule: Schedule, team: TeamPipeline | None) -> Schedule:
    """A schedule runs its team's variant: one that names none gets it, one that names the other is refused."""
    where = schedule.source if schedule.source != "command line" else "--pipeline"
    if schedule.pipeline:
        if team is not None:
            team.check(schedule.pipeline, where)
        return schedule
    if team is None:
        raise InputError(f"{schedule.source}: names no pipeline, and no team is known to choose the variant: pass "
                         "--team TEAM (or --namespace / $KFP_NAMESPACE of a team in kustomize/overlays), or name "
                         "one with `pipeline:`")
    return dataclasses.replace(schedule, pipeline=team.name)


def dry_run(schedules: list[Schedule]) -> None:
    """Print what would be applied; parameters are checked against our compiled variant where that is the target."""
    for schedule in schedules:
        variant = variant_of(schedule.pipeline or "")
        if variant is not None and schedule.version is None and compiled_file(variant).is_file():
            compiled = PipelineFile.read(compiled_file(variant))
            check_parameters(schedule.parameters, compiled.parameters, schedule.source,
                             f"{_rel(compiled.path)} ({compiled.name})")
        print(f"{schedule.source}: {schedule.describe()}")


def check_parameters(params: dict[str, Any], declared: dict[str, dict], where: str, target: str) -> None:
    """Refuse what the pipeline would refuse at run time, while nothing has been created yet."""
    if not declared:
        return
    allowed = ", ".join(sorted(declared))
    for name, value in params.items():
        if name not in declared:
            raise InputError(f"{where}: unknown parameter {name!r}; {target} takes: {allowed}")
        kind = declared[name].get("parameterType", "")
        fits = PARAMETER_TYPES.get(kind)
        if fits is not None and not fits(value):
            raise InputError(f"{where}: parameter {name!r} is {type(value).__name__} {value!r}; "
                             f"{target} expects {kind}")
    for name, definition in declared.items():
        if name not in params and not definition.get("isOptional") and "defaultValue" not in definition:
            raise InputError(f"{where}: parameter {name!r} is required by {target} (it has no default)")


# ---------------------------------------------------------------- connection
@contextlib.contextmanager
def connect(args: argparse.Namespace) -> Iterator[Operator]:
    token = _token(args.token_file)
    namespace = args.namespace or os.environ.get("KFP_NAMESPACE") or None
    with contextlib.ExitStack() as stack:
        if args.host or os.environ.get("KFP_HOST"):
            host = (args.host or os.environ["KFP_HOST"]).rstrip("/")
            if not host.startswith(("http://", "https://")):
                raise InputError(f"KFP host {host!r} must start with http:// or https://")
        elif args.port_forward:
            host = stack.enter_context(_port_forward())
        else:
            raise InputError("no KFP host: pass --host URL, set KFP_HOST, or use --port-forward")
        multi_user = _preflight(host, token)
        if multi_user and not namespace:
            raise InputError(f"KFP at {host} is multi-user: pass --namespace TEAM or set KFP_NAMESPACE")
        import kfp  # here, so that `--dry-run` and input errors never pay for importing the SDK

        with warnings.catch_warnings():
            # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later": we target 2.16.
            warnings.simplefilter("ignore", FutureWarning)
            client = kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow")
        with _api_errors(host):
            yield Operator(client, host, namespace)


def _token(token_file: str | None) -> str | None:
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise InputError(f"--token-file {token_file}: cannot read: {exc.strerror}") from None
        if not token:
            raise InputError(f"--token-file {token_file}: empty")
        return token
    return os.environ.get("KFP_TOKEN") or None


def _preflight(host: str, token: str | None) -> bool:
    """One GET of healthz with our token, returning whether KFP is multi-user.

    kfp.Client probes the same endpoint when it is built without a namespace, and on any failure,
    a rejected token included, retries five times five seconds apart and then raises a bare
    TimeoutError. Asking once first turns that into a clear message at once.
    """
    import certifi
    import urllib3

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    pool = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=certifi.where())
    try:
        response = pool.request("GET", f"{host}/apis/v2beta1/healthz", headers=headers,
                                timeout=urllib3.Timeout(connect=10, read=30), retries=False)
    except urllib3.exceptions.HTTPError as exc:
        raise OperateError(f"cannot reach KFP at {host}: {_reason(exc)}") from None
    if response.status in (401, 403):
        if token:
            raise OperateError(f"KFP at {host} refused the token (HTTP {response.status}): "
                               "check KFP_TOKEN or --token-file")
        raise OperateError(f"KFP at {host} needs a token (HTTP {response.status}): set KFP_TOKEN or pass --token-file")
    if response.status != 200:
        raise OperateError(f"KFP at {host} answered GET /apis/v2beta1/healthz with HTTP {response.status}: "
                           "is this the KFP API (svc/ml-pipeline-ui)?")
    try:
        return bool(json.loads(response.data).get("multi_user"))
    except (ValueError, AttributeError):
        raise OperateError(f"{host}/apis/v2beta1/healthz did not answer KFP's JSON: is this the KFP API?") from None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return str(reason).splitlines()[0]


@contextlib.contextmanager
def _port_forward() -> Iterator[str]:
    try:
        process = subprocess.Popen(PORT_FORWARD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        raise OperateError(f"--port-forward: cannot run kubectl: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                message = (process.stderr.read() if process.stderr else "").strip().splitlines()
                reason = message[-1] if message else f"exit code {process.returncode}"
                raise OperateError(f"`{' '.join(PORT_FORWARD)}` exited: {reason}")
            with socket.socket() as probe:
                probe.settimeout(1)
                if probe.connect_ex(("127.0.0.1", 8080)) == 0:
                    break
            if time.monotonic() > deadline:
                raise OperateError(f"`{' '.join(PORT_FORWARD)}` did not open port 8080 within 30 s")
            time.sleep(0.2)
        yield PORT_FORWARD_URL
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def _api_errors(host: str) -> Iterator[None]:
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as exc:
        raise OperateError(f"KFP at {host} answered HTTP {exc.status}: {_api_message(exc)}") from None
    except urllib3.exceptions.HTTPError as exc:
        raise OperateError(f"lost KFP at {host}: {_reason(exc)}") from None


def _api_message(exc: Any) -> str:
    try:
        body = json.loads(exc.body)
        message = body.get("message") or body.get("error") or exc.reason
    except (TypeError, ValueError, AttributeError):
        message = exc.reason
    return str(message).strip().splitlines()[0] if message else "no reason given"


# ---------------------------------------------------------------- operations
def _display(obj: Any) -> str:
    return obj.display_name or getattr(obj, "name", None) or ""


@dataclass
class _Plan:
    schedule: Schedule
    pipeline: Any
    version: Any


class Operator:
    """The five operations, over one kfp.Client bound to a host and (maybe) a team namespace."""

    def __init__(self, client: Any, host: str, namespace: str | None) -> None:
        self.client = client
        self.host = host
        self.namespace = namespace

    @property
    def _where(self) -> str:
        return f"namespace {self.namespace}" if self.namespace else f"KFP at {self.host}"

    # -- lookups
    @staticmethod
    def _all(list_call: Callable[..., Any], attribute: str, **kwargs: Any) -> list[Any]:
        items: list[Any] = []
        token = ""
        while True:
            page = list_call(page_token=token, page_size=100, **kwargs)
            items.extend(getattr(page, attribute) or [])
            token = page.next_page_token or ""
            if not token:
                return items

    def _pipelines(self) -> list[Any]:
        return self._all(self.client.list_pipelines, "pipelines", namespace=self.namespace)

    def find_pipeline(self, name: str) -> Any | None:
        # operation 1 is EQUALS, written as kfp.Client's own name lookups write it
        by_name = json.dumps({"predicates": [{"operation": 1, "key": "display_name", "stringValue": name}]})
        found = [p for p in self._all(self.client.list_pipelines, "pipelines", namespace=self.namespace,
                                      filter=by_name) if _display(p) == name]
        if len(found) > 1:
            raise OperateError(f"{len(found)} pipelines are named {name!r} in {self._where}; rename or delete one")
        return found[0] if found else None

    def require_pipeline(self, name: str) -> Any:
        pipeline = self.find_pipeline(name)
        if pipeline is None:
            names = sorted(_display(p) for p in self._pipelines())
            raise OperateError(f"no pipeline named {name!r} in {self._where} (there: {', '.join(names) or 'none'}); "
                               "upload it first: arrcoc pipeline upload PIPELINE_YAML")
        return pipeline

    def versions(self, pipeline: Any) -> list[Any]:
        """Oldest first."""
        versions = self._all(self.client.list_pipeline_versions, "pipeline_versions", pipeline_id=pipeline.pipeline_id)
        return sorted(versions, key=lambda v: v.created_at.timestamp() if hasattr(v.created_at, "timestamp") else 0)

    def resolve_version(self, pipeline: Any, name: str | None) -> Any:
        versions = self.versions(pipeline)
        if not versions:
            raise OperateError(f"pipeline {_display(pipeline)!r} has no versions")
        if name is None:
            return versions[-1]
        for version in versions:
            if _display(version) == name:
                return version
        recent = ", ".join(_display(v) for v in versions[-5:])
        raise OperateError(f"pipeline {_display(pipeline)!r} has no version {name!r} (latest: {recent})")

    def _spec(self, version: Any) -> dict | None:
        if version.pipeline_spec is not None:
            return version.pipeline_spec
        # list answers may leave the spec out; ask for the one version
        return self.client.get_pipeline_version(version.pipeline_id, version.pipeline_version_id).pipeline_spec

    def _declared(self, version: Any) -> dict[str, dict]:
        return _spec_parameters(self._spec(version))

    # -- upload
    def upload(self, pipeline_file: PipelineFile, name: str, version: str, description: str) -> int:
        pipeline = self.find_pipeline(name)
        if pipeline is not None:
            for existing in self.versions(pipeline):
                if _display(existing) != version:
                    continue
                theirs = self._spec(existing)
                if theirs is not None and not _same_spec(theirs, pipeline_file.spec):
                    raise OperateError(f"pipeline {name!r} already has a version {version!r} with a different spec; "
                                       "pass a new --version (or commit, for a new default)")
                print(f"unchanged: pipeline {name!r} version {version!r} is already uploaded "
                      f"({existing.pipeline_version_id})")
                return 0
        else:
            # KFP gives a new pipeline a first version named after the pipeline; ours follows it,
            # so the version every run and schedule names is the one carrying the git name.
            pipeline = self.client.upload_pipeline(str(pipeline_file.path), pipeline_name=name,
                                                   description=description or None, namespace=self.namespace)
            print(f"created pipeline {name!r} ({pipeline.pipeline_id}) in {self._where}")
        created = self.client.upload_pipeline_version(str(pipeline_file.path), pipeline_version_name=version,
                                                      pipeline_id=pipeline.pipeline_id,
                                                      description=description or None)
        print(f"uploaded pipeline {name!r} version {version!r} ({created.pipeline_version_id})")
        return 0

    # -- run
    def run(self, pipeline_name: str, version_name: str | None, params: dict[str, Any], params_file: str | None,
            experiment: str, run_name: str | None) -> int:
        pipeline = self.require_pipeline(pipeline_name)
        version = self.resolve_version(pipeline, version_name)
        target = f"pipeline {pipeline_name!r} version {_display(version)!r}"
        check_parameters(params, self._declared(version), params_file or "--params", target)
        exp = self.client.create_experiment(experiment, namespace=self.namespace)
        name = run_name or f"{pipeline_name} {_display(version)} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        created = self.client.run_pipeline(experiment_id=exp.experiment_id, job_name=name, params=params,
                                           pipeline_id=pipeline.pipeline_id, version_id=version.pipeline_version_id)
        print(f"started run {created.run_id} of {target} in experiment {experiment!r}")
        return 0

    # -- schedule
    def _plan(self, schedule: Schedule) -> _Plan:
        assert schedule.pipeline, "schedules_from_args fills in the default pipeline"
        pipeline_name = schedule.pipeline
        pipeline = self.require_pipeline(pipeline_name)
        version = self.resolve_version(pipeline, schedule.version)
        where = schedule.source if schedule.source != "command line" else "--params"
        check_parameters(schedule.parameters, self._declared(version), where,
                         f"pipeline {pipeline_name!r} version {_display(version)!r}")
        return _Plan(schedule, pipeline, version)

    def _recurring_runs(self) -> list[Any]:
        return self._all(self.client.list_recurring_runs, "recurring_runs", namespace=self.namespace)

    def apply_schedules(self, schedules: list[Schedule]) -> int:
        plans = [self._plan(schedule) for schedule in schedules]  # every lookup and check before any write
        existing = self._recurring_runs()
        for plan in plans:
            self._apply(plan, [r for r in existing if _display(r) == plan.schedule.name])
        return 0

    def _apply(self, plan: _Plan, existing: list[Any]) -> None:
        schedule = plan.schedule
        experiment = self.client.create_experiment(schedule.experiment, namespace=self.namespace)
        wanted = (schedule.cron, _canonical(schedule.parameters), plan.version.pipeline_version_id,
                  experiment.experiment_id, 1, True)
        keep = next((r for r in existing if _recurring_key(r) == wanted), None)
        target = f"{_display(plan.pipeline)}@{_display(plan.version)}"
        if keep is None:
            # create first, then delete: if creating fails, the old schedule still runs
            created = self.client.create_recurring_run(
                experiment_id=experiment.experiment_id, job_name=schedule.name, cron_expression=schedule.cron,
                max_concurrency=1, no_catchup=True, params=schedule.parameters,
                pipeline_id=plan.pipeline.pipeline_id, version_id=plan.version.pipeline_version_id,
                enabled=schedule.enabled)
            verb = "replaced" if existing else "created"
            print(f"{verb}: schedule {schedule.name!r} ({created.recurring_run_id}) "
                  f"cron \"{schedule.cron}\" -> {target}")
        else:
            enabled = str(keep.mode) == "ENABLE"
            if enabled != schedule.enabled:
                if schedule.enabled:
                    self.client.enable_recurring_run(keep.recurring_run_id)
                else:
                    self.client.disable_recurring_run(keep.recurring_run_id)
                print(f"{'enabled' if schedule.enabled else 'disabled'}: schedule {schedule.name!r} "
                      f"({keep.recurring_run_id}) as its file says")
            else:
                print(f"unchanged: schedule {schedule.name!r} ({keep.recurring_run_id}) "
                      f"cron \"{schedule.cron}\" -> {target}")
        for stale in existing:
            if stale is not keep:
                self.client.delete_recurring_run(stale.recurring_run_id)

    # -- unschedule
    def unschedule(self, name: str, delete: bool) -> int:
        matches = [r for r in self._recurring_runs() if _display(r) == name]
        if not matches:
            raise OperateError(f"no schedule named {name!r} in {self._where}")
        for recurring in matches:
            if delete:
                self.client.delete_recurring_run(recurring.recurring_run_id)
                print(f"deleted: schedule {name!r} ({recurring.recurring_run_id})")
            elif str(recurring.mode) == "DISABLE":
                print(f"unchanged: schedule {name!r} ({recurring.recurring_run_id}) is already disabled")
            else:
                self.client.disable_recurring_run(recurring.recurring_run_id)
                print(f"disabled: schedule {name!r} ({recurring.recurring_run_id}); "
                      "the next `schedule --from` re-enables it unless its file says enabled: false")
        return 0

    # -- list
    def listing(self) -> int:
        version_names: dict[str, str] = {}
        rows = []
        for pipeline in sorted(self._pipelines(), key=_display):
            for version in self.versions(pipeline):
                version_names[version.pipeline_version_id] = f"{_display(pipeline)}@{_display(version)}"
                rows.append([_display(pipeline), _display(version), _when(version.created_at),
                             version.pipeline_version_id])
        print(_table(["PIPELINE", "VERSION", "CREATED", "VERSION ID"], rows))
        experiments = {e.experiment_id: _display(e) for e in self._all(self.client.list_experiments, "experiments",
                                                                        namespace=self.namespace)}
        rows = []
        for recurring in sorted(self._recurring_runs(), key=_display):
            cron = getattr(getattr(recurring.trigger, "cron_schedule", None), "cron", None) or "-"
            reference = recurring.pipeline_version_reference
            version_id = reference.pipeline_version_id if reference else None
            rows.append([_display(recurring), cron, "enabled" if str(recurring.mode) == "ENABLE" else "disabled",
                         version_names.get(version_id or "", version_id or "-"),
                         experiments.get(recurring.experiment_id, recurring.experiment_id or "-")])
        print()
        print(_table(["SCHEDULE", "CRON", "STATE", "PIPELINE@VERSION", "EXPERIMENT"], rows))
        return 0


def _same_spec(theirs: Any, ours: dict) -> bool:
    """Whether KFP's copy of a version's spec is our file's; the platform part only where both carry one."""
    def split(spec: Any) -> tuple[Any, Any]:
        if isinstance(spec, dict) and "pipeline_spec" in spec:
            return spec["pipeline_spec"], spec.get("platform_spec")
        return spec, None

    (their_main, their_platform), (our_main, our_platform) = split(theirs), split(ours)
    if _canonical(their_main) != _canonical(our_main):
        return False
    return their_platform is None or our_platform is None or _canonical(their_platform) == _canonical(our_platform)


def _canonical(params: Any) -> str:
    # KFP keeps numbers as protobuf doubles: 3 and 3.0 are the same value
    def normal(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, dict):
            return {k: normal(v) for k, v in value.items()}
        if isinstance(value, list):
            return [normal(v) for v in value]
        return value

    return json.dumps(normal(params or {}), sort_keys=True)


def _recurring_key(recurring: Any) -> tuple:
    cron = getattr(getattr(recurring.trigger, "cron_schedule", None), "cron", None)
    reference = recurring.pipeline_version_reference
    parameters = recurring.runtime_config.parameters if recurring.runtime_config else None
    return (" ".join((cron or "").split()), _canonical(parameters),
            reference.pipeline_version_id if reference else None, recurring.experiment_id,
            int(recurring.max_concurrency or 0), bool(recurring.no_catchup))


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if hasattr(value, "strftime") else str(value or "-")


def _table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return f"{header[0]}: none"
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])
