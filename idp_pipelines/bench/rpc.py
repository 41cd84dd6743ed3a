"""Request round-trip latency to a host (the seed's USB4 "RPC latency" test, section 4.1, done right).

The seed sends 100 GETs of /health and reports min/p50/p95/max/mean/stdev, where p95 of so few samples
is close to the max and nothing says how sure any figure is. Here:

* the measured probes reuse one keep-alive connection (``httpx.Client``), so a sample is one request's
  round trip, not TCP setup; a separate small sample of fresh TCP connects gives ``connect_ms_p50``;
* percentiles carry order-statistic confidence intervals (``metrics.percentile_ci``) and are None when
  too few samples exist to bound them (p99 needs ~367 successful probes, hence 400 by default);
* failures are counted, never raised; the loop is bounded by ``probes`` and ``max_duration_s``.

Plain Python (httpx), no Dagster. ``RpcLatency.row()`` matches the ``rpc_latency`` table.
"""

from __future__ import annotations

import socket
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from idp_pipelines.bench.metrics import PercentileEstimate, percentile_ci
from idp_pipelines.probe import HEALTH_PATHS

if TYPE_CHECKING:
    from idp_pipelines.lab import Lab
    from idp_pipelines.warehouse import Warehouse

__all__ = ["RpcLatency", "measure_rpc_latency", "rpc_target", "store_rpc_latency", "CONNECT_PROBES"]

CONNECT_PROBES = 10  # fresh-connection sample size (connect time only)
_FALLBACK_PATH = HEALTH_PATHS["openai"]  # "/v1/models": every OpenAI-compatible server has it
_MAX_ERRORS_KEPT = 5


@dataclass
class RpcLatency:
    """Round-trip latency of ``probes`` keep-alive GETs of ``target_url`` (ms)."""

    target_url: str
    probes: int  # measured attempts (warm-up excluded); each is a sample or a failure
    failures: int
    samples_ms: list[float] = field(default_factory=list)
    connect_samples_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the first few distinct failure messages
    duration_s: float = 0.0
    stopped_early: bool = False  # max_duration_s ran out before all probes were sent
    confidence: float = 0.95

    # ---- statistics (computed from samples_ms)
    @property
    def n(self) -> int:
        return len(self.samples_ms)

    def percentile(self, q: float) -> PercentileEstimate:
        return percentile_ci(self.samples_ms, q, self.confidence)

    @property
    def p50(self) -> PercentileEstimate:
        return self.percentile(50)

    @property
    def p95(self) -> PercentileEstimate:
        return self.percentile(95)

    @property
    def p99(self) -> PercentileEstimate:
        return self.percentile(99)

    @property
    def min_ms(self) -> float | None:
        return min(self.samples_ms) if self.samples_ms else None

    @property
    def max_ms(self) -> float | None:
        return max(self.samples_ms) if self.samples_ms else None

    @property
    def mean_ms(self) -> float | None:
        return statistics.fmean(self.samples_ms) if self.samples_ms else None

    @property
    def stdev_ms(self) -> float | None:
        return statistics.stdev(self.samples_ms) if len(self.samples_ms) >= 2 else None

    @property
    def connect_ms_p50(self) -> float | None:
        return statistics.median(self.connect_samples_ms) if self.connect_samples_ms else None

    @property
    def failure_rate(self) -> float | None:
        return self.failures / self.probes if self.probes else None

    def row(self) -> dict[str, Any]:
        """A dict of ``rpc_latency`` columns (the caller adds measured_at, dagster_run_id, host).

        pXX_ms is None when the sample is too small to bound that percentile (never silently the max);
        its CI bounds are kept where they exist.
        """
        out: dict[str, Any] = {
            "target_url": self.target_url,
            "probes": self.probes,
            "failures": self.failures,
            "connect_ms_p50": self.connect_ms_p50,
            "min_ms": self.min_ms,
        }
        for q in (50, 95, 99):
            est = self.percentile(q)
            out[f"p{q}_ms"] = est.value
            out[f"p{q}_lo"] = est.lo
            out[f"p{q}_hi"] = est.hi
        out.update(max_ms=self.max_ms, mean_ms=self.mean_ms, stdev_ms=self.stdev_ms,
                   samples_ms=[float(x) for x in self.samples_ms])
        return out

    def summary(self) -> str:
        """One line for logs and metadata."""
        if not self.samples_ms:
            return f"{self.target_url}: no successful probe ({self.failures}/{self.probes} failed)" + (
                f": {self.errors[0]}" if self.errors else "")

        def fmt(est: PercentileEstimate) -> str:
            if est.value is None:
                return f"insufficient (n={est.n})"
            return f"{est.value:.2f} [{est.lo:.2f}, {est.hi:.2f}]"

        return (f"{self.target_url}: n={self.n}/{self.probes} ({self.failures} failed), "
                f"min {self.min_ms:.2f} ms, p50 {fmt(self.p50)}, p95 {fmt(self.p95)}, p99 {fmt(self.p99)}, "
                f"max {self.max_ms:.2f} ms, connect p50 "
                + (f"{self.connect_ms_p50:.2f} ms" if self.connect_ms_p50 is not None else "n/a"))


