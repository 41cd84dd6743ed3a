"""The decode roofline: which bandwidth and which byte count, and a clear reason when either is missing."""

from __future__ import annotations

import pytest

from idp_pipelines.bench.suite import bandwidth_for, ceiling_for
from idp_pipelines.lab import load_lab
from idp_pipelines.settings import REPO_ROOT
from idp_pipelines.warehouse import Warehouse, insert_rows


@pytest.fixture(scope="module")
def lab():
    return load_lab(REPO_ROOT / "labs" / "schlimers.yaml")


def _with(lab, name, n_gpu_layers="keep", **changes):
    ep = lab.endpoint(name)
    if n_gpu_layers != "keep":
        changes["llamacpp"] = ep.llamacpp.model_copy(update={"n_gpu_layers": n_gpu_layers})
    ep = ep.model_copy(update=changes)
    return lab.model_copy(update={"endpoints": [ep if e.name == name else e for e in lab.endpoints]}), ep


def test_llamacpp_offload_decides_the_bandwidth(lab, tiny_gguf):
    # schlimers.yaml runs llama.cpp on the Ryzen, explicitly: the CPU's 89.6 GB/s, not the GPU's 896
    assert bandwidth_for(lab, lab.endpoint("llamacpp-cpu")) == (
        89.6, "hosts[schlimers-server].cpu.memory_bandwidth_gb_s (n_gpu_layers 0)")
    unset, ep = _with(lab, "llamacpp-cpu", n_gpu_layers=None)
    bw, why = bandwidth_for(unset, ep)
    assert bw is None and why == ("llama.cpp on schlimers-server, which has a GPU, without n_gpu_layers: set "
                                  "endpoints[llamacpp-cpu].llamacpp.n_gpu_layers (0 = CPU only, -1 = every layer on the GPU)")
    full, ep = _with(lab, "llamacpp-cpu", n_gpu_layers=-1)
    assert bandwidth_for(full, ep)[0] == 896
    # one of the tiny model's 2 layers on the GPU: half the bytes at each bandwidth
    half, ep = _with(lab, "llamacpp-cpu", n_gpu_layers=1, model_file=tiny_gguf)
    bw, why = bandwidth_for(half, ep, tiny_gguf)
    assert bw == pytest.approx(1 / (0.5 / 896 + 0.5 / 89.6)) and why.startswith("50% of 2 layers")
    vllm = lab.endpoint("vllm-gpu")
    assert bandwidth_for(lab, vllm) == (896, "hosts[schlimers-server].gpu.memory_bandwidth_gb_s")


def test_ceiling_from_the_inventory_the_gguf_file_or_the_warehouse(lab, tiny_gguf, tmp_path):
    wh = Warehouse(tmp_path / "wh.duckdb")
    with wh.write() as con:  # a fresh warehouse: no hub_model row
        assert ceiling_for(con, lab, lab.endpoint("llamacpp-cpu")).source == (
            "no ceiling: model size unknown: set endpoints[llamacpp-cpu].model_bytes or model_file in the "
            "inventory, or materialise hub_model[llama-3.2-3b-q4]")
        given, ep = _with(lab, "llamacpp-cpu", model_bytes=2_000_000_000)
        c = ceiling_for(con, given, ep)
        assert c.tok_s == pytest.approx(89.6e9 / 2e9) and c.source == (
            "89.6 GB/s (hosts[schlimers-server].cpu.memory_bandwidth_gb_s (n_gpu_layers 0)) / 2,000.0 MB "
            "(endpoints[llamacpp-cpu].model_bytes)")
        from_file, ep = _with(lab, "llamacpp-cpu", model_file=tiny_gguf)
        c = ceiling_for(con, from_file, ep)
        assert c.model_bytes == tiny_gguf.stat().st_size and f"size of {tiny_gguf}" in c.source
        insert_rows(con, "model_downloads", [{
            "downloaded_at": "2026-11-27 10:00:00+00", "model": "llama-3.2-3b-q4", "repo_id": "a/b", "revision": "main",
            "commit_sha": "0" * 40, "files": 1, "bytes": 1_900_000_000, "bytes_downloaded": 0, "seconds": 1.0,
            "snapshot_path": "/x"}])
        c = ceiling_for(con, lab, lab.endpoint("llamacpp-cpu"))
        assert c.model_bytes == 1_900_000_000 and "last download of llama-3.2-3b-q4 (hub_model)" in c.source
