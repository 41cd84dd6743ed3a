"""The rules between files, each violated once; every message names both sides."""

from __future__ import annotations

from idp_pipelines.deploy import host_dir
from idp_pipelines.deploy.keys import ensure_keys
from idp_pipelines.deploy.models import ModelArtifact
from idp_pipelines.deploy.render import cross_checks, produced_paths, render_everything
from idp_pipelines.files import atomic_write
from idp_pipelines.secrets import service_env_path
from tests.deploy.conftest import artifacts_for, hub_snapshot


def _render(lab, tmp_path):
    for host in lab.docker_hosts():
        ensure_keys(lab, host)
    arts = artifacts_for(lab, tmp_path / "cache")
    render_everything(lab, arts, {})
    return arts


def test_the_rendered_files_satisfy_every_rule(schlimers, tmp_path):
    arts = _render(schlimers, tmp_path)
    assert cross_checks(schlimers, produced_paths(schlimers, arts)) == {
        "model_mounts": [], "keys_in_env": [], "upstreams_exist": [], "scrape_targets_exist": []}


def test_an_upstream_no_compose_file_publishes(schlimers, tmp_path):
    arts = _render(schlimers, tmp_path)
    site = host_dir("sclimers-gateway") / "nginx" / "ai-idp.conf"
    site.write_text(site.read_text().replace("server schlimers-server:8003;", "server schlimers-server:8005;"))
    problems = cross_checks(schlimers, produced_paths(schlimers, arts))["upstreams_exist"]
    assert len(problems) == 1
    assert problems[0].startswith("gateway nginx/ai-idp.conf upstream llamacpp_cpu_backend points at "
                                  "schlimers-server:8005, but no compose file publishes port 8005 on schlimers-server")
    assert "8003 (schlimers-server/compose.yaml service 'llamacpp-cpu')" in problems[0]


def test_a_scrape_target_no_compose_file_publishes(schlimers, tmp_path):
    arts = _render(schlimers, tmp_path)
    prom = host_dir("sclimers-observation") / "prometheus" / "prometheus.yml"
    prom.write_text(prom.read_text().replace("schlimers-server:9400", "schlimers-server:9401"))
    problems = cross_checks(schlimers, produced_paths(schlimers, arts))["scrape_targets_exist"]
    assert len(problems) == 1 and "prometheus.yml job 'dcgm-exporter' points at schlimers-server:9401" in problems[0]
    assert "9400 (schlimers-server/compose.yaml service 'dcgm-exporter')" in problems[0]


def test_a_mount_of_a_model_path_no_model_asset_produced_any_more(schlimers, tmp_path):
    arts = _render(schlimers, tmp_path)
    # hub_model downloads a new revision after the compose file was rendered
    new_sha = "f" * 40
    arts[("hub_model", "llama-3.1-8b-fp8")] = ModelArtifact(
        "llama-3.1-8b-fp8", "hub_model", hub_snapshot(tmp_path / "cache", schlimers, "llama-3.1-8b-fp8", new_sha), "hub-run-2")
    problems = cross_checks(schlimers, produced_paths(schlimers, arts))["model_mounts"]
    assert len(problems) == 1
    assert problems[0].startswith("schlimers-server/compose.yaml service 'vllm-gpu' mounts ")
    assert "for hub_model[llama-3.1-8b-fp8]" in problems[0] and f"snapshots/{new_sha} (hub_model[llama-3.1-8b-fp8] run hub-run-2)" in problems[0]


def test_a_key_a_service_uses_that_the_env_lacks(schlimers, tmp_path):
    arts = _render(schlimers, tmp_path)
    env = service_env_path("schlimers-server")
    atomic_write(env, "".join(line + "\n" for line in env.read_text().splitlines()
                              if not line.startswith("TRITON_API_KEY=")), mode=0o600)
    problems = cross_checks(schlimers, produced_paths(schlimers, arts))["keys_in_env"]
    assert problems == ["schlimers-server/compose.yaml service 'triton-gpu' uses TRITON_API_KEY, which "
                        "schlimers-server/.env does not define (it has ['LLAMACPP_API_KEY', 'VLLM_API_KEY']). "
                        "Fix: materialise service_secrets[schlimers-server]."]
