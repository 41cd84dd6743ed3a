"""Rendering both inventories: the seed's defects fixed in the files themselves."""

from __future__ import annotations

import yaml

from idp_pipelines.deploy import host_dir
from idp_pipelines.deploy.keys import ensure_keys, host_keys
from idp_pipelines.deploy.render import render_everything
from tests.deploy.conftest import SHA, artifacts_for


def _render(lab, tmp_path):
    for host in lab.docker_hosts():
        ensure_keys(lab, host)
    arts = artifacts_for(lab, tmp_path / "cache")
    return render_everything(lab, arts, {}), arts


def _compose(host):
    return yaml.safe_load((host_dir(host) / "compose.yaml").read_text())


def test_the_gpu_host_compose_file(schlimers, tmp_path):
    _render(schlimers, tmp_path)
    text = (host_dir("schlimers-server") / "compose.yaml").read_text()
    doc = yaml.safe_load(text)
    services = doc["services"]
    assert list(services) == ["vllm-gpu", "llamacpp-cpu", "triton-gpu", "dcgm-exporter", "node-exporter"]
    for name, svc in services.items():
        assert svc["restart"] == "unless-stopped" and svc["security_opt"] == ["no-new-privileges:true"], name
        assert "healthcheck" in svc, name
    # no key anywhere in the file: keys come through env_file, never on a command line
    for value in host_keys("schlimers-server").values():
        assert value not in text
    vllm = services["vllm-gpu"]
    assert "--api-key" not in vllm["command"] and "--disable-log-stats" not in vllm["command"]
    assert vllm["command"][vllm["command"].index("--max-num-seqs") + 1] == "32"
    assert vllm["env_file"] == [".env"] and vllm["x-idp-keys"] == ["VLLM_API_KEY"]
    assert vllm["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    # the repo folder is mounted (snapshot files are symlinks into blobs/), read-only; the engine opens the snapshot
    mount = vllm["volumes"][0]
    assert mount["read_only"] and mount["source"].endswith("models--RedHatAI--Meta-Llama-3.1-8B-Instruct-FP8")
    assert vllm["command"][1] == f"/models/llama-3.1-8b-fp8/snapshots/{SHA}"
    llama = services["llamacpp-cpu"]
    assert llama["command"][1] == f"/models/llama-3.2-3b-q4/snapshots/{SHA}/Llama-3.2-3B-Instruct-Q4_K_M.gguf"
    assert llama["command"][llama["command"].index("-tb") + 1] == "24" and "--metrics" in llama["command"]
    assert llama["environment"]["LLAMA_API_KEY"].startswith("${LLAMACPP_API_KEY:?")
    triton = services["triton-gpu"]
    assert triton["ports"] == ["8001:8000", "8002:8001", "8004:8002"]
    assert "triton-admin-key=$$TRITON_API_KEY" in triton["command"][0]
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert len({p.split(":")[0] for p in published}) == len(published)


def test_the_jetson_serves_its_gguf_with_llama_cpp_and_gets_the_file_synced(schlimers, tmp_path):
    bundles, arts = _render(schlimers, tmp_path)
    svc = _compose("jetson-orin")["services"]["jetson-edge"]
    assert svc["image"] == "dustynv/llama_cpp:r36.4.0" and svc["entrypoint"] == ["llama-server"]
    assert svc["command"][:2] == ["-m", "/models/llama-3.2-1b-q4/Llama-3.2-1B-Instruct-Q4_K_M.gguf"]
    assert svc["volumes"][0]["source"] == "/home/ubuntu/jetson/models/llama-3.2-1b-q4"
    script = (host_dir("jetson-orin") / "sync-models.sh").read_text()
    src = arts[("hub_model", "llama-3.2-1b-q4")].path / "Llama-3.2-1B-Instruct-Q4_K_M.gguf"
    assert "ssh -o BatchMode=yes" in script and " -p 22 " in script and " -l ubuntu " in script
    assert "--partial -e '" in script and f"{src} 192.168.1.50:/home/ubuntu/jetson/models/" in script


def test_gateway_and_monitoring_files(schlimers, tmp_path):
    _render(schlimers, tmp_path)
    site = (host_dir("sclimers-gateway") / "nginx" / "ai-idp.conf").read_text()
    assert "return 301 https://$host$request_uri;" in site and "proxy_buffering off;" in site
    assert "proxy_set_header Authorization $http_authorization;" in site and "keepalive 32;" in site
    assert "allow 192.168.1.0/24;" in site and "/etc/letsencrypt" not in site
    prom_dir = host_dir("sclimers-observation") / "prometheus"
    prom = yaml.safe_load((prom_dir / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["llamacpp-cpu"]["authorization"]["credentials_file"] == "keys/llamacpp-cpu"
    assert (prom_dir / "keys" / "llamacpp-cpu").stat().st_mode & 0o777 == 0o600
    assert jobs["triton-gpu"]["static_configs"][0]["targets"] == ["schlimers-server:8004"]
    assert "node-exporter" in jobs and prom["alerting"]["alertmanagers"]
    assert "retention" not in (prom_dir / "prometheus.yml").read_text()
    assert (prom_dir / "default").read_text().endswith('ARGS="--storage.tsdb.retention.time=30d"\n')
    alerts = {r["alert"] for r in yaml.safe_load((prom_dir / "rules" / "idp-alerts.yml").read_text())["groups"][0]["rules"]}
    assert {"TargetDown", "GpuTemperatureHigh", "GpuMemoryHigh"} <= alerts
    dash = (host_dir("sclimers-grafana") / "grafana" / "dashboards" / "ai-idp-inference.json").read_text()
    assert "vllm:generation_tokens_total" in dash and "DCGM_FI_DEV_FB_USED / 1024" in dash
    assert "histogram_quantile(0.95, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket[$__rate_interval])))" in dash
    ds = yaml.safe_load((host_dir("sclimers-grafana") / "grafana/provisioning/datasources/idp.yaml").read_text())
    assert ds["datasources"][0]["uid"] == "idp-prometheus"


def test_the_local_lab_renders_its_embedded_endpoint_from_the_quantized_model(local_lab, tmp_path):
    _render(local_lab, tmp_path)
    svc = _compose("localhost")["services"]["local-llamacpp"]
    assert svc["ports"] == ["18003:8080"] and "env_file" not in svc     # the embedded endpoint has no key
    assert svc["command"][1] == "/models/tiny-llama/tiny-llama-f32.Q4_K_M.gguf"
    assert svc["volumes"][0]["source"].endswith(f"gguf/tiny-llama/{SHA[:12]}")
    assert (host_dir("localhost") / "nginx" / "ai-idp.conf").exists()
    assert (host_dir("localhost") / "prometheus" / "prometheus.yml").exists()
