"""One benchmark run of one inventory endpoint: the sweep, its provenance, and its rows in DuckDB.

Shared by the `benchmark_runs` asset and `idp bench`. Each step is written to the warehouse as soon
as it ends, so a crash, a timeout or Ctrl-C keeps every step already measured (the run row then says
'failed' or stays 'running' with its error).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from idp_pipelines.bench.client import BenchClient, BenchError, EndpointConfig, Workload
from idp_pipelines.bench.load import StepResult, fixed_concurrency, run_step
from idp_pipelines.bench.metrics import decode_ceiling_tok_s
from idp_pipelines.bench.server_metrics import scrape_metrics
from idp_pipelines.lab import Endpoint, Lab
from idp_pipelines.settings import REPO_ROOT
from idp_pipelines.warehouse import Warehouse

HARNESS_VERSION = "1"

PROMPT_SETS: dict[str, tuple[str, ...]] = {
    # The seed's prompt first, so its numbers are comparable with the hand-run plan.
    "default": (
        "Explain quantum computing in simple terms.",
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "List the main differences between TCP and UDP and when to use each.",
        "Summarise the causes of the French Revolution in a few paragraphs.",
    ),
    "short": ("Hello!", "What is 2 + 2?", "Name three colours."),
    "long": (
        "You are reviewing a design document for a home AI lab with a GPU desktop, a CPU inference "
        "server, an edge node and a gateway. " * 8 + "List the five biggest risks and how to test each.",
    ),
}

# DCGM exporter gauges (per GPU): utilisation in %, framebuffer used in MiB.
DCGM_UTIL = "DCGM_FI_DEV_GPU_UTIL"
DCGM_FB_USED = "DCGM_FI_DEV_FB_USED"

STEP_COLUMNS = (
    "step_index", "step", "mode", "concurrency", "rate_rps", "started_at", "duration_s", "n_requests", "n_ok",
    "n_errors", "error_rate", "requests_per_s", "output_tokens", "output_tokens_per_s",
    "output_tok_s_per_request", "goodput_requests_per_s", "goodput_fraction", "server_reported_tokens_fraction",
    "length_honoured_fraction", "prefix_cache_hit_rate", "ttft_ms_n", "ttft_ms_p50", "ttft_ms_p50_lo",
    "ttft_ms_p50_hi", "ttft_ms_p95", "ttft_ms_p95_lo", "ttft_ms_p95_hi", "ttft_ms_p99", "tpot_ms_mean",
    "tpot_ms_p50", "tpot_ms_p50_lo", "tpot_ms_p50_hi", "tpot_ms_p95", "itl_ms_p50", "itl_ms_p99", "e2e_ms_p50",
    "e2e_ms_p95", "queue_ms_p50", "queue_ms_p95", "client_cpu_us_per_chunk", "gpu_utilization_pct",
    "gpu_memory_used_gb", "roofline_fraction", "suspect", "server_metrics", "summary",
)
REQUEST_COLUMNS = (
    "request_id", "t_intended", "t_sent", "t_first_byte", "t_first_token", "t_last_token", "t_end", "ttft_ms",
    "tpot_ms", "e2e_ms", "queue_ms", "ttft_from_intended_ms", "e2e_from_intended_ms", "max_tokens",
    "prompt_tokens", "completion_tokens", "cached_prompt_tokens", "content_chunks", "token_source",
    "server_reported_tokens", "finish_reason", "http_status", "error_kind", "error", "chunk_times", "chunk_tokens",
)


@dataclass
class RunOutcome:
    run_id: str
    endpoint: str
    status: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    decode_ceiling_tok_s: float | None = None

    def headline(self) -> dict[str, Any]:
        """Throughput at the highest concurrency and latency at the lowest: the trend numbers."""
        if not self.steps:
            return {}
        lo = min(self.steps, key=lambda s: s.get("concurrency") or 0)
        hi = max(self.steps, key=lambda s: s.get("concurrency") or 0)
        return {"ttft_ms_p50": lo.get("ttft_ms_p50"), "ttft_ms_p95": lo.get("ttft_ms_p95"),
                "tpot_ms_p50": lo.get("tpot_ms_p50"), "output_tok_s_per_request": lo.get("output_tok_s_per_request"),
                "output_tokens_per_s": hi.get("output_tokens_per_s"), "max_concurrency": hi.get("concurrency"),
                "error_rate": max((s.get("error_rate") or 0) for s in self.steps)}


def provenance(lab: Lab) -> dict[str, Any]:
    """The project's git sha and the head of every watched lab repo branch, at the time of the run.

    Uses the knowledge domain's git reader (one `for-each-ref` per repo); a repo that cannot be read
    records None rather than failing the benchmark.
    """
    from idp_pipelines.gitcli import GitError, git, resolve_refs

    def heads(repo: os.PathLike | str, branches: list[str]) -> dict[str, str | None]:
        try:
            return resolve_refs(repo, branches)
        except GitError:
            return dict.fromkeys(branches)

    try:
        project = git(REPO_ROOT, "rev-parse", "--verify", "--quiet", "HEAD^{commit}", ok=(0, 1),
                      timeout=10).decode().strip() or None
    except GitError:
        project = None
    return {"project_git_sha": project,
            "lab_git_shas": {f"{r.name}:{b}": sha for r in lab.git_repos
                             for b, sha in heads(r.path, r.branches).items()}}


def bandwidth_for(lab: Lab, ep: Endpoint) -> float | None:
    """The memory bandwidth that bounds this engine's decode: the CPU's for llama.cpp without GPU layers."""
    host = lab.host(ep.host)
    on_cpu = ep.kind == "llamacpp" and not int(ep.settings.get("n_gpu_layers", 0) or 0)
    unit = host.cpu if on_cpu else host.gpu
    return unit.memory_bandwidth_gb_s if unit else None


def model_provenance(wh: Warehouse, lab: Lab, ep: Endpoint) -> dict[str, Any]:
    if not ep.model:
        return {}
    model = lab.model(ep.model)
    out: dict[str, Any] = {"model_repo_id": model.repo_id, "model_revision": model.revision,
                           "quantization": ep.settings.get("quantization") or model.serving_quantization
                           or ("gguf" if model.format == "gguf" else None)}
    with wh.read() as con:
        row = con.execute("SELECT commit_sha, bytes FROM model_downloads WHERE model = ? "
                          "ORDER BY downloaded_at DESC LIMIT 1", [model.name]).fetchone()
    if row:
        out["model_commit_sha"], out["model_bytes"] = row
    return out


async def _dcgm(client: BenchClient, url: str | None) -> dict[str, float]:
    """The host's DCGM exporter after a step (GPU utilisation and memory); empty when there is none."""
    if not url:
        return {}
    try:
        return (await scrape_metrics(client.http, url)).samples
    except Exception:  # noqa: BLE001 - a missing exporter costs the GPU columns, not the run
        return {}


