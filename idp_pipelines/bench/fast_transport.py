"""A lean HTTP/1.1 transport for httpx.AsyncClient, built for streaming many small chunks.

httpx's default stack (httpcore + anyio + h11) costs about 100 us of client CPU per
streamed chunk; at 64 concurrent streams that saturates a core and inflates the very
latencies being measured. This transport speaks plain HTTP/1.1 over asyncio streams
(keep-alive pool, chunked or Content-Length bodies, optional TLS) and keeps the httpx
API above it. It does not do proxies, HTTP/2 or redirects; use ``transport="httpcore"``
on EndpointConfig for those.

Connection reuse is earned, not assumed from headers: llama.cpp's llama-server closes the
connection right after each streamed response while still sending ``Keep-Alive: timeout=5,
max=100``. A pooled connection is checked before use (the server's close may already have
arrived), and a request that fails on a reused connection before any byte of the response is
sent again once on a fresh connection: the response carries ``idp_retries`` (how many such
resends) and ``idp_attempt_started`` (perf_counter when the answered attempt began), so the
caller times the attempt that was answered and never records the dead socket as a server
failure. An origin seen closing connections soon after a response is not pooled any more.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
import time
from collections.abc import AsyncIterator

import httpx

__all__ = ["FastTransport"]

# A pooled connection found closed by the server this soon after its response was a close after the
# response (llama-server), not an idle timeout: stop pooling that origin's connections.
_EARLY_CLOSE_S = 1.0


class _Conn:
    """One pooled connection with a cheap read-timeout watchdog (one timer per timeout period)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, read_timeout: float
    ) -> None:
        self.reader, self.writer = reader, writer
        self.read_timeout = read_timeout
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.active = False
        self.timed_out = False
        self.released_at: float | None = None  # loop time the last response on it ended
        self._timer: asyncio.TimerHandle | None = None

    def usable(self) -> bool:
        """Still open as far as this side can tell (the server's FIN may already be in)."""
        return not (self.reader.at_eof() or self.writer.transport.is_closing()
                    or self.reader.exception() is not None)

    def arm(self) -> None:
        self.active, self.last = True, self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_later(self.read_timeout, self._check)

    def touch(self) -> None:
        self.last = self.loop.time()

    def disarm(self) -> None:
        self.active = False

    def _check(self) -> None:
        self._timer = None
        if not self.active:
            return
        idle = self.loop.time() - self.last
        if idle >= self.read_timeout:
            self.timed_out = True
            self.writer.transport.abort()
        else:
            self._timer = self.loop.call_later(self.read_timeout - idle, self._check)

    def close(self) -> None:
        self.active = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.writer.transport.abort()


class _Body(httpx.AsyncByteStream):
    def __init__(self, transport: FastTransport, key: tuple, conn: _Conn, framing: str,
                 length: int, keep_alive: bool) -> None:
        self._transport, self._key, self._conn = transport, key, conn
        self._framing, self._length, self._keep_alive = framing, length, keep_alive
        self._complete = False
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        reader = conn.reader
        try:
            if self._framing == "chunked":
                # decode chunk framing ourselves: one await per socket read, one yield per read
                buf, finished = b"", False
                while True:
                    out = []
                    while (i := buf.find(b"\r\n")) >= 0:
                        size = int(buf[:i].split(b";", 1)[0], 16)
                        if size == 0:
                            end = buf.find(b"\r\n\r\n", i)  # last chunk, optional trailers
                            if end >= 0:
                                finished, buf = True, b""
                            break
                        if len(buf) < i + size + 4:
                            break
                        out.append(buf[i + 2 : i + 2 + size])
                        buf = buf[i + size + 4 :]
                    if out:
                        yield out[0] if len(out) == 1 else b"".join(out)
                    if finished:
                        break
                    data = await reader.read(65536)
                    if not data:
                        raise asyncio.IncompleteReadError(buf, None)
                    conn.touch()
                    buf += data
            elif self._framing == "length":
                left = self._length
                while left > 0:
                    data = await reader.read(min(left, 65536))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", left)
                    left -= len(data)
                    conn.touch()
                    yield data
            else:  # body runs until the server closes the connection
                while data := await reader.read(65536):
                    conn.touch()
                    yield data
            self._complete = True
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError,
                ValueError) as exc:
            if conn.timed_out:
                raise httpx.ReadTimeout(f"no data for {conn.read_timeout} s") from None
            raise httpx.RemoteProtocolError(
                f"peer closed connection without sending complete message body: {exc!r}"
            ) from None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._conn.disarm()
        self._transport._release(self._key, self._conn, self._complete and self._keep_alive)


