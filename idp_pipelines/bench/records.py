"""The per-request record every benchmark produces; its fields become DuckDB columns.

Plain data with no imports from the rest of the harness: `metrics` derives figures from it
(`metrics.request_row` is its warehouse row), never the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RequestRecord", "ERROR_KINDS"]

# error_kind values: what went wrong, coarse enough to group by.
ERROR_KINDS = ("http_status", "auth", "stream_error", "connection", "timeout", "aborted",
               "protocol", "client")


@dataclass
class RequestRecord:
    """One streamed request. Times are seconds since the step started (perf_counter base)."""

    step: str
    request_id: int
    max_tokens: int | None = None
    t_intended: float | None = None  # when the load model wanted the request sent
    t_sent: float | None = None  # when the client actually sent it
    t_headers: float | None = None  # response status line and headers received
    t_first_byte: float | None = None  # first body bytes received
    t_first_token: float | None = None  # first chunk with non-empty content
    t_last_token: float | None = None  # last chunk with non-empty content
    t_end: float | None = None  # stream finished, failed or was aborted
    chunk_times: list[float] = field(default_factory=list)  # one per content chunk
    chunk_tokens: list[int] = field(default_factory=list)  # tokens per content chunk (see below)
    content_chunks: int = 0
    finish_reason: str | None = None
    http_status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_prompt_tokens: int | None = None
    # True when completion_tokens comes from the server (usage or llama.cpp timings); False
    # when it is a count of content chunks, which undercounts multi-token chunks.
    server_reported_tokens: bool = False
    token_source: str | None = None  # "usage", "timings" or "chunks"
    # Sent again on a fresh connection after a pooled one turned out dead before any response byte
    # (the server had closed it): not a server failure, and the times above are the answered attempt's.
    retries: int = 0
    # The server's own account where it gives one (llama.cpp's `timings`): prompt evaluation time and
    # tokens evaluated (cached tokens are in cached_prompt_tokens), decode time and tokens.
    server_prompt_ms: float | None = None
    server_prompt_n: int | None = None
    server_predicted_ms: float | None = None
    server_predicted_n: int | None = None
    error: str | None = None
    error_kind: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
