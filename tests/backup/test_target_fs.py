"""The backup target's check on real filesystems: an exFAT volume through exfat-fuse keeps no links; root
without CAP_CHOWN is refused owners as on a root-squashed NFS export."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from idp_pipelines.backup import BackupError, Target
from idp_pipelines.backup.snapshot import make_snapshot
from tests.backup.conftest import SNAPSHOT_SCRIPT, tree


def test_an_exfat_target_is_refused_before_copying_and_left_clean(cache, exfat, tmp_path):
    """A backup pointed at a USB disk (exFAT) says why it refuses and what to do, and writes nothing there."""
    nas = exfat / "nas"
    before = tree(cache.path)
    with pytest.raises(BackupError) as err:
        make_snapshot(cache.path, Target(str(nas)), lock_path=tmp_path / "backup.lock")
    assert str(err.value) == (
        f"The backup target {nas} cannot make a hard link: every snapshot there would be a full copy of the cache "
        "and the Hub cache's snapshot symlinks would be lost (SMB/CIFS and exFAT shares do this). Fix: point "
        "backup.target at a Linux filesystem (ext4, xfs, btrfs, ZFS), an NFS export, or host:/path over SSH on "
        "the NAS.")
    # nothing on the target: no snapshot, no .partial, no .idp-linkcheck.* left by the check itself
    assert os.listdir(exfat) == ["nas"] and os.listdir(nas) == []
    assert tree(cache.path) == before


def test_a_target_where_root_cannot_keep_owners_is_refused_before_copying(cache, tmp_path):
    """A backup running as root onto an NFS export with root_squash (the default) cannot give the copies their
    owner: rsync -a would copy the whole cache and then fail (exit 23), every night. Root without CAP_CHOWN
    meets the same refusal of chown; the target check says so before anything is copied."""
    owned = tmp_path / "alice-cache"
    subprocess.run(["cp", "-a", str(cache.path), str(owned)], check=True)
    subprocess.run(["chown", "-R", "-h", "1234:1234", str(owned)], check=True)  # the lab user's cache
    nas = tmp_path / "nas"
    proc = subprocess.run(["setpriv", "--bounding-set=-chown", sys.executable, "-c", SNAPSHOT_SCRIPT, str(owned),
                           str(nas), str(tmp_path / "backup.lock")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.strip() == (
        f"The backup target {nas} does not let root give a file its owner (chown 1234:1234 failed there): rsync -a "
        "would copy the whole cache and then fail (exit 23), on every run. An NFS export with root_squash (the "
        "default) maps root to nobody and does this. Nothing was copied. Fix: export the share with "
        "no_root_squash (Synology: Squash 'No mapping'; TrueNAS: Maproot User root), run the backup as the user "
        "who owns the cache, or point backup.target at host:/path over SSH on the NAS.")
    assert os.listdir(nas) == []  # no snapshot, no .partial, no probe left
    # the same cache as root with CAP_CHOWN: the check passes and the snapshot keeps the owner
    result = make_snapshot(owned, Target(str(nas)), lock_path=tmp_path / "backup.lock")
    blob = nas / result.name / "cache" / cache.blob_lfs
    assert (blob.stat().st_uid, blob.stat().st_gid) == (1234, 1234)
