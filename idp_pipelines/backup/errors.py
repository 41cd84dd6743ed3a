class BackupError(RuntimeError):
    """A backup, verification or restore cannot go on; the message names the target, the file and the fix."""


class FlushError(BackupError):
    """The target's disk failed a write, reported by a flush: what the snapshot wrote cannot be trusted."""
