"""How accurate and how cheap is the benchmark harness? Measured against injected truth.

The synthetic server (a test double, idp_pipelines/doubles) runs in its own process, as a real engine
would, the harness in this one, both on the same cores. Prints each figure, its goal and whether it is
met, and takes the TTFT tail at c=64 apart: with the server's clock in the first chunk (the same
CLOCK_MONOTONIC as the client's), each request's TTFT splits into

  uplink   client send -> the server's event loop read the request's last bytes (client, kernel)
  server   how late the server wrote the first chunk after its intended time (server event loop)
  downlink server wrote it -> client parsed it  (client event loop busy with other streams)

so a tail is pinned on the side that causes it before anything is changed.

Each worker sends 12 requests in (a), 24 in (b). All requests are alike, so the workers start in step:
a round's sends, first tokens and ends fall in the same few milliseconds on the same two cores, which
costs every client (the floor too) part of a percent. They drift apart over the rounds (the bench prints
how far), and the ideal throughput it compares with is the rate of that steady state. With 4 rounds a
step is mostly in step: `--rounds 4` shows it (figures for both in the README).

    .venv/bin/python benchmarks/bench_harness.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from idp_pipelines.bench.client import BenchClient, EndpointConfig, Workload  # noqa: E402
from idp_pipelines.bench.host_load import HostLoadMeter  # noqa: E402
from idp_pipelines.bench.load import fixed_concurrency, run_on_loop, run_step  # noqa: E402
from idp_pipelines.doubles.synthetic_server import SyntheticConfig, synthetic_server_subprocess  # noqa: E402


class StampedClient(BenchClient):
    """Keeps, per request, the absolute send time and the server's stamps from the first chunk."""

    stamps: dict[int, dict[str, float]]
    gaps: list[float]  # ms from a worker's previous response end to its next send: the harness's own time
    ends: dict  # per worker task, when its last response ended

    async def send(self, record, t0, deadline=None):
        task, now = asyncio.current_task(), time.perf_counter()
        if task in self.ends:
            self.gaps.append((now - self.ends[task]) * 1000)
        self.stamps.setdefault(id(record), {})["send"] = now
        out = await super().send(record, t0, deadline)
        self.ends[task] = time.perf_counter()
        return out

    def _handle_event(self, rec, state, event, t):
        if rec.t_first_token is None and b'"x_stamp"' in event:
            obj = json.loads(event.split(b"data: ", 1)[1])
            recv, intended, written = obj["x_stamp"]
            self.stamps.setdefault(id(rec), {}).update(recv=recv, intended=intended, written=written,
                                                       read=time.perf_counter())
        super()._handle_event(rec, state, event, t)


def _ideal(ttft_s: float, itl_s: float, tokens: int, concurrency: int) -> float:
    """Tokens per second of a closed loop that loses no time between requests."""
    return concurrency * tokens / (ttft_s + (tokens - 1) * itl_s)


def _step(ttft_s: float, itl_s: float, tokens: int, concurrency: int, rounds: int):
    config = SyntheticConfig(ttft_s=ttft_s, itl_s=itl_s, stamp=True)
    with synthetic_server_subprocess(config) as (proc, url):
        ep = EndpointConfig(url, "synthetic", api="chat", engine="synthetic")
        spec = fixed_concurrency(concurrency, concurrency * rounds, warmup_requests=concurrency,
                                 max_duration_s=120)

        async def go():
            async with StampedClient(ep, Workload(max_tokens=tokens, ignore_eos=True), concurrency) as client:
                client.stamps, client.gaps, client.ends = {}, [], {}
                step = await run_step(client, spec, host_meter=HostLoadMeter(exclude_pids=[proc.pid]))
                step.__dict__["gaps"] = client.gaps
                return step, client.stamps

        step, stamps = run_on_loop(go())
    s = step.summary()
    ideal = _ideal(ttft_s, itl_s, tokens, concurrency)
    server_cpu = (step.server_metrics.counters.get("process_cpu_seconds_total")
                  if step.server_metrics else None)
    return step, s, ideal, server_cpu, stamps


