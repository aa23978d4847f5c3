"""A local stand-in for the Hugging Face Hub HTTP API, for tests.

Why: push/pull code must be tested against the *real* ``huggingface_hub`` client (its
retries, LFS protocol, cache layout and error mapping) without touching the network.
The client is pointed at this server with ``HF_ENDPOINT``; nothing in the client is
patched. Only the subset of the API that the client uses for repos, commits, branches,
pull-request refs, LFS uploads and downloads is implemented.

Behaviour worth knowing when writing tests:

* Xet is not implemented. ``huggingface_hub`` >= 1.x decides *client side* to upload
  through Xet whenever ``hf_xet`` is installed, so a client that uploads must run with
  ``HF_HUB_DISABLE_XET=1`` (read at import time). :meth:`LocalHubServer.client_env`
  sets it; the Xet token routes answer 501 with an explanatory message.
* LFS files are served like on the Hub: ``/resolve`` answers 302 with ``X-Linked-Etag``
  / ``X-Linked-Size`` and a signed URL on a second port (the "CDN"), so the client drops
  its ``Authorization`` header there exactly as it does in production.
* As on the Hub, committing to a branch that does not exist is a 404
  ``RevisionNotFound``: call ``create_branch`` first (or pass
  ``auto_create_branches=True``).
* Any valid token may read and write every repo; without a token only public repos
  are readable. An invalid token is always a 401.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml  # a dependency of huggingface_hub

__all__ = ["ClientScriptError", "HubRequest", "LocalHubServer"]

REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIXES = {"dataset": "datasets/", "space": "spaces/"}
_API_SUBPATHS = frozenset(
    {
        "revision",
        "preupload",
        "commit",
        "commits",
        "tree",
        "paths-info",
        "refs",
        "branch",
        "tag",
        "settings",
        "discussions",
        "xet-read-token",
        "xet-write-token",
    }
)
_SHA1_RE = re.compile(r"[0-9a-f]{40}")
_SHORT_SHA_RE = re.compile(r"[0-9a-f]{7,39}")
_PR_REF_RE = re.compile(r"refs/pr/(\d+)")
_CHUNK = 1024 * 1024
_INVALID_TOKEN = "Invalid credentials in Authorization header"

# The .gitattributes the Hub puts in every new repo (trimmed to the LFS patterns).
_DEFAULT_LFS_PATTERNS = (
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model "
    "*.msgpack *.npy *.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar "
    "*.safetensors saved_model/**/* *.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst "
    "*tfevents*"
).split()
_DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in _DEFAULT_LFS_PATTERNS
).encode()


def _now() -> str:
    """Timestamp in the exact format the client's ``parse_datetime`` expects."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(data: bytes) -> str:
    """Git object id of a blob: what the Hub reports as a regular file's ``oid``/ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    """An error answered with the Hub's JSON shape and ``X-Error-*`` headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # more JSON fields, e.g. the repo "url" of a 409


@dataclass
class _Response:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None  # streamed instead of ``body`` (large blobs)
    file_range: tuple[int, int] | None = None  # inclusive byte range of ``file``

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
        hdrs = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
        return cls(status=status, headers=hdrs, body=json.dumps(payload).encode())


@dataclass(frozen=True)
class HubRequest:
    """One request seen by the server, for assertions in tests."""

    method: str
    path: str
    status: int
    role: Literal["hub", "storage"]


@dataclass
class _Fault:
    remaining: int
    path_substring: str
    status: int
    method: str | None
    when: Literal["before", "after"]


@dataclass
class _FileEntry:
    size: int
    sha256: str  # content hash, key into the blob store
    blob_id: str  # git oid: of the content, or of the LFS pointer for LFS files
    lfs: bool


@dataclass
class _Commit:
    oid: str
    parents: list[str]
    title: str
    message: str
    author: str
    date: str
    files: dict[str, _FileEntry]


@dataclass
class _PullRequest:
    num: int
    target_branch: str
    head: str
    author: str
    title: str
    status: str = "open"


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    owner: str
    created_at: str
    sdk: str | None = None
    gated: Any = False
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pulls: dict[int, _PullRequest] = field(default_factory=dict)
    lfs_objects: dict[str, int] = field(default_factory=dict)  # sha256 -> size
    api_commits: int = 0  # commits made through the commit endpoint

    @property
    def key(self) -> str:
        return f"{self.repo_type}:{self.repo_id}"

    @property
    def url_path(self) -> str:
        return _URL_PREFIXES.get(self.repo_type, "") + self.repo_id

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _Repo:
        commits = {
            oid: _Commit(**{**c, "files": {p: _FileEntry(**e) for p, e in c["files"].items()}})
            for oid, c in data.pop("commits").items()
        }
        pulls = {int(n): _PullRequest(**p) for n, p in data.pop("pulls").items()}
        return cls(**data, commits=commits, pulls=pulls)


@dataclass(frozen=True)
class _Revision:
    """A revision resolved against a repo; ``kind`` tells whether it can take commits."""

    commit: _Commit
    kind: Literal["branch", "pr", "tag", "commit"]
    name: str


