"""GGUF quantization core on the tiny model: output types, generation, size bands, failure modes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from idp_pipelines.embedded.tiny_model import write_tiny_gguf
from idp_pipelines.quantize import (
    QUANT_TYPES,
    QuantizeError,
    expected_size_ratio,
    inspect_gguf,
    normalize_quant_type,
    quantize_gguf,
    smoke_generate,
)
from idp_pipelines.files import sha256_file

TWO_D_PER_LAYER = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("src")
    return {
        "F32": write_tiny_gguf(d / "tiny-f32.gguf", dtype="f32"),
        "F16": write_tiny_gguf(d / "tiny-f16.gguf", dtype="f16"),
    }


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------- pure functions (no llama.cpp)


def test_names_and_bands():
    assert normalize_quant_type("q4_k_m") == "Q4_K_M"
    assert normalize_quant_type("Q8-0") == "Q8_0"
    with pytest.raises(QuantizeError) as ei:
        normalize_quant_type("Q4_K_XL")
    msg = str(ei.value)
    assert "unknown quant type 'Q4_K_XL'" in msg and "Q4_K_M" in msg and "Q8_0" in msg
    for q in QUANT_TYPES:
        for src in ("F32", "F16", "BF16"):
            low, high = expected_size_ratio(q, src)
            assert 0 < low < high
    # textbook values for large models sit inside the bands
    assert expected_size_ratio("Q8_0", "F32")[0] < 8.5 / 32 < expected_size_ratio("Q8_0", "F32")[1]
    assert expected_size_ratio("Q4_K_M", "F16")[0] < 0.30 < expected_size_ratio("Q4_K_M", "F16")[1]
    assert expected_size_ratio("Q4_K_M", "F32")[0] < 0.15 < expected_size_ratio("Q4_K_M", "F32")[1]
    with pytest.raises(QuantizeError, match="source dtype"):
        expected_size_ratio("Q8_0", "Q4_0")


def test_inspect_source(sources):
    s = inspect_gguf(sources["F16"])
    assert s.architecture == "llama" and s.name == "tiny-llama"
    assert s.tensor_count == 21 and s.n_params == 1_443_072
    assert s.type_counts == {"F16": 16, "F32": 5}
    assert s.file_type_name == "F16" and s.fallbacks == {}
    assert s.file_bytes == sources["F16"].stat().st_size
    # against another expected type, every 2-D tensor is "not in the expected type"
    assert len(inspect_gguf(sources["F16"], "Q8_0").fallbacks) == 16


def test_unknown_quant_type_and_missing_source(tmp_path, sources):
    dst = tmp_path / "out.gguf"
    with pytest.raises(QuantizeError, match=r"unknown quant type 'Q3_X'.*valid types: F32, F16"):
        quantize_gguf(sources["F32"], dst, "Q3_X")
    missing = tmp_path / "nope.gguf"
    with pytest.raises(QuantizeError) as ei:
        quantize_gguf(missing, dst, "Q8_0")
    assert f"GGUF file not found: {missing}" in str(ei.value) and "check the path" in str(ei.value)
    not_gguf = tmp_path / "model.safetensors"
    not_gguf.write_bytes(b"\x00" * 64)
    with pytest.raises(QuantizeError, match=r"is not a GGUF file .*convert_hf_to_gguf"):
        quantize_gguf(not_gguf, dst, "Q8_0")
    assert not dst.exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ llama.cpp


@pytest.fixture(scope="module")
def llama_cpp():
    """llama.cpp's tools; a machine without them fails here with the command that builds them."""
    from idp_pipelines.llama_tools import tool

    return {name: tool(name) for name in ("llama-quantize", "llama-simple")}


@pytest.fixture(scope="module")
def quantized(sources, llama_cpp, tmp_path_factory):
    out = tmp_path_factory.mktemp("q")
    results = {}
    for src_dt, src in sources.items():
        for q in ("Q8_0", "Q4_K_M"):
            results[(src_dt, q)] = quantize_gguf(src, out / f"tiny-{src_dt}-{q}.gguf", q, nthread=2)
    return out, results


