"""What the code location adds to `import dagster` when a code server loads it (goal: < 0.5 s)."""

from __future__ import annotations

import statistics
import subprocess
import sys

BASE = "import time; t=time.perf_counter(); import dagster; print(time.perf_counter()-t)"
# What a code server does after `import dagster`: import the module, read lab.yaml, build the Definitions.
FULL = ("import time; import dagster; t=time.perf_counter(); import idp_pipelines.definitions as d; "
        "from idp_pipelines.lab import load_lab; d.build_defs(load_lab()).resolve_asset_graph(); "
        "print(time.perf_counter()-t)")


def timed(code: str, n: int = 7) -> list[float]:
    return [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
            for _ in range(n)]


if __name__ == "__main__":
    timed(BASE, 1)  # warm the page cache
    base, full = timed(BASE), timed(FULL)
    extra = statistics.median(full)
    print(f"import dagster:                                median {statistics.median(base):.3f} s (min {min(base):.3f})")
    print(f"then import the code location and build defs: median {extra:.3f} s (min {min(full):.3f})")
    print(f"code location adds {extra:.3f} s  (goal < 0.5 s: {'met' if extra < 0.5 else 'NOT met'})")
