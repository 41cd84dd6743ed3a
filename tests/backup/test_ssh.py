"""An SSH target: Debian's sshd on 127.0.0.1, started by the test; snapshot, verification and restore over SSH."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from idp_pipelines.backup import BackupError, Target
from idp_pipelines.backup.records import gguf_hashes
from idp_pipelines.backup.restore import restore_drill
from idp_pipelines.backup.snapshot import make_snapshot, manifest_of
from idp_pipelines.backup.verify import cache_content, coverage, snapshot_files, verify_snapshot
from idp_pipelines.lab import load_lab
from tests.backup.conftest import REPO
from tests.support import write_lab


def test_snapshot_verification_and_drill_over_ssh(cache, sshd, tmp_path):
    far = tmp_path / "far-side" / "backup"
    lab_file = write_lab(tmp_path / "lab.yaml", extra={"backup": {
        "target": f"root@127.0.0.1:{far}", "ssh": {"port": sshd.port, "identity_file": str(sshd.key),
                                                  "known_hosts": str(sshd.known_hosts)}}})
    target = Target.from_inventory(load_lab(lab_file).backup)
    assert target.is_ssh and target.describe() == f"root@127.0.0.1:{far}"

    first = make_snapshot(cache.path, target, lock_path=tmp_path / "lock", now=datetime(2026, 11, 1, tzinfo=timezone.utc))
    assert first.bytes_sent == first.apparent_bytes and first.files_sent == first.files
    assert first.cp_copied == 0  # over SSH rsync sends every byte
    snap = far / first.name / "cache"
    assert (snap / cache.snapshot_link).is_symlink()  # written by rsync over SSH, link kept
    sparse = next(p for p in cache.gguf if p.endswith("F16.gguf"))  # 64 MB apparent, a few blocks of data
    assert (snap / sparse).read_bytes() == (cache.path / sparse).read_bytes()
    # rsync --sparse: holes stay holes over SSH too (the cache's file takes a few blocks of its 64 MB)
    assert (snap / sparse).stat().st_blocks <= (cache.path / sparse).stat().st_blocks + 64
    same = make_snapshot(cache.path, target, lock_path=tmp_path / "lock")
    assert same.unchanged and same.name == first.name  # nothing changed: no new snapshot
    (cache.path / "gguf" / "new.gguf").write_bytes(b"GGUF" + bytes(4000))
    second = make_snapshot(cache.path, target, lock_path=tmp_path / "lock", now=datetime(2026, 11, 2, tzinfo=timezone.utc))
    assert second.files_sent == 1 and second.own_bytes == 4004 and second.previous == first.name
    a, b = (far / n / "cache" / cache.blob_lfs for n in (first.name, second.name))
    assert a.stat().st_ino == b.stat().st_ino  # --link-dest over SSH: unchanged blobs are hard links
    assert coverage(cache_content(cache.path), snapshot_files(target, second.name)) == []

    with cache.warehouse.read() as con:
        ggufs = gguf_hashes(con, cache.path)
    good = verify_snapshot(target, second.name, manifest_of(target, second.name), gguf_sha256=ggufs,
                           models_by_repo={REPO: ["tiny"]}, cursor=None, period=1)
    assert good.findings == [] and good.hashed == 5  # sha256sum and git's blob sha1 computed on the far side

    snap = far / second.name / "cache"
    for rel in (cache.blob_lfs, cache.blob_git):
        p = snap / rel
        p.write_bytes(b"!" + p.read_bytes()[1:])
    bad = verify_snapshot(target, second.name, manifest_of(target, second.name), gguf_sha256=ggufs,
                          models_by_repo={REPO: ["tiny"]}, cursor=None, period=1)
    assert sorted((f["file"], f["problem"], f["expected"].split()[0]) for f in bad.findings) == sorted([
        (f"cache/{cache.blob_lfs}", "hash mismatch", "sha256"), (f"cache/{cache.blob_git}", "hash mismatch", "git-sha1")])

    drill = restore_drill(target, second.name, manifest_of(target, second.name), workdir=tmp_path)
    assert drill.repo_id == REPO and len(drill.problems) == 2  # the two damaged blobs came back damaged


def test_an_ssh_target_that_refuses_the_key_says_what_to_check(cache, sshd, tmp_path):
    target = Target(str(tmp_path / "x"), host="127.0.0.1", user="nobody-here", port=sshd.port,
                    identity_file=str(sshd.key), known_hosts=str(sshd.known_hosts))
    with pytest.raises(BackupError) as err:
        make_snapshot(cache.path, target, lock_path=tmp_path / "lock")
    msg = str(err.value)
    assert msg.startswith(f"checking hard links, symlinks and owners on nobody-here@127.0.0.1:{tmp_path / 'x'} failed (exit 255)")
    assert msg.endswith("Fix: check backup.target, backup.ssh (user, port, identity_file, known_hosts) and that the "
                        "host is up.")
    assert not (tmp_path / "x").exists()


def test_inventory_targets(tmp_path):
    def backup(value):
        path = write_lab(tmp_path / "lab.yaml", extra={"backup": value})
        return load_lab(path).backup

    remote = backup({"target": "nas:/volume1/b"})
    assert (remote.ssh_host, remote.ssh_user, remote.path) == ("nas", None, "/volume1/b")
    local = backup({"target": "relative/dir"})
    assert local.ssh_host is None and Path(local.path) == tmp_path / "relative" / "dir"  # beside lab.yaml
    with pytest.raises(Exception) as err:
        backup({"target": "nas:volume1/b"})
    assert "backup.target: target 'nas:volume1/b': the path on nas must be absolute" in str(err.value)
    with pytest.raises(Exception) as err:
        backup({"target": "/b", "method": "restic"})
    assert "backup.method: method 'restic' is not implemented: backups are rsync hard-link snapshots" in str(err.value)
    with pytest.raises(Exception) as err:
        backup({"target": "/b", "host": "nas"})
    assert "backup.host: unknown host 'nas'" in str(err.value)