def _gauge_sum(gauges: dict[str, float], name: str) -> float | None:
    vals = [v for k, v in gauges.items() if k == name or k.startswith(name + "{")]
    return sum(vals) if vals else None


def _gauge_mean(gauges: dict[str, float], name: str) -> float | None:
    vals = [v for k, v in gauges.items() if k == name or k.startswith(name + "{")]
    return sum(vals) / len(vals) if vals else None


def step_row(index: int, result: StepResult, slos: dict[str, float], ceiling: float | None,
             dcgm_after: dict[str, float]) -> dict[str, Any]:
    summary = result.summary(slos)
    tpot = summary.get("tpot_ms_mean")
    row = {c: summary.get(c) for c in STEP_COLUMNS if c in summary}
    row.update(step_index=index, step=result.name, started_at=summary["started_at"],
               output_tok_s_per_request=(1000.0 / tpot) if tpot else None)
    util = _gauge_mean(dcgm_after, DCGM_UTIL)
    fb_mib = _gauge_sum(dcgm_after, DCGM_FB_USED)
    row["gpu_utilization_pct"] = util
    row["gpu_memory_used_gb"] = fb_mib / 1024 if fb_mib is not None else None
    per_req = row["output_tok_s_per_request"]
    row["roofline_fraction"] = per_req / ceiling if (ceiling and per_req) else None
    row["suspect"] = (f"decode {per_req:.1f} tok/s per request is above the memory-bandwidth ceiling "
                      f"{ceiling:.1f} tok/s" if row["roofline_fraction"] and row["roofline_fraction"] > 1.0 else None)
    sm = result.server_metrics
    row["server_metrics"] = json.dumps({"counters": sm.counters, "gauges": sm.gauges, "error": sm.error}
                                       if sm else None, default=str)
    row["summary"] = json.dumps(summary, default=str)
    return row


def _insert(con, table: str, run_id: str, index: int | None, rows: list[dict], columns: tuple[str, ...]) -> None:
    if not rows:
        return
    lead = ["run_id"] + (["step_index"] if index is not None else [])
    cols = lead + list(columns)
    sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    con.executemany(sql, [[run_id] + ([index] if index is not None else []) + [r.get(c) for c in columns]
                          for r in rows])


