"""A cheap OpenAI-compatible streaming server with injected latency and known quirks.

Plain asyncio streams and hand-written HTTP/1.1 (keep-alive, chunked transfer) so the
server costs a few microseconds per token and is never the bottleneck of a benchmark
that shares a 2-core machine with it. Times are scheduled against absolute deadlines
(arrival + ttft + k * itl), so sleep overshoot does not accumulate into the TPOT. The arrival is
when the event loop read the request's last bytes, not when the server had parsed it: 64
requests that arrive together are parsed one after another (about 0.1 ms each here), and the
injected TTFT must not grow by the server's own queue of parsing, which is not the client's.

Per-request behaviour can be overridden with an ``x_synthetic`` object in the request
body whose keys are ``SyntheticConfig`` field names (tests use this to mix quirks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass

__all__ = [
    "SyntheticConfig",
    "SyntheticServer",
    "synthetic_server_subprocess",
]


@dataclass
class SyntheticConfig:
    """Latency model and quirks of the synthetic server."""

    ttft_s: float = 0.05
    itl_s: float = 0.01
    tokens_per_chunk: int = 1
    default_max_tokens: int = 16
    # Stop early (finish_reason "stop") after this many tokens unless ignore_eos / min_tokens.
    eos_after: int | None = None
    role_chunk: bool = True  # chat: first chunk carries only {"role": "assistant"}
    # "stream_options": separate usage chunk (choices=[]) only if include_usage was asked, as
    # OpenAI and vLLM do; "last_chunk": usage attached to the final content chunk; "none".
    usage: str = "stream_options"
    llamacpp_timings: bool = False  # add llama.cpp's `timings` object to the final chunk
    api_key: str | None = None
    error_every: int = 0  # every Nth request (1-based) sends an error event mid-stream
    drop_every: int = 0  # every Nth request drops the connection mid-stream
    http_status: int = 200  # e.g. 503 to make every request fail before streaming
    prefix_cache_words: int = 8  # emulated prefix cache keyed on the first N prompt words
    # llama.cpp's llama-server closes the connection after each streamed response while still saying
    # "Keep-Alive: timeout=5, max=100": emulate it, with the close this many seconds after the response
    # (a proxy that closes late makes a client that trusts the header wait for the close).
    close_after_stream_s: float | None = None
    # Put the server's own clock (perf_counter, the same CLOCK_MONOTONIC as the client's on Linux) in the
    # first content chunk: "x_stamp": [request arrived, intended first token, first chunk written]. Lets
    # `make bench` tell a late server from a late client when it takes the TTFT tail apart.
    stamp: bool = False


def _http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


_END = _http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"  # the last event and the end of the chunked body


class _State:
    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self.request_count = 0
        self.running = 0
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.seen_prefixes: set[str] = set()
        self.closes = 0  # connections closed by close_after_stream_s

    def metrics_text(self) -> str:
        return (
            "# TYPE process_cpu_seconds_total counter\n"
            f"process_cpu_seconds_total {time.process_time()}\n"
            "# HELP synthetic:requests_total Requests received.\n"
            "# TYPE synthetic:requests_total counter\n"
            f"synthetic:requests_total {self.request_count}\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="synthetic"}} {self.running}\n'
            "# TYPE vllm:generation_tokens_total counter\n"
            f'vllm:generation_tokens_total{{model_name="synthetic"}} {self.generation_tokens}\n'
            "# TYPE vllm:prompt_tokens_total counter\n"
            f'vllm:prompt_tokens_total{{model_name="synthetic"}} {self.prompt_tokens}\n'
            "# TYPE vllm:prefix_cache_queries_total counter\n"
            f'vllm:prefix_cache_queries_total{{model_name="synthetic"}} {self.prefix_queries}\n'
            "# TYPE vllm:prefix_cache_hits_total counter\n"
            f'vllm:prefix_cache_hits_total{{model_name="synthetic"}} {self.prefix_hits}\n'
        )


def _response(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}.get(
        status, "Error"
    )
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _error_body(message: str, err_type: str, code: int) -> bytes:
    return json.dumps({"error": {"message": message, "type": err_type, "code": code}}).encode()


class _ArrivalProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol that notes when the request's bytes were read, the last read winning:
    a request sent in parts has arrived when its last part has. (A body over the reader's 128 KiB
    pause limit would be read while it is parsed, so noted late; benchmark prompts are far smaller.)"""

    arrived: tuple[float, float] | None = None  # (loop.time(), perf_counter()), until the request is taken

    def data_received(self, data: bytes) -> None:
        self.arrived = (time.monotonic(), time.perf_counter())
        super().data_received(data)

    def take_arrival(self) -> tuple[float, float]:
        """The current request's arrival (now, if none was noted), and forget it for the next request."""
        arrived, self.arrived = self.arrived, None
        return arrived or (time.monotonic(), time.perf_counter())


