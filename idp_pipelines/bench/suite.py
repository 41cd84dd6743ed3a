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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from idp_pipelines.bench.checks import describe_errors, error_digest
from idp_pipelines.bench.client import BenchClient, BenchError, EndpointConfig, Workload
from idp_pipelines.bench.host_load import HostLoadMeter, local_server_pids
from idp_pipelines.bench.load import StepResult, fixed_concurrency, run_step
from idp_pipelines.bench.metrics import decode_ceiling_tok_s, request_row, ttft_split
from idp_pipelines.bench.server_metrics import scrape_metrics
from idp_pipelines.lab import Endpoint, Lab
from idp_pipelines.probe import probe_endpoint
from idp_pipelines.settings import REPO_ROOT
from idp_pipelines.warehouse import Warehouse, insert_rows

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
    "retries", "served_from_cache", "cache_fixed_prefix_tokens", "server_decode_tok_s", "ttft_server_prompt_ms",
    "ttft_server_queue_ms", "ttft_network_ms", "host_other_cpu_cores", "host_other_top", "errors",
)
REQUEST_COLUMNS = (
    "request_id", "t_intended", "t_sent", "t_first_byte", "t_first_token", "t_last_token", "t_end", "ttft_ms",
    "tpot_ms", "e2e_ms", "queue_ms", "ttft_from_intended_ms", "e2e_from_intended_ms", "max_tokens",
    "prompt_tokens", "completion_tokens", "cached_prompt_tokens", "content_chunks", "token_source",
    "server_reported_tokens", "finish_reason", "http_status", "error_kind", "error", "chunk_times", "chunk_tokens",
    "retries", "server_prompt_ms", "server_prompt_n", "server_predicted_ms", "server_predicted_n",
)


@dataclass
class RunOutcome:
    run_id: str
    endpoint: str
    status: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    decode_ceiling_tok_s: float | None = None
    ceiling_source: str | None = None  # how the ceiling was found, or why there is none
    network_rtt_ms: float | None = None
    errors: dict[str, list] = field(default_factory=dict)  # kind -> [count, one message]

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


@dataclass(frozen=True)
class Ceiling:
    """The single-stream decode roofline and where its two inputs came from (or why it is missing)."""

    tok_s: float | None
    bandwidth_gb_s: float | None
    model_bytes: int | None
    source: str


def _n_gpu_layers(ep: Endpoint) -> int | None:
    """llama.cpp's offload from the typed `llamacpp.n_gpu_layers` ("all" is every layer, -1); None when unset
    or "auto" (llama.cpp then decides by free VRAM: the ceiling cannot know it)."""
    raw = ep.llamacpp.n_gpu_layers if ep.llamacpp is not None else None
    if raw == "all":
        return -1
    return raw if isinstance(raw, int) else None


def _gguf_layers(path: Path) -> int | None:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        for key, f in reader.fields.items():
            if key.endswith(".block_count"):
                return int(f.parts[f.data[0]][0])
    except Exception:  # noqa: BLE001 - no layer count only costs a partial offload its ceiling
        return None
    return None