HOST_SLOT_WAIT_S = 4 * 3600.0  # a slow endpoint's sweep can take an hour; four is a stuck measurement


def host_slot(host: str, *, holder: str, log: Callable[[str], None] | None = None,
              timeout_s: float | None = None) -> contextlib.AbstractContextManager[None]:
    """The host's measurement slot, across processes: a sweep started by hand (`idp bench`) and a nightly
    Dagster run on the same host would distort each other, and Dagster's pool does not see the CLI."""
    from idp_pipelines.locks import file_lock
    from idp_pipelines.settings import idp_home

    return file_lock(idp_home() / "locks" / f"measure-{host}.lock", timeout_s=timeout_s or HOST_SLOT_WAIT_S,
                     what=f"the measurement slot of host {host!r}", on_wait=log, holder=holder, error=BenchError,
                     fix="let that measurement finish, or stop it if it is stuck.")


def run_endpoint(lab: Lab, endpoint: str, wh: Warehouse, *, trigger: str, dagster_run_id: str | None = None,
                 concurrency: list[int] | None = None, requests_per_step: int | None = None,
                 max_tokens: int | None = None, progress: Callable[[str, int, int], None] | None = None,
                 log: Callable[[str], None] = lambda m: None) -> RunOutcome:
    """Sweep one endpoint and store the run, its steps and every request; never loses a finished step.

    Waits for the host's measurement slot first: the run starts when the host is quiet.
    """
    ep = lab.endpoint(endpoint)
    if not ep.openai_compatible:
        raise BenchError(
            f"endpoint {ep.name!r} is of kind {ep.kind!r}, whose HTTP API is not OpenAI-compatible. Fix: add its "
            f"OpenAI-compatible frontend as an endpoint of kind 'openai' (Triton: the openai frontend) and "
            f"benchmark that."
        )
    holder = f"a benchmark of {ep.name} ({trigger}" + (f", Dagster run {dagster_run_id})" if dagster_run_id else ")")
    with host_slot(ep.host, holder=holder, log=log):
        return _run_endpoint(lab, ep, wh, trigger=trigger, dagster_run_id=dagster_run_id, concurrency=concurrency,
                             requests_per_step=requests_per_step, max_tokens=max_tokens, progress=progress, log=log)