def _describe(exc: Exception) -> str:
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {exc}"
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout: {type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}"


def _with_path(url: str, path: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, path, "", ""))


def _connect_times(url: str, n: int, timeout_s: float, deadline: float) -> list[float]:
    """Fresh TCP connects to the URL's host:port (ms); failures are skipped."""
    p = urlsplit(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    out: list[float] = []
    for _ in range(n):
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        try:
            with socket.create_connection((p.hostname, port), timeout=timeout_s):
                out.append((time.perf_counter() - t0) * 1000.0)
        except OSError:
            continue
    return out


def measure_rpc_latency(
    url: str,
    *,
    probes: int = 400,
    warmup: int = 10,
    timeout_s: float = 5.0,
    interval_s: float = 0.0,
    max_duration_s: float = 60,
    connect_probes: int = CONNECT_PROBES,
    api_key: str | None = None,
    confidence: float = 0.95,
) -> RpcLatency:
    """GET ``url`` ``probes`` times over one keep-alive connection after ``warmup`` unmeasured GETs.

    A 404 on a ``/health`` URL switches to ``/v1/models`` (llama-cpp-python has no /health, see
    ``probe.HEALTH_PATHS``); ``target_url`` records the URL actually measured. A response >= 400 or an
    exception is a failure (counted, the first messages kept); after a transport failure the next
    attempt first re-opens the connection unmeasured, so no sample includes TCP setup.
    The whole call (warm-up, probes, connect sample) stops after ``max_duration_s``.
    """
    import httpx

    if probes < 1:
        raise ValueError("probes must be >= 1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.monotonic()
    deadline = start + max_duration_s
    result = RpcLatency(target_url=url, probes=0, failures=0, confidence=confidence)

    def note(msg: str) -> None:
        if msg not in result.errors and len(result.errors) < _MAX_ERRORS_KEPT:
            result.errors.append(msg)

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(timeout=timeout_s, headers=headers, limits=limits, trust_env=False) as client:
        # warm-up (also resolves the health path): opens the connection, JIT paths on the server
        for i in range(max(warmup, 1)):
            if time.monotonic() > deadline:
                break
            try:
                r = client.get(result.target_url)
                if (i == 0 and r.status_code == 404 and urlsplit(result.target_url).path.endswith("/health")):
                    result.target_url = _with_path(result.target_url, _FALLBACK_PATH)
                    client.get(result.target_url)
            except Exception:  # noqa: BLE001 - a dead host shows up in the measured phase; don't wait twice
                break

        reconnect = False
        while result.probes < probes:
            if time.monotonic() > deadline:
                result.stopped_early = True
                break
            if interval_s > 0 and result.probes:
                time.sleep(interval_s)
            result.probes += 1
            try:
                if reconnect:  # re-open the connection outside the measurement
                    client.get(result.target_url)
                    reconnect = False
                t0 = time.perf_counter()
                r = client.get(result.target_url)
                dt = (time.perf_counter() - t0) * 1000.0
            except Exception as exc:  # noqa: BLE001 - a failure is a finding, not a crash
                result.failures += 1
                reconnect = True
                note(_describe(exc))
                continue
            if r.status_code >= 400:
                result.failures += 1
                note(f"HTTP {r.status_code}")
                continue
            result.samples_ms.append(dt)

    if connect_probes > 0:
        result.connect_samples_ms = _connect_times(result.target_url, connect_probes, timeout_s, deadline)
    result.duration_s = time.monotonic() - start
    return result


def rpc_target(lab: Lab, host_name: str) -> str | None:
    """The health URL of the first endpoint on ``host_name`` (None when the host serves none).

    vLLM and llama.cpp: ``/health`` (``measure_rpc_latency`` falls back to ``/v1/models`` on a 404);
    Triton: ``/v2/health/ready``; other OpenAI-compatible servers: ``/v1/models``.
    """
    for ep in lab.endpoints:
        if ep.host == host_name:
            return ep.base_url + HEALTH_PATHS[ep.kind]
    return None


def store_rpc_latency(warehouse: Warehouse, host: str, result: RpcLatency, dagster_run_id: str | None,
                      trend: int = 10) -> list[tuple]:
    """Append one measurement to ``rpc_latency`` (its one writer); returns the host's last ``trend``
    (measured_at, p50_ms, p95_ms), newest first."""
    from datetime import datetime, timezone

    from idp_pipelines.warehouse import insert_rows

    with warehouse.write() as con:
        insert_rows(con, "rpc_latency", [{"measured_at": datetime.now(timezone.utc), "dagster_run_id": dagster_run_id,
                                          "host": host, **result.row()}])
        return con.execute("SELECT measured_at, p50_ms, p95_ms FROM rpc_latency WHERE host = ? "
                           "ORDER BY measured_at DESC LIMIT ?", [host, trend]).fetchall()
