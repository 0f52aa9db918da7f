"""A stub of the KFP v2beta1 REST API: a real HTTP server on 127.0.0.1 for the real kfp.Client.

No cluster exists where the tests run, so this stands in for ml-pipeline: it keeps pipelines, versions,
experiments, runs and recurring runs in memory, answers with the JSON field names of the v2beta1 API
(those kfp_server_api's models read, e.g. `recurringRuns` in list responses), and records every request
so tests can assert what kfp.Client actually sent. It covers the subset kfp.Client 2.17 uses for
uploading, running and scheduling; anything else answers 404.

    with KfpStub(token="secret", multi_user=True) as kfp:
        ... kfp.url ...
        kfp.requests  # [Request(method, path, query, headers, body, files), ...]
"""
from __future__ import annotations

import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

API = "/apis/v2beta1"
# gRPC status codes as grpc-gateway puts them in error bodies
_GRPC = {400: 3, 401: 16, 404: 5, 409: 6}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: Any = None  # parsed JSON, if any
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # multipart field -> (filename, content)


class StubError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class KfpStub:
    def __init__(self, token: str | None = None, multi_user: bool = False, specs_in_lists: bool = True) -> None:
        self.token = token
        self.multi_user = multi_user
        # off: version lists leave out pipeline_spec, which then takes a GET of the one version
        self.specs_in_lists = specs_in_lists
        self.requests: list[Request] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}  # pipeline_id -> versions, oldest first
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self._ids = itertools.count(1)
        # a clock that only moves when something is created, so "latest" is deterministic
        self._clock = datetime(2026, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle
    def __enter__(self) -> KfpStub:
        handler = type("Handler", (_Handler,), {"stub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # a short poll keeps shutdown() quick; the default half second would add up over many tests
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def calls(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """Recorded requests, optionally only those with this method and path (a regex, matched whole)."""
        return [
            r for r in self.requests
            if (method is None or r.method == method) and (path is None or re.fullmatch(path, r.path))
        ]

    def writes(self) -> list[Request]:
        return [r for r in self.requests if r.method in ("POST", "DELETE", "PATCH", "PUT")]

    # ---- state helpers
    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def _now(self) -> str:
        self._clock += timedelta(minutes=1)
        return self._clock.strftime("%Y-%m-%dT%H:%M:%SZ")

    def _add_version(self, pipeline: dict, name: str, description: str | None, content: bytes) -> dict:
        docs = [doc for doc in yaml.safe_load_all(content) if doc]
        if not docs or "pipelineInfo" not in docs[0]:
            raise StubError(400, "Invalid input error: the uploaded file is not a compiled pipeline spec")
        # the shape the API returns for a spec with a platform spec beside it
        spec = docs[0] if len(docs) == 1 else {"pipeline_spec": docs[0], "platform_spec": docs[1]}
        version = {
            "pipeline_id": pipeline["pipeline_id"],
            "pipeline_version_id": self._new_id("version"),
            "display_name": name,
            "name": name,
            "description": description or "",
            "created_at": self._now(),
            "pipeline_spec": spec,
        }
        self.versions[pipeline["pipeline_id"]].append(version)
        return version

    # ---- routes: (method, path) -> response body
    def handle(self, request: Request) -> Any:
        m, p, q = request.method, request.path, request.query
        if self.token is not None and request.headers.get("authorization") != f"Bearer {self.token}":
            raise StubError(401, "Unauthenticated: request is missing a valid bearer token")
        if (m, p) == ("GET", f"{API}/healthz"):
            return {"multi_user": self.multi_user, "pipeline_store": "database"}

        if (m, p) == ("POST", f"{API}/pipelines/upload"):
            name = q.get("name") or q.get("display_name")
            namespace = q.get("namespace", "")
            if not name or "uploadfile" not in request.files:
                raise StubError(400, "Invalid input error: name and uploadfile are required")
            if any(x["display_name"] == name and x["namespace"] == namespace for x in self.pipelines.values()):
                raise StubError(409, f"Already exist error: pipeline {name} already exists in namespace {namespace!r}")
            pipeline = {
                "pipeline_id": self._new_id("pipeline"),
                "display_name": name,
                "name": name,
                "description": q.get("description", ""),
                "created_at": self._now(),
                "namespace": namespace,
            }
            self.pipelines[pipeline["pipeline_id"]] = pipeline
            self.versions[pipeline["pipeline_id"]] = []
            # KFP names a new pipeline's first version after the pipeline
            self._add_version(pipeline, name, q.get("description"), request.files["uploadfile"][1])
            return pipeline
        if (m, p) == ("POST", f"{API}/pipelines/upload_version"):
            pipeline = self._pipeline(q.get("pipelineid", ""))
            name = q.get("name") or q.get("display_name")
            if not name or "uploadfile" not in request.files:
                raise StubError(400, "Invalid input error: name and uploadfile are required")
            if any(v["display_name"] == name for v in self.versions[pipeline["pipeline_id"]]):
                raise StubError(409, f"Already exist error: version {name} already exists")
            return self._add_version(pipeline, name, q.get("description"), request.files["uploadfile"][1])
        if (m, p) == ("GET", f"{API}/pipelines"):
            namespace = q.get("namespace", "")
            return self._page("pipelines", [x for x in self.pipelines.values() if x["namespace"] == namespace], q)
        if match := re.fullmatch(f"{API}/pipelines/([^/]+)", p):
            if m == "GET":
                return self._pipeline(match[1])
        if match := re.fullmatch(f"{API}/pipelines/([^/]+)/versions", p):
            if m == "GET":
                versions = self.versions[self._pipeline(match[1])["pipeline_id"]]
                if not self.specs_in_lists:
                    versions = [{k: v for k, v in x.items() if k != "pipeline_spec"} for x in versions]
                return self._page("pipeline_versions", versions, q)
        if match := re.fullmatch(f"{API}/pipelines/([^/]+)/versions/([^/]+)", p):
            if m == "GET":
                return self._version(match[1], match[2])

        if (m, p) == ("GET", f"{API}/experiments"):
            namespace = q.get("namespace", "")
            return self._page("experiments", [x for x in self.experiments.values() if x["namespace"] == namespace], q)
        if (m, p) == ("POST", f"{API}/experiments"):
            body = request.body or {}
            experiment = {
                "experiment_id": self._new_id("experiment"),
                "display_name": body.get("display_name", ""),
                "description": body.get("description") or "",
                "namespace": body.get("namespace") or "",
                "created_at": self._now(),
                "storage_state": "AVAILABLE",
            }
            self.experiments[experiment["experiment_id"]] = experiment
            return experiment

        if (m, p) == ("POST", f"{API}/runs"):
            body = self._runnable(request.body or {})
            run = {**body, "run_id": self._new_id("run"), "created_at": self._now(), "state": "PENDING",
                   "storage_state": "AVAILABLE"}
            self.runs[run["run_id"]] = run
            return run

        if (m, p) == ("POST", f"{API}/recurringruns"):
            body = self._runnable(request.body or {})
            if not (body.get("trigger") or {}).get("cron_schedule", {}).get("cron") and not (
                body.get("trigger") or {}).get("periodic_schedule"):
                raise StubError(400, "Invalid input error: a trigger is required")
            mode = body.get("mode", "ENABLE")
            recurring = {
                **body,
                "recurring_run_id": self._new_id("recurring"),
                "created_at": self._now(),
                "mode": mode,
                "status": "ENABLED" if mode == "ENABLE" else "DISABLED",
                "max_concurrency": str(body.get("max_concurrency", "1")),
            }
            self.recurring_runs[recurring["recurring_run_id"]] = recurring
            return recurring
        if (m, p) == ("GET", f"{API}/recurringruns"):
            items = list(self.recurring_runs.values())
            if "experiment_id" in q:
                items = [x for x in items if x["experiment_id"] == q["experiment_id"]]
            else:
                items = [x for x in items if x["namespace"] == q.get("namespace", "")]
            return self._page("recurringRuns", items, q)
        if match := re.fullmatch(f"{API}/recurringruns/([^/:]+)(:enable|:disable)?", p):
            recurring = self.recurring_runs.get(match[1])
            if recurring is None:
                raise StubError(404, f"Not found: recurring run {match[1]}")
            if m == "GET" and not match[2]:
                return recurring
            if m == "DELETE" and not match[2]:
                del self.recurring_runs[match[1]]
                return {}
            if m == "POST" and match[2]:
                enable = match[2] == ":enable"
                recurring["mode"] = "ENABLE" if enable else "DISABLE"
                recurring["status"] = "ENABLED" if enable else "DISABLED"
                return {}
        raise StubError(404, f"Not Found: {m} {p}")

    def _pipeline(self, pipeline_id: str) -> dict:
        if pipeline_id not in self.pipelines:
            raise StubError(404, f"Not found: pipeline {pipeline_id}")
        return self.pipelines[pipeline_id]

    def _version(self, pipeline_id: str, version_id: str) -> dict:
        for version in self.versions.get(self._pipeline(pipeline_id)["pipeline_id"], []):
            if version["pipeline_version_id"] == version_id:
                return version
        raise StubError(404, f"Not found: pipeline version {version_id}")

    def _runnable(self, body: dict) -> dict:
        """Checks what the API server checks of a run or recurring run: its experiment and pipeline version."""
        experiment = self.experiments.get(body.get("experiment_id", ""))
        if experiment is None:
            raise StubError(404, f"Not found: experiment {body.get('experiment_id')!r}")
        reference = body.get("pipeline_version_reference") or {}
        if not body.get("pipeline_spec"):
            self._version(reference.get("pipeline_id", ""), reference.get("pipeline_version_id", ""))
        # runs and recurring runs live in their experiment's namespace
        return {**body, "namespace": experiment["namespace"]}

    @staticmethod
    def _page(key: str, items: list[dict], query: dict[str, str]) -> dict:
        items = _filtered(items, query.get("filter"))
        size = int(query.get("page_size") or 20)
        start = int(query.get("page_token") or 0)
        page = items[start:start + size]
        response: dict[str, Any] = {key: page, "total_size": len(items)}
        if start + size < len(items):
            response["next_page_token"] = str(start + size)
        return response


def _filtered(items: list[dict], filter_json: str | None) -> list[dict]:
    """The EQUALS-on-a-string predicates of KFP's filter protocol buffer, the only ones kfp.Client builds."""
    if not filter_json:
        return items
    for predicate in json.loads(filter_json).get("predicates", []):
        if predicate.get("operation") not in (1, "EQUALS"):
            raise StubError(400, f"stub supports only EQUALS predicates, got {predicate.get('operation')!r}")
        key = predicate["key"]
        value = predicate.get("stringValue", predicate.get("string_value"))
        items = [x for x in items if x.get(key) == value]
    return items


class _Handler(BaseHTTPRequestHandler):
    stub: KfpStub
    protocol_version = "HTTP/1.1"  # keep-alive, as urllib3's pool expects
    disable_nagle_algorithm = True  # headers and body go out as two writes; don't hold the second for an ACK

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass

    def _serve(self) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        request = Request(
            method=self.command,
            path=split.path,
            query={k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()},
            headers={k.lower(): v for k, v in self.headers.items()},
        )
        content_type = self.headers.get("Content-Type", "")
        if raw and content_type.startswith("multipart/form-data"):
            message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                request.files[name] = (part.get_filename() or "", part.get_payload(decode=True))
        elif raw:
            request.body = json.loads(raw)
        with self.stub._lock:
            self.stub.requests.append(request)
            try:
                status, payload = 200, self.stub.handle(request)
            except StubError as error:
                status = error.status
                payload = {"error": str(error), "code": _GRPC.get(status, 2), "message": str(error), "details": []}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PATCH = _serve
