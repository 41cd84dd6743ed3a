from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from idp_pipelines.cli import main as idp
from idp_pipelines.lab import LabError, load_lab
from idp_pipelines.settings import REPO_ROOT

LOCAL = REPO_ROOT / "labs" / "local.yaml"
SCHLIMERS = REPO_ROOT / "labs" / "schlimers.yaml"


def test_local_lab_loads_with_paths_under_idp_home(tmp_path):
    lab = load_lab(LOCAL)
    assert lab.name == "local"
    ep = lab.endpoint("local-llamacpp")
    assert ep.embedded and ep.base_url.startswith("http://127.0.0.1:") and lab.model(ep.model).format == "gguf"
    assert lab.model_cache.path == tmp_path / "idp-home" / "models"  # ${IDP_HOME} from the env
    assert lab.git_repos[0].path == REPO_ROOT  # relative to the lab file
    assert lab.mlflow.tracking_uri.startswith("http://127.0.0.1:")


def test_schlimers_lab_is_the_seed_lab():
    lab = load_lab(SCHLIMERS)
    server = lab.host("schlimers-server")
    assert server.gpu.model == "NVIDIA RTX 5070 Ti" and server.gpu.memory_gb == 16
    assert server.cpu.model == "AMD Ryzen 9 9900X" and server.cpu.inference_threads == 10
    ports = {e.name: e.port for e in lab.endpoints}
    assert ports == {"vllm-gpu": 8000, "llamacpp-cpu": 8003, "triton-gpu": 8001, "jetson-edge": 8001}
    assert lab.endpoint("jetson-edge").base_url == "http://192.168.1.50:8001"
    assert server.dcgm_url == "http://schlimers-server:9400/metrics"
    vllm = lab.endpoint("vllm-gpu")
    assert vllm.settings["gpu_memory_utilization"] == 0.80 and vllm.settings["max_num_seqs"] == 32
    assert vllm.api_key_env == "VLLM_API_KEY"
    assert {m.name for m in lab.models} == {"llama-3.1-8b-fp8", "llama-3.2-3b-q4", "llama-3.2-1b-q4"}
    claims = {x.name: (x.low, x.high) for x in lab.expectations}
    assert claims["vllm-ttft"] == (80, 150) and claims["vllm-throughput"] == (60, 100)
    assert claims["cpu-aggregate"] == (144, 200) and claims["rpc-p95"] == (3, 5)
    assert lab.model_cache.budget_gb == 500


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "lab.yaml"
    p.write_text(text)
    return p


