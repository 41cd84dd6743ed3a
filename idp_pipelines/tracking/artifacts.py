"""The files logged with a benchmark run: its requests (parquet), two plots, its steps and its findings.

Every text leaves redacted: error texts can echo request headers, a findings report can quote a key.
"""

from __future__ import annotations

import json
from pathlib import Path

from idp_pipelines.secrets import REDACTED, Redactor
from idp_pipelines.tracking.specs import from_json, step_summaries

ARTIFACT_CURVE = "plots/latency_throughput.png"
ARTIFACT_TTFT = "plots/ttft_distribution.png"
ARTIFACT_REQUESTS = "requests/requests.parquet"
ARTIFACT_STEPS = "steps/steps.json"
ARTIFACT_FINDINGS = "findings/findings.md"


def redact_table(table, redactor: Redactor):
    """The Arrow table with every secret replaced in its string columns."""
    import pyarrow.compute as pc

    if not redactor.secrets:
        return table
    for i, f in enumerate(table.schema):
        if str(f.type) in ("string", "large_string"):
            col = table.column(i)
            for s in redactor.secrets:
                col = pc.replace_substring(col, pattern=s, replacement=REDACTED)
            table = table.set_column(i, f, col)
    return table


def benchmark_artifacts(requests, run: dict, steps: list[dict], findings: Path | None, folder: Path,
                        redactor: Redactor) -> dict[str, Path]:
    """Write the run's files into `folder`; returns artefact path -> local file."""
    import pyarrow.parquet as pq

    from idp_pipelines.tracking import plots

    table = redact_table(requests, redactor)
    out: dict[str, Path] = {}
    (folder / "requests").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / ARTIFACT_REQUESTS, compression="zstd")
    out[ARTIFACT_REQUESTS] = folder / ARTIFACT_REQUESTS

    title = redactor.text(f"{run['endpoint']} · {run.get('model') or ''} "
                          f"{run.get('quantization') or ''} · {str(run['started_at'])[:16]}")
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    (folder / ARTIFACT_CURVE).write_bytes(plots.latency_throughput_png(step_summaries(steps), title))
    out[ARTIFACT_CURVE] = folder / ARTIFACT_CURVE
    label = {s["step_index"]: (f"c={s['concurrency']}" if s.get("concurrency") is not None else s["step"])
             for s in steps}
    ttft: dict[str, list[float]] = {}
    if table.num_rows:
        idx = table.column("step_index").to_pylist()
        vals = table.column("ttft_ms").to_pylist()
        errs = table.column("error").to_pylist()
        for si, v, e in zip(idx, vals, errs):
            if v is not None and e is None:
                ttft.setdefault(label.get(si, str(si)), []).append(v)
    (folder / ARTIFACT_TTFT).write_bytes(plots.ttft_distribution_png(ttft, title))
    out[ARTIFACT_TTFT] = folder / ARTIFACT_TTFT

    (folder / "steps").mkdir(parents=True, exist_ok=True)
    steps_json = json.dumps([{k: from_json(v) if k in ("summary", "server_metrics") else v for k, v in s.items()}
                             for s in steps], default=str, indent=1, sort_keys=True)
    (folder / ARTIFACT_STEPS).write_text(redactor.text(steps_json))
    out[ARTIFACT_STEPS] = folder / ARTIFACT_STEPS
    if findings is not None:
        (folder / "findings").mkdir(parents=True, exist_ok=True)
        (folder / ARTIFACT_FINDINGS).write_text(redactor.text(findings.read_text(errors="replace")))
        out[ARTIFACT_FINDINGS] = folder / ARTIFACT_FINDINGS
    return out
