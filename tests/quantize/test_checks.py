"""gguf_model's judgements, without Dagster and without llama.cpp: the texts a user reads in the UI."""

from __future__ import annotations

from idp_pipelines.quantize import GGUFSummary, QuantResult
from idp_pipelines.quantize.checks import (
    GGUF_GENERATES, GGUF_SIZE, GGUF_TYPES, Output, judge_nothing_to_make, judge_outputs,
)


def _output(quant: str, ratio: float, tokens: int, fallbacks: dict[str, str] | None = None) -> Output:
    result = QuantResult(
        src="/m/src.gguf", dst=f"/m/out.{quant}.gguf", quant_type=quant, ftype=7, src_dtype="F16",
        src_sha256="a" * 64, dst_sha256="b" * 64, src_bytes=1000, dst_bytes=int(1000 * ratio), size_ratio=ratio,
        seconds=0.1, total_seconds=0.2, nthread=2, params={}, tensor_types={}, fallbacks=fallbacks or {},
    )
    summary = GGUFSummary(
        path=result.dst, file_bytes=result.dst_bytes, architecture="llama", name="m", file_type=7,
        file_type_name=quant, tensor_count=3, n_params=10, type_counts={}, type_bytes={}, expected_types=[],
        fallbacks=fallbacks or {},
    )
    return Output(result, summary, tokens)


def test_good_outputs_pass_with_their_texts():
    judged = {j.check: j for j in judge_outputs([_output("Q8_0", 0.53, 8), _output("Q4_K_M", 0.31, 8)])}
    assert [(c, judged[c].passed, judged[c].description, judged[c].severity) for c in (GGUF_TYPES, GGUF_GENERATES, GGUF_SIZE)] == [
        (GGUF_TYPES, True, "every tensor has its quant type's type", "WARN"),
        (GGUF_GENERATES, True, "every output loads in llama.cpp and generates", "ERROR"),
        (GGUF_SIZE, True, "every output's size ratio is plausible", "ERROR"),
    ]


def test_each_failure_names_the_output_and_the_numbers():
    fell_back = {f"blk.{i}.ffn_down.weight": "Q8_0" for i in range(6)}
    judged = {j.check: j for j in judge_outputs([
        _output("Q4_K_M", 0.9, 0, fell_back),  # no shrink, nothing generated, six fallbacks
        _output("Q8_0", 0.53, 3),
    ])}
    assert not judged[GGUF_TYPES].passed and judged[GGUF_TYPES].description == (
        "Q4_K_M: 6 tensor(s) fell back (blk.0.ffn_down.weight=Q8_0, blk.1.ffn_down.weight=Q8_0, "
        "blk.2.ffn_down.weight=Q8_0, blk.3.ffn_down.weight=Q8_0, blk.4.ffn_down.weight=Q8_0)")
    assert not judged[GGUF_GENERATES].passed and judged[GGUF_GENERATES].description == "Q4_K_M: generated no token"
    assert not judged[GGUF_SIZE].passed and judged[GGUF_SIZE].description == (
        "Q4_K_M: size ratio 0.900 outside [0.253, 0.481]")


def test_a_model_without_targets_says_why_nothing_was_made():
    judged = judge_nothing_to_make("served as downloaded")
    assert [(j.check, j.passed, j.description) for j in judged] == [
        (c, True, "no GGUF made: served as downloaded") for c in (GGUF_TYPES, GGUF_GENERATES, GGUF_SIZE)]
