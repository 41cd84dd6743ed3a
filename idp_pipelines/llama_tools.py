"""Where llama.cpp's own C++ tools are: llama-server and llama-quantize.

`scripts/build-llama-cpp.sh` (run by `make install`) builds them once per machine from the llama.cpp source
that llama-cpp-python vendors, into a cache outside the checkout keyed by version and CPU flags. This
module computes the same folder (or takes $IDP_LLAMA_CPP_BIN) and fails with the fix when a tool is
missing. Path arithmetic and one small read of /proc/cpuinfo, only when asked.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

from idp_pipelines.settings import REPO_ROOT

# The llama-cpp-python release whose vendored llama.cpp is built (the script's LLAMA_CPP_PY_VERSION).
LLAMA_CPP_PY_VERSION = "0.3.36"
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-llama-cpp.sh"


class LlamaToolsError(RuntimeError):
    """A llama.cpp tool is not built on this machine."""


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            line = next((ln for ln in f if ln.startswith("flags")), None)
    except OSError:
        line = None
    text = line if line is not None else platform.machine() + "\n"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def bin_dir() -> Path:
    """$IDP_LLAMA_CPP_BIN, or the build cache folder for this version and this CPU."""
    if explicit := os.environ.get("IDP_LLAMA_CPP_BIN"):
        return Path(explicit)
    root = os.environ.get("IDP_BUILD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "idp_pipelines")
    return Path(root) / f"llama.cpp-{LLAMA_CPP_PY_VERSION}-{platform.machine()}-{_cpu_key()}" / "bin"


def tool(name: str) -> Path:
    """The path of `llama-server` or `llama-quantize`; LlamaToolsError with the fix if absent."""
    path = bin_dir() / name
    if not os.access(path, os.X_OK):
        raise LlamaToolsError(
            f"{name} is not built on this machine (looked in {path.parent}). Fix: run `make install` "
            f"(it runs {BUILD_SCRIPT.relative_to(REPO_ROOT)}, about 10-30 min once per machine), or set "
            f"IDP_LLAMA_CPP_BIN to a folder holding llama.cpp's {name}."
        )
    return path