class _State:
    """Repos, refs and blobs; metadata persisted as JSON so a restarted server keeps them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.repos: dict[str, _Repo] = {}
        self._counter = 0
        state_file = root / "state.json"
        if state_file.exists():
            data = json.loads(state_file.read_text())
            self.repos = {k: _Repo.from_json(v) for k, v in data["repos"].items()}

    def save(self) -> None:
        with self.lock:
            payload = {"repos": {k: asdict(r) for k, r in self.repos.items()}}
            tmp = self.root / "state.json.tmp"
            tmp.write_text(json.dumps(payload))
            os.replace(tmp, self.root / "state.json")

    # -- blobs ---------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256[:2] / sha256

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha):
            tmp = self.new_tmp_path()
            tmp.write_bytes(data)
            self.adopt_tmp(tmp, sha)
        return sha

    def new_tmp_path(self) -> Path:
        return self.tmp_dir / secrets.token_hex(16)

    def adopt_tmp(self, tmp: Path, sha256: str) -> None:
        dest = self.blob_path(sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    # -- commits -------------------------------------------------------------------------
    def new_commit_oid(self, parents: list[str], title: str) -> str:
        with self.lock:
            self._counter += 1
            seed = f"{parents}\n{title}\n{time.time_ns()}\n{self._counter}\n{secrets.token_hex(8)}"
        return hashlib.sha1(seed.encode()).hexdigest()

    def regular_entry(self, data: bytes) -> _FileEntry:
        return _FileEntry(size=len(data), sha256=self.put_bytes(data), blob_id=_git_blob_oid(data), lfs=False)


def _lfs_entry(sha256: str, size: int) -> _FileEntry:
    return _FileEntry(size=size, sha256=sha256, blob_id=_git_blob_oid(_lfs_pointer(sha256, size)), lfs=True)


def _card_metadata(readme: str) -> dict[str, Any] | None:
    """YAML front matter of a README (the Hub's ``cardData``); raises ``yaml.YAMLError``."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme, flags=re.DOTALL)
    if match is None:
        return None
    data = yaml.safe_load(match[1])
    return data if isinstance(data, dict) else None


def _parse_repo_segments(segments: list[str]) -> tuple[str, list[str]]:
    """Split ``ns/name/rest...`` into a repo id and the rest (legacy ids have no namespace)."""
    if len(segments) >= 2 and segments[1] not in _API_SUBPATHS:
        return f"{segments[0]}/{segments[1]}", segments[2:]
    return segments[0], segments[1:]


def _gitattributes_lfs_patterns(data: bytes) -> list[str]:
    patterns = []
    for line in data.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#") and "filter=lfs" in parts[1:]:
            patterns.append(parts[0])
    return patterns


def _matches_git_pattern(pattern: str, path: str) -> bool:
    """Rough gitattributes/gitignore matching: slash-less patterns match any basename."""
    pattern = pattern.strip()
    if pattern.endswith("/"):
        return path.startswith(pattern.lstrip("/")) or f"/{pattern}" in f"/{path}"
    if "/" not in pattern:
        return fnmatch.fnmatchcase(path.rsplit("/", 1)[-1], pattern)
    return fnmatch.fnmatchcase(path, pattern.lstrip("/"))


class _Handler(BaseHTTPRequestHandler):
    """Routes one request; ``server.hub`` is the owning :class:`LocalHubServer`."""

    protocol_version = "HTTP/1.1"
    timeout = 30  # idle keep-alive connections must not pin threads forever
    server: _HTTPServer

    # BaseHTTPRequestHandler dispatches on do_<METHOD>.
    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log (pytest output stays readable)."""

    # -- plumbing ------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        """Read the whole request body, including chunked uploads (httpx streams file objects)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)  # CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        hub = self.server.hub
        role = self.server.role
        split = urlsplit(self.path)
        try:
            body = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        response: _Response | None = hub._take_fault(self.command, self.path, "before")
        if response is None:
            try:
                response = hub._route(self, role, split.path, parse_qs(split.query), body)
            except HubError as err:
                response = hub._error_response(err)
            except Exception as err:  # a server bug must surface as a 500, not a hang
                hub._record_internal_error(traceback.format_exc())
                response = hub._error_response(HubError(500, f"Local hub internal error: {err!r}"))
            after = hub._take_fault(self.command, self.path, "after")
            if after is not None:
                response = after
        # Log before answering: a test may inspect the log as soon as the client returns.
        hub._log(HubRequest(self.command, self.path, response.status, role))
        self._send(response)

    def _send(self, response: _Response) -> None:
        if response.file is not None:
            start, end = response.file_range or (0, response.file.stat().st_size - 1)
            length = max(end - start + 1, 0)
        else:
            start, length = 0, len(response.body)
        self.send_response(response.status)
        for key, value in response.headers.items():
            # Header values must be one latin-1 line (error messages may carry newlines).
            self.send_header(key, " ".join(value.split()).encode("latin-1", "replace").decode("latin-1"))
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD" or length == 0:
            return
        try:
            if response.file is None:
                self.wfile.write(response.body)
                return
            with response.file.open("rb") as fh:
                fh.seek(start)
                remaining = length
                while remaining > 0:
                    chunk = fh.read(min(_CHUNK, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    """Threaded server that tracks its connections so ``stop()`` can cut keep-alive ones."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], hub: LocalHubServer, role: Literal["hub", "storage"]) -> None:
        super().__init__(address, _Handler)
        self.hub = hub
        self.role = role
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class ClientScriptError(RuntimeError):
    """A client subprocess started by :meth:`LocalHubServer.run_python` failed."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        super().__init__(f"client script exited with {returncode}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class LocalHubServer:
    """A Hub look-alike on a random local port, backed by a directory.

    Usage::

        with LocalHubServer(tokens={"hf_good"}, root=tmp_path) as hub:
            env = hub.client_env(token="hf_good", hf_home=tmp_path / "hf")
            subprocess.run([sys.executable, "push.py"], env=env, check=True)
            assert hub.commit_count("user/repo") == 1

    ``tokens`` is a set of valid tokens (all owned by ``default_user``) or a mapping
    token -> user name. Repos created without a namespace go to the token's user.
    """

    def __init__(
        self,
        tokens: Iterable[str] | Mapping[str, str] = ("hf_good",),
        root: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        default_user: str = "user",
        lfs_threshold: int = 10 * 1024 * 1024,
        multipart_threshold: int | None = None,
        multipart_chunk_size: int = 5 * 1024 * 1024,
        auto_create_branches: bool = False,
    ) -> None:
        if isinstance(tokens, Mapping):
            self.tokens: dict[str, str] = dict(tokens)
        else:
            self.tokens = dict.fromkeys(tokens, default_user)
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="local-hub-"))
        self.host = host
        self.port = port
        self.lfs_threshold = lfs_threshold
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk_size = multipart_chunk_size
        self.auto_create_branches = auto_create_branches
        self._state = _State(self.root)
        self._secret = secrets.token_bytes(32)
        self._faults: list[_Fault] = []
        self._log_entries: list[HubRequest] = []
        self._unhandled_entries: list[str] = []
        self._internal_errors: list[str] = []
        self._meta_lock = threading.Lock()
        self._servers: list[_HTTPServer] = []
        self._threads: list[threading.Thread] = []

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> LocalHubServer:
        """Start the API server and the storage ("CDN") server in daemon threads."""
        if self._servers:
            return self
        roles: tuple[tuple[Literal["hub", "storage"], int], ...] = (("hub", self.port), ("storage", 0))
        for role, port in roles:
            srv = _HTTPServer((self.host, port), self, role)
            thread = threading.Thread(
                target=srv.serve_forever, kwargs={"poll_interval": 0.05}, name=f"local-hub-{role}", daemon=True
            )
            thread.start()
            self._servers.append(srv)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop both servers; the root directory is removed only if this object created it."""
        for srv in self._servers:
            srv.shutdown()
            srv.close_connections()
            srv.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL to use as ``HF_ENDPOINT`` / ``HfApi(endpoint=...)``."""
        return self._server_url(0)

    @property
    def storage_url(self) -> str:
        """Base URL of the storage server that receives LFS uploads and serves LFS downloads."""
        return self._server_url(1)

    def _server_url(self, index: int) -> str:
        if not self._servers:
            raise RuntimeError("LocalHubServer is not started")
        host, port = self._servers[index].server_address[:2]
        return f"http://{host}:{port}"

    # -- test helpers --------------------------------------------------------------------
    def fail_next(
        self,
        n: int = 1,
        path_substring: str = "",
        status: int = 500,
        *,
        method: str | None = None,
        when: Literal["before", "after"] = "before",
    ) -> None:
        """Answer the next ``n`` matching requests with ``status``.

        ``when="before"`` fails without doing anything (a crashed upload); ``"after"``
        performs the request and then reports a failure (a lost response, e.g. a commit
        that landed although the client saw a 500).
        """
        with self._meta_lock:
            self._faults.append(_Fault(n, path_substring, status, method.upper() if method else None, when))

    def pending_failures(self) -> int:
        """Number of injected failures not consumed yet."""
        with self._meta_lock:
            return sum(f.remaining for f in self._faults)

    @property
    def request_log(self) -> list[HubRequest]:
        """Every request answered so far, in order."""
        with self._meta_lock:
            return list(self._log_entries)

    @property
    def unhandled_requests(self) -> list[str]:
        """Requests for routes this server does not implement (assert it is empty in fixtures)."""
        with self._meta_lock:
            return list(self._unhandled_entries)

    @property
    def internal_errors(self) -> list[str]:
        """Tracebacks of server bugs (answered as 500, which the client retries with backoff)."""
        with self._meta_lock:
            return list(self._internal_errors)

    def count_requests(self, path_substring: str = "", method: str | None = None) -> int:
        return sum(
            1 for r in self.request_log if path_substring in r.path and (method is None or r.method == method.upper())
        )

    def commit_count(self, repo_id: str, repo_type: str = "model") -> int:
        """Commits created through the commit API (the repo's initial commit is not counted)."""
        with self._state.lock:
            return self._get_repo(repo_type, repo_id).api_commits

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[dict[str, Any]]:
        """History of ``revision`` (newest first) as ``{"oid", "title", "parents", "files"}``."""
        with self._state.lock:
            repo = self._get_repo(repo_type, repo_id)
            return [
                {"oid": c.oid, "title": c.title, "parents": list(c.parents), "files": sorted(c.files)}
                for c in self._history(repo, self._resolve(repo, revision).commit)
            ]

    def refs(self, repo_id: str, repo_type: str = "model") -> dict[str, dict[str, str]]:
        """``{"branches": {...}, "tags": {...}, "pulls": {"refs/pr/1": oid}}``."""
        with self._state.lock:
            repo = self._get_repo(repo_type, repo_id)
            return {
                "branches": dict(repo.branches),
                "tags": dict(repo.tags),
                "pulls": {f"refs/pr/{n}": pr.head for n, pr in repo.pulls.items()},
            }

    def list_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        with self._state.lock:
            return sorted(self._resolve(self._get_repo(repo_type, repo_id), revision).commit.files)

    def file_content(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        with self._state.lock:
            entry = self._resolve(self._get_repo(repo_type, repo_id), revision).commit.files[path]
        return self._state.read_blob(entry.sha256)

    def is_lfs(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bool:
        with self._state.lock:
            return self._resolve(self._get_repo(repo_type, repo_id), revision).commit.files[path].lfs

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._state.lock:
            return f"{repo_type}:{repo_id}" in self._state.repos

    def seed_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | None = None,
        *,
        repo_type: str = "model",
        private: bool = False,
    ) -> str:
        """Create a repo without going through HTTP (fixtures for download-side tests).

        The repo gets the Hub's initial ``.gitattributes`` commit, then one commit with
        ``files`` if given. Returns the head commit of ``main``. Not counted by
        :meth:`commit_count`.
        """
        owner = repo_id.split("/")[0]
        with self._state.lock:
            if f"{repo_type}:{repo_id}" in self._state.repos:
                raise ValueError(f"{repo_type} repo {repo_id} already exists")
            repo = _Repo(repo_type, repo_id, private, owner, _now())
            files_0 = {".gitattributes": self._state.regular_entry(_DEFAULT_GITATTRIBUTES)}
            repo.branches["main"] = self._add_commit(repo, [], "initial commit", "", owner, files_0).oid
            self._state.repos[repo.key] = repo
            self._state.save()
        if files:
            return self.seed_commit(repo_id, files, repo_type=repo_type)
        return repo.branches["main"]

    def seed_commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | None],
        *,
        revision: str = "main",
        repo_type: str = "model",
        message: str = "seed commit",
    ) -> str:
        """Commit ``files`` (``None`` deletes a path) straight onto a branch, created from main if missing.

        Files are stored as LFS or regular by the same rules as the preupload endpoint.
        Not counted by :meth:`commit_count`. Returns the new commit id.
        """
        with self._state.lock:
            repo = self._get_repo(repo_type, repo_id)
            base = repo.commits[repo.branches.get(revision, repo.branches["main"])]
            tree = dict(base.files)
            for path, data in files.items():
                if data is None:
                    tree.pop(path, None)
                elif self._upload_mode(base, path, len(data), data[:512]) == "lfs":
                    sha = self._state.put_bytes(data)
                    repo.lfs_objects[sha] = len(data)
                    tree[path] = _lfs_entry(sha, len(data))
                else:
                    tree[path] = self._state.regular_entry(data)
            commit = self._add_commit(repo, [base.oid], message, "", repo.owner, tree)
            repo.branches[revision] = commit.oid
            self._state.save()
            return commit.oid

    def client_env(
        self,
        token: str | None = None,
        hf_home: str | os.PathLike[str] | None = None,
        base: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Environment for a subprocess running the real client against this server.

        ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET`` are read when ``huggingface_hub`` is
        imported, so they cannot be changed inside an already running interpreter.
        """
        env = dict(os.environ if base is None else base)
        for var in (
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "HF_DATASETS_OFFLINE",
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_TOKEN_PATH",
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
            "TRANSFORMERS_CACHE",
            "HF_XET_CACHE",
        ):
            env.pop(var, None)
        env.update(
            HF_ENDPOINT=self.url,
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_IMPLICIT_TOKEN="0",
        )
        if hf_home is not None:
            env["HF_HOME"] = os.fspath(hf_home)
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def run_python(
        self,
        code: str,
        *,
        hf_home: str | os.PathLike[str],
        token: str | None = None,
        timeout: float = 120,
        cwd: str | os.PathLike[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> str:
        """Run ``code`` in a fresh interpreter wired to this server; return its stdout.

        A fresh process is the faithful way to honour ``HF_ENDPOINT``/``HF_HUB_DISABLE_XET``.
        """
        env = {**self.client_env(token=token, hf_home=hf_home), **(extra_env or {})}
        proc = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise ClientScriptError(proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout

    # -- internals: faults and log ------------------------------------------------------
    def _take_fault(self, method: str, path: str, when: str) -> _Response | None:
        with self._meta_lock:
            for fault in self._faults:
                if (
                    fault.remaining > 0
                    and fault.when == when
                    and fault.path_substring in path
                    and (fault.method is None or fault.method == method)
                ):
                    fault.remaining -= 1
                    status = fault.status
                    break
            else:
                return None
            self._faults = [f for f in self._faults if f.remaining > 0]
        return self._error_response(HubError(status, f"Injected failure ({status}) for {method} {path}"))

    def _unhandled(self, what: str) -> HubError:
        with self._meta_lock:
            self._unhandled_entries.append(what)
        return HubError(404, f"Not implemented by the local hub: {what}")

    def _record_internal_error(self, tb: str) -> None:
        with self._meta_lock:
            self._internal_errors.append(tb)

    def _log(self, entry: HubRequest) -> None:
        with self._meta_lock:
            self._log_entries.append(entry)

    @staticmethod
    def _error_response(err: HubError) -> _Response:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        return _Response.json({**err.extra, "error": err.message}, status=err.status, headers=headers)

    # -- internals: auth, repos, revisions -----------------------------------------------
    def _user(self, handler: BaseHTTPRequestHandler) -> str | None:
        """User behind the request's token; an unknown token is a 401 like on the Hub."""
        auth = handler.headers.get("Authorization")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, _INVALID_TOKEN)
        return user

    def _require_user(self, handler: BaseHTTPRequestHandler) -> str:
        user = self._user(handler)
        if user is None:
            raise HubError(401, "You must be authenticated to perform this action")
        return user

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._state.repos.get(f"{repo_type}:{repo_id}")
        if repo is None:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        return repo

    def _readable_repo(self, handler: BaseHTTPRequestHandler, repo_type: str, repo_id: str) -> _Repo:
        user = self._user(handler)
        repo = self._get_repo(repo_type, repo_id)
        if repo.private and user is None:
            # The Hub hides private repos from anonymous users behind a 401 RepoNotFound.
            raise HubError(401, "Repository not found", code="RepoNotFound")
        return repo

    def _writable_repo(self, handler: BaseHTTPRequestHandler, repo_type: str, repo_id: str) -> tuple[_Repo, str]:
        user = self._user(handler)
        repo = self._get_repo(repo_type, repo_id)
        if user is None:
            raise HubError(401 if repo.private else 403, "You must be authenticated to write to this repo")
        return repo, user

    def _resolve(self, repo: _Repo, revision: str) -> _Revision:
        if revision.startswith("refs/heads/"):
            revision = revision[len("refs/heads/") :]
        if revision in repo.branches:
            return _Revision(repo.commits[repo.branches[revision]], "branch", revision)
        tag = revision[len("refs/tags/") :] if revision.startswith("refs/tags/") else revision
        if tag in repo.tags:
            return _Revision(repo.commits[repo.tags[tag]], "tag", tag)
        if (match := _PR_REF_RE.fullmatch(revision)) and int(match[1]) in repo.pulls:
            return _Revision(repo.commits[repo.pulls[int(match[1])].head], "pr", revision)
        if _SHA1_RE.fullmatch(revision) and revision in repo.commits:
            return _Revision(repo.commits[revision], "commit", revision)
        if _SHORT_SHA_RE.fullmatch(revision):
            found = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(found) == 1:
                return _Revision(repo.commits[found[0]], "commit", found[0])
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    @staticmethod
    def _history(repo: _Repo, head: _Commit) -> Iterator[_Commit]:
        """First-parent history, newest first."""
        commit: _Commit | None = head
        while commit is not None:
            yield commit
            commit = repo.commits.get(commit.parents[0]) if commit.parents else None

    def _add_commit(
        self, repo: _Repo, parents: list[str], title: str, message: str, author: str, files: dict[str, _FileEntry]
    ) -> _Commit:
        commit = _Commit(
            oid=self._state.new_commit_oid(parents, title),
            parents=parents,
            title=title,
            message=message,
            author=author,
            date=_now(),
            files=files,
        )
        repo.commits[commit.oid] = commit
        return commit

    def _base_url(self, handler: BaseHTTPRequestHandler) -> str:
        """URL the client used to reach us (keeps links valid behind ``localhost`` etc.)."""
        host = handler.headers.get("Host")
        return f"http://{host}" if host else self.url

    def _sign(self, message: str) -> str:
        return hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()[:32]

    def _check_sig(self, message: str, query: dict[str, list[str]]) -> None:
        if not hmac.compare_digest(query.get("sig", [""])[0], self._sign(message)):
            raise HubError(403, "Invalid or missing signature")

    # -- routing -------------------------------------------------------------------------
    def _route(
        self,
        handler: BaseHTTPRequestHandler,
        role: str,
        raw_path: str,
        query: dict[str, list[str]],
        body: bytes,
    ) -> _Response:
        method = handler.command
        segments = [unquote(s) for s in raw_path.split("/")[1:]]
        if role == "storage":
            return self._route_storage(method, segments, query, body)
        if segments[:1] == ["api"]:
            return self._route_api(handler, method, segments[1:], query, body)
        if "resolve" in segments and method in ("GET", "HEAD"):
            return self._route_resolve(handler, segments, query)
        git_idx = next((i for i, s in enumerate(segments) if s.endswith(".git")), None)
        if git_idx is not None and segments[git_idx + 1 : git_idx + 4] == ["info", "lfs", "objects"]:
            return self._route_lfs(handler, segments, git_idx, query, body)
        if git_idx is not None and segments[git_idx + 1 : git_idx + 4] == ["info", "lfs", "complete_multipart"]:
            return self._route_lfs(handler, segments, git_idx, query, body)
        raise self._unhandled(f"{method} {raw_path}")

    @staticmethod
    def _json_body(body: bytes) -> dict[str, Any]:
        if not body:
            return {}
        try:
            data = json.loads(body)
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err
        if not isinstance(data, dict):
            raise HubError(400, "JSON body must be an object")
        return data

    def _route_api(
        self,
        handler: BaseHTTPRequestHandler,
        method: str,
        segs: list[str],
        query: dict[str, list[str]],
        body: bytes,
    ) -> _Response:
        if segs == ["whoami-v2"] and method == "GET":
            return self._whoami(handler)
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo(handler, self._json_body(body))
        if segs == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo(handler, self._json_body(body))
        if segs == ["validate-yaml"] and method == "POST":
            return self._validate_yaml(self._json_body(body))
        if segs[:1] == ["telemetry"]:
            return _Response.json({})
        if len(segs) >= 2 and segs[0] in ("models", "datasets", "spaces"):
            repo_type = segs[0][:-1]
            repo_id, rest = _parse_repo_segments(segs[1:])
            return self._route_repo_api(handler, method, repo_type, repo_id, rest, query, body)
        raise self._unhandled(f"{method} /api/{'/'.join(segs)}")

    def _route_repo_api(
        self,
        handler: BaseHTTPRequestHandler,
        method: str,
        repo_type: str,
        repo_id: str,
        rest: list[str],
        query: dict[str, list[str]],
        body: bytes,
    ) -> _Response:
        action = rest[0] if rest else ""
        arg = "/".join(rest[1:])
        with self._state.lock:
            if method == "GET" and action == "":
                return self._repo_info(handler, repo_type, repo_id, "main", query)
            if method == "GET" and action == "revision":
                return self._repo_info(handler, repo_type, repo_id, rest[1], query)
            if method == "GET" and action == "tree":
                return self._tree(handler, repo_type, repo_id, rest[1], "/".join(rest[2:]), query)
            if method == "POST" and action == "paths-info":
                return self._paths_info(handler, repo_type, repo_id, arg, body)
            if method == "GET" and action == "refs":
                return self._list_refs(handler, repo_type, repo_id, query)
            if method == "GET" and action == "commits":
                return self._list_commits(handler, repo_type, repo_id, arg or "main")
            if method == "POST" and action == "preupload":
                return self._preupload(handler, repo_type, repo_id, arg, query, self._json_body(body))
            if method == "POST" and action == "commit":
                return self._commit(handler, repo_type, repo_id, arg, query, body)
            if action == "branch" and method in ("POST", "DELETE"):
                return self._branch(handler, method, repo_type, repo_id, arg, self._json_body(body))
            if action == "tag" and method in ("POST", "DELETE"):
                return self._tag(handler, method, repo_type, repo_id, arg, self._json_body(body))
            if method == "PUT" and action == "settings":
                return self._settings(handler, repo_type, repo_id, self._json_body(body))
            if action in ("xet-write-token", "xet-read-token"):
                raise HubError(
                    501,
                    "Xet storage is not implemented by the local test hub: run the client with "
                    "HF_HUB_DISABLE_XET=1 so that it uses the LFS protocol.",
                )
        raise self._unhandled(f"{method} /api/{repo_type}s/{repo_id}/{'/'.join(rest)}")

    # -- account -------------------------------------------------------------------------
    def _whoami(self, handler: BaseHTTPRequestHandler) -> _Response:
        user = self._user(handler)
        if user is None:
            raise HubError(401, _INVALID_TOKEN)
        return _Response.json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": f"{user}@example.invalid",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local-hub", "role": "write"}},
            }
        )

    def _validate_yaml(self, payload: dict[str, Any]) -> _Response:
        try:
            _card_metadata(str(payload.get("content", "")))
        except yaml.YAMLError as err:
            raise HubError(400, f"Invalid metadata in README.md.\n- {err}") from err
        return _Response.json({"warnings": []})

    # -- repos ---------------------------------------------------------------------------
    def _create_repo(self, handler: BaseHTTPRequestHandler, payload: dict[str, Any]) -> _Response:
        user = self._require_user(handler)
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {repo_type}")
        name = payload.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.\-]{1,96}", name):
            raise HubError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{payload.get('organization') or user}/{name}"
        visibility = payload.get("visibility")
        private = visibility == "private" if visibility is not None else bool(payload.get("private", False))
        base = self._base_url(handler)
        with self._state.lock:
            existing = self._state.repos.get(f"{repo_type}:{repo_id}")
            if existing is not None:
                raise HubError(
                    409,
                    f"You already created this {repo_type} repo",
                    extra={"url": f"{base}/{existing.url_path}"},
                )
            repo = _Repo(repo_type, repo_id, private, user, _now(), sdk=payload.get("sdk"))
            files = {".gitattributes": self._state.regular_entry(_DEFAULT_GITATTRIBUTES)}
            commit = self._add_commit(repo, [], "initial commit", "", user, files)
            repo.branches["main"] = commit.oid
            self._state.repos[repo.key] = repo
            self._state.save()
        return _Response.json({"url": f"{base}/{repo.url_path}", "name": repo_id, "id": repo.key})

    def _delete_repo(self, handler: BaseHTTPRequestHandler, payload: dict[str, Any]) -> _Response:
        user = self._require_user(handler)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        with self._state.lock:
            self._get_repo(repo_type, repo_id)
            del self._state.repos[f"{repo_type}:{repo_id}"]
            self._state.save()
        return _Response.json({})

    def _settings(
        self, handler: BaseHTTPRequestHandler, repo_type: str, repo_id: str, payload: dict[str, Any]
    ) -> _Response:
        repo, _ = self._writable_repo(handler, repo_type, repo_id)
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        if "private" in payload:
            repo.private = bool(payload["private"])
        if "gated" in payload:
            repo.gated = payload["gated"]
        self._state.save()
        return _Response.json({})

    def _entry_json(self, path: str, entry: _FileEntry) -> dict[str, Any]:
        data: dict[str, Any] = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": path}
        if entry.lfs:
            data["lfs"] = {
                "oid": entry.sha256,
                "size": entry.size,
                "pointerSize": len(_lfs_pointer(entry.sha256, entry.size)),
            }
        return data

    def _repo_info(
        self,
        handler: BaseHTTPRequestHandler,
        repo_type: str,
        repo_id: str,
        revision: str,
        query: dict[str, list[str]],
    ) -> _Response:
        repo = self._readable_repo(handler, repo_type, repo_id)
        commit = self._resolve(repo, revision).commit
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry = commit.files[path]
                sibling.update(size=entry.size, blobId=entry.blob_id)
                if entry.lfs:
                    lfs = self._entry_json(path, entry)["lfs"]
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.key.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if "README.md" in commit.files:
            try:
                card = _card_metadata(self._state.read_blob(commit.files["README.md"].sha256).decode(errors="replace"))
            except yaml.YAMLError:
                card = None
            if card:
                info["cardData"] = card
                info.update({k: card[k] for k in ("library_name", "pipeline_tag") if k in card})
                tags = card.get("tags")
                info["tags"] = [tags] if isinstance(tags, str) else list(tags or [])
        if repo_type == "model":
            info["modelId"] = repo.repo_id
        if repo_type == "space":
            info.update(sdk=repo.sdk, runtime={"stage": "NO_APP_FILE", "hardware": {}})
        return _Response.json(info)

    def _folder_oid(self, commit: _Commit, folder: str) -> str:
        prefix = folder + "/"
        listing = "".join(f"{p}:{e.blob_id}\n" for p, e in sorted(commit.files.items()) if p.startswith(prefix))
        return hashlib.sha1(listing.encode()).hexdigest()

    def _last_commit(self, repo: _Repo, head: _Commit, path: str) -> dict[str, str]:
        """Newest commit (first-parent) that changed ``path`` (a file or a folder)."""

        def snapshot(commit: _Commit) -> dict[str, str]:
            prefix = path + "/"
            return {p: e.blob_id for p, e in commit.files.items() if p == path or p.startswith(prefix)}

        history = list(self._history(repo, head))
        last = history[0]
        for newer, older in zip(history, history[1:], strict=False):
            if snapshot(newer) != snapshot(older):
                last = newer
                break
            last = older
        return {"id": last.oid, "title": last.title, "date": last.date}

    def _tree(
        self,
        handler: BaseHTTPRequestHandler,
        repo_type: str,
        repo_id: str,
        revision: str,
        path: str,
        query: dict[str, list[str]],
    ) -> _Response:
        repo = self._readable_repo(handler, repo_type, repo_id)
        commit = self._resolve(repo, revision).commit
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = query.get("expand", ["false"])[0].lower() in ("1", "true")
        path = path.strip("/")
        prefix = f"{path}/" if path else ""
        if path and path in commit.files:
            raise HubError(404, f"{path} is a file, not a folder", code="EntryNotFound")
        files: list[dict[str, Any]] = []
        folders: set[str] = set()
        for file_path, entry in commit.files.items():
            if not file_path.startswith(prefix):
                continue
            relative = file_path[len(prefix) :]
            parts = relative.split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                files.append(self._entry_json(file_path, entry))
        if path and not files and not folders:
            raise HubError(404, f"Entry not found: {path}", code="EntryNotFound")
        entries = [{"type": "directory", "oid": self._folder_oid(commit, f), "size": 0, "path": f} for f in folders]
        entries = sorted(entries, key=lambda e: e["path"]) + sorted(files, key=lambda e: e["path"])
        if expand:
            for item in entries:
                item["lastCommit"] = self._last_commit(repo, commit, item["path"])
        return _Response.json(entries)

    def _paths_info(
        self, handler: BaseHTTPRequestHandler, repo_type: str, repo_id: str, revision: str, body: bytes
    ) -> _Response:
        repo = self._readable_repo(handler, repo_type, repo_id)
        commit = self._resolve(repo, revision or "main").commit
        if handler.headers.get("Content-Type", "").startswith("application/json"):
            form = self._json_body(body)
            paths, expand = list(form.get("paths", [])), bool(form.get("expand"))
        else:
            form_qs = parse_qs(body.decode())
            paths = form_qs.get("paths", [])
            expand = form_qs.get("expand", ["False"])[0].lower() in ("1", "true")
        result = []
        for raw in paths:
            path = raw.strip("/")
            if path in commit.files:
                item = self._entry_json(path, commit.files[path])
            elif any(p.startswith(path + "/") for p in commit.files):
                item = {"type": "directory", "oid": self._folder_oid(commit, path), "size": 0, "path": path}
            else:
                continue
            if expand:
                item["lastCommit"] = self._last_commit(repo, commit, path)
            result.append(item)
        return _Response.json(result)

    def _list_refs(
        self, handler: BaseHTTPRequestHandler, repo_type: str, repo_id: str, query: dict[str, list[str]]
    ) -> _Response:
        repo = self._readable_repo(handler, repo_type, repo_id)
        data: dict[str, Any] = {
            "branches": [
                {"name": n, "ref": f"refs/heads/{n}", "targetCommit": oid} for n, oid in sorted(repo.branches.items())
            ],
            "converts": [],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": oid} for n, oid in sorted(repo.tags.items())],
        }
        if query.get("include_prs", ["0"])[0] in ("1", "true", "True"):
            data["pullRequests"] = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": pr.head}
                for n, pr in sorted(repo.pulls.items())
            ]
        return _Response.json(data)

    def _list_commits(self, handler: BaseHTTPRequestHandler, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._readable_repo(handler, repo_type, repo_id)
        head = self._resolve(repo, revision).commit
        return _Response.json(
            [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author, "avatar": ""}],
                    "date": c.date,
                }
                for c in self._history(repo, head)
            ]
        )

    def _branch(
        self,
        handler: BaseHTTPRequestHandler,
        method: str,
        repo_type: str,
        repo_id: str,
        branch: str,
        payload: dict[str, Any],
    ) -> _Response:
        repo, _ = self._writable_repo(handler, repo_type, repo_id)
        if not branch or branch.startswith("refs/") or _SHA1_RE.fullmatch(branch):
            raise HubError(400, f"Invalid branch name: {branch!r}")
        if method == "DELETE":
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch")
            del repo.branches[branch]
        else:
            if branch in repo.branches:
                raise HubError(409, "Reference already exists")
            start = self._resolve(repo, str(payload.get("startingPoint") or "main")).commit
            repo.branches[branch] = start.oid
        self._state.save()
        return _Response.json({})

    def _tag(
        self,
        handler: BaseHTTPRequestHandler,
        method: str,
        repo_type: str,
        repo_id: str,
        arg: str,
        payload: dict[str, Any],
    ) -> _Response:
        repo, _ = self._writable_repo(handler, repo_type, repo_id)
        if method == "DELETE":
            if arg not in repo.tags:
                raise HubError(404, f"Invalid rev id: {arg}", code="RevisionNotFound")
            del repo.tags[arg]
        else:
            tag = str(payload.get("tag") or "")
            if not tag:
                raise HubError(400, "Missing tag name")
            if tag in repo.tags:
                raise HubError(409, "Tag already exists")
            repo.tags[tag] = self._resolve(repo, arg or "main").commit.oid
        self._state.save()
        return _Response.json({})

    # -- uploads -------------------------------------------------------------------------
    def _writable_revision(self, repo: _Repo, revision: str, create_pr: bool) -> _Revision | None:
        """Revision that a commit/preupload targets; ``None`` for a branch to auto-create."""
        try:
            rev = self._resolve(repo, revision)
        except HubError:
            if self.auto_create_branches and not create_pr and revision != "main":
                return None
            raise
        if rev.kind not in ("branch", "pr") or (create_pr and rev.kind != "branch"):
            raise HubError(400, f"Cannot commit to {revision!r}: not a branch")
        return rev

    def _upload_mode(self, commit: _Commit | None, path: str, size: int, sample: bytes) -> str:
        if size >= self.lfs_threshold or b"\x00" in sample:
            return "lfs"
        attributes = commit.files.get(".gitattributes") if commit else None
        patterns = (
            _gitattributes_lfs_patterns(self._state.read_blob(attributes.sha256))
            if attributes
            else list(_DEFAULT_LFS_PATTERNS)
        )
        return "lfs" if any(_matches_git_pattern(p, path) for p in patterns) else "regular"

    def _preupload(
        self,
        handler: BaseHTTPRequestHandler,
        repo_type: str,
        repo_id: str,
        revision: str,
        query: dict[str, list[str]],
        payload: dict[str, Any],
    ) -> _Response:
        repo, _ = self._writable_repo(handler, repo_type, repo_id)
        create_pr = query.get("create_pr", ["0"])[0] == "1"
        rev = self._writable_revision(repo, revision, create_pr)
        commit = rev.commit if rev else repo.commits[repo.branches["main"]]
        gitignore = payload.get("gitIgnore")
        if gitignore is None and ".gitignore" in commit.files:
            gitignore = self._state.read_blob(commit.files[".gitignore"].sha256).decode(errors="replace")
        ignore_patterns = [
            line.strip() for line in (gitignore or "").splitlines() if line.strip() and not line.startswith("#")
        ]
        files = []
        for item in payload.get("files", []):
            path = str(item["path"])
            sample = base64.b64decode(item.get("sample", ""))
            mode = self._upload_mode(commit, path, int(item.get("size", 0)), sample)
            existing = commit.files.get(path)
            oid = (existing.sha256 if existing.lfs else existing.blob_id) if existing else None
            files.append(
                {
                    "path": path,
                    "uploadMode": mode,
                    "shouldIgnore": any(_matches_git_pattern(p, path) for p in ignore_patterns),
                    "oid": oid,
                }
            )
        return _Response.json({"files": files, "commitOid": commit.oid})

    def _commit(
        self,
        handler: BaseHTTPRequestHandler,
        repo_type: str,
        repo_id: str,
        revision: str,
        query: dict[str, list[str]],
        body: bytes,
    ) -> _Response:
        repo, user = self._writable_repo(handler, repo_type, repo_id)
        create_pr = query.get("create_pr", ["0"])[0] == "1"
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid NDJSON commit payload: {err}") from err
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0].get("value") or {}
        title = str(header.get("summary") or "").strip()
        if not title:
            raise HubError(400, "Commit summary is required")
        parent_commit = header.get("parentCommit")

        rev = self._writable_revision(repo, revision, create_pr)
        base = rev.commit if rev else repo.commits[repo.branches["main"]]
        if parent_commit:
            matches = [oid for oid in repo.commits if oid.startswith(parent_commit)]
            if len(matches) != 1:
                raise HubError(404, f"Invalid parent commit: {parent_commit}", code="RevisionNotFound")
            if create_pr:
                base = repo.commits[matches[0]]
            elif matches[0] != base.oid:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")

        files = dict(base.files)
        for line in lines[1:]:
            self._apply_operation(repo, files, line.get("key"), line.get("value") or {})

        commit = self._add_commit(repo, [base.oid], title, str(header.get("description") or ""), user, files)
        repo.api_commits += 1
        web = self._base_url(handler)
        pr_url = None
        if create_pr:
            num = max([*repo.pulls, 0]) + 1
            repo.pulls[num] = _PullRequest(num, rev.name if rev else "main", commit.oid, user, title)
            pr_url = f"{web}/{repo.url_path}/discussions/{num}"
        elif rev is None or rev.kind == "branch":
            repo.branches[rev.name if rev else revision] = commit.oid
        else:
            repo.pulls[int(rev.name.rsplit("/", 1)[1])].head = commit.oid  # rev.name is "refs/pr/N"
        self._state.save()
        return _Response.json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{web}/{repo.url_path}/commit/{commit.oid}",
                "pullRequestUrl": pr_url,
                "hookOutput": "",
            }
        )

    def _apply_operation(self, repo: _Repo, files: dict[str, _FileEntry], key: Any, value: dict[str, Any]) -> None:
        path = str(value.get("path", "")).strip("/")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, f"Unsupported encoding for {path}")
            files[path] = self._state.regular_entry(base64.b64decode(value.get("content", "")))
        elif key == "lfsFile":
            oid = str(value.get("oid", ""))
            if oid not in repo.lfs_objects or not self._state.has_blob(oid):
                raise HubError(
                    422,
                    f"Your push was rejected because an LFS pointer pointed to a file that does not exist ({path})",
                )
            size = int(value.get("size") or repo.lfs_objects[oid])
            files[path] = _lfs_entry(oid, size)
        elif key == "deletedFile":
            if path not in files:
                raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
            del files[path]
        elif key == "deletedFolder":
            doomed = [p for p in files if p.startswith(path + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"Unknown commit operation: {key!r}")

    # -- LFS -----------------------------------------------------------------------------
    def _route_lfs(
        self,
        handler: BaseHTTPRequestHandler,
        segments: list[str],
        git_idx: int,
        query: dict[str, list[str]],
        body: bytes,
    ) -> _Response:
        repo_segs = segments[: git_idx + 1]
        repo_segs[-1] = repo_segs[-1][: -len(".git")]
        repo_type = "model"
        if repo_segs[0] in ("datasets", "spaces") and len(repo_segs) > 1:
            repo_type = repo_segs.pop(0)[:-1]
        repo_id = "/".join(repo_segs)
        action = segments[git_idx + 3 :]
        if handler.command != "POST":
            raise HubError(405, "Method not allowed")
        with self._state.lock:
            if action == ["objects", "batch"]:
                return self._lfs_batch(handler, repo_type, repo_id, self._json_body(body))
            if action == ["objects", "verify"]:
                return self._lfs_verify(handler, repo_type, repo_id, self._json_body(body))
            if len(action) == 2 and action[0] == "complete_multipart":
                return self._lfs_complete_multipart(repo_type, repo_id, action[1], query, self._json_body(body))
        raise self._unhandled(f"POST {repo_id}.git/info/lfs/{'/'.join(action)}")

    def _lfs_batch(
        self, handler: BaseHTTPRequestHandler, repo_type: str, repo_id: str, payload: dict[str, Any]
    ) -> _Response:
        repo, _ = self._writable_repo(handler, repo_type, repo_id)
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' LFS operation is supported by the local hub")
        web, storage = self._base_url(handler), self.storage_url
        repo_key = quote(repo.key, safe="")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj["oid"]), int(obj["size"])
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid in repo.lfs_objects and self._state.has_blob(oid):
                objects.append(item)  # already stored: no actions, the client skips the upload
                continue
            sig = self._sign(f"upload:{repo.key}:{oid}:{size}")
            params = f"repo={repo_key}&size={size}&sig={sig}"
            verify = {
                "href": f"{web}/{repo.url_path}.git/info/lfs/objects/verify",
                "header": {"Authorization": handler.headers.get("Authorization", "")},
            }
            if self.multipart_threshold is not None and size >= self.multipart_threshold:
                chunk = self.multipart_chunk_size
                n_parts = -(-size // chunk)
                header = {"chunk_size": str(chunk)}
                for part in range(1, n_parts + 1):
                    header[f"{part:05d}"] = f"{storage}/_storage/upload/{oid}/{part}?{params}"
                upload = {
                    "href": f"{web}/{repo.url_path}.git/info/lfs/complete_multipart/{oid}?{params}",
                    "header": header,
                }
            else:
                upload = {"href": f"{storage}/_storage/upload/{oid}?{params}"}
            item["actions"] = {"upload": upload, "verify": verify}
            objects.append(item)
        return _Response.json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            headers={"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _lfs_verify(
        self, handler: BaseHTTPRequestHandler, repo_type: str, repo_id: str, payload: dict[str, Any]
    ) -> _Response:
        repo, _ = self._writable_repo(handler, repo_type, repo_id)
        oid, size = str(payload.get("oid")), int(payload.get("size", -1))
        if repo.lfs_objects.get(oid) != size or not self._state.has_blob(oid):
            raise HubError(404, f"LFS object {oid} of size {size} was not uploaded")
        return _Response.json({"success": True})

    def _lfs_complete_multipart(
        self, repo_type: str, repo_id: str, oid: str, query: dict[str, list[str]], payload: dict[str, Any]
    ) -> _Response:
        repo = self._get_repo(repo_type, repo_id)
        size = int(query.get("size", ["-1"])[0])
        self._check_sig(f"upload:{repo.key}:{oid}:{size}", query)
        part_dir = self._state.tmp_dir / f"multipart-{repo.key.replace('/', '--')}-{oid}"
        parts = sorted(payload.get("parts", []), key=lambda p: int(p["partNumber"]))
        tmp = self._state.new_tmp_path()
        digest = hashlib.sha256()
        with tmp.open("wb") as out:
            for part in parts:
                part_file = part_dir / str(int(part["partNumber"]))
                if not part_file.is_file():
                    raise HubError(400, f"Part {part['partNumber']} of {oid} was not uploaded")
                data = part_file.read_bytes()
                if part.get("etag") != f'"{hashlib.md5(data).hexdigest()}"':
                    raise HubError(400, f"ETag mismatch for part {part['partNumber']} of {oid}")
                digest.update(data)
                out.write(data)
        self._finish_upload(repo, oid, size, tmp, digest.hexdigest())
        shutil.rmtree(part_dir, ignore_errors=True)
        return _Response.json({"success": True})

    def _finish_upload(self, repo: _Repo, oid: str, size: int, tmp: Path, actual_sha: str) -> None:
        if actual_sha != oid or tmp.stat().st_size != size:
            tmp.unlink(missing_ok=True)
            raise HubError(400, f"Uploaded content does not match oid {oid} / size {size}")
        self._state.adopt_tmp(tmp, oid)
        with self._state.lock:
            repo.lfs_objects[oid] = size
            self._state.save()

    # -- storage server ("S3"/"CDN") -----------------------------------------------------
    def _route_storage(self, method: str, segs: list[str], query: dict[str, list[str]], body: bytes) -> _Response:
        if segs[:2] == ["_storage", "upload"] and method == "PUT" and len(segs) in (3, 4):
            oid = segs[2]
            repo_key = query.get("repo", [""])[0]
            size = int(query.get("size", ["-1"])[0])
            self._check_sig(f"upload:{repo_key}:{oid}:{size}", query)
            with self._state.lock:
                repo = self._state.repos.get(repo_key)
            if repo is None:
                raise HubError(404, "Repository not found")
            if len(segs) == 4:  # one part of a multipart upload
                part_dir = self._state.tmp_dir / f"multipart-{repo_key.replace('/', '--')}-{oid}"
                part_dir.mkdir(parents=True, exist_ok=True)
                (part_dir / str(int(segs[3]))).write_bytes(body)
                return _Response(headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
            tmp = self._state.new_tmp_path()
            tmp.write_bytes(body)
            self._finish_upload(repo, oid, size, tmp, hashlib.sha256(body).hexdigest())
            return _Response(headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        if segs[:2] == ["_storage", "blob"] and method in ("GET", "HEAD") and len(segs) == 3:
            sha = segs[2]
            self._check_sig(f"blob:{sha}", query)
            if not self._state.has_blob(sha):
                raise HubError(404, "NoSuchKey")
            return self._blob_response(sha, {"ETag": f'"{sha}"'})
        raise self._unhandled(f"{method} /{'/'.join(segs)} (storage)")

    def _blob_response(self, sha: str, headers: dict[str, str], range_header: str | None = None) -> _Response:
        path = self._state.blob_path(sha)
        size = path.stat().st_size
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", **headers}
        if range_header and (m := re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", range_header)):
            start_s, end_s = m.groups()
            if start_s:
                start, end = int(start_s), int(end_s) if end_s else size - 1
            else:
                start, end = max(size - int(end_s or 0), 0), size - 1
            end = min(end, size - 1)
            if start >= size or start > end:
                return _Response(416, {"Content-Range": f"bytes */{size}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            return _Response(206, headers, file=path, file_range=(start, end))
        return _Response(200, headers, file=path)

    # -- downloads -----------------------------------------------------------------------
    def _route_resolve(
        self, handler: BaseHTTPRequestHandler, segments: list[str], query: dict[str, list[str]]
    ) -> _Response:
        idx = segments.index("resolve")
        repo_segs, rest = segments[:idx], segments[idx + 1 :]
        repo_type = "model"
        if len(repo_segs) > 1 and repo_segs[0] in ("datasets", "spaces"):
            repo_type = repo_segs.pop(0)[:-1]
        if not repo_segs or len(rest) < 2:
            raise HubError(404, "Invalid resolve URL")
        repo_id, revision, path = "/".join(repo_segs), rest[0], "/".join(rest[1:])
        with self._state.lock:
            repo = self._readable_repo(handler, repo_type, repo_id)
            commit = self._resolve(repo, revision).commit
            entry = commit.files.get(path)
        headers = {"X-Repo-Commit": commit.oid}
        if entry is None:
            raise HubError(404, "Entry not found", code="EntryNotFound", headers=headers)
        if entry.lfs:
            sig = self._sign(f"blob:{entry.sha256}")
            location = f"{self.storage_url}/_storage/blob/{entry.sha256}?sig={sig}"
            headers.update(
                {
                    "Location": location,
                    "ETag": f'"{entry.blob_id}"',
                    "X-Linked-Etag": f'"{entry.sha256}"',
                    "X-Linked-Size": str(entry.size),
                    "Content-Type": "text/plain; charset=utf-8",
                }
            )
            return _Response(302, headers)
        headers["ETag"] = f'"{entry.blob_id}"'
        return self._blob_response(entry.sha256, headers, handler.headers.get("Range"))
