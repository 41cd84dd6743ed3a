
from functools import lru_cache
from pathlib import Path

import dagster as dg

from idp_pipelines.lab import Lab, load_lab


@lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> Lab:
    return load_lab(path)


class LabResource(dg.ConfigurableResource):
    """The lab inventory (lab.yaml), parsed once per file version."""

    path: str

    def load(self) -> Lab:
        p = Path(self.path)
        try:
            mtime = p.stat().st_mtime_ns
        except OSError:
            return load_lab(p)  # raises the LabError that says the file is missing
        return _load(str(p), mtime)
