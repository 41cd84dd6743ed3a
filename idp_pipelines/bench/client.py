"""Streaming OpenAI-compatible client that times every chunk and never raises per request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from idp_pipelines.bench.fast_transport import FastTransport
from idp_pipelines.bench.records import RequestRecord

__all__ = [
    "cache_bust_prefix",
    "BenchError",
    "EndpointConfig",
    "Workload",
    "BenchClient",
    "length_control_params",
]

Api = Literal["completions", "chat"]
Engine = Literal["openai", "vllm", "llamacpp", "synthetic"]


class BenchError(Exception):
    """A benchmark could not be configured or run (not a failed request: those are records)."""


@dataclass(frozen=True)
class EndpointConfig:
    """Where and how to talk to the server. The API key is a value, never logged or stored."""

    base_url: str  # server root, e.g. http://127.0.0.1:8000 (without /v1)
    model: str
    api: Api = "completions"
    engine: Engine = "openai"
    api_key: str | None = field(default=None, repr=False)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 120.0  # longest silence allowed between two reads
    request_timeout_s: float = 600.0  # whole request, headers to last byte
    include_usage: bool = True  # stream_options.include_usage
    # "fast": lean HTTP/1.1 transport (~10x less client CPU per chunk); "httpcore": httpx's own
    transport: Literal["fast", "httpcore"] = "fast"
    metrics_url: str | None = None  # Prometheus text; default {base_url}/metrics
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        path = "/v1/chat/completions" if self.api == "chat" else "/v1/completions"
        return self.base_url.rstrip("/") + path

    @property
    def resolved_metrics_url(self) -> str:
        return self.metrics_url or self.base_url.rstrip("/") + "/metrics"


@dataclass(frozen=True)
class Workload:
    """What each request asks for."""

    prompts: Sequence[str] = ("Write a short story about a lighthouse keeper.",)
    max_tokens: int = 128
    ignore_eos: bool = False  # force exactly max_tokens where the engine supports it
    min_tokens: int | None = None  # vLLM only
    # A prefix unique across the whole run leads every prompt, so no request can reuse another's
    # cached prompt (a prefix shared by the run, or ids restarting per step, would be served from cache)
    cache_bust: bool = False
    temperature: float = 0.0


def length_control_params(
    engine: Engine, max_tokens: int, ignore_eos: bool, min_tokens: int | None
) -> dict[str, Any]:
    """Request fields that pin the output length on the given engine.

    vLLM takes ``ignore_eos`` and ``min_tokens`` as extra sampling params; llama.cpp's C++ server
    takes ``ignore_eos`` and llama-cpp-python's server ``min_tokens`` (each ignores the other's
    field, so both are sent); OpenAI takes neither.
    """
    params: dict[str, Any] = {"max_tokens": max_tokens}
    if engine in ("vllm", "synthetic"):
        if ignore_eos:
            params["ignore_eos"] = True
        if min_tokens is not None:
            params["min_tokens"] = min_tokens
    elif engine == "llamacpp":
        if ignore_eos:
            params["ignore_eos"] = True
        if min_tokens is not None:
            params["min_tokens"] = min_tokens
    elif ignore_eos or min_tokens is not None:
        raise BenchError(
            f"engine {engine!r} cannot force the output length (ignore_eos/min_tokens); "
            "leave them unset and check length_honoured_fraction"
        )
    return params


# json.loads on bytes sniffs the encoding and wraps raw_decode: ~2 us a chunk the stream does not need
_decode = json.JSONDecoder().raw_decode

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def cache_bust_prefix(n: int) -> str:
    """A prefix unique for each n whose FIRST character differs for any 62 consecutive n.

    A prompt cache matches on the common token prefix, so uniqueness has to lead: n written in
    base 62 with the least significant digit first (a counter written the usual way shares its
    leading digits with its neighbours, "1234" and "1235" share the token "123").
    """
    out = ""
    while True:
        n, d = divmod(n, len(_DIGITS))
        out += _DIGITS[d]
        if not n:
            return out


def _env_proxied(url: str) -> bool:
    """Whether HTTP(S)_PROXY / ALL_PROXY (and NO_PROXY) send this URL through a proxy."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(url)
    proxies = getproxies()
    if parts.scheme not in proxies and "all" not in proxies:
        return False
    return not proxy_bypass(parts.netloc)


