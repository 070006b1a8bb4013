"""A loopback Hugging Face Hub that the real `huggingface_hub` client can talk to.

It speaks the part of the Hub's protocol that `hf_hub_download`, `get_hf_file_metadata` and
`HfApi.model_info` use (read from huggingface_hub's file_download.py, utils/_http.py, hf_api.py):

- `HEAD|GET /{repo}/resolve/{revision}/{filename}`: an LFS file answers 302 to the "CDN" with
  X-Repo-Commit, X-Linked-Etag (its sha256) and X-Linked-Size; a plain git file answers 200 with
  its git blob sha1 as ETag. Misses answer 404 with X-Error-Code (RepoNotFound, RevisionNotFound,
  EntryNotFound), which the client turns into its typed errors.
- `GET /api/models/{repo}[/revision/{revision}]`: model_info JSON; with `?blobs=true` the siblings
  carry size, blobId and lfs {sha256, size, pointerSize}.
- The CDN is a second server on another port (another origin, as on the real Hub, so the client
  reads the metadata from the 302 itself): `GET /blobs/{sha256}`, honouring Range.

`FakeHub.tamper()` makes the CDN serve other bytes than the metadata announces. The `fake_hub`
fixture starts it and points the client at it (HF_ENDPOINT and friends). Load it in a test
module with `pytest_plugins = ["hubserver"]`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")
_MODEL_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<revision>[^/]+))?$")
_BLOB = re.compile(r"^/blobs/(?P<key>[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class HubFile:
    content: bytes
    lfs: bool = True

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def git_sha1(self) -> str:
        """The git blob id: what the Hub uses as ETag for a file that is not in LFS."""
        header = f"blob {len(self.content)}\0".encode()
        return hashlib.sha1(header + self.content).hexdigest()


@dataclass
class HubRepo:
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)  # commit -> files

    def commit_for(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class FakeHub:
    """Repos held in memory, served on 127.0.0.1 by a hub server and a CDN server."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.cdn: dict[str, bytes] = {}  # LFS sha256 -> the bytes the CDN serves for it
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self._lock = threading.Lock()
        self._hub = _serve(self, _HubHandler)
        self._cdn_server = _serve(self, _CdnHandler)
        self.endpoint = f"http://127.0.0.1:{self._hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._cdn_server.server_address[1]}"

    def add_file(
        self, repo: str, filename: str, content: bytes, *, branch: str = "main", lfs: bool = True
    ) -> str:
        """Commit one file onto `branch` (other files carried over); returns the new commit."""
        with self._lock:
            hub_repo = self.repos.setdefault(repo, HubRepo())
            parent = hub_repo.branches.get(branch)
            files = dict(hub_repo.commits.get(parent, {})) if parent else {}
            files[filename] = HubFile(content, lfs)
            seed = f"{repo}|{parent}|{filename}|{len(hub_repo.commits)}".encode() + content
            commit = hashlib.sha1(seed).hexdigest()
            hub_repo.commits[commit] = files
            hub_repo.branches[branch] = commit
            if lfs:
                self.cdn[HubFile(content).sha256] = content
            return commit

    def tamper(self, sha256: str, content: bytes) -> None:
        """Make the CDN serve `content` for the blob announced as `sha256` (a bad mirror)."""
        with self._lock:
            self.cdn[sha256] = content

    def downloads(self) -> int:
        """How many times the CDN sent a blob's bytes."""
        return sum(1 for method, path in self.requests if method == "GET" and "/blobs/" in path)

    def close(self) -> None:
        for server in (self._hub, self._cdn_server):
            server.shutdown()
            server.server_close()

    def _log(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))


