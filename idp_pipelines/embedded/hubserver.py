"""A local Hugging Face Hub-compatible HTTP server: the embedded lab's Hub, and the tests'.

It implements exactly the endpoints huggingface_hub 2.4.0 calls for `model_info`/`repo_info`,
`list_repo_tree`, `get_paths_info`, `snapshot_download` and `hf_hub_download` (plain HTTP, no Xet):

    GET  /api/models/{repo}                          model info at the default branch
    GET  /api/models/{repo}/revision/{rev}           model info at a revision (?blobs=true adds file metadata)
    GET  /api/models/{repo}/tree/{rev}[/{path}]      file listing (?recursive=true), paginated with a Link header
    POST /api/models/{repo}/paths-info/{rev}         metadata of given paths (form field `paths`, repeated)
    HEAD /{repo}/resolve/{rev}/{path}                X-Repo-Commit, ETag, X-Linked-Etag/X-Linked-Size (LFS),
    GET  /{repo}/resolve/{rev}/{path}                Content-Length, Accept-Ranges; GET honours `Range: bytes=a-[b]`

Errors carry the `X-Error-Code` headers huggingface_hub maps to its exceptions (RepoNotFound,
RevisionNotFound, EntryNotFound, GatedRepo). Faults are switched on per file; every request is
counted per (method, path) so tests can assert what was (not) downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_TOKEN = "hf_test_token"  # accepted for gated repos unless `tokens=` says otherwise
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".onnx", ".h5", ".msgpack", ".model")
LFS_MIN_SIZE = 10 * 1024
_CHUNK = 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubFile:
    """One file of a commit: in memory (`data`) or on disk (`source`)."""

    path: str
    size: int
    sha256: str
    git_sha1: str
    lfs: bool
    data: bytes | None = None
    source: Path | None = None

    @classmethod
    def from_bytes(cls, path: str, data: bytes, lfs: bool | None = None) -> HubFile:
        if lfs is None:
            lfs = path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE
        return cls(path, len(data), hashlib.sha256(data).hexdigest(), git_blob_sha1(data), lfs, data=data)

    @classmethod
    def from_path(cls, path: str, source: Path, lfs: bool | None = None) -> HubFile:
        size = source.stat().st_size
        sha256 = hashlib.sha256()
        sha1 = hashlib.sha1(b"blob %d\0" % size)
        with source.open("rb") as f:
            while chunk := f.read(_CHUNK):
                sha256.update(chunk)
                sha1.update(chunk)
        if lfs is None:
            lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
        return cls(path, size, sha256.hexdigest(), sha1.hexdigest(), lfs, source=source)

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    @property
    def oid(self) -> str:
        # As on the Hub: the git blob id of what git stores, i.e. the pointer file for LFS files.
        return git_blob_sha1(self.pointer) if self.lfs else self.git_sha1

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1

    def entry(self) -> dict:
        entry = {"type": "file", "oid": self.oid, "size": self.size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(self.pointer)}
        return entry

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end) in chunks of at most 1 MiB."""
        if self.data is not None:
            view = memoryview(self.data)
            for pos in range(start, end, _CHUNK):
                yield bytes(view[pos : min(pos + _CHUNK, end)])
            return
        assert self.source is not None
        with self.source.open("rb") as f:
            f.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk


@dataclass
class HubRepo:
    repo_id: str
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    hidden: set[str] = field(default_factory=set)  # listed in the tree, but /resolve/ answers 404


@dataclass
class _Fault:
    times: int | None  # None: always
    at: int | None  # byte offset; None: the middle of the file

    def fire(self) -> bool:
        if self.times is None:
            return True
        if self.times <= 0:
            return False
        self.times -= 1
        return True