@pytest.mark.parametrize("src_dt", ["F32", "F16"])
def test_q8_0_output(quantized, sources, src_dt):
    out_dir, results = quantized
    r = results[(src_dt, "Q8_0")]
    dst = Path(r.dst)
    assert dst.is_file() and _leftovers(out_dir) == []
    assert r.quant_type == "Q8_0" and r.src_dtype == src_dt and r.params["ftype"] == r.ftype == 7
    assert r.params["nthread"] == 2 and r.nthread == 2
    assert r.src_sha256 == sha256_file(sources[src_dt]) and r.dst_sha256 == sha256_file(dst)
    assert (r.src_bytes, r.dst_bytes) == (sources[src_dt].stat().st_size, dst.stat().st_size)
    s = inspect_gguf(dst)
    assert s.file_type_name == "Q8_0" and s.tensor_count == 21
    assert s.type_counts == r.tensor_types == {"Q8_0": 16, "F32": 5}  # all 2-D weights Q8_0, norms F32
    assert s.fallbacks == r.fallbacks == {}
    low, high = expected_size_ratio("Q8_0", src_dt)
    assert low <= r.size_ratio <= high, (r.size_ratio, low, high)
    assert oct(dst.stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("src_dt", ["F32", "F16"])
def test_q4_k_m_output(quantized, src_dt):
    _, results = quantized
    r = results[(src_dt, "Q4_K_M")]
    s = inspect_gguf(r.dst)
    assert s.file_type_name == "Q4_K_M"
    assert s.fallbacks == {} and r.fallbacks == {}  # every row width is a multiple of 256: no fallback
    t = s.tensor_types
    # llama.cpp's Q4_K_M mixture with 2 layers: output and layer-1 attn_v / ffn_down in Q6_K, rest Q4_K
    assert t["output.weight"] == "Q6_K"
    assert t["token_embd.weight"] == "Q4_K"
    assert t["blk.0.attn_v.weight"] == t["blk.0.ffn_down.weight"] == "Q4_K"
    assert t["blk.1.attn_v.weight"] == t["blk.1.ffn_down.weight"] == "Q6_K"
    for i in range(2):
        for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert t[f"blk.{i}.{name}.weight"] == "Q4_K"
    assert s.type_counts == {"F32": 5, "Q4_K": 13, "Q6_K": 3}
    low, high = expected_size_ratio("Q4_K_M", src_dt)
    assert low <= r.size_ratio <= high, (r.size_ratio, low, high)


def test_quantization_is_deterministic(quantized, sources, tmp_path):
    _, results = quantized
    r = quantize_gguf(sources["F32"], tmp_path / "again.gguf", "q4_k_m", nthread=1)
    assert r.dst_sha256 == results[("F32", "Q4_K_M")].dst_sha256


@pytest.mark.parametrize("key", [("F32", "Q8_0"), ("F16", "Q4_K_M")])
def test_quantized_model_generates(quantized, key):
    _, results = quantized
    out = smoke_generate(results[key].dst, prompt="Hello", max_tokens=8)
    assert out["tokens"] >= 1 and out["prompt_tokens"] == 2  # <s> ▁Hello
    assert out["seconds"] >= out["generate_seconds"] > 0


def test_source_already_quantized(quantized, tmp_path):
    _, results = quantized
    q8 = results[("F32", "Q8_0")].dst
    dst = tmp_path / "requant.gguf"
    with pytest.raises(QuantizeError) as ei:
        quantize_gguf(q8, dst, "Q4_K_M")
    msg = str(ei.value)
    assert f"{q8} is already quantized" in msg and "Q8_0" in msg and "F32/F16/BF16" in msg
    assert not dst.exists() and _leftovers(tmp_path) == []


def test_existing_destination_is_replaced_atomically(sources, llama_cpp, tmp_path):
    dst = tmp_path / "model.gguf"
    dst.write_bytes(b"old")
    r = quantize_gguf(sources["F16"], dst, "Q8_0")
    assert dst.read_bytes()[:4] == b"GGUF" and r.dst_bytes == dst.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_dst_is_src_or_directory(sources, llama_cpp, tmp_path):
    with pytest.raises(QuantizeError, match="is the source file"):
        quantize_gguf(sources["F32"], sources["F32"], "Q8_0")
    with pytest.raises(QuantizeError, match="is a directory"):
        quantize_gguf(sources["F32"], tmp_path, "Q8_0")


def test_unwritable_destination_dir(sources, llama_cpp, tmp_path):
    if os.geteuid() == 0:
        # root ignores directory permissions, but not a pseudo-filesystem: /proc takes no new files.
        with pytest.raises(QuantizeError, match=r"cannot write to the destination directory /proc .*writable"):
            quantize_gguf(sources["F32"], Path("/proc/out.gguf"), "Q8_0")
        assert not [n for n in os.listdir("/proc") if "out.gguf" in n]
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(QuantizeError, match=r"cannot write to the destination directory .*writable"):
            quantize_gguf(sources["F32"], ro / "out.gguf", "Q8_0")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_unwritable_destination_path(sources, llama_cpp, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file, not a directory")
    dst = blocker / "sub" / "out.gguf"
    with pytest.raises(QuantizeError) as ei:
        quantize_gguf(sources["F32"], dst, "Q8_0")
    msg = str(ei.value)
    assert "cannot write to the destination directory" in msg and str(dst.parent) in msg
    assert "choose a writable output path" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_llama_cpp_failure_removes_temp_file(sources, llama_cpp, tmp_path):
    # A valid GGUF header whose tensor data is cut short: GGUFReader or llama.cpp must reject it.
    src = tmp_path / "truncated.gguf"
    data = sources["F32"].read_bytes()
    src.write_bytes(data[: len(data) // 2])
    dst = tmp_path / "out" / "q.gguf"
    with pytest.raises(QuantizeError) as ei:
        quantize_gguf(src, dst, "Q8_0")
    assert str(src) in str(ei.value)
    assert not dst.exists()
    assert not dst.parent.exists() or _leftovers(dst.parent) == []


def test_llama_cpp_rejects_source_temp_file_removed(llama_cpp, tmp_path):
    # Unquantized and well-formed, so our checks pass; llama.cpp itself fails (unknown architecture).
    import numpy as np
    from gguf import GGUFWriter

    src = tmp_path / "alien.gguf"
    w = GGUFWriter(src, arch="notanarch")
    w.add_tensor("token_embd.weight", np.zeros((4, 256), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    dst = tmp_path / "out.gguf"
    with pytest.raises(QuantizeError) as ei:
        quantize_gguf(src, dst, "Q8_0")
    msg = str(ei.value)
    assert f"llama.cpp failed to quantize {src} to Q8_0" in msg
    assert "unknown model architecture: 'notanarch'" in msg  # llama.cpp's own log line, captured
    assert "supported architecture" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alien.gguf"]


def test_smoke_generate_errors(tmp_path, llama_cpp):
    with pytest.raises(QuantizeError, match="GGUF file not found"):
        smoke_generate(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 60)
    with pytest.raises(QuantizeError, match=f"llama.cpp cannot load {bad}"):
        smoke_generate(bad)