async def _lean_step(url: str, tokens: int, concurrency: int, rounds: int) -> tuple[list[float], int, float]:
    """The floor: a minimal asyncio client (one keep-alive connection per worker, raw HTTP/1.1, no
    parsing beyond finding the first token and the last chunk) against the same server, same load.
    What it loses to the ideal is lost by the server, the kernel and a Python client at all, not by
    the harness. Returns (TTFTs in ms, tokens, seconds from the first send to the last end)."""
    port = int(url.rsplit(":", 1)[1])
    ttfts: list[float] = []
    counted = 0
    starts: list[float] = []
    ends: list[float] = []

    barrier = asyncio.Barrier(concurrency)

    async def request(reader, writer, text: str) -> tuple[float, float, float, int]:
        body = json.dumps({"model": "synthetic", "stream": True, "max_tokens": tokens, "ignore_eos": True,
                           "messages": [{"role": "user", "content": text}]}).encode()
        t = time.perf_counter()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await reader.readuntil(b"\r\n\r\n")
        first, got, buf, recent = None, 0, b"", b""
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("the server closed the connection mid-stream")
            buf += data
            recent = (recent + data)[-16:]  # the raw tail, whether or not the last chunk came in its own read
            done = recent.endswith(b"\r\n0\r\n\r\n")  # the last chunk of the chunked body
            k = buf.rfind(b"\n") + 1  # count tokens in whole events only
            c = buf.count(b'"content":" tok', 0, k)
            if c and first is None:
                first = time.perf_counter()
            got, buf = got + c, buf[k:]
            if done:
                return t, first, time.perf_counter(), got

    async def worker(w: int) -> None:
        nonlocal counted
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await request(reader, writer, f"lean warm-up {w}")  # as the harness's warm-up: one per worker
            await barrier.wait()
            for i in range(rounds):
                t, first, end, got = await request(reader, writer, f"lean {w} {i}")
                starts.append(t)
                ends.append(end)
                ttfts.append((first - t) * 1000)
                counted += got
        finally:
            writer.close()

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return ttfts, counted, max(ends) - min(starts)


def _lean(ttft_s: float, itl_s: float, tokens: int, concurrency: int, rounds: int) -> tuple[float, float, float]:
    """(TTFT p50, TTFT p95, fraction of ideal throughput) of the minimal client on this machine now."""
    config = SyntheticConfig(ttft_s=ttft_s, itl_s=itl_s)
    with synthetic_server_subprocess(config) as (_proc, url):
        ttfts, counted, seconds = run_on_loop(_lean_step(url, tokens, concurrency, rounds))
    q = statistics.quantiles(ttfts, n=100)
    return q[49], q[94], counted / seconds / _ideal(ttft_s, itl_s, tokens, concurrency)


def _print_lean(ttft_s: float, itl_s: float, tokens: int, concurrency: int, rounds: int) -> None:
    p50, p95, frac = _lean(ttft_s, itl_s, tokens, concurrency, rounds)
    print(f"  the floor, a minimal asyncio client (same server, same load, run right after): TTFT p50 {p50:.2f} ms, "
          f"p95 {p95:.2f} ms, throughput {frac:.1%} of ideal")


def _goal(label: str, value: str, goal: str, met: bool) -> bool:
    print(f"  {label:<34} {value:<34} goal {goal:<16} {'MET' if met else 'NOT MET'}")
    return met


