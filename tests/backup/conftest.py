"""A model cache made the way the lab makes one (the local Hub server through huggingface_hub), plus GGUF
outputs with their hashes in a real DuckDB warehouse, a large sparse file and random blobs; a real exFAT
volume as a target that keeps no links."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pytest

from idp_pipelines.backup import Target
from idp_pipelines.hub import download_model
from idp_pipelines.warehouse import Warehouse, insert_rows
from tests.support_sshd import Sshd, sshd_server

REPO = "lab/tiny-model"
SPARSE_BYTES = 64 * 1024 * 1024  # apparent size; a few blocks on disk


@dataclass
class Cache:
    path: Path
    sha: str
    warehouse: Warehouse
    gguf: dict[str, str]  # path relative to the cache -> sha256
    blob_lfs: str  # relative path of the LFS weights blob (named by sha256)
    blob_git: str  # relative path of config.json's blob (named by its git sha1)
    snapshot_link: str  # relative path of the weights' symlink in snapshots/


def make_cache(hub, root: Path, *, weights: int = 300_000, seed: int = 1, sparse_bytes: int = SPARSE_BYTES) -> Cache:
    files = {
        "config.json": b'{"hidden_size": 8}\n',
        "model.safetensors": random.Random(seed).randbytes(weights),
        "tokenizer.json": b'{"vocab": ["<s>", "</s>"]}\n',
    }
    sha = hub.create_repo(REPO, files, lfs={"model.safetensors"})
    cache = root / "models"
    result = download_model(REPO, sha, cache_dir=cache, endpoint=hub.url)
    by = {f.path: f for f in result.files}
    weights_blob = by["model.safetensors"].local_path.resolve().relative_to(cache).as_posix()
    config_blob = by["config.json"].local_path.resolve().relative_to(cache).as_posix()
    link = by["model.safetensors"].local_path.relative_to(cache).as_posix()
    if not (cache / "CACHEDIR.TAG").exists():
        (cache / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    # GGUF outputs as the quantizer leaves them: a file, its sidecar, and a work file in progress
    out = cache / "gguf" / "tiny" / sha[:12]
    out.mkdir(parents=True)
    q8 = out / "tiny.Q8_0.gguf"
    q8.write_bytes(b"GGUF" + random.Random(seed + 1).randbytes(200_000))
    sparse = out / "tiny.F16.gguf"
    with sparse.open("wb") as f:  # large and sparse: rsync must copy it whole and right
        f.write(b"GGUF")
        f.seek(sparse_bytes - 4)
        f.write(b"tail")
    (out / "tiny.Q8_0.gguf.json").write_text('{"quant_type": "Q8_0"}')
    (out / ".tiny.Q4_K_M.gguf.12345.tmp").write_bytes(b"half a quantization")
    (cache / ".locks" / "models--lab--tiny-model").mkdir(parents=True, exist_ok=True)
    (cache / ".locks" / "models--lab--tiny-model" / "x.lock").write_text("")
    gguf = {}
    wh = Warehouse(root / "warehouse.duckdb")
    rows = []
    for p in (q8, sparse):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        rel = p.relative_to(cache).as_posix()
        gguf[rel] = digest
        rows.append({"quantized_at": datetime.now(timezone.utc), "dagster_run_id": None, "model": "tiny",
                     "commit_sha": sha, "source_file": "tiny.f32.gguf", "source_sha256": "0" * 64,
                     "source_dtype": "F32", "quant_type": p.name.split(".")[1], "output_path": str(p),
                     "output_sha256": digest, "output_bytes": p.stat().st_size, "size_ratio": 1.0,
                     "seconds": 0.1, "fallbacks": 0, "params": None, "reused": False})
    with wh.write() as con:
        insert_rows(con, "quantizations", rows)
    return Cache(cache, sha, wh, gguf, weights_blob, config_blob, link)


@pytest.fixture
def cache(hub, tmp_path) -> Cache:
    return make_cache(hub, tmp_path)


@pytest.fixture
def target(tmp_path) -> Target:
    return Target(str(tmp_path / "nas" / "backup"))


# make_snapshot in a process of its own: argv cache, target folder, lock file [, bandwidth limit in KiB/s]; a
# BackupError is printed, exit 3
SNAPSHOT_SCRIPT = """
import sys
from pathlib import Path
from idp_pipelines.backup import BackupError, Target
from idp_pipelines.backup.snapshot import make_snapshot
try:
    make_snapshot(Path(sys.argv[1]), Target(sys.argv[2], bwlimit_kib_s=int(sys.argv[4]) if sys.argv[4:] else None),
                  lock_path=Path(sys.argv[3]))
except BackupError as exc:
    print(exc)
    sys.exit(3)
