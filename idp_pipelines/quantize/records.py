"""The quantize core's warehouse table (quantizations), written by column name."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from idp_pipelines.warehouse import insert_rows

if TYPE_CHECKING:
    import duckdb

    from .checks import Output


def record_quantizations(con: duckdb.DuckDBPyConnection, *, run_id: str | None, model: str, commit_sha: str,
                         source_file: str, source_sha256: str, outputs: list[tuple[Output, bool]],
                         at: datetime | None = None) -> None:
    """One row per output; `outputs` pairs each with whether an earlier identical output was reused."""
    when = at or datetime.now(timezone.utc)
    insert_rows(con, "quantizations", [
        {"quantized_at": when, "dagster_run_id": run_id, "model": model, "commit_sha": commit_sha,
         "source_file": source_file, "source_sha256": source_sha256, "source_dtype": o.result.src_dtype,
         "quant_type": o.result.quant_type, "output_path": o.result.dst, "output_sha256": o.result.dst_sha256,
         "output_bytes": o.result.dst_bytes, "size_ratio": o.result.size_ratio, "seconds": o.result.seconds,
         "fallbacks": len(o.summary.fallbacks), "params": json.dumps(o.result.params, default=str),
         "reused": reused}
        for o, reused in outputs
    ])