class HubServer:
    """Hub-compatible server on 127.0.0.1:<free port>; use as a context manager."""

    def __init__(self, *, tokens: tuple[str, ...] = (DEFAULT_TOKEN,), tree_page_size: int = 1000,
                 port: int = 0) -> None:
        self.port = port
        self.tokens = set(tokens)
        self.tree_page_size = tree_page_size
        self.repos: dict[str, HubRepo] = {}
        self.requests: Counter[tuple[str, str]] = Counter()
        self.log: list[tuple[str, str, int]] = []  # (method, path, status)
        self._drops: dict[tuple[str, str], _Fault] = {}
        self._corruptions: dict[tuple[str, str], _Fault] = {}
        self._statuses: dict[tuple[str, str], tuple[int, _Fault]] = {}
        self._lock = threading.Lock()
        self._commit_counter = 0
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> HubServer:
        self._httpd = _Server(("127.0.0.1", self.port), _Handler, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hubserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()  # joins handler threads; their sockets are closed above
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # -- content ---------------------------------------------------------------------------------

    def create_repo(
        self,
        repo_id: str,
        files: dict[str, bytes | Path],
        *,
        branch: str = "main",
        gated: bool = False,
        lfs: set[str] | None = None,
    ) -> str:
        """Create a repo with one commit on `branch`; return the commit sha."""
        with self._lock:
            self.repos[repo_id] = HubRepo(repo_id, gated=gated)
        return self.commit(repo_id, files, branch=branch, lfs=lfs)

    def create_repo_from_dir(self, repo_id: str, directory: Path, **kwargs) -> str:
        files: dict[str, bytes | Path] = {
            p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*")) if p.is_file()
        }
        return self.create_repo(repo_id, files, **kwargs)

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes | Path],
        *,
        branch: str = "main",
        delete: tuple[str, ...] = (),
        lfs: set[str] | None = None,
    ) -> str:
        """Add a commit on top of `branch` (moving it, as a push would); return the new sha."""
        built = {
            path: (
                HubFile.from_path(path, src, lfs=None if lfs is None else path in lfs)
                if isinstance(src, Path)
                else HubFile.from_bytes(path, src, lfs=None if lfs is None else path in lfs)
            )
            for path, src in files.items()
        }
        with self._lock:
            repo = self.repos[repo_id]
            parent = repo.refs.get(branch)
            tree = dict(repo.commits[parent]) if parent else {}
            for path in delete:
                tree.pop(path, None)
            tree.update(built)
            self._commit_counter += 1
            seed = f"{repo_id}\0{parent}\0{self._commit_counter}\0" + "".join(
                f"{p}\0{f.oid}\0" for p, f in sorted(tree.items())
            )
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[sha] = tree
            repo.refs[branch] = sha
            return sha

    def set_ref(self, repo_id: str, ref: str, sha: str) -> None:
        """Point a branch or tag at an existing commit."""
        with self._lock:
            assert sha in self.repos[repo_id].commits
            self.repos[repo_id].refs[ref] = sha

    def delete_repo(self, repo_id: str) -> None:
        with self._lock:
            self.repos.pop(repo_id, None)

    def set_gated(self, repo_id: str, gated: bool = True) -> None:
        with self._lock:
            self.repos[repo_id].gated = gated

    # -- faults ----------------------------------------------------------------------------------

    def drop_connection(self, repo_id: str, path: str, *, times: int | None = 1, at: int | None = None) -> None:
        """Close the connection after byte `at` (default: half) of a GET of `path`; `times=None`: always."""
        with self._lock:
            self._drops[(repo_id, path)] = _Fault(times, at)

    def corrupt(self, repo_id: str, path: str, *, times: int | None = 1, at: int | None = None) -> None:
        """Serve `path` with one byte flipped (same length); `times=None`: always."""
        with self._lock:
            self._corruptions[(repo_id, path)] = _Fault(times, at)

    def fail_status(self, repo_id: str, path: str, status: int, *, times: int | None = None) -> None:
        """Answer requests for `path` on /resolve/ with HTTP `status` and no error code; `times=None`: always."""
        with self._lock:
            self._statuses[(repo_id, path)] = (status, _Fault(times, None))

    def hide_file(self, repo_id: str, path: str) -> None:
        """Keep `path` in the listing but answer 404 EntryNotFound on /resolve/."""
        with self._lock:
            self.repos[repo_id].hidden.add(path)

    def clear_faults(self) -> None:
        with self._lock:
            self._drops.clear()
            self._corruptions.clear()
            self._statuses.clear()
            for repo in self.repos.values():
                repo.hidden.clear()

    # -- counters --------------------------------------------------------------------------------

    def count(self, method: str | None = None, *, contains: str = "") -> int:
        """Requests seen, filtered by method and by a substring of the (unquoted) path."""
        with self._lock:
            return sum(
                n for (m, p), n in self.requests.items() if (method is None or m == method) and contains in p
            )

    def content_gets(self, repo_id: str | None = None) -> int:
        """GET requests on /resolve/ (file content), optionally for one repo."""
        prefix = f"/{repo_id}/resolve/" if repo_id else "/resolve/"
        return self.count("GET", contains=prefix)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.log.clear()

    # -- used by the handler ---------------------------------------------------------------------

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests[(method, path)] += 1

    def _take_fault(self, table: dict[tuple[str, str], _Fault], key: tuple[str, str]) -> _Fault | None:
        with self._lock:
            fault = table.get(key)
            return fault if fault is not None and fault.fire() else None


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins handler threads: bounded because we close their sockets
    block_on_close = True

    def __init__(self, address, handler, hub: HubServer) -> None:
        self.hub = hub
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, handler)

    def track(self, sock: socket.socket, add: bool) -> None:
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(sock)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        # Clients hanging up mid-body (and our own injected drops) are expected; stay quiet.
        pass