def bandwidth_for(lab: Lab, ep: Endpoint, model_file: Path | None = None) -> tuple[float | None, str]:
    """The memory bandwidth that bounds this endpoint's decode, and where it comes from.

    llama.cpp reads the layers it offloads from GPU memory and the rest from host RAM: with
    `n_gpu_layers` 0 the CPU's bandwidth bounds it, with all layers (-1) the GPU's, in between the
    harmonic mix by layer share. On a GPU host the offload must be given: it is never guessed.
    """
    host = lab.host(ep.host)
    cpu_bw = host.cpu.memory_bandwidth_gb_s if host.cpu else None
    gpu_bw = host.gpu.memory_bandwidth_gb_s if host.gpu else None
    where = f"hosts[{ep.host}]"
    if ep.kind != "llamacpp":
        return (gpu_bw, f"{where}.gpu.memory_bandwidth_gb_s") if gpu_bw else (
            None, f"no {where}.gpu.memory_bandwidth_gb_s in the inventory")
    ngl = _n_gpu_layers(ep)
    if ngl is None and host.gpu is not None:
        return None, (f"llama.cpp on {ep.host}, which has a GPU, without n_gpu_layers: set "
                      f"endpoints[{ep.name}].llamacpp.n_gpu_layers (0 = CPU only, -1 = every layer on the GPU)")
    if not ngl:
        return (cpu_bw, f"{where}.cpu.memory_bandwidth_gb_s (n_gpu_layers 0)") if cpu_bw else (
            None, f"no {where}.cpu.memory_bandwidth_gb_s in the inventory")
    if not gpu_bw:
        return None, f"n_gpu_layers {ngl} but no {where}.gpu.memory_bandwidth_gb_s in the inventory"
    layers = _gguf_layers(model_file) if model_file else None
    if ngl < 0 or (layers and ngl >= layers + 1):  # llama.cpp counts the output layer too
        return gpu_bw, f"{where}.gpu.memory_bandwidth_gb_s (all layers offloaded)"
    if not layers or not cpu_bw:
        return None, (f"partial offload (n_gpu_layers {ngl}) needs the model's layer count (endpoints"
                      f"[{ep.name}].model_file) and {where}.cpu.memory_bandwidth_gb_s")
    share = min(1.0, ngl / layers)
    mixed = 1.0 / (share / gpu_bw + (1 - share) / cpu_bw)
    return mixed, f"{share:.0%} of {layers} layers at {where}.gpu, the rest at {where}.cpu bandwidth"


def model_bytes_for(con: Any, lab: Lab, ep: Endpoint) -> tuple[int | None, str]:
    """Bytes read per decoded token (the weights): the inventory's figure, the GGUF file's size, or the
    model's last quantization / download in the warehouse."""
    if ep.model_bytes:
        return ep.model_bytes, f"endpoints[{ep.name}].model_bytes"
    if ep.model_file is not None:
        if ep.model_file.is_file():
            return ep.model_file.stat().st_size, f"size of {ep.model_file}"
        return None, f"endpoints[{ep.name}].model_file {ep.model_file} does not exist"
    if not ep.model:
        return None, f"no model_bytes, model_file or model for endpoint {ep.name}"
    model = lab.model(ep.model)
    quant = ep.settings.get("quantization") or model.serving_quantization
    row = con.execute("SELECT output_bytes, output_path FROM quantizations WHERE model = ? AND quant_type = ? "
                      "ORDER BY quantized_at DESC LIMIT 1", [model.name, str(quant)]).fetchone() if quant else None
    if row:
        return int(row[0]), f"quantization {quant} of {model.name} ({row[1]})"
    row = con.execute("SELECT bytes FROM model_downloads WHERE model = ? ORDER BY downloaded_at DESC LIMIT 1",
                      [model.name]).fetchone()
    if row:
        return int(row[0]), f"last download of {model.name} (hub_model)"
    return None, (f"model size unknown: set endpoints[{ep.name}].model_bytes or model_file in the inventory, "
                  f"or materialise hub_model[{model.name}]")


def ceiling_for(con: Any, lab: Lab, ep: Endpoint) -> Ceiling:
    """The roofline, reading the warehouse through ``con`` (a DuckDB connection) where the inventory is silent."""
    nbytes, bytes_src = model_bytes_for(con, lab, ep)
    bw, bw_src = bandwidth_for(lab, ep, ep.model_file)
    if bw and nbytes:
        return Ceiling(decode_ceiling_tok_s(bw, nbytes), bw, nbytes,
                       f"{bw:g} GB/s ({bw_src}) / {nbytes / 1e6:,.1f} MB ({bytes_src})")
    missing = [src for ok, src in ((bw, bw_src), (nbytes, bytes_src)) if not ok]
    return Ceiling(None, bw, nbytes, "no ceiling: " + "; ".join(missing))


def model_provenance(con: Any, lab: Lab, ep: Endpoint) -> dict[str, Any]:
    if not ep.model:
        return {}
    model = lab.model(ep.model)
    out: dict[str, Any] = {"model_repo_id": model.repo_id, "model_revision": model.revision,
                           "quantization": ep.settings.get("quantization") or model.serving_quantization
                           or ("gguf" if model.format == "gguf" else None)}
    row = con.execute("SELECT commit_sha FROM model_downloads WHERE model = ? "
                      "ORDER BY downloaded_at DESC LIMIT 1", [model.name]).fetchone()
    if row:
        out["model_commit_sha"] = row[0]
    return out


