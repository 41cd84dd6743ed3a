"""GGUF quantization core (plain Python, no Dagster): see :mod:`idp_pipelines.quantize.gguf_quant`."""

from idp_pipelines.quantize.gguf_quant import (
    QUANT_TYPES,
    SOURCE_DTYPES,
    GGUFSummary,
    QuantizeError,
    QuantResult,
    expected_size_ratio,
    expected_tensor_types,
    ftype_for,
    inspect_gguf,
    normalize_quant_type,
    quant_type_names,
    quantize_gguf,
    smoke_generate,
    source_dtype,
)

__all__ = [
    "QUANT_TYPES",
    "SOURCE_DTYPES",
    "GGUFSummary",
    "QuantizeError",
    "QuantResult",
    "expected_size_ratio",
    "expected_tensor_types",
    "ftype_for",
    "inspect_gguf",
    "normalize_quant_type",
    "quant_type_names",
    "quantize_gguf",
    "smoke_generate",
    "source_dtype",
]
