"""The synthetic server injects its TTFT from the request's arrival: the truth `make bench` holds the
harness to must not depend on how the request reached the server or on what it did before."""

from __future__ import annotations

import json
import socket
import time

from idp_pipelines.doubles.synthetic_server import SyntheticConfig, SyntheticServer

TTFT = 0.1


def _first_token_after(sock: socket.socket, parts: list[bytes], gap_s: float) -> float:
    """Send `parts` with `gap_s` between them; seconds from the last part to the first content token."""
    for i, part in enumerate(parts):
        if i:
            time.sleep(gap_s)
        sock.sendall(part)
    sent = time.perf_counter()
    buf = b""
    first = None
    while not buf.endswith(b"0\r\n\r\n"):  # the end of the chunked body
        data = sock.recv(65536)
        assert data, "the server closed the connection mid-response"
        if first is None and b'"content":" tok' in data:
            first = time.perf_counter()
        buf += data
    assert first is not None, buf[-300:]
    return first - sent


def _request(text: str) -> tuple[bytes, bytes]:
    body = json.dumps({"model": "synthetic", "stream": True, "max_tokens": 2, "ignore_eos": True,
                       "messages": [{"role": "user", "content": text}]}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    return head, body


def test_ttft_counts_from_the_whole_request_and_afresh_for_each_request_on_a_connection():
    with SyntheticServer(SyntheticConfig(ttft_s=TTFT, itl_s=0.001, role_chunk=False)) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            # the head now, the body 0.25 s later: counted from the head's arrival, the TTFT would have
            # passed before the body came, and the first token would follow the body at once
            assert _first_token_after(sock, list(_request("split in two")), gap_s=0.25) >= TTFT * 0.9
            time.sleep(0.25)  # idle on the kept-alive connection: this request's time must not count
            assert _first_token_after(sock, [b"".join(_request("the next one"))], gap_s=0) >= TTFT * 0.9
