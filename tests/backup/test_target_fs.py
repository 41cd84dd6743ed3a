"""The backup target's link check on a real filesystem that keeps no links: an exFAT volume through exfat-fuse."""

from __future__ import annotations

import os

import pytest

from idp_pipelines.backup import BackupError, Target
from idp_pipelines.backup.snapshot import make_snapshot
from tests.backup.conftest import tree


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