class _NotFound(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 30  # an idle keep-alive connection cannot hold a handler thread forever

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    # -- plumbing --------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        raw_segments = split.path.lstrip("/").split("/")
        path = unquote(split.path)
        self.hub._record(method, path)
        query = parse_qs(split.query)
        body = b""
        if method == "POST":
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            if raw_segments[:2] == ["api", "models"]:
                self._api(method, [unquote(s) for s in raw_segments[2:]], query, body)
            elif "resolve" in raw_segments and method in ("GET", "HEAD"):
                i = raw_segments.index("resolve")
                repo_id = "/".join(unquote(s) for s in raw_segments[:i])
                if len(raw_segments) < i + 3:
                    raise _NotFound(404, "EntryNotFound", "Entry not found")
                rev = unquote(raw_segments[i + 1])
                filename = "/".join(unquote(s) for s in raw_segments[i + 2 :])
                self._resolve(method, repo_id, rev, filename)
            else:
                raise _NotFound(404, "", "Not Found")
        except _NotFound as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_json(self, payload: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self._log(status)

    def _error(self, e: _NotFound) -> None:
        headers = dict(e.headers)
        if e.code:
            headers["X-Error-Code"] = e.code
        headers["X-Error-Message"] = e.message
        self._send_json({"error": e.message}, e.status, headers)

    def _log(self, status: int) -> None:
        with self.hub._lock:
            self.hub.log.append((self.command, unquote(urlsplit(self.path).path), status))

    # -- lookups ---------------------------------------------------------------------------------

    def _repo(self, repo_id: str) -> HubRepo:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise _NotFound(404, "RepoNotFound", "Repository not found")
        if repo.gated:
            auth = self.headers.get("Authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if token not in self.hub.tokens:
                raise _NotFound(
                    403 if token else 401,
                    "GatedRepo",
                    f"Access to model {repo_id} is restricted. You must have access to it and be authenticated"
                    " to access it. Please log in.",
                )
        return repo

    def _commit(self, repo: HubRepo, rev: str) -> tuple[str, dict[str, HubFile]]:
        sha = repo.refs.get(rev, rev)
        tree = repo.commits.get(sha)
        if tree is None:
            raise _NotFound(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha, tree

    # -- /api/models/... -------------------------------------------------------------------------

    def _api(self, method: str, segs: list[str], query: dict[str, list[str]], body: bytes) -> None:
        for keyword in ("revision", "tree", "paths-info"):
            if keyword in segs[1:]:
                i = segs.index(keyword, 1)
                repo_id, rest = "/".join(segs[:i]), segs[i + 1 :]
                break
        else:
            keyword, repo_id, rest = "info", "/".join(segs), []
        repo = self._repo(repo_id)
        if keyword in ("info", "revision") and method == "GET":
            sha, tree = self._commit(repo, rest[0] if rest else "main")
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for f in sorted(tree.values(), key=lambda f: f.path):
                sibling: dict = {"rfilename": f.path}
                if blobs:
                    sibling.update(size=f.size, blobId=f.oid)
                    if f.lfs:
                        sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
                siblings.append(sibling)
            info = {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0] if "/" in repo_id else None,
                "sha": sha,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
            }
            if blobs:
                info["usedStorage"] = sum(f.size for f in tree.values())
            self._send_json(info)
        elif keyword == "tree" and method == "GET" and rest:
            sha, tree = self._commit(repo, rest[0])
            self._tree(tree, "/".join(rest[1:]), query)
        elif keyword == "paths-info" and method == "POST" and rest:
            sha, tree = self._commit(repo, rest[0])
            form = parse_qs(body.decode())
            out: list[dict] = []
            for p in form.get("paths", []):
                p = p.strip("/")
                if p in tree:
                    out.append(tree[p].entry())
                elif any(path.startswith(p + "/") for path in tree):
                    out.append({"type": "directory", "oid": _tree_oid(p, tree), "size": 0, "path": p})
            self._send_json(out)
        else:
            raise _NotFound(404, "", "Not Found")

    def _tree(self, tree: dict[str, HubFile], base: str, query: dict[str, list[str]]) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = base + "/" if base else ""
        if base and not any(p.startswith(prefix) for p in tree):
            raise _NotFound(404, "EntryNotFound", f"{base} does not exist on this revision")
        entries: dict[str, dict] = {}
        for path in sorted(tree):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix) :].split("/")
            # Directories on the way to the file, then the file itself (if within depth).
            depth = len(rel) if recursive else 1
            for d in range(1, min(depth, len(rel) - 1) + 1):
                dpath = prefix + "/".join(rel[:d])
                entries.setdefault(
                    dpath, {"type": "directory", "oid": _tree_oid(dpath, tree), "size": 0, "path": dpath}
                )
            if recursive or len(rel) == 1:
                entries[path] = tree[path].entry()
        items = list(entries.values())
        cursor = int(query.get("cursor", ["0"])[0])
        page = items[cursor : cursor + self.hub.tree_page_size]
        headers = {}
        if cursor + self.hub.tree_page_size < len(items):
            split = urlsplit(self.path)
            params = {k: v[0] for k, v in query.items() if k != "cursor"}
            params["cursor"] = str(cursor + self.hub.tree_page_size)
            qs = "&".join(f"{k}={quote(v)}" for k, v in params.items())
            headers["Link"] = f'<{self.hub.url}{split.path}?{qs}>; rel="next"'
        self._send_json(page, headers=headers)

    # -- /{repo}/resolve/{rev}/{path} ------------------------------------------------------------

    def _resolve(self, method: str, repo_id: str, rev: str, filename: str) -> None:
        repo = self._repo(repo_id)
        sha, tree = self._commit(repo, rev)
        f = tree.get(filename)
        if f is None or filename in repo.hidden:
            raise _NotFound(404, "EntryNotFound", f"{filename} does not exist on this revision", {"X-Repo-Commit": sha})
        with self.hub._lock:
            failing = self.hub._statuses.get((repo_id, filename))
            status_fault = failing[0] if failing is not None and failing[1].fire() else None
        if status_fault is not None:
            raise _NotFound(status_fault, "", f"injected HTTP {status_fault}")

        start, end = 0, f.size
        status = 200
        range_header = self.headers.get("Range")
        if range_header and method == "GET":
            parsed = _parse_range(range_header, f.size)
            if parsed is None:
                raise _NotFound(416, "", "Range Not Satisfiable", {"Content-Range": f"bytes */{f.size}"})
            start, end = parsed
            status = 206

        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{f.etag}"')
        self.send_header("X-Repo-Commit", sha)
        self.send_header("Content-Disposition", f'inline; filename="{os.path.basename(filename)}"')
        if f.lfs:
            self.send_header("X-Linked-Etag", f'"{f.sha256}"')
            self.send_header("X-Linked-Size", str(f.size))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{f.size}")
        self.end_headers()
        self._log(status)
        if method == "HEAD":
            return

        key = (repo_id, filename)
        drop = self.hub._take_fault(self.hub._drops, key)
        corrupt = self.hub._take_fault(self.hub._corruptions, key)
        stop = end
        if drop is not None:
            stop = max(start, min(end, drop.at if drop.at is not None else f.size // 2))
        flip = None
        if corrupt is not None:
            flip = corrupt.at if corrupt.at is not None else f.size // 2

        if drop is None and flip is None and f.source is not None:
            with f.source.open("rb") as fh:
                self.connection.sendfile(fh, start, end - start)
        else:
            pos = start
            for chunk in f.chunks(start, stop):
                if flip is not None and pos <= flip < pos + len(chunk):
                    b = bytearray(chunk)
                    b[flip - pos] ^= 0xFF
                    chunk = bytes(b)
                self.wfile.write(chunk)
                pos += len(chunk)
        if drop is not None:
            # Fewer bytes than Content-Length, then hang up: the client sees an incomplete body.
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _tree_oid(path: str, tree: dict[str, HubFile]) -> str:
    return hashlib.sha1(("tree\0" + path + "".join(f.oid for p, f in sorted(tree.items()))).encode()).hexdigest()


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-` or `bytes=a-b` -> [start, end) ; None if unsatisfiable or unsupported."""
    if not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[6:].strip().partition("-")
    try:
        if first == "":
            n = int(last)
            return (max(0, size - n), size) if n > 0 else None
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    except ValueError:
        return None
    if start >= size or start >= end:
        return None
    return start, end


def main(argv: list[str] | None = None) -> int:
    """Serve directories as Hub repos until SIGTERM/SIGINT: the embedded lab's stand-in for the Hub."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--repo", action="append", default=[], metavar="OWNER/NAME=DIR",
                        help="serve DIR's files as one commit on main of OWNER/NAME (repeatable)")
    args = parser.parse_args(argv)
    server = HubServer(port=args.port)
    for spec in args.repo:
        repo_id, _, directory = spec.partition("=")
        sha = server.create_repo_from_dir(repo_id, Path(directory))
        print(f"{repo_id}@{sha} from {directory}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with server:
        print(f"LISTENING {server.url}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
