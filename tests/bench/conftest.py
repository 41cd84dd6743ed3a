from __future__ import annotations

import pytest

from idp_pipelines.bench.client import EndpointConfig
from idp_pipelines.doubles.synthetic_server import SyntheticConfig, SyntheticServer

API_KEY = "sk-test-not-a-real-key-7f3a9c"


@pytest.fixture(scope="module")
def server():
    """One in-process synthetic server per module; tests vary it per request via x_synthetic."""
    with SyntheticServer(SyntheticConfig(ttft_s=0.02, itl_s=0.002, api_key=API_KEY)) as srv:
        yield srv


def endpoint(server, api="chat", key=API_KEY, **quirks) -> EndpointConfig:
    extra = {"x_synthetic": quirks} if quirks else {}
    return EndpointConfig(server.url, "synthetic", api=api, engine="synthetic", api_key=key,
                          extra_body=extra, connect_timeout_s=5, read_timeout_s=10,
                          request_timeout_s=30)
