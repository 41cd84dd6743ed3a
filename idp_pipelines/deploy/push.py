"""Push a host's rendered files to its config_dir: a local folder (embedded lab) or over SSH.

Every write is atomic (a temp file in the same folder, renamed); secret files (`.env`, key files: the
rendered mode 0600) are written under `umask 077` and get their mode before the rename, so they never exist
readable by others on the far side. A key file a service reads as its own user (Prometheus' scrape
credentials on an LXC host) is 0640 and in that service's group (`key_group`), set before the rename too.
The plan's diffs never show a secret's value.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from idp_pipelines.files import atomic_write
from idp_pipelines.secrets import parse_env

from . import DeployError
from .ssh import SshConn

TMP_SUFFIX = ".idp-tmp"
KEY_MODE = 0o640  # a key file its service's group reads (lxc.Placement.key_group)
SECRET_MODES = (0o600, KEY_MODE)


@dataclass(frozen=True)
class FileState:
    sha256: str
    mode: int


class LocalDir:
    """config_dir on this machine."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def listing(self) -> dict[str, FileState]:
        out = {}
        if not self.root.is_dir():
            return out
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and not p.is_symlink() and not p.name.endswith(TMP_SUFFIX):
                out[p.relative_to(self.root).as_posix()] = FileState(hashlib.sha256(p.read_bytes()).hexdigest(),
                                                                     p.stat().st_mode & 0o7777)
        return out

    def read(self, rel: str) -> bytes | None:
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, rel: str, data: bytes, mode: int, key_group: str | None = None) -> None:
        gid = None
        if mode == KEY_MODE and key_group is not None:
            import grp

            try:
                gid = grp.getgrnam(key_group).gr_gid
            except KeyError:
                raise DeployError(f"{rel} is for the {key_group} service, but this host has no group "
                                  f"{key_group!r}. Fix: install the service's package (apt-get install "
                                  f"{key_group}) first.") from None
        atomic_write(self.root / rel, data, mode=mode, gid=gid)

    def remove(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def link(self, link: str, target: str) -> None:
        tmp = Path(link + TMP_SUFFIX)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)

    def run(self, command: str) -> tuple[int, str]:
        """A validator or reload on this machine: (exit code, output)."""
        import subprocess

        proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=300)
        return proc.returncode, (proc.stdout + proc.stderr).strip()


class SshDir:
    """config_dir on a host reached over SSH (sudo where the inventory says)."""

    def __init__(self, conn: SshConn, root: str):
        self.conn, self.root = conn, root.rstrip("/") or "/"

    def __str__(self) -> str:
        return f"{self.conn.name}:{self.root}"

    def listing(self) -> dict[str, FileState]:
        # one round trip: mode and sha256 of every file under the folder
        script = (f"cd {shlex.quote(self.root)} 2>/dev/null || exit 0; "
                  f"find . -type f ! -name '*{TMP_SUFFIX}' -exec sh -c "
                  "'for f; do printf \"%s %s\\n\" \"$(stat -c %a \"$f\")\" \"$(sha256sum \"$f\")\"; done' _ {} +")
        out = {}
        for line in self.conn.run(script).stdout.decode("utf-8", "replace").splitlines():
            mode, digest, path = line.split(None, 2)
            out[path.strip().removeprefix("./")] = FileState(digest, int(mode, 8))
        return out

    def read(self, rel: str) -> bytes | None:
        path = shlex.quote(f"{self.root}/{rel}")
        proc = self.conn.run(f"test -f {path} && cat {path}", check=False)
        return proc.stdout if proc.returncode == 0 else None

    def write(self, rel: str, data: bytes, mode: int, key_group: str | None = None) -> None:
        path = f"{self.root}/{rel}"
        q = shlex.quote(path)
        group = f"chgrp {shlex.quote(key_group)} \"$t\"; " if mode == KEY_MODE and key_group else ""
        # the folder as a service user can read it (Grafana's dashboards folder); only the file is private
        self.conn.run(f"set -e; mkdir -p -m 0755 {shlex.quote(os.path.dirname(path))}; umask 077; "
                      f"t={q}.$${TMP_SUFFIX}; trap 'rm -f \"$t\"' EXIT; cat > \"$t\"; {group}chmod {mode:o} \"$t\"; "
                      f"mv -f \"$t\" {q}; trap - EXIT", stdin=data)

    def remove(self, rel: str) -> None:
        self.conn.run(f"rm -f {shlex.quote(f'{self.root}/{rel}')}")

    def link(self, link: str, target: str) -> None:
        self.conn.run(f"mkdir -p {shlex.quote(os.path.dirname(link))} && ln -sfn {shlex.quote(target)} {shlex.quote(link)}")

    def run(self, command: str) -> tuple[int, str]:
        """A validator or reload on the host (through sudo where the inventory says): (exit code, output)."""
        proc = self.conn.run(command, check=False, timeout_s=300)
        return proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace").strip()


