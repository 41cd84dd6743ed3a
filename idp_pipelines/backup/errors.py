class BackupError(RuntimeError):
    """A backup, verification or restore cannot go on; the message names the target, the file and the fix."""
