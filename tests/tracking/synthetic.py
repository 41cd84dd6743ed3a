"""Synthetic but realistic benchmark rows in the migration-4 schema (and quantizations, migration 2).

Used by the tracking tests and benchmarks/bench_mlflow.py. Values follow what the harness writes:
per-request timings in seconds since the step start, step figures from them, a summary JSON of everything.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa

SECRET = "sk-test-SECRET"
T0 = datetime(2026, 11, 20, 2, 0, tzinfo=timezone.utc)


def _pct(v: np.ndarray, q: float) -> float | None:
    return float(np.percentile(v, q)) if v.size else None


def insert_benchmark_run(con, run_id: str, endpoint: str, *, kind: str = "vllm", status: str = "complete",
                         concurrencies=(1, 2, 4, 8), requests_per_step: int = 24, seed: int = 0,
                         started_at: datetime | None = None, model: str = "tiny-llama",
                         quantization: str | None = "Q4_K_M", commit_sha: str = "c" * 40,
                         engine_settings: dict | None = None, leak_secret: str | None = None,
                         dagster_run_id: str | None = "dagster-run-0001") -> None:
    """One benchmark run with its steps and requests. `leak_secret` puts a key where a careless logger would ship it."""
    rng = np.random.default_rng(seed)
    started = started_at or T0
    engine = engine_settings if engine_settings is not None else (
        {"gpu_memory_utilization": 0.9, "max_num_seqs": 64, "max_num_batched_tokens": 8192, "dtype": "auto"}
        if kind == "vllm" else {"threads": 2, "parallel": 4, "ctx_size": 4096})
    if leak_secret:
        engine = {**engine, "api_key": leak_secret, "extra_args": f"--api-key {leak_secret} --disable-log-requests"}
    workload = {"prompt_set": "chat-short-v1", "prompt_tokens": 256, "max_tokens": 64, "seed": 7}
    slos = {"ttft_ms": 2000.0, "tpot_ms": 100.0}
    steps, requests = [], []
    t = started
    for si, c in enumerate(concurrencies):
        n = requests_per_step
        ttft = rng.gamma(4.0, 25.0 + 12.0 * c, n) / 1000.0  # seconds: queueing grows with concurrency
        tpot = rng.normal(0.012 + 0.002 * c, 0.001, n).clip(0.005)
        out_tok = np.full(n, workload["max_tokens"])
        sent = np.sort(rng.uniform(0, n / c * 0.3, n))
        first = sent + ttft
        last = first + tpot * (out_tok - 1)
        err = np.zeros(n, dtype=bool)
        if c >= 8:
            err[rng.integers(0, n)] = True
        e2e = last - sent
        ok = ~err
        duration = float(last.max() - sent.min())
        rps = ok.sum() / duration
        good = ok & (ttft * 1000 <= slos["ttft_ms"]) & (tpot * 1000 <= slos["tpot_ms"])
        col = {
            "n_requests": n, "n_ok": int(ok.sum()), "n_errors": int(err.sum()), "error_rate": float(err.mean()),
            "requests_per_s": float(rps), "output_tokens": int(out_tok[ok].sum()),
            "output_tokens_per_s": float(out_tok[ok].sum() / duration),
            "output_tok_s_per_request": float(1.0 / tpot[ok].mean()),
            "goodput_requests_per_s": float(good.sum() / duration), "goodput_fraction": float(good.mean()),
            "server_reported_tokens_fraction": 1.0, "length_honoured_fraction": 1.0, "prefix_cache_hit_rate": 0.0,
            "ttft_ms_n": int(ok.sum()),
            "ttft_ms_p50": _pct(ttft[ok] * 1e3, 50), "ttft_ms_p50_lo": _pct(ttft[ok] * 1e3, 40),
            "ttft_ms_p50_hi": _pct(ttft[ok] * 1e3, 60), "ttft_ms_p95": _pct(ttft[ok] * 1e3, 95),
            "ttft_ms_p95_lo": _pct(ttft[ok] * 1e3, 90), "ttft_ms_p95_hi": _pct(ttft[ok] * 1e3, 99),
            "ttft_ms_p99": None,  # too few samples for its CI: the harness writes NULL, never the max
            "tpot_ms_mean": float(tpot[ok].mean() * 1e3), "tpot_ms_p50": _pct(tpot[ok] * 1e3, 50),
            "tpot_ms_p50_lo": _pct(tpot[ok] * 1e3, 40), "tpot_ms_p50_hi": _pct(tpot[ok] * 1e3, 60),
            "tpot_ms_p95": _pct(tpot[ok] * 1e3, 95), "itl_ms_p50": _pct(tpot[ok] * 1e3, 50),
            "itl_ms_p99": _pct(tpot[ok] * 1e3, 99), "e2e_ms_p50": _pct(e2e[ok] * 1e3, 50),
            "e2e_ms_p95": _pct(e2e[ok] * 1e3, 95), "queue_ms_p50": 0.4, "queue_ms_p95": 1.1,
            "client_cpu_us_per_chunk": 38.0, "gpu_utilization_pct": min(99.0, 20.0 * c),
            "gpu_memory_used_gb": 14.2, "roofline_fraction": min(0.95, 0.1 * c),
        }
        step_started = t + timedelta(seconds=30 * si)
        summary = {"step": f"c{c}", "mode": "concurrency", "concurrency": c, "rate_rps": None,
                   "started_at": step_started.isoformat(), "client_cpu_s": 0.05, "warmup_count": 2,
                   "n_aborted": 0, "errors_by_kind": {"http_status": int(err.sum())} if err.any() else {},
                   "duration_s": duration, "prompt_tokens": int(256 * ok.sum()), "slos": slos,
                   "ttft_ms_mean": float(ttft[ok].mean() * 1e3), "ttft_ms_p90": _pct(ttft[ok] * 1e3, 90),
                   "ttft_ms_p95_sufficient": True, "ttft_ms_p99_sufficient": False, **col}
        server = {"counters": {"vllm:prefix_cache_queries_total": 0.0},
                  "gauges": {"vllm:num_requests_running": float(c)}, "error": None}
        steps.append([run_id, si, f"c{c}", "concurrency", c, None, step_started, duration, *col.values(),
                      None, json.dumps(server), json.dumps(summary)])
        for i in range(n):
            error = None
            if err[i]:
                error = f"HTTP 401 from {endpoint}: invalid key {leak_secret}" if leak_secret else "HTTP 503"
            chunks = (first[i] + tpot[i] * np.arange(out_tok[i])).astype(np.float32).tolist()
            requests.append({
                "run_id": run_id, "step_index": si, "request_id": i, "t_intended": float(sent[i]),
                "t_sent": float(sent[i]), "t_first_byte": float(first[i] - 0.001), "t_first_token": float(first[i]),
                "t_last_token": float(last[i]), "t_end": float(last[i] + 0.001),
                "ttft_ms": None if err[i] else float(ttft[i] * 1e3), "tpot_ms": None if err[i] else float(tpot[i] * 1e3),
                "e2e_ms": None if err[i] else float(e2e[i] * 1e3), "queue_ms": 0.4, "ttft_from_intended_ms": float(ttft[i] * 1e3),
                "e2e_from_intended_ms": float(e2e[i] * 1e3), "max_tokens": int(workload["max_tokens"]),
                "prompt_tokens": 256, "completion_tokens": None if err[i] else int(out_tok[i]),
                "cached_prompt_tokens": 0, "content_chunks": 0 if err[i] else int(out_tok[i]),
                "token_source": "usage", "server_reported_tokens": not err[i],
                "finish_reason": None if err[i] else "length", "http_status": 401 if err[i] else 200,
                "error_kind": "auth" if err[i] else None, "error": error,
                "chunk_times": [] if err[i] else chunks, "chunk_tokens": [] if err[i] else [1] * int(out_tok[i]),
            })
    finished = started + timedelta(seconds=30 * len(concurrencies))
    con.execute(
        f"INSERT INTO benchmark_runs ({_migration4_columns(con, 'benchmark_runs', 28)}) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [run_id, endpoint, kind, "schlimers-server", "http://10.0.0.5:8000", model, f"{model}-served",
         "idp-local/tiny-llama", "main", commit_sha, quantization, json.dumps(engine), json.dumps(workload),
         "closed_loop", list(concurrencies), json.dumps(slos), "0.3.1", "a" * 40,
         json.dumps({"idp-pipelines:main": "a" * 40, "homelab-ansible:main": "b" * 40}), dagster_run_id, "schedule",
         started, finished if status == "complete" else None, status,
         None if status == "complete" else "endpoint went away", 360.0, 4_100_000_000, 87.8],
    )
    con.executemany(f"INSERT INTO benchmark_steps ({_migration4_columns(con, 'benchmark_steps', 47)}) VALUES ("
                    + ", ".join("?" * 47) + ")", steps)
    if requests:
        con.register("synthetic_requests", pa.Table.from_pylist(requests))
        con.execute("INSERT INTO benchmark_requests BY NAME SELECT * FROM synthetic_requests")
        con.unregister("synthetic_requests")


def _migration4_columns(con, table: str, n: int) -> str:
    """The table's first n columns: migration 4's, in order (later migrations append columns)."""
    return ", ".join(c for (c,) in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
        [table]).fetchall()[:n])


def insert_quantization(con, model: str = "tiny-llama", quant_type: str = "Q4_K_M", *,
                        output_sha256: str = "d" * 64, commit_sha: str = "c" * 40,
                        quantized_at: datetime | None = None, reused: bool = False) -> None:
    con.execute(
        "INSERT INTO quantizations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [quantized_at or T0 - timedelta(days=1), "dagster-run-quant", model, commit_sha, "tiny-llama-f32.gguf",
         "e" * 64, "F32", quant_type, f"/models/gguf/{model}/{quant_type}.gguf", output_sha256, 1_200_000, 0.28,
         0.18, 0, json.dumps({"nthread": 2, "allow_requantize": False}), reused],
    )
