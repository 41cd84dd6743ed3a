"""The backup target: a folder here (a local disk or a mounted share) or on an SSH host.

Everything done on the target is a small POSIX shell script, run by `sh` here or by `ssh host sh` there.
What an SSH target (the NAS) needs: sh, GNU coreutils (stat, df, sha256sum, sha1sum), GNU find, rsync,
and the backup user's key in its authorized_keys. Nothing of this project is installed there.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from idp_pipelines.backup.errors import BackupError, FlushError
from idp_pipelines.files import hash_file

if TYPE_CHECKING:
    from idp_pipelines.lab import Backup

# Snapshot folders are named by their UTC start time; no ':' (rsync reads "a:b" as a remote path).
SNAPSHOT_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ$")
PARTIAL_SUFFIX = ".partial"
DELETING_SUFFIX = ".deleting"
MANIFEST = "idp-manifest.json"


@dataclass(frozen=True)
class Entry:
    """One path under a listed folder, as `find -printf` saw it."""

    kind: str  # "f" file, "l" symlink, "d" folder
    links: int  # hard-link count: 1 means no other snapshot shares this file
    size: int
    mtime: float
    path: str  # relative to the listed folder
    link_to: str  # a symlink's target, as written


@dataclass(frozen=True)
class Target:
    path: str  # the target's folder, on `host` when there is one
    host: str | None = None
    user: str | None = None
    port: int = 22
    identity_file: str | None = None
    known_hosts: str | None = None
    bwlimit_kib_s: int | None = None

    @classmethod
    def from_inventory(cls, backup: Backup) -> Target:
        return cls(path=backup.path, host=backup.ssh_host, user=backup.ssh_user, port=backup.ssh.port,
                   identity_file=str(backup.ssh.identity_file) if backup.ssh.identity_file else None,
                   known_hosts=str(backup.ssh.known_hosts) if backup.ssh.known_hosts else None,
                   bwlimit_kib_s=backup.bwlimit_kib_s)

    @property
    def is_ssh(self) -> bool:
        return self.host is not None

    def describe(self) -> str:
        return f"{self._login()}:{self.path}" if self.is_ssh else self.path

    def _login(self) -> str:
        return f"{self.user}@{self.host}" if self.user else str(self.host)

    def ssh_argv(self) -> list[str]:
        """The ssh command (without the remote command): batch mode, the inventory's key and known_hosts."""
        argv = ["ssh", "-p", str(self.port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=20",
                "-o", "ServerAliveInterval=30"]
        if self.identity_file:
            argv += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        return argv

    def remote(self, sub: str = "") -> str:
        """A path on the target as rsync writes it (`user@host:/path/sub` over SSH)."""
        path = f"{self.path.rstrip('/')}/{sub}" if sub else self.path
        return f"{self._login()}:{path}" if self.is_ssh else path

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    # ------------------------------------------------------------------------------------ shell

    def sh_argv(self, script: str, args: Sequence[str] = ()) -> list[str]:
        if not self.is_ssh:
            return ["sh", "-c", script, "sh", *args]
        command = " ".join(["sh", "-c", shlex.quote(script), "sh", *(shlex.quote(a) for a in args)])
        return [*self.ssh_argv(), self._login(), command]

    def sh(self, script: str, *args: str, input: bytes | None = None, what: str) -> bytes:
        """Run `script` on the target (`$1`.. are `args`); its stdout, or a BackupError naming `what`."""
        try:
            proc = subprocess.run(self.sh_argv(script, args), input=input, capture_output=True, timeout=3600)
        except FileNotFoundError as exc:
            raise BackupError(f"{what} on {self.describe()}: {exc.filename} is not installed. Fix: apt-get "
                              f"install {'openssh-client' if self.is_ssh else 'coreutils'}.") from None
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()
            hint = (" Fix: check backup.target, backup.ssh (user, port, identity_file, known_hosts) and that the "
                    "host is up." if self.is_ssh and proc.returncode == 255 else "")
            error = BackupError(f"{what} on {self.describe()} failed (exit {proc.returncode}): {err}.{hint}")
            error.returncode = proc.returncode  # the script's own exit code (255: ssh could not connect)
            raise error
        return proc.stdout

    # ------------------------------------------------------------------------------------ queries

    def names(self) -> list[str]:
        """The entries at the top of the target (snapshots, partial ones, ones being deleted)."""
        out = self.sh('mkdir -p "$1" && cd "$1" && for f in * .[!.]*; do [ -e "$f" ] && printf "%s\\0" "$f"; done; :',
                      self.path, what="listing the target")
        return sorted(n for n in out.decode().split("\0") if n)

    def snapshots(self) -> list[str]:
        """Complete snapshots, oldest first."""
        return [n for n in self.names() if SNAPSHOT_RE.match(n)]

    def free_bytes(self) -> int:
        out = self.sh('mkdir -p "$1" && df -Pk "$1" | tail -n 1', self.path, what="reading the free space")
        try:
            return int(out.split()[3]) * 1024
        except (IndexError, ValueError):
            raise BackupError(f"df on {self.describe()} printed {out!r}: cannot read the free space.") from None

    def check_links(self, owners: Sequence[str] = ()) -> None:
        """Refuse a target that does not keep hard links and symlinks (SMB, exFAT): each snapshot there
        would be a full copy, and the snapshots' symlinks would be lost. With `owners` ("uid:gid" of what is
        backed up), also one where root cannot give a file those owners (an NFS export with root_squash):
        rsync -a would copy everything, then fail (exit 23) on every run."""
        out = self.sh(
            # the probe folder goes also when a step fails (a full or read-only target) or the run is stopped
            # (a signal's trap exits: dash would run the handler and carry on to a false verdict)
            'set -e; d="$1/.idp-linkcheck.$$"; trap \'rm -rf "$d"\' EXIT\n'
            'trap "exit 129" HUP; trap "exit 130" INT; trap "exit 143" TERM\n'
            'rm -rf "$d"; mkdir -p "$d"; echo x > "$d/a"\n'
            'if ! ln "$d/a" "$d/b" 2>/dev/null; then echo "no-hardlink"; '
            'elif [ "$(stat -c %h "$d/a")" != 2 ]; then echo "no-hardlink-count"; '
            'elif ! ln -s a "$d/c" 2>/dev/null || [ ! -L "$d/c" ]; then echo "no-symlink"; '
            # rsync -a sets owners only where it runs as root (a user's rsync keeps its own)
            'elif [ "$(id -u)" = 0 ] && bad=$(for o in $2; do chown -h "$o" "$d/a" 2>/dev/null || '
            '{ echo "$o"; break; }; done) && [ -n "$bad" ]; then echo "no-chown $bad"; '
            'else echo ok; fi', self.path, " ".join(owners), what="checking hard links, symlinks and owners")
        verdict = out.decode().strip()
        if verdict.startswith("no-chown "):
            raise BackupError(
                f"The backup target {self.describe()} does not let root give a file its owner (chown "
                f"{verdict.split()[1]} failed there): rsync -a would copy the whole cache and then fail (exit 23), "
                "on every run. An NFS export with root_squash (the default) maps root to nobody and does this. "
                "Nothing was copied. Fix: export the share with no_root_squash (Synology: Squash 'No mapping'; "
                "TrueNAS: Maproot User root), run the backup as the user who owns the cache, or point "
                "backup.target at host:/path over SSH on the NAS.")
        reasons = {
            "no-hardlink": "cannot make a hard link",
            "no-hardlink-count": "makes hard links that do not share one file (the link count stays 1)",
            "no-symlink": "cannot keep a symbolic link",
        }
        if verdict != "ok":
            raise BackupError(
                f"The backup target {self.describe()} {reasons.get(verdict, verdict)}: every snapshot there would "
                "be a full copy of the cache and the Hub cache's snapshot symlinks would be lost (SMB/CIFS and exFAT "
                "shares do this). Fix: point backup.target at a Linux filesystem (ext4, xfs, btrfs, ZFS), an NFS "
                "export, or host:/path over SSH on the NAS.")

    def listing(self, sub: str) -> dict[str, Entry]:
        """Every file, symlink and folder under `sub` (relative path -> Entry); empty if it does not exist."""
        out = self.sh('[ -d "$1" ] || exit 0; find "$1" -mindepth 1 -printf "%y\\t%n\\t%s\\t%T@\\t%P\\t%l\\0"',
                      self.join(sub), what=f"listing {sub}")
        entries: dict[str, Entry] = {}
        for rec in out.decode(errors="surrogateescape").split("\0"):
            if not rec:
                continue
            kind, links, size, mtime, path, link_to = rec.split("\t", 5)
            entries[path] = Entry(kind, int(links), int(size), float(mtime), path, link_to)
        return entries

    def read_file(self, rel: str) -> bytes | None:
        out = self.sh('[ -f "$1" ] && cat "$1" || echo -n', self.join(rel), what=f"reading {rel}")
        return out or None

    # ------------------------------------------------------------------------------------ changes

    def write_file(self, rel: str, data: bytes) -> None:
        """Write through a temp name and rename: a crash leaves the old file or the new one."""
        self.sh('mkdir -p "$(dirname "$1")" && cat > "$1.idp-tmp" && mv -f "$1.idp-tmp" "$1"', self.join(rel),
                input=data, what=f"writing {rel}")

    def rename(self, old: str, new: str) -> None:
        self.sh('[ ! -e "$2" ] || { echo "$2 exists" >&2; exit 1; }; mv "$1" "$2"', self.join(old), self.join(new),
                what=f"renaming {old} to {new}")

    def sync(self, sub: str = "") -> None:
        """Flush the filesystem holding `sub` to its disk (`sync -f`, syncfs): what was written survives a power
        cut. A write the disk failed is a FlushError where syncfs reports it (Linux 5.8 and later, to the first
        flush after the failure only). A NAS whose `sync` has no -f flushes all its filesystems and cannot
        report one."""
        try:
            self.sh('out=$(LC_ALL=C sync -f "$1" 2>&1) && exit 0\n'
                    'case "$out" in *"invalid option"*|*"unrecognized option"*|*"Usage:"*) sync; exit 0;; esac\n'
                    'printf "%s\\n" "$out" >&2; exit 75', self.join(sub) if sub else self.path,
                    what="flushing the target to its disk")
        except BackupError as exc:
            if getattr(exc, "returncode", None) == 75:  # sync itself failed, not the way to the target
                raise FlushError(str(exc)) from None
            raise

    def remove_tree(self, name: str) -> None:
        """Delete a snapshot: renamed to `.deleting` first, so a crash midway never leaves a half-deleted
        folder that looks complete."""
        if not name.endswith(DELETING_SUFFIX):
            self.rename(name, name + DELETING_SUFFIX)
            name += DELETING_SUFFIX
        self.sh('rm -rf "$1"', self.join(name), what=f"deleting {name}")

    # ------------------------------------------------------------------------------------ hashing

    def hash_files(self, sub: str, files: Iterable[tuple[str, str]], workers: int = 2) -> dict[str, str | None]:
        """{path: hex digest or None when missing} of (path relative to `sub`, "sha256" | "git-sha1") pairs.

        On an SSH target the hashing runs there (sha256sum, and sha1sum over git's blob header): only
        the digests come back, never the bytes.
        """
        files = list(files)
        if not self.is_ssh:
            root = Path(self.join(sub))

            def one(item: tuple[str, str]) -> tuple[str, str | None]:
                try:
                    return item[0], hash_file(root / item[0], item[1])
                except (FileNotFoundError, NotADirectoryError):
                    return item[0], None

            # hashlib releases the GIL: two threads keep both cores busy on a large slice
            with ThreadPoolExecutor(max(1, workers)) as pool:
                return dict(pool.map(one, files))
        result: dict[str, str | None] = {p: None for p, _ in files}
        sha256 = [p for p, a in files if a == "sha256"]
        sha1 = [p for p, a in files if a == "git-sha1"]
        if sha256:
            out = self.sh('cd "$1" && xargs -0 sha256sum -- 2>/dev/null; :', self.join(sub),
                          input=b"\0".join(p.encode() for p in sha256), what="hashing files (sha256sum)")
            result.update(_parse_sums(out))
        if sha1:
            out = self.sh(
                'cd "$1" || exit 1; while IFS= read -r f; do s=$(stat -c %s -- "$f" 2>/dev/null) || continue; '
                'h=$({ printf "blob %s\\000" "$s"; cat -- "$f"; } | sha1sum); echo "${h%% *}  $f"; done',
                self.join(sub), input="\n".join(sha1).encode() + b"\n", what="hashing files (git blob sha1)")
            result.update(_parse_sums(out))
        return result


def _parse_sums(out: bytes) -> dict[str, str]:
    sums: dict[str, str] = {}
    for line in out.decode(errors="surrogateescape").splitlines():
        digest, _, path = line.partition("  ")
        if path:
            sums[path.lstrip("*")] = digest.lstrip("\\")
    return sums


def ensure_tools(*tools: str) -> None:
    """Fail with the apt-get line when a tool the backup runs here is missing."""
    import shutil

    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        packages = sorted({_PACKAGES.get(t, t) for t in missing})
        raise BackupError(f"{', '.join(missing)} not found on PATH (host {os.uname().nodename}). "
                          f"Fix: apt-get install {' '.join(packages)}.")


_PACKAGES = {"ssh": "openssh-client", "setpriv": "util-linux"}