class FastTransport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 pool capped at ``max_connections`` (callers queue beyond it)."""

    def __init__(
        self,
        max_connections: int,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 120.0,
        ssl_context: _ssl.SSLContext | None = None,
    ) -> None:
        self._max = max(1, max_connections)
        self._connect_timeout = connect_timeout_s
        self._read_timeout = read_timeout_s
        self._ssl = ssl_context
        self._idle: dict[tuple, list[_Conn]] = {}
        self._sem: asyncio.Semaphore | None = None
        self._all: set[_Conn] = set()
        self.no_reuse: set[tuple] = set()  # origins that close connections after a response
        self.stale_retries = 0  # requests resent on a fresh connection, over the transport's life

    def _release(self, key: tuple, conn: _Conn, reusable: bool) -> None:
        if reusable and key not in self.no_reuse and conn.usable():
            conn.released_at = conn.loop.time()
            self._idle.setdefault(key, []).append(conn)
        else:
            self._all.discard(conn)
            conn.close()
        assert self._sem is not None
        self._sem.release()

    def _distrust_if_early(self, key: tuple, conn: _Conn) -> None:
        if conn.released_at is not None and conn.loop.time() - conn.released_at < _EARLY_CLOSE_S:
            self.no_reuse.add(key)
            for other in self._idle.pop(key, []):
                self._all.discard(other)
                other.close()

    def _pooled(self, key: tuple) -> _Conn | None:
        """An idle connection that still looks open; closed ones are dropped on the way."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
            self._all.discard(conn)
            conn.close()
            self._distrust_if_early(key, conn)
        return None

    async def _connect(self, key: tuple) -> _Conn:
        scheme, host, port = key
        ssl_ctx = None
        if scheme == "https":
            ssl_ctx = self._ssl or _ssl.create_default_context()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ssl_ctx, limit=2**20),
                self._connect_timeout,
            )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from None  # callers name the URL
        conn = _Conn(reader, writer, self._read_timeout)
        self._all.add(conn)
        return conn

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._max)
        url = request.url
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
        head = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), url.raw_path)]
        head += [b"%s: %s\r\n" % (k, v) for k, v in request.headers.raw]
        head.append(b"\r\n")
        return await self.send_bytes(key, b"".join(head) + body)

    @staticmethod
    def request_head(method: str, url: str, headers: dict[str, str]) -> tuple[tuple, bytes]:
        """(origin key, request head without Content-Length and the blank line) for ``send_bytes``:
        built once per client, so each request costs a bytes concatenation instead of an httpx.Request
        (URL parsing and header normalisation, 20-60 us a request)."""
        u = httpx.URL(url)
        key = (u.scheme, u.host, u.port or (443 if u.scheme == "https" else 80))
        host = f"[{u.host}]" if ":" in u.host else u.host  # an IPv6 literal keeps its brackets
        host = host if u.port is None else f"{host}:{u.port}"
        lines = [b"%s %s HTTP/1.1\r\n" % (method.encode(), u.raw_path), b"Host: %s\r\n" % host.encode()]
        lines += [b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items()]
        return key, b"".join(lines)

    async def send_bytes(self, key: tuple, payload: bytes) -> httpx.Response:
        """Send a complete HTTP/1.1 request (head and body) to the origin ``key``; the streaming response."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._max)
        await self._sem.acquire()
        try:
            retries = 0
            while True:
                started = time.perf_counter()
                # after one dead pooled connection, the resend goes on a fresh one: at most one resend
                conn = self._pooled(key) if not retries else None
                reused = conn is not None
                if conn is None:
                    conn = await self._connect(key)
                try:
                    return await self._exchange(key, conn, payload, reused, retries, started)
                except _StaleConnection:
                    self._all.discard(conn)
                    conn.close()
                    self._distrust_if_early(key, conn)
                    if not reused:
                        raise httpx.RemoteProtocolError(
                            "server closed the connection without a response"
                        ) from None
                    retries += 1
                    self.stale_retries += 1
        except BaseException:
            self._sem.release()
            raise

    async def _exchange(self, key: tuple, conn: _Conn, payload: bytes, reused: bool, retries: int,
                        started: float) -> httpx.Response:
        conn.arm()
        try:
            try:
                conn.writer.write(payload)
                await conn.writer.drain()
                raw = await conn.reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                # nothing of a response arrived: on a pooled connection that is the server's earlier
                # close (or reset) we had not seen yet, not an answer to this request
                partial = getattr(exc, "partial", b"")
                if not partial and not conn.timed_out:
                    conn.disarm()
                    if reused:
                        raise _StaleConnection() from None
                raise
            conn.touch()
            lines = raw[:-4].split(b"\r\n")
            _version, status, *reason = lines[0].split(b" ", 2)
            headers = []
            framing, length, keep_alive = "close", 0, True
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                k, v = k.strip(), v.strip()
                headers.append((k, v))
                lk = k.lower()
                if lk == b"transfer-encoding" and b"chunked" in v.lower():
                    framing = "chunked"
                elif lk == b"content-length" and framing != "chunked":
                    framing, length = "length", int(v)
                elif lk == b"connection" and v.lower() == b"close":
                    keep_alive = False
            if framing == "close":
                keep_alive = False
        except _StaleConnection:
            raise
        except BaseException as exc:
            self._all.discard(conn)
            conn.close()
            if isinstance(exc, (asyncio.IncompleteReadError, ConnectionError, ValueError)):
                if conn.timed_out:
                    raise httpx.ReadTimeout(f"no response within {conn.read_timeout} s") from None
                raise httpx.RemoteProtocolError(f"bad or missing response head: {exc!r}") from None
            raise
        stream = _Body(self, key, conn, framing, length, keep_alive)
        return httpx.Response(
            int(status),
            headers=headers,
            stream=stream,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason[0] if reason else b"",
                        "idp_retries": retries, "idp_attempt_started": started},
        )

    async def aclose(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._all.clear()
        self._idle.clear()


class _StaleConnection(Exception):
    pass
