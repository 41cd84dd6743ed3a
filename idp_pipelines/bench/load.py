"""Load models: closed-loop fixed concurrency, open-loop request rate, concurrency sweeps."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from idp_pipelines.bench import metrics
from idp_pipelines.bench.client import BenchClient, BenchError, EndpointConfig, Workload
from idp_pipelines.bench.host_load import HostLoad, HostLoadMeter
from idp_pipelines.bench.records import RequestRecord
from idp_pipelines.bench.server_metrics import (
    ServerMetricsDelta,
    metrics_delta,
    prefix_cache_hit_rate,
    scrape_metrics,
)

__all__ = [
    "LoadSpec",
    "StepResult",
    "ProgressCallback",
    "fixed_concurrency",
    "request_rate",
    "concurrency_sweep",
    "arrival_offsets",
    "run_step",
    "run_steps",
    "run_benchmark",
    "run_on_loop",
]

ProgressCallback = Callable[[str, int, int], None]  # (step, done, total)


@dataclass(frozen=True)
class LoadSpec:
    """One benchmark step. Build with fixed_concurrency / request_rate / concurrency_sweep."""

    name: str
    mode: Literal["concurrency", "rate"]
    num_requests: int
    max_duration_s: float = 300.0
    concurrency: int | None = None  # closed loop: number of workers
    rate_rps: float | None = None  # open loop: mean arrivals per second
    arrival: Literal["poisson", "constant"] = "poisson"
    max_concurrency: int | None = None  # open loop: cap on in-flight requests (queues beyond)
    seed: int = 0
    warmup_requests: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise BenchError(f"step {self.name!r}: num_requests must be >= 1")
        if self.max_duration_s <= 0:
            raise BenchError(f"step {self.name!r}: max_duration_s must be > 0")
        if self.mode == "concurrency" and not (self.concurrency and self.concurrency >= 1):
            raise BenchError(f"step {self.name!r}: closed loop needs concurrency >= 1")
        if self.mode == "rate" and not (self.rate_rps and self.rate_rps > 0):
            raise BenchError(f"step {self.name!r}: open loop needs rate_rps > 0")

    @property
    def connections(self) -> int:
        """Connections this step can hold open at once."""
        if self.mode == "concurrency":
            return self.concurrency or 1
        return self.max_concurrency or min(self.num_requests, 1024)


def fixed_concurrency(
    concurrency: int, num_requests: int, *, max_duration_s: float = 300.0,
    warmup_requests: int = 0, name: str | None = None,
) -> LoadSpec:
    return LoadSpec(
        name=name or f"c{concurrency}", mode="concurrency", num_requests=num_requests,
        max_duration_s=max_duration_s, concurrency=concurrency, warmup_requests=warmup_requests,
    )


def request_rate(
    rate_rps: float, num_requests: int, *, arrival: Literal["poisson", "constant"] = "poisson",
    seed: int = 0, max_concurrency: int | None = None, max_duration_s: float = 300.0,
    warmup_requests: int = 0, name: str | None = None,
) -> LoadSpec:
    return LoadSpec(
        name=name or f"r{rate_rps:g}", mode="rate", num_requests=num_requests,
        max_duration_s=max_duration_s, rate_rps=rate_rps, arrival=arrival, seed=seed,
        max_concurrency=max_concurrency, warmup_requests=warmup_requests,
    )


def concurrency_sweep(
    concurrencies: Sequence[int], num_requests: int | Callable[[int], int], *,
    max_duration_s: float = 300.0, warmup_requests: int = 0,
) -> list[LoadSpec]:
    """One closed-loop step per concurrency; num_requests may depend on the concurrency."""
    return [
        fixed_concurrency(
            c, num_requests(c) if callable(num_requests) else num_requests,
            max_duration_s=max_duration_s, warmup_requests=warmup_requests,
        )
        for c in concurrencies
    ]


def arrival_offsets(spec: LoadSpec) -> list[float]:
    """Intended send times (s from step start) for an open-loop step; seeded, reproducible."""
    assert spec.rate_rps
    if spec.arrival == "constant":
        return [i / spec.rate_rps for i in range(spec.num_requests)]
    rng = random.Random(spec.seed)
    t, out = 0.0, []
    for _ in range(spec.num_requests):
        out.append(t)
        t += rng.expovariate(spec.rate_rps)
    return out


@dataclass
class StepResult:
    """Records and context of one measured step (warm-up requests are not in ``records``)."""

    load: LoadSpec
    started_at: str  # UTC ISO time of the measured phase start
    duration_s: float  # first send to last request end
    records: list[RequestRecord]
    warmup_count: int = 0
    client_cpu_s: float = 0.0  # process CPU time of the client over the measured phase
    server_metrics: ServerMetricsDelta | None = None
    host_load: HostLoad | None = None  # CPU of other processes on this machine during the step
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.load.name

    def summary(self, slos: Mapping[str, float] | None = None) -> dict[str, Any]:
        out = {"step": self.name, "mode": self.load.mode, "concurrency": self.load.concurrency,
               "rate_rps": self.load.rate_rps, "started_at": self.started_at,
               "client_cpu_s": self.client_cpu_s, "warmup_count": self.warmup_count}
        out.update(metrics.summarize(self.records, self.duration_s, slos))
        streamed = sum(len(r.chunk_times) for r in self.records)
        out["client_cpu_us_per_chunk"] = self.client_cpu_s / streamed * 1e6 if streamed else None
        if self.server_metrics is not None:
            out["server_metrics_error"] = self.server_metrics.error
            out["server_prefix_cache_hit_rate"] = prefix_cache_hit_rate(self.server_metrics)
        if self.host_load is not None:
            out["host_other_cpu_cores"] = self.host_load.other_cpu_cores
            out["host_other_top"] = self.host_load.top
        return out


async def _closed_loop(
    client: BenchClient, spec: LoadSpec, n: int, step: str, t0: float, deadline: float,
    progress: ProgressCallback | None, id_base: int,
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    next_id = done = 0

    async def worker() -> None:
        nonlocal next_id, done
        while next_id < n and time.perf_counter() < deadline:
            rec = RequestRecord(step=step, request_id=id_base + next_id)
            next_id += 1
            records.append(rec)
            rec.t_intended = time.perf_counter() - t0  # closed loop: send as soon as free
            await client.send(rec, t0, deadline)
            done += 1
            if progress:
                progress(step, done, n)
            if rec.error_kind == "aborted":
                break  # the step's limit: timers may fire a little before perf_counter reaches it

    await asyncio.gather(*(worker() for _ in range(min(spec.concurrency or 1, n))))
    return records


async def _open_loop(
    client: BenchClient, spec: LoadSpec, step: str, t0: float, deadline: float,
    progress: ProgressCallback | None,
) -> list[RequestRecord]:
    records: list[RequestRecord] = []
    sem = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
    done = 0
    offsets = arrival_offsets(spec)

    async def one(rec: RequestRecord) -> None:
        nonlocal done
        if sem is not None:
            async with sem:
                if time.perf_counter() >= deadline:
                    client.fail(rec, "aborted", "aborted: step max_duration_s reached", t0)
                else:
                    await client.send(rec, t0, deadline)
        else:
            await client.send(rec, t0, deadline)
        done += 1
        if progress:
            progress(step, done, len(offsets))

    tasks = []
    for i, offset in enumerate(offsets):
        if t0 + offset >= deadline:
            break
        # loop until due: uvloop timers have 1 ms granularity and may fire early
        while (delay := t0 + offset - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        rec = RequestRecord(step=step, request_id=i, t_intended=offset)
        records.append(rec)
        tasks.append(asyncio.create_task(one(rec)))
    await asyncio.gather(*tasks)
    return records


async def run_step(
    client: BenchClient, spec: LoadSpec, progress: ProgressCallback | None = None,
    scrape: bool = True, host_meter: HostLoadMeter | None = None,
) -> StepResult:
    """Warm up, scrape /metrics, run the measured phase within its limits, scrape again.

    ``host_meter`` samples the CPU other processes use during the measured phase.
    """
    warm: list[RequestRecord] = []
    if spec.warmup_requests:
        wt0 = time.perf_counter()
        warm_spec = fixed_concurrency(min(spec.connections, spec.warmup_requests),
                                      spec.warmup_requests, name=f"{spec.name}:warmup")
        warm = await _closed_loop(client, warm_spec, spec.warmup_requests, warm_spec.name,
                                  wt0, wt0 + spec.max_duration_s, None, id_base=-10**6)
    before = after = None
    metrics_error = None
    url = client.endpoint.resolved_metrics_url
    if scrape:
        try:
            before = await scrape_metrics(client.http, url)
        except Exception as exc:  # the server may have no /metrics: say so, keep going
            metrics_error = client.redact(f"scraping {url} failed: {type(exc).__name__}: {exc}")
    if host_meter is not None:
        host_meter.start()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + spec.max_duration_s
    if spec.mode == "concurrency":
        records = await _closed_loop(client, spec, spec.num_requests, spec.name, t0, deadline,
                                     progress, id_base=0)
    else:
        records = await _open_loop(client, spec, spec.name, t0, deadline, progress)
    client_cpu = time.process_time() - cpu0
    host_load = host_meter.stop() if host_meter is not None else None
    ends = [r.t_end for r in records if r.t_end is not None]
    starts = [r.t_sent for r in records if r.t_sent is not None]
    duration = (max(ends) - min(starts)) if ends and starts else time.perf_counter() - t0
    server = None
    if scrape:
        if before is not None:
            try:
                after = await scrape_metrics(client.http, url)
                server = metrics_delta(before, after)
            except Exception as exc:
                metrics_error = client.redact(f"scraping {url} failed: {type(exc).__name__}: {exc}")
        if server is None:
            server = ServerMetricsDelta(error=metrics_error)
    return StepResult(load=spec, started_at=started_at, duration_s=duration, records=records,
                      warmup_count=len(warm), client_cpu_s=client_cpu, server_metrics=server,
                      host_load=host_load)


async def run_steps(
    endpoint: EndpointConfig, workload: Workload, steps: Sequence[LoadSpec],
    progress: ProgressCallback | None = None, scrape: bool = True,
) -> list[StepResult]:
    """Run steps in order over one client whose pool fits the largest step."""
    if not steps:
        raise BenchError("no steps to run: pass at least one LoadSpec")
    async with BenchClient(endpoint, workload, max(s.connections for s in steps)) as client:
        return [await run_step(client, s, progress, scrape) for s in steps]


def run_benchmark(
    endpoint: EndpointConfig, workload: Workload, steps: Sequence[LoadSpec],
    progress: ProgressCallback | None = None, scrape: bool = True,
    use_uvloop: bool | None = None,
) -> list[StepResult]:
    """Synchronous entry point (Dagster assets call this).

    Uses uvloop when installed and ``use_uvloop`` is not False: it halves the client's
    event-loop cost per chunk, which keeps the client from inflating what it measures.
    """
    return run_on_loop(run_steps(endpoint, workload, steps, progress, scrape), use_uvloop)


def run_on_loop(coro, use_uvloop: bool | None = None):
    """Run `coro` to its end on uvloop when installed and ``use_uvloop`` is not False, else asyncio's loop."""
    if use_uvloop is not False:
        try:
            import uvloop
        except ImportError:
            if use_uvloop:
                raise BenchError("use_uvloop=True but uvloop is not installed") from None
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)
