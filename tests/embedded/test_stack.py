"""`idp up`'s plan, without starting anything: the main job's order and the llama-server command line."""

from __future__ import annotations

from idp_pipelines.embedded.stack import Stack
from idp_pipelines.settings import REPO_ROOT


def test_the_main_job_measures_after_everything_else_and_follows_up_after_the_measurements(tmp_path):
    stages = Stack(REPO_ROOT / "labs" / "local.yaml", tmp_path, 3000).main_job_stages()
    assert stages == [
        ("everything but the measurements",
         ["backup_verification", "benchmark_tuning", "cache_backup", "deployed_state", "gateway_config", "gguf_model",
          "git_commits", "hardware_findings", "hub_model", "inference_endpoints", "mlflow_experiments",
          "model_cache_inventory", "model_cache_rehash", "monitoring_config", "obsidian_notes", "service_configs",
          "service_secrets"]),
        ("the measurements (benchmark_runs, rpc_latency)", ["benchmark_runs", "rpc_latency"]),
        # the deploy group renders (and deploys) again once benchmark_tuning has a recommendation
        ("what follows the measurements", ["benchmark_tuning", "deployed_state", "gateway_config", "hardware_findings",
                                           "mlflow_experiments", "monitoring_config", "obsidian_notes",
                                           "service_configs"]),
    ]


def test_the_embedded_endpoint_runs_llama_server_with_the_typed_flags_and_the_key_out_of_argv(tmp_path, monkeypatch):
    import yaml

    from idp_pipelines.embedded.stack import plan_services
    from idp_pipelines.lab import load_lab

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "llama-server").write_text("")  # only its path is planned here; nothing is started
    (bin_dir / "llama-server").chmod(0o755)
    monkeypatch.setenv("IDP_LLAMA_CPP_BIN", str(bin_dir))
    monkeypatch.setenv("LAB_TEST_KEY", "sk-not-on-the-command-line")
    data = yaml.safe_load((REPO_ROOT / "labs" / "local.yaml").read_text())
    data["endpoints"][0]["api_key_env"] = "LAB_TEST_KEY"
    (tmp_path / "lab.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    llama = plan_services(load_lab(tmp_path / "lab.yaml"), tmp_path / "home", 3000)[0]
    assert llama.argv[0] == str(bin_dir / "llama-server")
    assert llama.argv[llama.argv.index("--port") + 1] == "18003"
    assert llama.argv[llama.argv.index("--alias") + 1] == "tiny-llama"
    assert llama.argv[-12:] == ["-c", "2048", "-np", "4", "-t", "2", "-tb", "2", "-ngl", "0", "--cont-batching",
                                "--metrics"]
    assert llama.env == {"LLAMA_API_KEY": "sk-not-on-the-command-line"}
    assert not [a for a in llama.argv if "sk-not" in a]
    assert llama.ready_url == "http://127.0.0.1:18003/health"