def _tail_apart(step, stamps: dict, ttft_s: float) -> None:
    """Mean of each TTFT component (ms) for the requests at or above p95 against those around p50."""
    rows = []
    for r in step.records:
        st = stamps.get(id(r), {})
        if r.ok and {"send", "recv", "intended", "written", "read"} <= set(st):
            rows.append({
                "ttft": (r.t_first_token - r.t_sent) * 1000,
                "uplink": (st["recv"] - st["send"]) * 1000,
                "server": (st["written"] - st["intended"]) * 1000,
                "downlink": (st["read"] - st["written"]) * 1000,
            })
    if len(rows) < 20:
        print("  (too few stamped requests to take the tail apart)")
        return
    rows.sort(key=lambda x: x["ttft"])
    n = len(rows)
    groups = {"p40-p60": rows[int(n * 0.4):int(n * 0.6)], ">= p95": rows[int(n * 0.95):]}
    print(f"  TTFT taken apart (ms over the injected {ttft_s * 1000:.0f} ms; {n} requests):")
    print(f"    {'requests':<10} {'TTFT':>8} {'uplink':>8} {'server':>8} {'downlink':>9}")
    for name, g in groups.items():
        m = {k: statistics.fmean(x[k] for x in g) for k in ("ttft", "uplink", "server", "downlink")}
        print(f"    {name:<10} {m['ttft']:8.2f} {m['uplink']:8.2f} {m['server']:8.2f} {m['downlink']:9.2f}")
    # Request ids are handed out as workers come free, so each run of `concurrency` ids is one round. All
    # requests are alike: the workers start together and stay in step for a while (a round's sends, first
    # tokens and ends all fall in the same few milliseconds on the same two cores), then drift apart.
    c = step.load.concurrency
    # (chunked before failed requests are left out, so one error does not shift every later round)
    by_id = sorted(step.records, key=lambda r: r.request_id)
    rounds = [[r for r in g if r.ok] for g in (by_id[i:i + c] for i in range(0, len(by_id), c)) if len(g) == c]
    if len(rounds) >= 2 and rounds[0] and rounds[-1]:
        def spread(g) -> float:
            return (max(r.t_sent for r in g) - min(r.t_sent for r in g)) * 1000

        def ttft50(g) -> float:
            return statistics.median((r.t_first_token - r.t_sent) * 1000 for r in g)

        print(f"    rounds of {c} requests: their sends spread over {spread(rounds[0]):.1f} ms in the first, "
              f"{spread(rounds[-1]):.1f} ms in the last (of {len(rounds)}); TTFT p50 {ttft50(rounds[0]):.2f} ms "
              f"in the first, {ttft50(rounds[-1]):.2f} ms in the last")
    gaps = step.__dict__.get("gaps") or []
    if gaps:
        print(f"    the harness's own time from a response's end to the worker's next send: median "
              f"{statistics.median(gaps) * 1000:.0f} us, max {max(gaps):.2f} ms ({len(gaps)} sends)")


