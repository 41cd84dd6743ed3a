from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from idp_pipelines.bench.metrics import min_samples_for_percentile
from idp_pipelines.bench.rpc import RpcLatency, measure_rpc_latency, rpc_target, store_rpc_latency
from idp_pipelines.lab import load_lab
from idp_pipelines.settings import REPO_ROOT
from idp_pipelines.warehouse import Warehouse
from tests.support import free_port

ROW_COLUMNS = {
    "target_url", "probes", "failures", "connect_ms_p50", "min_ms", "p50_ms", "p50_lo", "p50_hi",
    "p95_ms", "p95_lo", "p95_hi", "p99_ms", "p99_lo", "p99_hi", "max_ms", "mean_ms", "stdev_ms", "samples_ms",
}


class HealthServer:
    """A tiny keep-alive HTTP server on 127.0.0.1 answering /health after `delay_s`."""

    def __init__(self, delay_s: float = 0.003, *, health_404: bool = False, stop_after: int | None = None):
        self.delay_s, self.health_404, self.stop_after = delay_s, health_404, stop_after
        self.requests = 0
        self.refusing = False
        self.paths: list[str] = []
        self.serving_connections: set[int] = set()  # connections that answered at least one request
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.stopped = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # headers and body go out in two writes: without NODELAY, Nagle + delayed ACK add ~40 ms
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with outer._lock:
                    outer._sockets.append(self.connection)

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                with outer._lock:
                    if outer.refusing:  # going away: hang up without an answer
                        self.close_connection = True
                        return
                    outer.requests += 1
                    outer.paths.append(self.path)
                    outer.serving_connections.add(id(self.connection))
                    trigger = outer.stop_after is not None and outer.requests == outer.stop_after
                    outer.refusing = trigger
                if self.path == "/health" and outer.health_404:
                    status, body = 404, b"not found"
                elif self.path in ("/health", "/v1/models"):
                    time.sleep(outer.delay_s)
                    status, body = 200, (b"ok" if self.path == "/health" else json.dumps({"data": []}).encode())
                else:
                    status, body = 404, b"not found"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                if trigger:  # after this answer is out
                    threading.Thread(target=outer.stop, daemon=True).start()

        class Server(ThreadingHTTPServer):
            request_queue_size = 64  # the connect sample opens connections back to back
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        with self._lock:
            for s in self._sockets:  # end keep-alive connections too, not only the listener
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __enter__(self) -> HealthServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self._thread.join(timeout=5)


def test_measures_keepalive_round_trip_with_cis():
    with HealthServer(delay_s=0.003) as srv:
        r = measure_rpc_latency(srv.url + "/health", probes=100, warmup=5, timeout_s=5, max_duration_s=30)
    assert isinstance(r, RpcLatency)
    assert (r.probes, r.failures, r.n) == (100, 0, 100)
    assert r.target_url == srv.url + "/health"
    # every request sleeps 3 ms on the server: nothing can be faster (how close it gets is make bench's)
    assert r.min_ms >= 2.9 and r.p50.value >= 2.9
    assert r.p50.lo <= r.p50.value <= r.p50.hi
    assert r.p95.sufficient and r.p95.lo <= r.p95.value <= r.p95.hi
    assert r.min_ms <= r.p50.value <= r.p95.value <= r.max_ms
    # 100 samples cannot bound p99 (needs ~367): marked insufficient, never silently the max
    assert min_samples_for_percentile(99) > 100
    assert not r.p99.sufficient and r.p99.value is None
    assert r.mean_ms > 0 and r.stdev_ms >= 0
    # one keep-alive connection served warm-up and every probe: samples exclude TCP setup
    assert len(srv.serving_connections) == 1
    assert srv.requests == 105
    # fresh connects were sampled separately
    assert r.connect_samples_ms and r.connect_ms_p50 > 0


def test_row_matches_rpc_latency_table(tmp_path):
    with HealthServer(delay_s=0.001) as srv:
        r = measure_rpc_latency(srv.url + "/health", probes=80, warmup=2)
    row = r.row()
    assert set(row) == ROW_COLUMNS
    assert row["p99_ms"] is None  # insufficient
    assert row["p95_ms"] is not None and row["p50_lo"] <= row["p50_ms"] <= row["p50_hi"]
    assert len(row["samples_ms"]) == 80 and all(isinstance(x, float) for x in row["samples_ms"])
    wh = Warehouse(tmp_path / "wh.duckdb")
    trend = store_rpc_latency(wh, "jetson-orin", r, "dagster-1")
    assert len(trend) == 1 and trend[0][1] == row["p50_ms"]
    with wh.read() as con:
        assert con.execute("SELECT host, dagster_run_id, probes, len(samples_ms), p99_ms FROM rpc_latency"
                           ).fetchone() == ("jetson-orin", "dagster-1", 80, 80, None)


def test_failures_are_counted_when_the_server_stops_midway():
    with HealthServer(delay_s=0.002, stop_after=35) as srv:  # 5 warm-up + 30 probes, then it goes away
        r = measure_rpc_latency(srv.url + "/health", probes=100, warmup=5, timeout_s=2, max_duration_s=120)
    assert r.probes == 100 and not r.stopped_early  # refused attempts are counted, not waited out
    assert r.failures + r.n == 100
    assert r.n == 30  # 35 answered requests = 5 warm-up + 30 probes; every later attempt failed
    assert r.failures == 70
    assert r.errors and all("connect" in e or "Error" in e for e in r.errors)  # the reason is kept
    row = r.row()
    assert row["failures"] == r.failures and row["p50_ms"] is not None


def test_unreachable_target_never_raises():
    url = f"http://127.0.0.1:{free_port()}/health"
    r = measure_rpc_latency(url, probes=5, warmup=1, timeout_s=1, max_duration_s=10, connect_probes=2)
    assert (r.probes, r.failures, r.n) == (5, 5, 0)
    assert r.connect_ms_p50 is None
    row = r.row()
    assert row["min_ms"] is None and row["p50_ms"] is None and row["samples_ms"] == []
    assert "no successful probe" in r.summary()


def test_llamacpp_without_health_falls_back_to_models():
    with HealthServer(delay_s=0.001, health_404=True) as srv:
        r = measure_rpc_latency(srv.url + "/health", probes=20, warmup=2)
    assert r.target_url == srv.url + "/v1/models"
    assert (r.n, r.failures) == (20, 0)
    assert srv.paths.count("/health") == 1


def test_bounded_by_max_duration():
    with HealthServer(delay_s=0.05) as srv:
        r = measure_rpc_latency(srv.url + "/health", probes=1000, warmup=1, interval_s=0.01,
                                max_duration_s=0.5, connect_probes=1)
    # each probe takes >= 60 ms (50 ms answer + 10 ms interval): 0.5 s holds at most 9 of them
    assert r.stopped_early and r.probes <= 9 and len(r.connect_samples_ms) <= 1


@pytest.fixture(scope="module")
def lab():
    return load_lab(REPO_ROOT / "labs" / "schlimers.yaml")


def test_rpc_target_is_the_first_endpoint_health_url(lab):
    assert rpc_target(lab, "jetson-orin") == "http://192.168.1.50:8001/health"
    assert rpc_target(lab, "schlimers-server") == "http://schlimers-server:8000/health"
    assert rpc_target(lab, "xps15") is None
    assert rpc_target(lab, "no-such-host") is None