def _serve(hub: FakeHub, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.hub = hub  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class _Handler(BaseHTTPRequestHandler):
    server_version = "FakeHub/1"

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest's output clean; FakeHub.requests records what came

    def do_HEAD(self) -> None:
        self.hub._log("HEAD", self.path)
        self._answer(body=False)

    def do_GET(self) -> None:
        self.hub._log("GET", self.path)
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        raise NotImplementedError

    def _send(
        self, status: int, headers: dict[str, str], payload: bytes = b"", *, body: bool = True
    ) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(payload)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def _error(self, status: int, code: str, *, body: bool, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "text/plain"}
        if commit is not None:
            headers["X-Repo-Commit"] = commit
        self._send(status, headers, code.encode(), body=body)


class _HubHandler(_Handler):
    def _answer(self, *, body: bool) -> None:
        url = urlsplit(self.path)
        if match := _RESOLVE.match(url.path):
            self._resolve(match["repo"], unquote(match["revision"]), unquote(match["filename"]), body)
        elif match := _MODEL_INFO.match(url.path):
            blobs = parse_qs(url.query).get("blobs", ["false"])[0].lower() == "true"
            self._model_info(match["repo"], unquote(match["revision"] or "main"), blobs, body)
        else:
            self._error(404, "NotFound", body=body)

    def _resolve(self, repo: str, revision: str, filename: str, body: bool) -> None:
        hub_repo = self.hub.repos.get(repo)
        if hub_repo is None:
            return self._error(404, "RepoNotFound", body=body)
        commit = hub_repo.commit_for(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", body=body)
        file = hub_repo.commits[commit].get(filename)
        if file is None:
            return self._error(404, "EntryNotFound", body=body, commit=commit)
        if not file.lfs:
            headers = {"X-Repo-Commit": commit, "ETag": f'"{file.git_sha1}"'}
            return self._send(200, headers, file.content, body=body)
        headers = {
            "X-Repo-Commit": commit,
            "X-Linked-Etag": f'"{file.sha256}"',
            "X-Linked-Size": str(len(file.content)),
            "ETag": f'"{HubFile(_lfs_pointer(file)).git_sha1}"',
            "Location": f"{self.hub.cdn_url}/blobs/{file.sha256}",
        }
        self._send(302, headers, body=body)

    def _model_info(self, repo: str, revision: str, blobs: bool, body: bool) -> None:
        hub_repo = self.hub.repos.get(repo)
        if hub_repo is None:
            return self._error(404, "RepoNotFound", body=body)
        commit = hub_repo.commit_for(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", body=body)
        siblings = [
            _sibling(name, file, blobs) for name, file in sorted(hub_repo.commits[commit].items())
        ]
        info = {"_id": commit[:24], "id": repo, "modelId": repo, "sha": commit, "private": False}
        payload = json.dumps({**info, "siblings": siblings}).encode()
        self._send(200, {"Content-Type": "application/json"}, payload, body=body)


def _sibling(name: str, file: HubFile, blobs: bool) -> dict[str, object]:
    if not blobs:
        return {"rfilename": name}
    sibling: dict[str, object] = {"rfilename": name, "size": len(file.content)}
    if file.lfs:
        pointer = _lfs_pointer(file)
        sibling["blobId"] = HubFile(pointer).git_sha1
        sibling["lfs"] = {
            "sha256": file.sha256,
            "size": len(file.content),
            "pointerSize": len(pointer),
        }
    else:
        sibling["blobId"] = file.git_sha1
    return sibling


def _lfs_pointer(file: HubFile) -> bytes:
    return (
        "version https://git-lfs.github.com/spec/v1\n"
        f"oid sha256:{file.sha256}\nsize {len(file.content)}\n"
    ).encode()


class _CdnHandler(_Handler):
    def _answer(self, *, body: bool) -> None:
        match = _BLOB.match(urlsplit(self.path).path)
        content = self.hub.cdn.get(match["key"]) if match else None
        if content is None:
            return self._send(404, {"Content-Type": "text/plain"}, b"no such blob", body=body)
        start, end = self._range(len(content))
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if (start, end) == (0, len(content)):
            return self._send(200, headers, content, body=body)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(content)}"
        self._send(206, headers, content[start:end], body=body)

    def _range(self, size: int) -> tuple[int, int]:
        match = _RANGE.match(self.headers.get("Range", ""))
        if match is None:
            return 0, size
        start = min(int(match[1]), size)
        end = min(int(match[2]) + 1, size) if match[2] else size
        return start, end


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A FakeHub on loopback, with the real huggingface_hub client pointed at it."""
    from huggingface_hub import constants

    hub = FakeHub()
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub reads these once at import: patch its copies so no real token is sent and
    # an HF_HUB_OFFLINE set by an earlier test (or the kit's offline gate) does not stick.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    try:
        yield hub
    finally:
        hub.close()