@dataclass
class FileChange:
    rel: str
    action: str          # create | update | mode | same
    diff: str
    secret: bool
    mode: int

    @property
    def changes(self) -> bool:
        return self.action != "same"


def rendered_files(root: Path, secrets: list[str]) -> dict[str, tuple[bytes, int]]:
    """What the host receives: every file under its rendered folder, with the mode it gets there: 0600 for
    the .env and any file holding a key (Prometheus' key files), 0755 for scripts, 0644 for the rest."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.name.endswith(TMP_SUFFIX):
            data = p.read_bytes()
            secret = p.name == ".env" or any(s.encode() in data for s in secrets if s)
            mode = 0o600 if secret else 0o755 if p.stat().st_mode & 0o100 else 0o644
            out[p.relative_to(root).as_posix()] = (data, mode)
    return out


def is_secret(rel: str, mode: int) -> bool:
    return Path(rel).name == ".env" or mode in SECRET_MODES


def _secret_diff(rel: str, old: bytes | None, new: bytes) -> str:
    if Path(rel).name != ".env":
        return f"(secret file {rel}: contents {'differ' if old is not None else 'new'}; not shown)"

    def parse(b: bytes) -> dict[str, str]:  # in memory: live keys never pass through a temp file
        return parse_env(b.decode("utf-8", "replace"))

    a, b = parse(old or b""), parse(new)
    parts = [f"{k}: {what}" for k, what in
             [(k, "added") for k in sorted(set(b) - set(a))] + [(k, "removed") for k in sorted(set(a) - set(b))] +
             [(k, "changed") for k in sorted(set(a) & set(b)) if a[k] != b[k]]]
    return f"(secret file {rel}: values not shown) " + ("; ".join(parts) or "comments only")


def plan_files(rendered: dict[str, tuple[bytes, int]], target, label: str) -> list[FileChange]:
    """Per rendered file: create / update (with a unified diff) / mode (only the mode differs) / same."""
    listing = target.listing()
    out = []
    for rel, (data, mode) in rendered.items():
        have = listing.get(rel)
        secret = is_secret(rel, mode)
        if have is not None and have.sha256 == hashlib.sha256(data).hexdigest():
            action = "same" if have.mode == mode else "mode"
            diff = "" if action == "same" else f"mode {have.mode:o} -> {mode:o}"
            out.append(FileChange(rel, action, diff, secret, mode))
            continue
        old = target.read(rel) if have is not None else None
        if secret:
            diff = _secret_diff(rel, old, data)
        else:
            diff = "".join(difflib.unified_diff(
                (old or b"").decode("utf-8", "replace").splitlines(keepends=True),
                data.decode("utf-8", "replace").splitlines(keepends=True),
                fromfile=f"{label}/{rel}" if old is not None else "/dev/null", tofile=f"rendered/{rel}"))
        out.append(FileChange(rel, "create" if have is None else "update", diff, secret, mode))
    return out


def push(rendered: dict[str, tuple[bytes, int]], target, changes: list[FileChange],
         key_group: str | None = None) -> list[str]:
    """Write the files the plan says differ; returns their paths relative to config_dir. Key files (mode
    0640) go to `key_group`."""
    done = []
    for ch in changes:
        if not ch.changes:
            continue
        data, mode = rendered[ch.rel]
        try:
            target.write(ch.rel, data, (mode if mode in SECRET_MODES else 0o600) if ch.secret else mode, key_group)
        except OSError as exc:
            raise DeployError(f"cannot write {ch.rel} to {target}: {exc}. Fix: check config_dir exists and is "
                              f"writable by the deploying user.") from None
        done.append(ch.rel)
    return done