def _run_endpoint(lab: Lab, ep: Endpoint, wh: Warehouse, *, trigger: str, dagster_run_id: str | None,
                  concurrency: list[int] | None, requests_per_step: int | None, max_tokens: int | None,
                  progress: Callable[[str, int, int], None] | None, log: Callable[[str], None]) -> RunOutcome:
    cfg = lab.benchmarks
    concurrencies = concurrency or ep.concurrency or cfg.concurrency
    n = requests_per_step or cfg.requests_per_step
    tokens = max_tokens or cfg.max_tokens
    api_key = os.environ.get(ep.api_key_env) if ep.api_key_env else None
    engine = {"vllm": "vllm", "llamacpp": "llamacpp"}.get(ep.kind, "openai")
    endpoint_cfg = EndpointConfig(
        base_url=ep.base_url, model=ep.served_model_name or ep.model or "", api=cfg.api, engine=engine,
        api_key=api_key, request_timeout_s=cfg.request_timeout_s,
        metrics_url=(ep.base_url + ep.metrics_path) if ep.metrics_path else None,
    )
    length_forced = cfg.ignore_eos and engine != "openai"
    workload = Workload(prompts=PROMPT_SETS[cfg.prompt_set], max_tokens=tokens, ignore_eos=length_forced,
                        min_tokens=tokens if length_forced and engine in ("vllm", "llamacpp") else None,
                        cache_bust=cfg.cache_bust)
    steps = [fixed_concurrency(c, max(n, c), max_duration_s=cfg.max_step_duration_s,
                               warmup_requests=cfg.warmup_requests if i == 0 else 0)
             for i, c in enumerate(concurrencies)]
    slos = {f"{k}_max": v for k, v in ep.slo.model_dump().items() if v is not None}
    model_info = model_provenance(wh, lab, ep)
    bandwidth = bandwidth_for(lab, ep)
    ceiling = (decode_ceiling_tok_s(bandwidth, model_info["model_bytes"])
               if bandwidth and model_info.get("model_bytes") else None)
    prov = provenance(lab)
    run_id = uuid.uuid4().hex
    outcome = RunOutcome(run_id=run_id, endpoint=ep.name, status="running", decode_ceiling_tok_s=ceiling)
    with wh.write() as con:
        con.execute(
            "INSERT INTO benchmark_runs (run_id, endpoint, kind, host, base_url, model, served_model_name, "
            "model_repo_id, model_revision, model_commit_sha, quantization, engine_settings, workload, load_model, "
            "concurrencies, slos, harness_version, project_git_sha, lab_git_shas, dagster_run_id, trigger, "
            "started_at, status, gpu_bandwidth_gb_s, model_bytes, decode_ceiling_tok_s) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)",
            [run_id, ep.name, ep.kind, ep.host, ep.base_url, ep.model, ep.served_model_name,
             model_info.get("model_repo_id"), model_info.get("model_revision"), model_info.get("model_commit_sha"),
             model_info.get("quantization"), json.dumps(ep.settings, sort_keys=True),
             json.dumps({"api": cfg.api, "prompt_set": cfg.prompt_set, "max_tokens": tokens,
                         "ignore_eos": workload.ignore_eos, "min_tokens": workload.min_tokens,
                         "cache_bust": cfg.cache_bust, "requests_per_step": n,
                         "warmup_requests": cfg.warmup_requests}, sort_keys=True),
             "closed-loop concurrency sweep", concurrencies, json.dumps(slos, sort_keys=True), HARNESS_VERSION,
             prov["project_git_sha"], json.dumps(prov["lab_git_shas"], sort_keys=True), dagster_run_id, trigger,
             datetime.now(timezone.utc), bandwidth, model_info.get("model_bytes"), ceiling],
        )
    dcgm_url = lab.host(ep.host).dcgm_url

    async def sweep() -> None:
        async with BenchClient(endpoint_cfg, workload, max(s.connections for s in steps), run_id=run_id) as client:
            for index, spec in enumerate(steps):
                log(f"{ep.name}: step {index + 1}/{len(steps)}: concurrency {spec.concurrency}, "
                    f"{spec.num_requests} requests")
                result = await run_step(client, spec, progress, scrape=ep.metrics_path is not None)
                dcgm = await _dcgm(client, dcgm_url)
                row = step_row(index, result, slos, ceiling, dcgm)
                with wh.write() as con:
                    _insert(con, "benchmark_steps", run_id, None, [row], STEP_COLUMNS)
                    _insert(con, "benchmark_requests", run_id, index, [r.to_row() for r in result.records],
                            REQUEST_COLUMNS)
                outcome.steps.append(row)
                log(f"{ep.name}: c={spec.concurrency}: {row['n_ok']}/{row['n_requests']} ok, "
                    f"TTFT p50 {_ms(row['ttft_ms_p50'])}, {_num(row['output_tokens_per_s'])} tok/s")

    t0 = time.monotonic()
    try:
        asyncio.run(sweep())
        outcome.status = "complete"
    except BaseException as exc:  # noqa: BLE001 - record why, keep the steps, re-raise
        outcome.status, outcome.error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        with wh.write() as con:
            con.execute("UPDATE benchmark_runs SET status = ?, error = ?, finished_at = ? WHERE run_id = ?",
                        [outcome.status, outcome.error, datetime.now(timezone.utc), run_id])
        log(f"{ep.name}: run {run_id} {outcome.status} after {time.monotonic() - t0:.1f} s")
    return outcome


def _ms(v: float | None) -> str:
    return f"{v:.1f} ms" if v is not None else "n/a"


def _num(v: float | None) -> str:
    return f"{v:.1f}" if v is not None else "n/a"


def baseline(wh: Warehouse, endpoint: str, exclude_run: str, runs: int) -> dict[str, Any]:
    """Median headline metrics of the last `runs` complete nightly runs of an endpoint (not `exclude_run`)."""
    sql = """
        WITH recent AS (
            SELECT run_id FROM benchmark_runs
            WHERE endpoint = ? AND status = 'complete' AND trigger = 'nightly' AND run_id <> ?
            ORDER BY started_at DESC LIMIT ?
        ), per_run AS (
            SELECT s.run_id,
                   arg_min(coalesce(s.ttft_ms_p95, s.ttft_ms_p50), s.concurrency) AS ttft_ms,
                   arg_max(s.output_tokens_per_s, s.concurrency) AS output_tokens_per_s
            FROM benchmark_steps s JOIN recent USING (run_id) GROUP BY s.run_id
        )
        SELECT count(*), median(ttft_ms), median(output_tokens_per_s) FROM per_run
    """
    with wh.read() as con:
        n, ttft, tput = con.execute(sql, [endpoint, exclude_run, runs]).fetchone()
    return {"runs": n, "ttft_ms": ttft, "output_tokens_per_s": tput}