async def _handle_connection(
    state: _State, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: _ArrivalProtocol
) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
            # the next request's bytes come only after this response (one request at a time per connection)
            arrived = protocol.take_arrival()
            keep = await _route(state, method, path.split("?", 1)[0], headers, body, writer, arrived)
            if not keep:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _route(
    state: _State,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    writer: asyncio.StreamWriter,
    arrived: tuple[float, float],
) -> bool:
    if method == "GET" and path == "/metrics":
        writer.write(_response(200, state.metrics_text().encode(), "text/plain; version=0.0.4"))
        return True
    if method == "GET" and path in ("/health", "/v1/models"):
        writer.write(_response(200, b'{"object":"list","data":[{"id":"synthetic"}]}'))
        return True
    if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
        writer.write(_response(404, _error_body(f"no route {method} {path}", "not_found", 404)))
        return True
    config = state.config
    if config.api_key is not None and headers.get("authorization") != f"Bearer {config.api_key}":
        writer.write(
            _response(401, _error_body("Incorrect API key provided.", "invalid_api_key", 401))
        )
        return True
    try:
        request = json.loads(body)
    except ValueError:
        writer.write(_response(400, _error_body("body is not JSON", "invalid_request", 400)))
        return True
    overrides = request.get("x_synthetic") or {}
    if overrides:
        config = dataclasses.replace(config, **overrides)
    state.request_count += 1
    if config.http_status != 200:
        writer.write(
            _response(config.http_status, _error_body("injected failure", "server_error", 500))
        )
        return True
    # per request, not shared state: a drop on one connection must not close another one
    keep = await _stream(state, config, request, path.endswith("chat/completions"), writer, arrived)
    if keep and config.close_after_stream_s is not None:
        await writer.drain()
        if config.close_after_stream_s > 0:
            await asyncio.sleep(config.close_after_stream_s)
        state.closes += 1
        return False
    return keep


async def _stream(
    state: _State,
    config: SyntheticConfig,
    request: dict,
    chat: bool,
    writer: asyncio.StreamWriter,
    arrived: tuple[float, float],
) -> bool:
    """Stream one response; False when the connection was dropped (not to be used again)."""
    loop = asyncio.get_running_loop()
    start, received = arrived  # loop.time() is time.monotonic()
    number = state.request_count
    prompt_text = (
        " ".join(str(m.get("content", "")) for m in request.get("messages", []))
        if chat
        else str(request.get("prompt", ""))
    )
    words = prompt_text.split()
    prompt_tokens = max(1, len(words))
    key = " ".join(words[: config.prefix_cache_words])
    cached = min(config.prefix_cache_words, prompt_tokens) if key in state.seen_prefixes else 0
    state.seen_prefixes.add(key)
    state.prompt_tokens += prompt_tokens
    state.prefix_queries += prompt_tokens
    state.prefix_hits += cached

    max_tokens = int(request.get("max_tokens") or config.default_max_tokens)
    n_tokens = max_tokens
    if config.eos_after is not None and not request.get("ignore_eos"):
        n_tokens = min(max_tokens, max(config.eos_after, int(request.get("min_tokens") or 0)))
    finish = "length" if n_tokens == max_tokens else "stop"
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": n_tokens,
        "total_tokens": prompt_tokens + n_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    timings = {
        "cache_n": cached,
        "prompt_n": prompt_tokens - cached,
        "prompt_ms": config.ttft_s * 1000,
        "predicted_n": n_tokens,
        "predicted_ms": config.itl_s * 1000 * max(0, n_tokens - 1),
    }
    if chat:
        head = (
            '{"id":"chatcmpl-%d","object":"chat.completion.chunk","created":0,'
            '"model":"synthetic","choices":[{"index":0,"delta":{"content":"' % number
        ).encode()
        mid = b'"},"logprobs":null,"finish_reason":'
    else:
        head = (
            '{"id":"cmpl-%d","object":"text_completion","created":0,'
            '"model":"synthetic","choices":[{"index":0,"text":"' % number
        ).encode()
        mid = b'","logprobs":null,"finish_reason":'

    keep_alive_header = b"Keep-Alive: timeout=5, max=100\r\n" if config.close_after_stream_s is not None else b""
    # one write (one send) per instant of the injected timeline: the head with the role chunk, each token,
    # the last token with the usage, [DONE] and the end of the body. 32 streams that start or end together
    # would otherwise queue two or three sends each (about 20 us apiece on loopback) behind one another.
    opening = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        + keep_alive_header + b"Transfer-Encoding: chunked\r\n\r\n"
    )
    state.running += 1
    try:
        if chat and config.role_chunk:
            role = {
                "id": f"chatcmpl-{number}",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "synthetic",
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                ],
            }
            opening += _http_chunk(b"data: " + json.dumps(role).encode() + b"\n\n")
        writer.write(opening)
        tpc = max(1, config.tokens_per_chunk)
        n_chunks = math.ceil(n_tokens / tpc)
        fail_at = n_chunks // 2
        sent = 0
        out = b""  # the chunk not yet written (none when no token is asked for)
        for i in range(n_chunks):
            if config.error_every and number % config.error_every == 0 and i == fail_at:
                err = _error_body("injected mid-stream failure", "server_error", 500)
                writer.write(_http_chunk(b"data: " + err + b"\n\n") + _END)
                return True
            if config.drop_every and number % config.drop_every == 0 and i == fail_at:
                # drain() returns at once below the high-water mark, and abort() discards what is still
                # buffered: on a busy machine the client then saw no response head at all, not a drop
                # mid-stream. Hang up only once the head and the chunks so far are in the kernel.
                while writer.transport.get_write_buffer_size():
                    await asyncio.sleep(0.001)
                writer.transport.abort()
                return False
            k = min(tpc, n_tokens - sent)
            sent += k
            # chunk i is ready when its last token is: ttft + (sent - 1) * itl
            delay = start + config.ttft_s + (sent - 1) * config.itl_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            last = i == n_chunks - 1
            text = b" tok" * k
            if last:
                tail = b'"' + finish.encode() + b'"}]'
                if config.usage == "last_chunk":
                    tail += b',"usage":' + json.dumps(usage).encode()
                if config.llamacpp_timings:
                    tail += b',"timings":' + json.dumps(timings).encode()
                event = head + text + mid + tail + b"}"
            else:
                event = head + text + mid + b"null}]}"
            if config.stamp and i == 0:
                stamp = [received, received + config.ttft_s + (sent - 1) * config.itl_s, time.perf_counter()]
                event = event[:-1] + b',"x_stamp":' + json.dumps(stamp).encode() + b"}"
            out = _http_chunk(b"data: " + event + b"\n\n")
            state.generation_tokens += k
            if last:
                break  # written with what ends the body, below
            writer.write(out)
            if writer.transport.get_write_buffer_size() > 65536:
                await writer.drain()
        if config.usage == "stream_options" and include_usage:
            obj = "chat.completion.chunk" if chat else "text_completion"
            final = {"id": f"x-{number}", "object": obj, "created": 0, "model": "synthetic",
                     "choices": [], "usage": usage}
            out += _http_chunk(b"data: " + json.dumps(final).encode() + b"\n\n")
        writer.write(out + _END)
        return True
    finally:
        state.running -= 1


