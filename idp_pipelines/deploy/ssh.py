"""Reaching a lab host over SSH with the inventory's user, key and pinned known_hosts (OpenSSH's client).

Strict by construction: `BatchMode` (never a prompt), `StrictHostKeyChecking=yes` against the inventory's
known_hosts file, so a changed host key is an error naming the host and the fix, not a question.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from idp_pipelines.lab import Lab

from . import DeployError


class SshError(DeployError):
    """A host could not be reached, or refused, over SSH."""


@dataclass(frozen=True)
class SshConn:
    host: str                      # the address ssh connects to
    name: str                      # the inventory's host name (for errors)
    user: str | None = None
    port: int = 22
    identity_file: str | None = None
    known_hosts: str | None = None
    sudo: bool = False
    docker_socket: str = "/var/run/docker.sock"

    def argv(self, *extra: str) -> list[str]:
        out = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=15",
               "-o", "ServerAliveInterval=15", "-p", str(self.port)]
        if self.known_hosts:
            out += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null"]
        if self.identity_file:
            out += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        if self.user:
            out += ["-l", self.user]
        return out + list(extra)

    def wrap(self, command: str) -> str:
        """A remote shell command, through `sudo -n` where the inventory says the user needs it."""
        return f"sudo -n sh -c {shlex.quote(command)}" if self.sudo else command

    def run(self, command: str, *, stdin: bytes | None = None, timeout_s: float = 120, check: bool = True,
            sudo: bool = True) -> subprocess.CompletedProcess:
        cmd = self.wrap(command) if sudo else command
        try:
            proc = subprocess.run(self.argv("--", self.host, cmd), input=stdin, capture_output=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise SshError(f"{self.where}: no answer within {timeout_s:.0f} s. Fix: check the host is up.") from None
        if proc.returncode == 255:
            raise self._connect_error(proc.stderr.decode("utf-8", "replace"))
        if check and proc.returncode != 0:
            raise SshError(f"{self.where}: `{command[:200]}` failed with exit code {proc.returncode}: "
                           f"{proc.stderr.decode('utf-8', 'replace').strip()[-1500:]}")
        return proc

    @property
    def where(self) -> str:
        return f"host {self.name!r} over SSH ({self.user + '@' if self.user else ''}{self.host}:{self.port})"

    def _connect_error(self, stderr: str) -> SshError:
        kh = self.known_hosts or "~/.ssh/known_hosts"
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr or "Host key for" in stderr and "has changed" in stderr:
            return SshError(f"{self.where}: the host key CHANGED from the one in {kh}. Nothing was changed on the "
                            f"host. Fix: if the host was really reinstalled, check its new key out of band and "
                            f"replace its line in {kh} (hosts[].ssh.known_hosts); otherwise do not connect.")
        if "Host key verification failed" in stderr or "No ED25519 host key is known" in stderr \
                or "host key is known" in stderr:
            return SshError(f"{self.where}: its host key is not in {kh}: no trust on first use. Fix: add the "
                            f"host's key (ssh-keyscan, checked out of band) to {kh}.")
        if "Permission denied" in stderr:
            return SshError(f"{self.where}: the key was refused ({stderr.strip()[-300:]}). Fix: install the "
                            f"public key of {self.identity_file or 'your default key'} in the user's "
                            f"authorized_keys, or set hosts[].ssh.user/identity_file.")
        return SshError(f"{self.where}: cannot connect: {stderr.strip()[-800:]}")

    @contextlib.contextmanager
    def docker_socket_forward(self, timeout_s: float = 30) -> Iterator[str]:
        """A local unix socket forwarded to the host's Docker socket for the SDK (`unix://...`).

        Why not the SDK's own `ssh://`: its paramiko mode needs paramiko (not installed here), and
        `use_ssh_client=True` runs a bare `ssh host docker system dial-stdio` that cannot be given the
        inventory's key and known_hosts file, so a changed host key would depend on ~/.ssh/config.
        """
        with tempfile.TemporaryDirectory(prefix="idp-dk-") as d:
            local = Path(d) / "docker.sock"
            proc = subprocess.Popen(self.argv("-N", "-o", "ExitOnForwardFailure=yes", "-o", "StreamLocalBindUnlink=yes",
                                              "-L", f"{local}:{self.docker_socket}", "--", self.host),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                deadline = time.monotonic() + timeout_s
                while not local.exists():
                    if proc.poll() is not None:
                        raise self._connect_error(proc.stderr.read().decode("utf-8", "replace"))
                    if time.monotonic() > deadline:
                        raise SshError(f"{self.where}: the Docker socket forward did not open in {timeout_s:.0f} s.")
                    time.sleep(0.05)
                yield f"unix://{local}"
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def ssh_for(lab: Lab, host_name: str) -> SshConn | None:
    """How to reach the host over SSH, or None when its files and engine are on this machine."""
    host = lab.host(host_name)
    docker_host = host.docker_host or ""
    if host.ssh is None and not docker_host.startswith("ssh://"):
        return None
    user, address, port = None, host.address, None
    if docker_host.startswith("ssh://"):
        rest = docker_host.removeprefix("ssh://").rstrip("/")
        if "@" in rest:
            user, rest = rest.split("@", 1)
        address, _, p = rest.partition(":")
        port = int(p) if p else None
    ssh = host.ssh
    known_hosts = str(ssh.known_hosts) if ssh and ssh.known_hosts else None
    if ssh and ssh.host_key:
        if known_hosts:
            raise SshError(f"hosts[{host.name}].ssh: both known_hosts and host_key are set. Fix: keep one.")
        known_hosts = str(_pinned(host.name, address, port or ssh.port, ssh.host_key))
    return SshConn(host=address, name=host.name, user=(ssh.user if ssh and ssh.user else user),
                   port=(ssh.port if ssh and (ssh.port != 22 or port is None) else port or 22),
                   identity_file=str(ssh.identity_file) if ssh and ssh.identity_file else None,
                   known_hosts=known_hosts,
                   sudo=bool(ssh and ssh.sudo),
                   docker_socket=ssh.docker_socket if ssh else "/var/run/docker.sock")


def _pinned(name: str, address: str, port: int, key: str) -> Path:
    """A known_hosts file holding only the inventory's host key (rewritten when the inventory changes it)."""
    from idp_pipelines import settings
    from idp_pipelines.files import atomic_write

    path = settings.deploy_dir() / ".ssh" / f"known_hosts-{name}"
    line = f"{address if port == 22 else f'[{address}]:{port}'} {key}\n"
    if not path.exists() or path.read_text() != line:
        atomic_write(path, line, mode=0o600)
    return path