def engine_settings(ep: Endpoint) -> dict[str, Any]:
    """What the inventory says the server runs with: its settings and, where the inventory types them,
    the llama.cpp server's settings (slots, context, cache_ram)."""
    out: dict[str, Any] = dict(ep.settings)
    if ep.llamacpp is not None:
        out["llamacpp"] = ep.llamacpp.model_dump(mode="json")
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
             dcgm_after: dict[str, float], network_rtt_ms: float | None = None) -> dict[str, Any]:
    """The `benchmark_steps` row of one measured step (without run_id)."""
    summary = result.summary(slos)
    tpot = summary.get("tpot_ms_mean")
    row = {c: summary.get(c) for c in STEP_COLUMNS if c in summary}
    row.update(step_index=index, step=result.name, started_at=summary["started_at"],
               output_tok_s_per_request=(1000.0 / tpot) if tpot else None)
    row.update(ttft_split(summary, network_rtt_ms))
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
    row["host_other_top"] = json.dumps(summary.get("host_other_top"))
    row["errors"] = json.dumps(error_digest(result.records))
    row["summary"] = json.dumps(summary, default=str)
    return {c: row.get(c) for c in STEP_COLUMNS}


def store_step(wh: Warehouse, run_id: str, row: dict[str, Any], result: StepResult) -> None:
    """One step and its requests, in one transaction: the only writer of both tables."""
    with wh.write() as con:
        insert_rows(con, "benchmark_steps", [{"run_id": run_id, **row}])
        insert_rows(con, "benchmark_requests", [
            {"run_id": run_id, "step_index": row["step_index"], **{c: full[c] for c in REQUEST_COLUMNS}}
            for full in map(request_row, result.records)])


HOST_SLOT_WAIT_S = 4 * 3600.0  # a slow endpoint's sweep can take an hour; four is a stuck measurement