def _startup(rounds: int = 3) -> tuple[float, float]:
    """CPU seconds of `idp bench` until its first request is sent, and its peak RSS (MB), best of rounds.

    Run as a user runs it (bytecode cached after the first round), against the synthetic server.
    """
    hook = (
        "import sys, resource\n"
        "import idp_pipelines.bench.client as c\n"
        "orig = c.BenchClient.send\n"
        "async def send(self, rec, t0, deadline=None):\n"
        "    if not getattr(c, '_first', False):\n"
        "        c._first = True\n"
        "        r = resource.getrusage(resource.RUSAGE_SELF)\n"
        "        print(f'FIRST {r.ru_utime + r.ru_stime}', file=sys.stderr, flush=True)\n"
        "    return await orig(self, rec, t0, deadline)\n"
        "c.BenchClient.send = send\n"
        "from idp_pipelines.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print(f'PEAK {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}', file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    import yaml

    from tests.support import write_lab

    cpu, peak = [], []
    with tempfile.TemporaryDirectory() as tmp, \
            synthetic_server_subprocess(SyntheticConfig(ttft_s=0.001, itl_s=0.0005)) as (_p, url):
        lab = write_lab(Path(tmp) / "lab.yaml", endpoint_url=url)
        data = yaml.safe_load(lab.read_text())
        # the synthetic server speaks vLLM's wire: no llama-server flags, no llama.cpp service deployed for it
        ep = data["endpoints"][0]
        ep["kind"] = "vllm"
        ep.pop("llamacpp", None)
        data["services"] = [sv for sv in data.get("services", []) if sv.get("endpoint") != ep["name"]]
        lab.write_text(yaml.safe_dump(data))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env.update(IDP_HOME=f"{tmp}/home", PYTHONPATH=str(Path(__file__).resolve().parent.parent),
                   PYTHONPYCACHEPREFIX=f"{tmp}/pycache")
        for i in range(rounds + 1):
            out = subprocess.run([sys.executable, "-c", hook, "bench", "local-llamacpp", "--concurrency", "1",
                                  "--requests", "1", "--max-tokens", "1", "--lab", str(lab)],
                                 env=env, capture_output=True, text=True)
            figures = dict(line.split() for line in out.stderr.splitlines() if line.startswith(("FIRST", "PEAK")))
            if out.returncode != 0 or len(figures) != 2:
                raise SystemExit(f"idp bench failed: {out.stderr[-2000:]}")
            if i:  # the first round writes the bytecode cache
                cpu.append(float(figures["FIRST"]))
                peak.append(float(figures["PEAK"]))
    return min(cpu), max(peak)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12,
                        help="requests per worker in (a), twice as many in (b) (default 12; see the README for 4)")
    args = parser.parse_args()
    results = []
    t = time.perf_counter()

    print("(a) injected TTFT 50 ms, 10 ms/token, 64 tokens, concurrency 64")
    step, s, ideal, server_cpu_a, stamps = _step(0.050, 0.010, 64, 64, args.rounds)
    err = s["ttft_ms_p50"] - 50.0
    results.append(_goal("TTFT p50 vs 50 ms truth", f"{s['ttft_ms_p50']:.2f} ms ({err:+.2f})",
                         "within 6 ms", abs(err) <= 6))
    p95 = s["ttft_ms_p95"]
    results.append(_goal("TTFT p95 vs 50 ms truth", f"{p95:.2f} ms ({p95 - 50:+.2f})" if p95 else "insufficient n",
                         "within 6 ms", p95 is not None and abs(p95 - 50) <= 6))
    frac = s["output_tokens_per_s"] / ideal
    results.append(_goal("throughput vs ideal", f"{s['output_tokens_per_s']:.0f}/{ideal:.0f} tok/s ({frac:.1%})",
                         ">= 99 %", frac >= 0.99))
    print(f"  errors {s['n_errors']}/{s['n_requests']}, TPOT p50 {s['tpot_ms_p50']:.3f} ms, "
          f"resends {s['retries']}; during the step {step.host_load.describe()}")
    _tail_apart(step, stamps, 0.050)
    _print_lean(0.050, 0.010, 64, 64, args.rounds)
    tokens_a = s["output_tokens"]
    cpu_us = step.client_cpu_s / tokens_a * 1e6 if tokens_a else float("nan")

    print("(b) injected TTFT 20 ms, 2 ms/token, 64 tokens, concurrency 32")
    step_b, sb, ideal_b, _, stamps_b = _step(0.020, 0.002, 64, 32, args.rounds * 2)
    tpot_err = (sb["tpot_ms_p50"] - 2.0) / 2.0
    results.append(_goal("TPOT p50 vs 2 ms truth", f"{sb['tpot_ms_p50']:.4f} ms ({tpot_err:+.2%})",
                         "within 2 %", abs(tpot_err) <= 0.02))
    frac_b = sb["output_tokens_per_s"] / ideal_b
    results.append(_goal("throughput vs ideal",
                         f"{sb['output_tokens_per_s']:.0f}/{ideal_b:.0f} tok/s ({frac_b:.1%})",
                         ">= 99 %", frac_b >= 0.99))
    print(f"  TTFT p50 {sb['ttft_ms_p50']:.2f} ms, p95 {sb['ttft_ms_p95'] or float('nan'):.2f} ms vs 20 ms truth, "
          f"errors {sb['n_errors']}; during the step {step_b.host_load.describe()}")
    _tail_apart(step_b, stamps_b, 0.020)
    _print_lean(0.020, 0.002, 64, 32, args.rounds * 2)

    print("(c) CPU per streamed token in scenario (a), client and server in separate processes")
    results.append(_goal("client CPU per token", f"{cpu_us:.1f} us ({tokens_a} tokens)", "< 40 us", cpu_us < 40))
    if server_cpu_a is not None and tokens_a:
        print(f"  server CPU per token               {server_cpu_a / tokens_a * 1e6:.1f} us "
              f"({server_cpu_a:.2f} s over the step)")

    print("(d) `idp bench` start-up: CPU until the first request is sent, and peak memory")
    cpu_s, peak_mb = _startup()
    results.append(_goal("start-up CPU", f"{cpu_s:.2f} s", "< 0.7 s", cpu_s < 0.7))
    results.append(_goal("peak memory", f"{peak_mb:.0f} MB", "< 120 MB", peak_mb < 120))
    print(f"{sum(results)}/{len(results)} goals met in {time.perf_counter() - t:.1f} s "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: figures on a busy machine are worse)")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
