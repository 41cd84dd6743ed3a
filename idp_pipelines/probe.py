"""Probe inference endpoints: is it up, which models does it serve, how long is a round trip.

Plain Python (httpx), no Dagster. API keys are sent as bearer tokens and never kept in a result.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

    from idp_pipelines.lab import Endpoint
    from idp_pipelines.warehouse import Warehouse

# Where each engine says it is ready. llama-cpp-python's server has no /health (the C++ server does),
# so a 404 there falls back to the model list, which every OpenAI-compatible server has.
HEALTH_PATHS = {"vllm": "/health", "llamacpp": "/health", "triton": "/v2/health/ready", "openai": "/v1/models"}


@dataclass
class ProbeResult:
    endpoint: str
    kind: str
    host: str
    base_url: str
    required: bool
    up: bool
    status_code: int | None
    error: str | None
    expected_model: str | None
    served_models: list[str] = field(default_factory=list)
    model_served: bool | None = None
    rtt_ms: list[float] = field(default_factory=list)
    # llama.cpp's /props as the server reports them (slots, context, build); not an endpoint_probes column
    server_props: dict | None = None

    @property
    def rtt_min_ms(self) -> float | None:
        return min(self.rtt_ms) if self.rtt_ms else None

    @property
    def rtt_p50_ms(self) -> float | None:
        return statistics.median(self.rtt_ms) if self.rtt_ms else None

    @property
    def rtt_max_ms(self) -> float | None:
        return max(self.rtt_ms) if self.rtt_ms else None

    def row(self) -> dict:
        d = asdict(self)
        d.pop("rtt_ms")
        d.pop("server_props")
        return {**d, "probes": len(self.rtt_ms), "rtt_min_ms": self.rtt_min_ms,
                "rtt_p50_ms": self.rtt_p50_ms, "rtt_max_ms": self.rtt_max_ms}


def _describe(exc: Exception, url: str) -> str:
    import httpx

    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect to {url} (is the server running and the port right?)"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer from {url} within the timeout"
    return f"{type(exc).__name__} from {url}: {exc}"


def _served_models(client: httpx.Client, ep: Endpoint) -> list[str]:
    if ep.kind == "triton":
        r = client.post("/v2/repository/index", json={})
        r.raise_for_status()
        return [m.get("name", "") for m in r.json() if m.get("state", "READY") == "READY"]
    r = client.get("/v1/models")
    r.raise_for_status()
    return [m.get("id", "") for m in r.json().get("data", [])]


def _llamacpp_props(client: httpx.Client) -> dict | None:
    """What llama.cpp's server says it runs with: slots, context, model file, build."""
    try:
        r = client.get("/props")
        if r.status_code != 200:
            return None
        props = r.json()
    except Exception:  # noqa: BLE001 - an older server without /props costs the record, nothing else
        return None
    gen = props.get("default_generation_settings") or {}
    return {"total_slots": props.get("total_slots"), "n_ctx": gen.get("n_ctx") or props.get("n_ctx"),
            "model_path": props.get("model_path"), "build_info": props.get("build_info"),
            "cache_prompt": (gen.get("params") or {}).get("cache_prompt")}


def probe_endpoint(ep: Endpoint, *, api_key: str | None = None, probes: int = 5,
                   timeout_s: float = 5.0, props: bool = False) -> ProbeResult:
    """Health, served models and `probes` round trips of the health request (after one warm-up); with
    ``props``, llama.cpp's own account of its settings too."""
    import httpx

    expected = ep.served_model_name or ep.model
    result = ProbeResult(endpoint=ep.name, kind=ep.kind, host=ep.host, base_url=ep.base_url,
                         required=ep.required, up=False, status_code=None, error=None, expected_model=expected)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    health = HEALTH_PATHS[ep.kind]
    # a plain-http endpoint needs no CA bundle: loading one costs ~20 ms of start-up CPU for nothing
    verify = not ep.base_url.startswith("http://")
    with httpx.Client(base_url=ep.base_url, headers=headers, timeout=timeout_s, verify=verify) as client:
        try:
            r = client.get(health)
            if r.status_code == 404 and health != "/v1/models":
                health = "/v1/models"
                r = client.get(health)
            result.status_code = r.status_code
            if r.status_code in (401, 403):
                result.error = (f"{ep.base_url}{health} answered {r.status_code}: the API key was refused"
                                + (f" (set {ep.api_key_env})" if ep.api_key_env else ""))
                return result
            if r.status_code >= 400:
                result.error = f"{ep.base_url}{health} answered HTTP {r.status_code}"
                return result
            result.up = True
            for _ in range(probes):
                t0 = time.perf_counter()
                client.get(health)
                result.rtt_ms.append((time.perf_counter() - t0) * 1000.0)
        except Exception as exc:  # noqa: BLE001 - every failure is a finding, not a crash
            result.error = _describe(exc, ep.base_url + health)
            result.up = False
            return result
        if props and ep.kind == "llamacpp":
            result.server_props = _llamacpp_props(client)
        try:
            result.served_models = _served_models(client, ep)
            result.model_served = expected in result.served_models if expected else None
        except Exception as exc:  # noqa: BLE001
            result.error = f"up, but listing models failed: {_describe(exc, ep.base_url)}"
    return result


def probe_all(endpoints: list[Endpoint], *, probes: int = 5, timeout_s: float = 5.0) -> list[ProbeResult]:
    """Probe every endpoint concurrently (a dead host costs one timeout, not one per endpoint); each key
    comes from `Endpoint.api_key()`."""
    if not endpoints:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(endpoints))) as pool:
        return list(pool.map(lambda ep: probe_endpoint(ep, api_key=ep.api_key(), probes=probes,
                                                       timeout_s=timeout_s), endpoints))


def store_probes(warehouse: Warehouse, results: list[ProbeResult], dagster_run_id: str | None) -> list[dict]:
    """Append the probes to ``endpoint_probes`` (its one writer); returns the rows written."""
    from datetime import datetime, timezone

    from idp_pipelines.warehouse import insert_rows

    probed_at = datetime.now(timezone.utc)
    rows = [r.row() for r in results]
    with warehouse.write() as con:
        insert_rows(con, "endpoint_probes", [{"probed_at": probed_at, "dagster_run_id": dagster_run_id, **row}
                                             for row in rows])
    return rows