@contextlib.contextmanager
def host_slot(host: str, *, holder: str, log: Callable[[str], None] | None = None,
              timeout_s: float | None = None) -> Iterator[None]:
    """The host's measurement slot, across processes: a sweep started by hand (`idp bench`) and a nightly
    Dagster run on the same host would distort each other, and Dagster's pool does not see the CLI.

    A measurement that finds the slot taken says so at once (naming the holder), waits, then proceeds.
    """
    from idp_pipelines.locks import file_lock
    from idp_pipelines.settings import idp_home

    path = idp_home() / "locks" / f"measure-{host}.lock"
    what = f"the measurement slot of host {host!r}"
    fix = "let that measurement finish, or stop it if it is stuck."
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(path, timeout_s=0, what=what, holder=holder, error=BenchError, fix=fix))
        except BenchError as busy:
            if log:  # "Waited 0 s for <what> <path>, held by ... Fix: ..." -> what the wait is for
                log(f"waiting: {str(busy).split('. Fix:')[0].replace('Waited 0 s for', 'the measurement needs')}")
            held.enter_context(file_lock(path, timeout_s=timeout_s or HOST_SLOT_WAIT_S, what=what, on_wait=log,
                                         holder=holder, error=BenchError, fix=fix))
        yield


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
    engine = {"vllm": "vllm", "llamacpp": "llamacpp"}.get(ep.kind, "openai")
    endpoint_cfg = EndpointConfig(
        base_url=ep.base_url, model=ep.served_model_name or ep.model or "", api=cfg.api, engine=engine,
        api_key=ep.api_key(), request_timeout_s=cfg.request_timeout_s,
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
    # the client/network share of TTFT: llama.cpp reports no queue time, so the probe's round trip it is
    probe = probe_endpoint(ep, api_key=endpoint_cfg.api_key, probes=5, props=True)
    prov = provenance(lab)
    run_id = uuid.uuid4().hex
    settings = engine_settings(ep)
    # one connection for the lookups and the run row: each DuckDB open costs ~20 ms of start-up CPU
    with wh.write() as con:
        model_info = model_provenance(con, lab, ep)
        ceiling = ceiling_for(con, lab, ep)
        insert_rows(con, "benchmark_runs", [{
            "run_id": run_id, "endpoint": ep.name, "kind": ep.kind, "host": ep.host, "base_url": ep.base_url,
            "model": ep.model, "served_model_name": ep.served_model_name,
            "model_repo_id": model_info.get("model_repo_id"), "model_revision": model_info.get("model_revision"),
            "model_commit_sha": model_info.get("model_commit_sha"), "quantization": model_info.get("quantization"),
            "engine_settings": json.dumps(settings, sort_keys=True),
            "workload": json.dumps({"api": cfg.api, "prompt_set": cfg.prompt_set, "max_tokens": tokens,
                                    "ignore_eos": workload.ignore_eos, "min_tokens": workload.min_tokens,
                                    "cache_bust": cfg.cache_bust, "requests_per_step": n,
                                    "warmup_requests": cfg.warmup_requests}, sort_keys=True),
            "load_model": "closed-loop concurrency sweep", "concurrencies": concurrencies,
            "slos": json.dumps(slos, sort_keys=True), "harness_version": HARNESS_VERSION,
            "project_git_sha": prov["project_git_sha"], "lab_git_shas": json.dumps(prov["lab_git_shas"], sort_keys=True),
            "dagster_run_id": dagster_run_id, "trigger": trigger, "started_at": datetime.now(timezone.utc),
            "status": "running", "gpu_bandwidth_gb_s": ceiling.bandwidth_gb_s, "model_bytes": ceiling.model_bytes,
            "decode_ceiling_tok_s": ceiling.tok_s, "ceiling_source": ceiling.source,
            "network_rtt_ms": probe.rtt_p50_ms, "n_gpu_layers": _n_gpu_layers(ep),
            "server_props": json.dumps(probe.server_props, sort_keys=True) if probe.server_props else None,
        }])
    outcome = RunOutcome(run_id=run_id, endpoint=ep.name, status="running", decode_ceiling_tok_s=ceiling.tok_s,
                         ceiling_source=ceiling.source, network_rtt_ms=probe.rtt_p50_ms)
    dcgm_url = lab.host(ep.host).dcgm_url
    # the server's own processes are the measurement when it runs here: only the rest is "load"
    meter = HostLoadMeter(exclude_pids=local_server_pids(ep.base_url))

    async def sweep() -> None:
        async with BenchClient(endpoint_cfg, workload, max(s.connections for s in steps), run_id=run_id) as client:
            for index, spec in enumerate(steps):
                log(f"{ep.name}: step {index + 1}/{len(steps)}: concurrency {spec.concurrency}, "
                    f"{spec.num_requests} requests")
                result = await run_step(client, spec, progress, scrape=ep.metrics_path is not None,
                                        host_meter=meter)
                dcgm = await _dcgm(client, dcgm_url)
                row = step_row(index, result, slos, ceiling.tok_s, dcgm, probe.rtt_p50_ms)
                store_step(wh, run_id, row, result)
                outcome.steps.append(row)
                error_digest(result.records, outcome.errors)
                log(f"{ep.name}: c={spec.concurrency}: {row['n_ok']}/{row['n_requests']} ok, "
                    f"TTFT p50 {_ms(row['ttft_ms_p50'])}, {_num(row['output_tokens_per_s'])} tok/s"
                    + (f", {row['retries']} resent after a dead pooled connection" if row["retries"] else ""))
                if row["n_ok"] == 0:
                    # nothing answered: the endpoint is down or refuses us, and the next steps would only
                    # repeat that at a higher concurrency
                    raise NothingAnswered(describe_errors(outcome.errors))

    t0 = time.monotonic()
    try:
        asyncio.run(sweep())
        outcome.status = "complete"
    except NothingAnswered as exc:
        outcome.status, outcome.error = "failed", f"no request was answered: {exc}"
    except BaseException as exc:  # noqa: BLE001 - record why, keep the steps, re-raise
        outcome.status, outcome.error = "failed", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        with wh.write() as con:
            con.execute("UPDATE benchmark_runs SET status = ?, error = ?, finished_at = ?, errors = ? WHERE run_id = ?",
                        [outcome.status, outcome.error, datetime.now(timezone.utc),
                         json.dumps(outcome.errors) if outcome.errors else None, run_id])
        log(f"{ep.name}: run {run_id} {outcome.status} after {time.monotonic() - t0:.1f} s"
            + (f": {outcome.error}" if outcome.error else ""))
    return outcome


class NothingAnswered(Exception):
    """A whole step without one answered request: the run stops and is marked failed."""


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