class SyntheticServer:
    """The synthetic server on its own event loop in a daemon thread (127.0.0.1, port 0)."""

    def __init__(self, config: SyntheticConfig | None = None, port: int = 0) -> None:
        self.config = config or SyntheticConfig()
        self._port = port
        self._state = _State(self.config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def request_count(self) -> int:
        return self._state.request_count

    def start(self) -> SyntheticServer:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(_start(self._state, self._port))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name="synthetic-openai", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("synthetic server did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None

    def __enter__(self) -> SyntheticServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _start(state: _State, port: int) -> asyncio.base_events.Server:
    loop = asyncio.get_running_loop()

    def factory() -> _ArrivalProtocol:  # asyncio.start_server's, with the arrival noted
        protocol: _ArrivalProtocol

        def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Awaitable[None]:
            return _handle_connection(state, reader, writer, protocol)

        protocol = _ArrivalProtocol(asyncio.StreamReader(loop=loop), connected, loop=loop)
        return protocol

    return await loop.create_server(factory, "127.0.0.1", port, backlog=1024)


@contextlib.contextmanager
def synthetic_server_subprocess(
    config: SyntheticConfig | None = None, startup_timeout_s: float = 20.0
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run the server in a child process; yields (process, base_url) and stops it after."""
    config = config or SyntheticConfig()
    cmd = [sys.executable, "-m", "idp_pipelines.doubles.synthetic_server", "--port", "0",
           "--config-json", json.dumps(dataclasses.asdict(config))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline() if proc.stdout else ""
            if line.startswith("LISTENING ") or not line:
                break
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"synthetic server subprocess did not start: {line!r}")
        yield proc, f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ttft-ms", type=float)
    parser.add_argument("--itl-ms", type=float)
    parser.add_argument("--tokens-per-chunk", type=int)
    parser.add_argument("--api-key-env", help="read the expected API key from this env var")
    parser.add_argument("--config-json", help="SyntheticConfig fields as JSON")
    args = parser.parse_args(argv)
    config = SyntheticConfig(**json.loads(args.config_json)) if args.config_json else SyntheticConfig()
    if args.ttft_ms is not None:
        config.ttft_s = args.ttft_ms / 1000
    if args.itl_ms is not None:
        config.itl_s = args.itl_ms / 1000
    if args.tokens_per_chunk is not None:
        config.tokens_per_chunk = args.tokens_per_chunk
    if args.api_key_env:
        config.api_key = os.environ[args.api_key_env]

    async def serve() -> None:
        server = await _start(_State(config), args.port)
        port = server.sockets[0].getsockname()[1]
        print(f"LISTENING {port}", flush=True)
        async with server:
            await server.serve_forever()

    # select(), not epoll: epoll_wait takes whole milliseconds and Python rounds every sleep up to the next
    # one, so each deadline of the injected truth was met 0.5 ms late on average (0.6 ms measured at the
    # first chunk); select() takes microseconds (0.1-0.3 ms late). A process of its own has far fewer
    # than select()'s 1024 descriptors.
    with contextlib.suppress(KeyboardInterrupt), \
            asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selectors.SelectSelector())) as runner:
        runner.run(serve())


if __name__ == "__main__":
    main()
