"""Plain-Python core for pinned, verified model downloads from the Hugging Face Hub (no Dagster here)."""

from .download import (
    DownloadedFile,
    DownloadPlan,
    DownloadResult,
    PlannedFile,
    cache_size,
    check_space,
    download_model,
    local_snapshot,
    plan_download,
    resolve_revision,
)
from .errors import HubError

__all__ = [
    "DownloadPlan",
    "DownloadResult",
    "DownloadedFile",
    "HubError",
    "PlannedFile",
    "cache_size",
    "check_space",
    "download_model",
    "local_snapshot",
    "plan_download",
    "resolve_revision",
]
