"""Which GGUF in a snapshot is the quantization source, where each output goes, and whether it is current.

Outputs live under ``<model cache>/gguf/<model>/<commit sha[:12]>/<stem>.<QUANT>.gguf`` with a JSON
sidecar recording the source sha256 and quant type: a rerun with the same source reuses the file, a new
Hub revision gets a new folder (the old one stays until the cache checks report it).
"""

from __future__ import annotations

import json
from pathlib import Path

from idp_pipelines.files import atomic_write

from idp_pipelines.quantize.gguf_quant import (
    SOURCE_DTYPES,
    QuantizeError,
    QuantResult,
    inspect_gguf,
    normalize_quant_type,
    quantize_gguf,
)


def find_source(snapshot: Path) -> Path:
    """The one F32/F16/BF16 GGUF in a snapshot (a repo of ready-made quants has none)."""
    sources, seen = [], []
    for path in sorted(snapshot.rglob("*.gguf")):
        summary = inspect_gguf(path)
        seen.append(f"{path.name} ({summary.dominant_type})")
        if set(summary.type_counts) <= set(SOURCE_DTYPES):
            sources.append(path)
    if len(sources) != 1:
        what = "no" if not sources else f"{len(sources)}"
        raise QuantizeError(
            f"{snapshot} holds {what} unquantized (F32/F16/BF16) GGUF file(s); found: {', '.join(seen) or 'no GGUF'}. "
            "Fix: set the model's allow_patterns to download exactly one F16/F32/BF16 GGUF, or drop its "
            "quantize targets and serve the downloaded quant as it is."
        )
    return sources[0]


def output_path(cache_dir: Path, model: str, sha: str, source: Path, quant_type: str) -> Path:
    return Path(cache_dir) / "gguf" / model / sha[:12] / f"{source.stem}.{normalize_quant_type(quant_type)}.gguf"


def _sidecar(dst: Path) -> Path:
    return dst.with_name(dst.name + ".json")


def ensure_quantized(src: Path, dst: Path, quant_type: str, src_sha256: str,
                     nthread: int | None = None, progress=None) -> tuple[QuantResult, bool]:
    """Quantize unless `dst` already holds this source at this type; returns (result, reused)."""
    side = _sidecar(dst)
    if dst.is_file() and side.is_file():
        try:
            recorded = json.loads(side.read_text())
            if (recorded.get("src_sha256") == src_sha256 and recorded.get("quant_type") == normalize_quant_type(quant_type)
                    and recorded.get("dst_bytes") == dst.stat().st_size):
                return QuantResult(**recorded), True
        except (ValueError, TypeError, OSError):
            pass  # unreadable sidecar: quantize again
    result = quantize_gguf(src, dst, quant_type, nthread=nthread, progress=progress)
    atomic_write(side, json.dumps(result.to_dict(), indent=2))
    return result, False