"""


def tree(root: Path) -> dict[str, tuple]:
    """Every path under root: ("l", link target) for symlinks, ("f", bytes sha256, mode, mtime_ns) for files."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_file():
                st = p.stat()
                out[rel] = ("f", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode & 0o7777, st.st_mtime_ns)
    return out


class SshTarget:
    """The tests' own sshd (tests/support_sshd.py) seen as a backup target."""

    def __init__(self, server: Sshd) -> None:
        self.server, self.port, self.key, self.known_hosts, self.log = (
            server, server.port, server.key, server.known_hosts, server.log)

    def target(self, path: Path) -> Target:
        return Target(str(path), host="127.0.0.1", user="root", port=self.port, identity_file=str(self.key),
                      known_hosts=str(self.known_hosts))


@pytest.fixture
def sshd(tmp_path):
    """Debian's openssh-server on 127.0.0.1 (a free port), its own config, a throwaway host key and client key."""
    with sshd_server(tmp_path / "sshd") as server:
        yield SshTarget(server)


def _run(argv: list[str], what: str) -> str:
    """Run a setup command of the exFAT volume; a clear failure (never a skip) when it cannot."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.fail(f"{what}: {argv[0]} not found. Fix: apt-get install exfat-fuse exfatprogs "
                    "(make install does: APT_PACKAGES).")
    if proc.returncode != 0:
        pytest.fail(f"{what}: {' '.join(argv)} failed (exit {proc.returncode}): "
                    f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def exfat(tmp_path) -> Iterator[Path]:
    """A 32 MB exFAT volume (mkfs.exfat, mounted by exfat-fuse): a USB disk or an SD card as the backup
    target, which keeps neither hard links nor symlinks. Unmounted, its FUSE process gone, at teardown."""
    image, mnt = tmp_path / "exfat.img", tmp_path / "exfat"
    mnt.mkdir()
    with image.open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    _run(["mkfs.exfat", str(image)], "formatting the exFAT image")
    # as root exfat-fuse mounts with `blkdev`: a plain file is refused ("Block device required")
    dev = _run(["losetup", "--find", "--show", str(image)], "attaching the exFAT image to a loop device").strip()
    try:
        _run(["mount.exfat-fuse", dev, str(mnt)], f"mounting {dev} on {mnt}")
        daemons = [p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [])[-2:] == [dev, str(mnt)]]
        try:
            assert os.path.ismount(mnt) and daemons, f"mount.exfat-fuse exited 0 but {mnt} is not its mount"
            yield mnt
        finally:
            unmount(mnt)
            deadline = time.monotonic() + 30  # it exits at once; a zombie is gone (init reaps it later)
            while (alive := [p for p in daemons if running(p)]) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not alive, f"exfat-fuse {[p.pid for p in alive]} still running after umount {mnt}"
    finally:
        subprocess.run(["losetup", "--detach", dev])


def unmount(mnt: Path) -> None:
    """umount `mnt`; a busy mount is detached lazily (nothing left mounted), then the test fails."""
    proc = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        subprocess.run(["umount", "--lazy", str(mnt)])
        pytest.fail(f"umount {mnt} failed (exit {proc.returncode}): {proc.stderr.strip()}")


@contextlib.contextmanager
def mounted(image: Path, mnt: Path, options: str = "loop") -> Iterator[Path]:
    """`image` mounted on `mnt` for the block; the loop device goes with the mount (autoclear)."""
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", options, str(image), str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        unmount(mnt)


@contextlib.contextmanager
def ext4_volume(tmp_path: Path, name: str, *mkfs_args: str) -> Iterator[tuple[Path, Path]]:
    """A fresh 192 MB ext4 volume on a loop device, mounted: (its image, its mount point). 192 MB: the cache's
    sparse 64 MB file counts whole in the free-space check."""
    image = tmp_path / f"{name}.img"
    with image.open("wb") as f:
        f.truncate(192 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", *mkfs_args, str(image)], check=True, capture_output=True)
    with mounted(image, tmp_path / name) as mnt:
        yield image, mnt


def power_cut(image: Path, name: str) -> Path:
    """What the volume of `image` holds if the power goes now: the image, copied while mounted, is what the
    filesystem has written to its device so far (not what only its page cache holds)."""
    cut = image.with_name(f"{name}.img")
    subprocess.run(["cp", "--sparse=always", str(image), str(cut)], check=True)
    return cut


@contextlib.contextmanager
def after_reboot(cut: Path) -> Iterator[Path]:
    """The volume `power_cut` left, as the next boot finds it: e2fsck replays its journal; mounted read-only."""
    fsck = subprocess.run(["e2fsck", "-fy", str(cut)], capture_output=True, text=True)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr  # 1: errors corrected (the journal replayed)
    with mounted(cut, cut.with_suffix(""), "loop,ro") as mnt:
        yield mnt
