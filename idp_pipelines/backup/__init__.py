"""Backups of the model cache and the lab's state: dated rsync hard-link snapshots on a target folder.

Plain Python, no Dagster. The target is a local path, a mounted share or `host:/path` over SSH; every
operation on it is a short POSIX shell script run there (`sh` locally, `ssh host sh` remotely), so both
kinds share one code path and an SSH target is hashed on the far side.
"""

from idp_pipelines.backup.errors import BackupError
from idp_pipelines.backup.target import Target

__all__ = ["BackupError", "Target"]