class _StreamFailed(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class BenchClient:
    """One httpx.AsyncClient sized to the concurrency; ``send`` turns a request into a record."""

    def __init__(
        self,
        endpoint: EndpointConfig,
        workload: Workload,
        max_connections: int,
        run_id: str | None = None,
    ) -> None:
        if not workload.prompts:
            raise BenchError("Workload.prompts is empty: give at least one prompt")
        self.endpoint = endpoint
        self.workload = workload
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self._sent = 0  # requests built over the client's life (= the run): the cache-bust counter
        self._length = length_control_params(
            endpoint.engine, workload.max_tokens, workload.ignore_eos, workload.min_tokens
        )
        # identity: the SSE parser reads raw bytes, so the body must not be compressed
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                   "Accept-Encoding": "identity"}
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        self._headers = headers
        n = max(1, max_connections)
        transport = None
        if endpoint.transport == "fast":
            transport = FastTransport(n, endpoint.connect_timeout_s, endpoint.read_timeout_s)
        # the direct path only where AsyncClient itself would use our transport: a URL the environment
        # routes through a proxy goes through AsyncClient's proxy mount, as before
        self._fast = None if transport is None or _env_proxied(endpoint.url) else transport
        # the request head, once (the fast path builds each request as bytes: head, length, body)
        self._fast_key, self._fast_head = FastTransport.request_head(
            "POST", endpoint.url, {"User-Agent": f"python-httpx/{httpx.__version__}", **headers})
        self._client = httpx.AsyncClient(
            transport=transport,
            # a plain-http endpoint needs no CA bundle (loading one costs ~20 ms of start-up CPU)
            verify=not endpoint.base_url.startswith("http://"),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            timeout=httpx.Timeout(
                connect=endpoint.connect_timeout_s,
                read=endpoint.read_timeout_s,
                write=endpoint.connect_timeout_s,
                pool=endpoint.request_timeout_s,
            ),
        )

    async def __aenter__(self) -> BenchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        return self._client

    def build_body(self, request_id: int) -> dict[str, Any]:
        prompt = self.workload.prompts[request_id % len(self.workload.prompts)]
        if self.workload.cache_bust:
            # then the run id, so the next run's request n does not meet this one's in the cache
            prompt = f"{cache_bust_prefix(self._sent)}{self.run_id[:8]}: {prompt}"
        self._sent += 1
        body: dict[str, Any] = {
            "model": self.endpoint.model,
            "stream": True,
            "temperature": self.workload.temperature,
            **self._length,
        }
        if self.endpoint.api == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.endpoint.include_usage:
            body["stream_options"] = {"include_usage": True}
        body.update(self.endpoint.extra_body)
        return body

    def redact(self, text: str) -> str:
        key = self.endpoint.api_key
        return text.replace(key, "***") if key else text

    async def send(
        self,
        record: RequestRecord,
        t0: float,
        deadline: float | None = None,
    ) -> RequestRecord:
        """Stream one request into ``record`` (times relative to perf_counter ``t0``).

        ``deadline`` is a perf_counter time after which the request is aborted (step limit).
        Never raises for request failures; they become ``record.error``.
        """
        perf = time.perf_counter
        content = json.dumps(self.build_body(record.request_id)).encode()
        record.max_tokens = self.workload.max_tokens
        limit = perf() + self.endpoint.request_timeout_s
        aborted_by_step = deadline is not None and deadline < limit
        if aborted_by_step:
            limit = deadline
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(loop.time() + (limit - perf())):
                record.t_sent = perf() - t0
                await self._stream(record, content, t0)
        except TimeoutError:
            if aborted_by_step:
                self.fail(record, "aborted", "aborted: step max_duration_s reached", t0)
            else:
                self.fail(
                    record, "timeout",
                    f"timeout: request exceeded request_timeout_s={self.endpoint.request_timeout_s}",
                    t0,
                )
        except _StreamFailed as exc:
            self.fail(record, exc.kind, str(exc), t0)
        except httpx.TimeoutException as exc:
            self.fail(record, "timeout",
                      f"timeout: {type(exc).__name__} from {self.endpoint.url}", t0)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            where = "mid-stream" if record.t_headers is not None else "before the response"
            self.fail(
                record, "connection",
                f"connection dropped {where} after {record.content_chunks} content chunks: "
                f"{type(exc).__name__}: {exc}",
                t0,
            )
        except httpx.ConnectError as exc:
            self.fail(record, "connection", f"cannot connect to {self.endpoint.url}: {exc}", t0)
        except Exception as exc:  # a bad response must never crash the run
            self.fail(record, "client", f"client error: {type(exc).__name__}: {exc}", t0)
        return record

    def fail(self, record: RequestRecord, kind: str, message: str, t0: float) -> None:
        record.error = self.redact(message)
        record.error_kind = kind
        record.t_end = time.perf_counter() - t0
        self._finalise_tokens(record)

    @contextlib.asynccontextmanager
    async def _post(self, content: bytes) -> AsyncIterator[httpx.Response]:
        """POST the body and yield the streaming response.

        On the fast transport the request goes to it directly as bytes: AsyncClient.stream's URL parsing,
        header merging, cookies, auth and event hooks cost about 100 us of client CPU a request, which at
        high concurrency delays the sends and reads being timed. Errors are the same httpx exceptions.
        """
        if self._fast is None:
            async with self._client.stream("POST", self.endpoint.url, content=content,
                                           headers=self._headers) as resp:
                yield resp
            return
        resp = await self._fast.send_bytes(
            self._fast_key, self._fast_head + b"Content-Length: %d\r\n\r\n" % len(content) + content)
        try:
            yield resp
        finally:
            await resp.aclose()

    async def _stream(self, rec: RequestRecord, content: bytes, t0: float) -> None:
        perf = time.perf_counter
        async with self._post(content) as resp:
            rec.t_headers = perf() - t0
            rec.http_status = resp.status_code
            ext = resp.extensions
            if ext.get("idp_attempt_started") is not None:
                # the transport resent it on a fresh connection: time the attempt that was answered
                rec.t_sent = ext["idp_attempt_started"] - t0
                rec.retries = ext.get("idp_retries", 0)
            if resp.status_code != 200:
                raw = b""
                async for part in resp.aiter_raw():
                    raw += part
                    if len(raw) > 4096:
                        break
                raise self._http_error(resp.status_code, raw)
            state = _ParseState()
            rec.__dict__["_parse_state"] = state  # read back by _finalise_tokens, then dropped
            buf = b""
            # resp.stream is the transport's body as-is: aiter_raw would add per-chunk
            # bookkeeping (about 4 us a chunk) that the SSE parser does not need
            async for raw in resp.stream:
                t = perf() - t0
                if rec.t_first_byte is None:
                    rec.t_first_byte = t
                buf += raw
                if b"\r" in buf:
                    buf = buf.replace(b"\r\n", b"\n")
                if b"\n\n" not in buf:
                    continue
                events = buf.split(b"\n\n")
                buf = events.pop()
                for event in events:
                    self._handle_event(rec, state, event, t)
            rec.t_end = perf() - t0
        if buf.strip() and not state.done:
            self._handle_event(rec, state, buf, rec.t_end)
        if not state.done and rec.finish_reason is None:
            raise _StreamFailed(
                "protocol",
                f"stream ended without [DONE] or finish_reason after {rec.content_chunks} "
                "content chunks",
            )
        self._finalise_tokens(rec)

    def _http_error(self, status: int, raw: bytes) -> _StreamFailed:
        if status in (401, 403):
            return _StreamFailed(
                "auth",
                f"HTTP {status} from {self.endpoint.url}: the API key was rejected "
                "(check the env var the inventory names for this endpoint)",
            )
        try:
            err = json.loads(raw)
            inner = err.get("error", err)
            detail = str(inner.get("message", inner) if isinstance(inner, dict) else inner)
        except (ValueError, AttributeError):
            detail = raw[:200].decode("utf-8", "replace")
        return _StreamFailed("http_status", f"HTTP {status} from {self.endpoint.url}: {detail}")

    def _handle_event(self, rec: RequestRecord, state: _ParseState, event: bytes, t: float) -> None:
        data = None
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                part = line[5:].lstrip(b" ")
                data = part if data is None else data + b"\n" + part
            # comment lines (":" pings), "event:" and "id:" fields carry nothing we time
        if data is None:
            return
        if data == b"[DONE]":
            state.done = True
            return
        try:
            text = data.decode()
            obj, end = _decode(text)
            if end != len(text) and text[end:].strip():
                raise ValueError("extra data after the JSON object")
        except (ValueError, UnicodeDecodeError):
            raise _StreamFailed(
                "protocol", f"malformed SSE data after {rec.content_chunks} content chunks: "
                f"{data[:120].decode('utf-8', 'replace')!r}"
            ) from None
        if not isinstance(obj, dict):
            raise _StreamFailed("protocol", f"SSE data is not a JSON object: {data[:120]!r}")
        if "error" in obj or obj.get("object") == "error":
            err = obj.get("error", obj)
            msg = err.get("message", err) if isinstance(err, dict) else err
            raise _StreamFailed(
                "stream_error",
                f"error event mid-stream after {rec.content_chunks} content chunks: {msg}",
            )
        running = None  # cumulative completion tokens if this chunk reports them
        usage = obj.get("usage")
        if usage:
            if usage.get("completion_tokens") is not None:
                state.usage_completion = running = int(usage["completion_tokens"])
            if usage.get("prompt_tokens") is not None:
                rec.prompt_tokens = int(usage["prompt_tokens"])
            details = usage.get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                rec.cached_prompt_tokens = int(details["cached_tokens"])
        timings = obj.get("timings")
        if timings:
            if timings.get("predicted_n") is not None:
                state.timings_completion = int(timings["predicted_n"])
                running = state.timings_completion if running is None else running
            if timings.get("cache_n") is not None:
                rec.cached_prompt_tokens = int(timings["cache_n"])
            if timings.get("prompt_n") is not None:
                rec.server_prompt_n = int(timings["prompt_n"])
                if rec.prompt_tokens is None:
                    rec.prompt_tokens = rec.server_prompt_n + int(timings.get("cache_n") or 0)
            if timings.get("prompt_ms") is not None:
                rec.server_prompt_ms = float(timings["prompt_ms"])
            if timings.get("predicted_ms") is not None:
                rec.server_predicted_ms = float(timings["predicted_ms"])
                rec.server_predicted_n = state.timings_completion
        if obj.get("tokens_predicted") is not None:  # llama.cpp native /completion
            state.timings_completion = int(obj["tokens_predicted"])
        choices = obj.get("choices")
        if not choices:
            return
        choice = choices[0]
        if choice.get("finish_reason"):
            rec.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        if delta is not None:
            text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
        else:
            text = choice.get("text")
        if not text:
            return  # role-only or empty delta: not a token
        rec.content_chunks += 1
        rec.chunk_times.append(t)
        if rec.t_first_token is None:
            rec.t_first_token = t
        rec.t_last_token = t
        if state.per_chunk_counts is None:
            # trust running counts only if the server sends one on every chunk (vLLM
            # continuous_usage_stats, llama.cpp timings_per_token), not just on the last
            state.per_chunk_counts = running is not None
        if state.per_chunk_counts and running is not None:
            rec.chunk_tokens.append(max(0, running - state.running_seen))
            state.running_seen = running
        else:
            rec.chunk_tokens.append(1)

    @staticmethod
    def _finalise_tokens(rec: RequestRecord) -> None:
        state: _ParseState | None = rec.__dict__.pop("_parse_state", None)
        if state is not None and state.usage_completion is not None:
            rec.completion_tokens, rec.token_source = state.usage_completion, "usage"
            rec.server_reported_tokens = True
        elif state is not None and state.timings_completion is not None:
            rec.completion_tokens, rec.token_source = state.timings_completion, "timings"
            rec.server_reported_tokens = True
        elif rec.finish_reason == "length" and rec.max_tokens and rec.error is None:
            # No usage (llama-cpp-python streams none), but the server says it stopped at max_tokens:
            # that count is exact, while content chunks undercount (tokens that end mid-UTF-8 stream
            # no text: 9-13 chunks for 16 tokens on the tiny model).
            rec.completion_tokens, rec.token_source = rec.max_tokens, "finish_reason"
            rec.server_reported_tokens = True
        else:
            rec.completion_tokens, rec.token_source = rec.content_chunks, "chunks"
            rec.server_reported_tokens = False


@dataclass
class _ParseState:
    done: bool = False
    usage_completion: int | None = None
    timings_completion: int | None = None
    running_seen: int = 0
    per_chunk_counts: bool | None = None
