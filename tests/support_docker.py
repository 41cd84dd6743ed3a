"""A private Docker engine for tests: Debian's dockerd with its own data root, exec root and socket in tmp.

`docker_engine(root)` starts it (`--storage-driver=vfs --iptables=false --bridge=none`: no kernel
overlay, no firewall rules, no docker0) and stops it on exit, also when the test fails. No registry is
reachable, so `busybox_image(client)` builds an image by `docker import` of a tarball holding Debian's
busybox-static: its httpd and wget applets stand in for a service and its healthcheck.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = "/bin/busybox"
BUSYBOX_IMAGE = "idp-test/busybox:1"
APPLETS = ("sh", "httpd", "wget", "sleep", "mkdir", "echo", "cat", "printf", "kill", "true", "false", "env")


@dataclass
class Engine:
    socket: Path
    log: Path
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self):
        import docker

        return docker.DockerClient(base_url=self.url, timeout=60)


def _fail(msg: str) -> None:
    raise AssertionError(msg)


@contextlib.contextmanager
def docker_engine(root: Path, timeout_s: float = 90.0) -> Iterator[Engine]:
    """Start dockerd under `root` (short paths: a unix socket path has a 108-byte limit) and stop it after."""
    from idp_pipelines.processes import stop_process_group

    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(dockerd).exists():
        _fail("dockerd not found. Fix: apt-get install docker.io (make install does: APT_PACKAGES).")
    if os.geteuid() != 0:
        _fail("dockerd needs root here (no rootless setup): run the deploy tests as root.")
    if not Path("/sys/fs/cgroup").is_dir() or not any(Path("/sys/fs/cgroup").iterdir()):
        _fail("no cgroup filesystem at /sys/fs/cgroup: dockerd cannot run containers on this machine.")
    root.mkdir(parents=True, exist_ok=True)
    data, execr, sock = root / "data", root / "exec", root / "docker.sock"
    if len(str(sock)) > 100:
        _fail(f"socket path {sock} is too long for a unix socket: give docker_engine a shorter root.")
    log = root / "dockerd.log"
    proc = subprocess.Popen(
        [dockerd, "--data-root", str(data), "--exec-root", str(execr), "-H", f"unix://{sock}",
         "--pidfile", str(root / "dockerd.pid"), "--storage-driver=vfs", "--iptables=false", "--ip6tables=false",
         "--bridge=none", "--containerd-namespace", f"idp{os.getpid()}", "--containerd-plugins-namespace",
         f"idp{os.getpid()}p"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import docker

        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                _fail(f"dockerd exited with {proc.returncode} before answering (needs root and cgroups): "
                      f"{log.read_text(errors='replace')[-3000:]}")
            if sock.exists():
                try:
                    docker.DockerClient(base_url=f"unix://{sock}", timeout=5).ping()
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    pass
            if time.monotonic() > deadline:
                _fail(f"dockerd did not answer on {sock} within {timeout_s:.0f} s: "
                      f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield Engine(sock, log, proc)
    finally:
        with contextlib.suppress(Exception):
            import docker

            client = docker.DockerClient(base_url=f"unix://{sock}", timeout=30)
            for c in client.containers.list(all=True):
                c.remove(force=True)
        stop_process_group(proc, timeout_s=30)
        _unmount_under(root)


def _unmount_under(root: Path) -> None:
    """dockerd leaves its network namespace bind-mounted under the exec root: unmount what is under `root`
    so the test's tmp folder can be removed."""
    prefix = str(root.resolve()) + "/"
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], check=False, capture_output=True)


def busybox_rootfs() -> bytes:
    """A tarball of a root filesystem: busybox-static and links for the applets the stand-ins use."""
    if not Path(BUSYBOX).exists():
        _fail(f"{BUSYBOX} not found. Fix: apt-get install busybox-static (make install does: APT_PACKAGES).")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "tmp", "www", "etc", "proc", "sys", "dev"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(BUSYBOX, arcname="bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    return buf.getvalue()


def busybox_image(client, tag: str = BUSYBOX_IMAGE) -> str:
    """`docker import` of the busybox rootfs (what `tar c . | docker import - TAG` does)."""
    repo, _, version = tag.partition(":")
    client.images.client.api.import_image_from_data(busybox_rootfs(), repository=repo, tag=version or "latest")
    return tag


def httpd_service(port: int, *, model: str = "tiny-llama", say: str = "ok", health_port: int | None = None,
                  image: str = BUSYBOX_IMAGE, interval: str = "1s") -> dict:
    """A compose service: busybox httpd on 127.0.0.1:`port` answering /health and /v1/models like an
    OpenAI-compatible engine (what inference_endpoints' probe asks); `health_port` other than `port`
    makes a healthcheck that never passes."""
    script = (f"mkdir -p /www/v1 && echo {say} > /www/health && "
              f"echo '{{\"data\": [{{\"id\": \"{model}\"}}]}}' > /www/v1/models && "
              f"exec httpd -f -p 127.0.0.1:{port} -h /www")
    return {
        "image": image,
        "entrypoint": ["/bin/sh", "-c"],
        "command": [script],
        "network_mode": "host",
        "healthcheck": {"test": ["CMD", "wget", "-q", "-O", "/dev/null",
                                 f"http://127.0.0.1:{health_port or port}/health"],
                        "interval": interval, "timeout": "2s", "retries": 2, "start_period": "1s"},
        "restart": "unless-stopped",
        "stop_grace_period": "1s",  # httpd as PID 1 ignores SIGTERM: do not wait the engine's 10 s
        "security_opt": ["no-new-privileges:true"],
    }
