"""Small threaded fake Hugging Face Hub and Kaggle API servers on loopback, for the real client libraries.

They answer the routes `huggingface_hub` (model info, tree listing, HEAD/GET resolve with Range)
and `kagglehub` (kagglesdk's ModelApiService RPCs) call, with the hubs' error codes, and can
drop a connection part-way through a file.
"""

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]]  # commit sha -> {path: bytes}
    refs: dict[str, str]  # branch/tag -> commit sha
    gated: bool = False


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def commit_sha(files: dict[str, bytes]) -> str:
    h = hashlib.sha1()
    for name in sorted(files):
        h.update(name.encode() + hashlib.sha1(files[name]).digest())
    return h.hexdigest()


class _Server:
    handler: type

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.httpd = ThreadingHTTPServer((host, port), self.handler)
        self.httpd.daemon_threads = True
        self.httpd.fake = self
        self.requests: list[tuple[str, str]] = []
        self.thread = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    @property
    def fake(self):
        return self.server.fake

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        # One request per connection, so a stopped server leaves no kept-alive handler behind.
        self.close_connection = True
        self.send_response(status)
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None, head: bool = False):
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}, head)


# ----------------------------------------------------------------------------- Hugging Face


class _HFHandler(_Handler):
    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    def _error(self, status: int, code: str, message: str, head: bool):
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head)

    def _route(self, head: bool):
        path = unquote(urlparse(self.path).path)
        self.fake.requests.append((self.command, path))
        m = re.match(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?$", path)
        if m:
            return self._api(m[1], m[2], m[3], head)
        m = re.match(r"^/api/models/([^/]+/[^/]+)$", path)
        if m:
            return self._api(m[1], "revision", "main", head)
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            return self._resolve(m[1], m[2], m[3], head)
        self._error(404, "RepoNotFound", f"no route {path}", head)

    def _commit(self, repo_id: str, revision: str, head: bool):
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found", head)
            return None, None
        sha = repo.refs.get(revision, revision if revision in repo.commits else None)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            return None, None
        return repo, sha

    def _api(self, repo_id: str, kind: str, revision: str, head: bool):
        repo, sha = self._commit(repo_id, revision, head)
        if repo is None:
            return
        files = repo.commits[sha]
        if kind == "revision":
            return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                                    "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                                    "siblings": [{"rfilename": name} for name in sorted(files)]}, head=head)
        entries = []
        for name, data in sorted(files.items()):
            entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if name.endswith(".safetensors"):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries, head=head)

    def _resolve(self, repo_id: str, revision: str, name: str, head: bool):
        repo, sha = self._commit(repo_id, revision, head)
        if repo is None:
            return
        if repo.gated and not self.headers.get("Authorization"):
            return self._error(401, "GatedRepo", "Access to model is restricted; you must be authenticated", head)
        files = repo.commits[sha]
        if name not in files:
            return self._error(404, "EntryNotFound", f"{name} does not exist", head)
        data = files[name]
        etag = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else hashlib.sha1(data).hexdigest()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start = 0
        rng = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if rng and not head:
            start = int(rng[1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        headers["Content-Length"] = str(len(data) if head else len(body))
        cut = self.fake.cut.get(name, 0)
        if cut and not head:
            self.fake.cut[name] = cut - 1  # cut the next `cut` downloads of this file half-way
            self.send_response(206 if start else 200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self._send(206 if start else 200, body, headers, head)


class FakeHFHub(_Server):
    handler = _HFHandler

    def __init__(self, port: int = 0):
        super().__init__(port=port)
        self.repos: dict[str, Repo] = {}
        self.cut: dict[str, int] = {}

    def add(self, repo_id: str, folder: Path, ref: str = "main", gated: bool = False, files: dict | None = None) -> str:
        """Adds a commit with a folder's files (or `files`) under `ref`; returns its sha."""
        files = files if files is not None else folder_files(folder)
        sha = commit_sha(files)
        repo = self.repos.setdefault(repo_id, Repo({}, {}, gated))
        repo.commits[sha] = files
        repo.refs[ref] = sha
        return sha


# ----------------------------------------------------------------------------- Kaggle


class _KaggleHandler(_Handler):
    def do_POST(self):
        path = urlparse(self.path).path
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        self.fake.requests.append(("POST", path))
        m = re.match(r"^/api/v1/models\.ModelApiService/(\w+)$", path)
        if not m:
            return self._json(404, {"code": 404, "message": f"no route {path}"})
        key = "/".join([body.get("ownerSlug", ""), body.get("modelSlug", ""),
                        body.get("framework", "").removeprefix("MODEL_FRAMEWORK_").lower(), body.get("instanceSlug", "")])
        model = self.fake.models.get(key)
        if model is None:
            return self._json(404, {"code": 404, "message": f"Model instance {key} not found"})
        if model["gated"] and not self.headers.get("Authorization"):
            return self._json(403, {"code": 403, "message": "You must accept the license to access this model"})
        versions = model["versions"]
        if m[1] == "GetModelInstance":
            return self._json(200, {"versionNumber": max(versions), "slug": body.get("instanceSlug")})
        version = int(body.get("versionNumber") or 0)
        if version not in versions:
            return self._json(404, {"code": 404, "message": f"version {version} of {key} not found"})
        files = versions[version]
        if m[1] == "ListModelInstanceVersionFiles":
            return self._json(200, {"files": [{"name": n, "totalBytes": len(d)} for n, d in sorted(files.items())],
                                    "nextPageToken": ""})
        if m[1] == "DownloadModelInstanceVersion":
            name = body.get("path")
            if name not in files:
                return self._json(404, {"code": 404, "message": f"file {name} not found"})
            return self._send(200, files[name], {"Content-Type": "application/octet-stream"})
        self._json(404, {"code": 404, "message": f"unknown method {m[1]}"})


class FakeKaggle(_Server):
    """Answers on localhost:7777, where kagglesdk sends requests with KAGGLE_API_ENVIRONMENT=TEST."""

    handler = _KaggleHandler

    def __init__(self, port: int = 7777):
        super().__init__(port=port)
        self.models: dict[str, dict] = {}

    def add(self, handle: str, version: int, folder: Path, gated: bool = False) -> None:
        """`handle` is owner/model/framework/variation."""
        model = self.models.setdefault(handle, {"versions": {}, "gated": gated})
        model["versions"][version] = folder_files(folder)