def _mutated(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load(LOCAL.read_text())
    mutate(data)
    return _write(tmp_path, yaml.safe_dump(data, sort_keys=False))


def _error(path: Path) -> str:
    with pytest.raises(LabError) as info:
        load_lab(path)
    msg = str(info.value)
    assert str(path) in msg  # always names the file
    assert "Fix:" in msg     # and says what to do
    return msg


def test_bad_yaml_names_line_and_column(tmp_path):
    msg = _error(_write(tmp_path, "name: x\nhosts:\n  - name: a\n   address: b\n"))
    assert "line 4, column 4" in msg and "not valid YAML" in msg


def test_duplicate_yaml_key_is_an_error_not_a_silent_overwrite(tmp_path):
    msg = _error(_write(tmp_path, LOCAL.read_text() + "\nname: other\n"))
    assert "duplicate key 'name'" in msg and "first at line" in msg


def test_unknown_key_lists_the_allowed_ones(tmp_path):
    path = _mutated(tmp_path, lambda d: d["endpoints"][0].update(baseurl="http://x:1"))
    msg = _error(path)
    assert "endpoints[0].baseurl: unknown key 'baseurl'" in msg
    assert "base_url" in msg  # the key the owner meant is among the suggestions


def test_wrong_type_names_field_and_value(tmp_path):
    path = _mutated(tmp_path, lambda d: d["model_cache"].update(budget_gb="lots"))
    msg = _error(path)
    assert "model_cache.budget_gb:" in msg and "'lots'" in msg and "valid number" in msg


def test_duplicate_endpoint_name(tmp_path):
    path = _mutated(tmp_path, lambda d: d["endpoints"].append(dict(d["endpoints"][0])))
    msg = _error(path)
    assert "endpoints[1].name: duplicate endpoint name 'local-llamacpp' (also endpoints[0])" in msg
    assert "unique name" in msg


def test_endpoint_naming_unknown_model(tmp_path):
    path = _mutated(tmp_path, lambda d: d["endpoints"][0].update(model="gpt-5"))
    msg = _error(path)
    assert "endpoints[0].model: unknown model 'gpt-5'" in msg and "['tiny-llama']" in msg


def test_bad_name_and_missing_section(tmp_path):
    def mutate(d):
        d["endpoints"][0]["name"] = "Local/LLama"
        del d["vault"]

    msg = _error(_mutated(tmp_path, mutate))
    assert "endpoints[0].name: 'Local/LLama' is not valid" in msg and "partition key" in msg
    assert "vault: required key is missing" in msg


def test_secret_must_be_an_env_var_name_not_a_key(tmp_path):
    path = _mutated(tmp_path, lambda d: d["endpoints"][0].update(api_key_env="sk-1234abcd"))
    msg = _error(path)
    assert "endpoints[0].api_key_env" in msg and "never the key itself" in msg


def test_unset_environment_variable(tmp_path):
    path = _mutated(tmp_path, lambda d: d["vault"].update(path="${NO_SUCH_VAR_X}/vault"))
    msg = _error(path)
    assert "vault.path: environment variable ${NO_SUCH_VAR_X} is not set" in msg


def test_missing_file(tmp_path):
    with pytest.raises(LabError, match="does not exist. Fix: set IDP_LAB"):
        load_lab(tmp_path / "nope.yaml")


def test_idp_lab_selects_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("IDP_LAB", str(SCHLIMERS))
    assert load_lab().name == "schlimers"


def test_lab_check_cli(tmp_path, capsys):
    assert idp(["lab-check", str(SCHLIMERS)]) == 0
    assert "lab 'schlimers', 7 hosts, 4 endpoints, 3 models" in capsys.readouterr().out
    bad = _mutated(tmp_path, lambda d: d["endpoints"][0].update(model="gpt-5"))
    assert idp(["lab-check", str(bad)]) == 2
    assert "unknown model 'gpt-5'" in capsys.readouterr().err


# ------------------------------------------------------------------ llama.cpp's server flags, typed


def test_llamacpp_flags_are_typed_and_recorded_in_settings():
    ep = load_lab(LOCAL).endpoint("local-llamacpp")
    assert ep.llamacpp.flags() == ["-c", "2048", "-np", "4", "-t", "2", "-tb", "2", "-ngl", "0",
                                   "--cont-batching", "--metrics"]
    # what benchmarks record with the endpoint (and what tuning reads as the current -np)
    assert ep.settings["parallel"] == 4 and ep.settings["ctx_size"] == 2048 and ep.settings["n_gpu_layers"] == 0
    seed = load_lab(SCHLIMERS).endpoint("llamacpp-cpu").llamacpp
    assert (seed.ctx_size, seed.parallel, seed.threads, seed.cont_batching) == (8192, 8, 10, True)


def test_llamacpp_context_is_split_across_slots_like_llama_cpp_does():
    from idp_pipelines.lab import LlamaCppServer

    # src/llama-context.cpp: n_ctx_seq = n_ctx / n_seq_max, padded up to 256; a unified KV cache is shared
    assert LlamaCppServer(ctx_size=2048, parallel=4).ctx_per_slot() == 512
    assert LlamaCppServer(ctx_size=512, parallel=4).ctx_per_slot() == 256
    assert LlamaCppServer(ctx_size=8192, parallel=8).ctx_per_slot() == 1024
    assert LlamaCppServer(ctx_size=2048, parallel=4, kv_unified=True).ctx_per_slot() == 2048


def test_prompt_budget_covers_every_benchmark_prompt():
    from idp_pipelines.bench.suite import PROMPT_SETS
    from idp_pipelines.lab import PROMPT_TOKEN_BUDGET

    assert set(PROMPT_TOKEN_BUDGET) == set(PROMPT_SETS)
    for name, prompts in PROMPT_SETS.items():
        assert max(len(p.encode()) for p in prompts) + 64 <= PROMPT_TOKEN_BUDGET[name], name


def test_misspelt_llamacpp_flag_names_the_field(tmp_path):
    path = _mutated(tmp_path, lambda d: d["endpoints"][0]["llamacpp"].update(paralel=8))
    msg = _error(path)
    assert "endpoints[0].llamacpp.paralel: unknown key 'paralel'" in msg and "parallel" in msg


def test_llamacpp_flag_left_in_settings_says_where_it_goes(tmp_path):
    path = _mutated(tmp_path, lambda d: d["endpoints"][0].update(settings={"parallel": 8}))
    msg = _error(path)
    assert "endpoints[0]: settings.parallel is a llama-server flag with a typed field" in msg
    assert "Fix: move parallel from settings: to llamacpp:" in msg


def test_llamacpp_block_on_another_engine_is_an_error(tmp_path):
    path = _mutated(tmp_path, lambda d: d["endpoints"][0].update(kind="vllm"))
    msg = _error(path)
    assert "endpoints[0]: llamacpp: holds llama-server flags, but this endpoint's kind is 'vllm'" in msg


def test_slot_too_small_for_the_benchmark_is_an_error(tmp_path):
    path = _mutated(tmp_path, lambda d: (d["endpoints"][0]["llamacpp"].update(ctx_size=512, parallel=4),
                                         d["benchmarks"].update(max_tokens=200)))
    msg = _error(path)
    assert ("endpoints[0].llamacpp.ctx_size: 512 split across 4 slot(s) gives each 256 tokens, but a benchmark "
            "request needs up to 360") in msg and "Fix: raise ctx_size to at least 1440 or lower parallel" in msg


def test_more_threads_than_the_host_has_is_an_error(tmp_path):
    path = _mutated(tmp_path, lambda d: d["endpoints"][0]["llamacpp"].update(threads_batch=64))
    msg = _error(path)
    assert "endpoints[0].llamacpp.threads_batch: 64 is more than the 2 hardware threads of host 'localhost'" in msg
