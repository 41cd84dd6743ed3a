"""Prometheus (scrape config, alert rules, retention flag) and Grafana (datasource, dashboards)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import yaml

from idp_pipelines.lab import Lab, Service

from . import DeployError

PROMETHEUS_YML = "prometheus/prometheus.yml"
RULES_YML = "prometheus/rules/idp-alerts.yml"
PROMETHEUS_DEFAULTS = "prometheus/default"      # Debian's /etc/default/prometheus: the retention flag
DATASOURCE_YML = "grafana/provisioning/datasources/idp.yaml"
DASHBOARDS_YML = "grafana/provisioning/dashboards/idp.yaml"
DASHBOARD_JSON = "grafana/dashboards/ai-idp-inference.json"
DASHBOARD_DIR = "/var/lib/grafana/dashboards/idp"
# The engines whose /metrics need the endpoint's key: llama-server's --api-key guards /metrics too.
KEYED_METRICS = {"llamacpp"}


@dataclass
class Target:
    job: str
    service: Service
    address: str          # host:port
    metrics_path: str = "/metrics"
    key_name: str | None = None


@dataclass
class MonitoringBundle:
    files: dict[str, str] = field(default_factory=dict)       # host-relative path -> text (under each host)
    secret_files: dict[str, str] = field(default_factory=dict)  # path -> key (0600)
    prometheus_host: str = ""
    grafana_host: str | None = None
    targets: list[Target] = field(default_factory=list)
    queries: list[dict] = field(default_factory=list)          # {panel, expr} of the dashboard


def scrape_targets(lab: Lab) -> list[Target]:
    out = []
    for svc in lab.services:
        if not svc.container:
            continue
        address = lab.host(svc.host).address
        if svc.kind in ("vllm", "llamacpp"):
            port = svc.port("http")
            ep = lab.endpoint(svc.endpoint)
            if not ep.metrics_path:
                continue
            key = ep.api_key_env if svc.kind in KEYED_METRICS else None
            out.append(Target(svc.name, svc, f"{address}:{port.host}", ep.metrics_path, key))
        elif (port := svc.port("metrics")) is not None:
            out.append(Target(svc.name, svc, f"{address}:{port.host}"))
    return out


def _panel(pid: int, title: str, expr: str, unit: str, uid: str, x: int, y: int) -> dict:
    return {"id": pid, "type": "timeseries", "title": title,
            "datasource": {"type": "prometheus", "uid": uid},
            "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": "A", "expr": expr, "datasource": {"type": "prometheus", "uid": uid},
                         "legendFormat": "{{job}}"}]}


def dashboard(lab: Lab) -> dict:
    """The seed's dashboards (GPU utilisation, GPU memory, tokens/s, P95 latency) with the real names."""
    mon = lab.monitoring
    kinds = {s.kind for s in lab.services}
    uid = mon.datasource_uid
    panels: list[tuple[str, str, str]] = []
    if "dcgm-exporter" in kinds:
        panels += [("GPU utilisation (%)", "DCGM_FI_DEV_GPU_UTIL", "percent"),
                   # DCGM reports framebuffer memory in MiB (the seed divided by 1024^3 as if bytes)
                   ("GPU memory used (GiB)", "DCGM_FI_DEV_FB_USED / 1024", "decgbytes"),
                   ("GPU temperature (C)", "DCGM_FI_DEV_GPU_TEMP", "celsius")]
    if "vllm" in kinds:
        panels += [("vLLM throughput (tok/s)", "sum by (job) (rate(vllm:generation_tokens_total[$__rate_interval]))",
                    "short"),
                   ("vLLM request latency P95 (s)",
                    "histogram_quantile(0.95, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket[$__rate_interval])))",
                    "s"),
                   ("vLLM requests running / waiting", "sum by (job) (vllm:num_requests_running + vllm:num_requests_waiting)",
                    "short")]
    if "llamacpp" in kinds:
        panels += [("llama.cpp throughput (tok/s)",
                    "sum by (job) (rate(llamacpp:tokens_predicted_total[$__rate_interval]))", "short"),
                   ("llama.cpp requests processing / deferred",
                    "sum by (job) (llamacpp:requests_processing + llamacpp:requests_deferred)", "short")]
    if "node-exporter" in kinds:
        panels += [("Host CPU busy (%)",
                    '100 * (1 - avg by (job) (rate(node_cpu_seconds_total{mode="idle"}[$__rate_interval])))', "percent")]
    panels.append(("Targets up", "up", "short"))
    return {
        "uid": "ai-idp-inference", "title": "AI IDP Inference Monitoring", "schemaVersion": 39, "version": 1,
        "editable": False, "time": {"from": "now-6h", "to": "now"}, "refresh": "30s", "tags": ["idp"],
        "panels": [_panel(i + 1, t, e, u, uid, 12 * (i % 2), 8 * (i // 2)) for i, (t, e, u) in enumerate(panels)],
    }


def alert_rules(lab: Lab, targets: list[Target]) -> dict:
    mon = lab.monitoring
    kinds = {t.service.kind for t in targets}
    rules = [{"alert": "TargetDown",
              "expr": f"up{{job=~\"{'|'.join(t.job for t in targets)}\"}} == 0",
              "for": mon.target_down_for, "labels": {"severity": "critical"},
              "annotations": {"summary": "{{ $labels.job }} on {{ $labels.instance }} is down"}}]
    if "dcgm-exporter" in kinds:
        rules += [
            {"alert": "GpuTemperatureHigh", "expr": f"DCGM_FI_DEV_GPU_TEMP > {mon.gpu_temperature_c:g}", "for": "5m",
             "labels": {"severity": "warning"},
             "annotations": {"summary": "GPU {{ $labels.gpu }} at {{ $value }} C (sustained load, seed risk table)"}},
            {"alert": "GpuMemoryHigh",
             "expr": f"DCGM_FI_DEV_FB_USED / (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE) > {mon.gpu_memory_fraction:g}",
             "for": "10m", "labels": {"severity": "warning"},
             "annotations": {"summary": "GPU {{ $labels.gpu }} memory above "
                                        f"{mon.gpu_memory_fraction:.0%} (OOM risk)"}},
        ]
    if "node-exporter" in kinds:
        rules.append({"alert": "HostMemoryLow",
                      "expr": "node_memory_MemAvailable_bytes / node_memory_MemTotal_bytes < 0.05", "for": "10m",
                      "labels": {"severity": "warning"},
                      "annotations": {"summary": "{{ $labels.instance }} has under 5 % memory available"}})
    return {"groups": [{"name": "idp-lab", "rules": rules}]}


def render_monitoring(lab: Lab, keys_by_host: dict[str, dict[str, str]]) -> MonitoringBundle:
    """Every monitoring file; `keys_by_host` are the hosts' key stores (for Prometheus' credentials files)."""
    mon = lab.monitoring
    if mon is None:
        raise DeployError("the inventory has no monitoring: section. Fix: add one (prometheus_host, "
                          "scrape_interval_s, retention_days, datasource_uid), see labs/schlimers.yaml.")
    targets = scrape_targets(lab)
    bundle = MonitoringBundle(prometheus_host=mon.prometheus_host, grafana_host=mon.grafana_host, targets=targets)
    scrape = []
    for t in targets:
        job = {"job_name": t.job, "metrics_path": t.metrics_path,
               "static_configs": [{"targets": [t.address], "labels": {"host": t.service.host, "kind": t.service.kind}}]}
        if t.key_name:
            key = keys_by_host.get(t.service.host, {}).get(t.key_name)
            if key is None:
                raise DeployError(f"Prometheus scrapes {t.job} with the key {t.key_name}, which the .env of "
                                  f"{t.service.host} does not hold. Fix: materialise service_secrets[{t.service.host}].")
            rel = f"keys/{t.job}"
            bundle.secret_files[f"prometheus/{rel}"] = key + "\n"
            job["authorization"] = {"type": "Bearer", "credentials_file": rel}
        scrape.append(job)
    config = {"global": {"scrape_interval": f"{mon.scrape_interval_s}s", "evaluation_interval": f"{mon.scrape_interval_s}s",
                         "external_labels": {"lab": lab.name}},
              "rule_files": ["rules/*.yml"], "scrape_configs": scrape}
    if mon.alertmanager:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [mon.alertmanager]}]}]}
    head = f"# Rendered by idp_pipelines (monitoring_config) for {mon.prometheus_host}. Do not edit: change lab.yaml.\n"
    bundle.files[PROMETHEUS_YML] = head + yaml.safe_dump(config, sort_keys=False, width=120)
    bundle.files[RULES_YML] = head + yaml.safe_dump(alert_rules(lab, targets), sort_keys=False, width=200)
    # Retention is a command-line flag of Prometheus, not a prometheus.yml setting.
    bundle.files[PROMETHEUS_DEFAULTS] = (f"# /etc/default/prometheus, rendered by idp_pipelines\nARGS=\"--storage.tsdb."
                                         f"retention.time={mon.retention_days}d\"\n")
    if mon.grafana_host:
        prom = lab.host(mon.prometheus_host).address
        ds = {"apiVersion": 1, "datasources": [{
            "name": "Prometheus (lab)", "type": "prometheus", "uid": mon.datasource_uid, "access": "proxy",
            "url": f"http://{prom}:{mon.prometheus_port}", "isDefault": True, "editable": False}]}
        prov = {"apiVersion": 1, "providers": [{"name": "idp", "folder": "AI IDP", "type": "file",
                                                "disableDeletion": True, "options": {"path": DASHBOARD_DIR}}]}
        dash = dashboard(lab)
        bundle.files[DATASOURCE_YML] = yaml.safe_dump(ds, sort_keys=False)
        bundle.files[DASHBOARDS_YML] = yaml.safe_dump(prov, sort_keys=False)
        bundle.files[DASHBOARD_JSON] = json.dumps(dash, indent=2) + "\n"
        bundle.queries = [{"panel": p["title"], "expr": t["expr"]} for p in dash["panels"] for t in p["targets"]]
    return bundle
