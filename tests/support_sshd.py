"""Debian's openssh-server on 127.0.0.1 for tests: its own config, a throwaway host key and client key.

Shared by the backup and deploy tests (`sshd_server(folder)`, a context manager; stopped at the end, also
when the test fails). The known_hosts file pins the throwaway host key: no trust on first use.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Sshd:
    port: int
    key: Path  # the client's private key
    known_hosts: Path
    log: Path
    host_key: Path

    def ssh_argv(self) -> list[str]:
        return ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o",
                f"UserKnownHostsFile={self.known_hosts}", "-i", str(self.key), "-p", str(self.port), "root@127.0.0.1"]


@contextlib.contextmanager
def sshd_server(d: Path, timeout_s: float = 30.0) -> Iterator[Sshd]:
    from idp_pipelines.processes import free_port, stop_process_group

    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    assert Path(binary).exists(), "sshd not found. Fix: apt-get install openssh-server (make install does: APT_PACKAGES)"
    d.mkdir(parents=True, exist_ok=True)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile none\nSubsystem sftp internal-sftp\n"
        "AllowStreamLocalForwarding yes\n")
    host_pub = (d / "host.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation folder
    log = d / "sshd.log"
    proc = subprocess.Popen([binary, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, f"sshd exited: {log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"sshd did not listen on {port}: {log.read_text()}"
                time.sleep(0.1)
        yield Sshd(port, d / "client", d / "known_hosts", log, d / "host")
    finally:
        stop_process_group(proc)
