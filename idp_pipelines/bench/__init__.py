"""Streaming inference benchmark harness: plain Python, no Dagster (assets wrap it)."""

from idp_pipelines.bench.client import (
    BenchClient,
    BenchError,
    EndpointConfig,
    Workload,
    length_control_params,
)
from idp_pipelines.bench.load import (
    LoadSpec,
    StepResult,
    concurrency_sweep,
    fixed_concurrency,
    request_rate,
    run_benchmark,
    run_step,
    run_steps,
)
from idp_pipelines.bench.metrics import decode_ceiling_tok_s, roofline_check, summarize
from idp_pipelines.bench.records import RequestRecord

__all__ = [
    "BenchClient", "BenchError", "EndpointConfig", "Workload", "length_control_params",
    "LoadSpec", "StepResult", "concurrency_sweep", "fixed_concurrency", "request_rate",
    "run_benchmark", "run_step", "run_steps", "decode_ceiling_tok_s", "roofline_check",
    "summarize", "RequestRecord",
]
