"""Each real validator on the rendered files, and on one broken file each (its own error text)."""

from __future__ import annotations

import json

import yaml

from idp_pipelines.deploy import host_dir
from idp_pipelines.deploy.keys import ensure_keys
from idp_pipelines.deploy.render import render_everything, validate_gateway, validate_monitoring
from idp_pipelines.deploy.validate import (
    check_compose,
    check_grafana,
    check_nginx,
    check_prometheus_config,
    check_rules,
    metric_names,
)
from tests.deploy.conftest import artifacts_for


def _render(lab, tmp_path):
    for host in lab.docker_hosts():
        ensure_keys(lab, host)
    render_everything(lab, artifacts_for(lab, tmp_path / "cache"), {})


def test_compose_files_pass_the_compose_schema_and_a_broken_one_fails(schlimers, tmp_path):
    _render(schlimers, tmp_path)
    for host in schlimers.docker_hosts():
        verdict = check_compose((host_dir(host) / "compose.yaml").read_text(), host)
        assert verdict.passed, verdict.errors
    doc = yaml.safe_load((host_dir("schlimers-server") / "compose.yaml").read_text())
    doc["services"]["vllm-gpu"]["restart_policy"] = "always"        # a misspelt key
    verdict = check_compose(yaml.safe_dump(doc), "schlimers-server/compose.yaml")
    assert not verdict.passed
    assert verdict.errors == ["schlimers-server/compose.yaml: services.vllm-gpu: Unevaluated properties are not "
                              "allowed ('restart_policy' was unexpected)"]
    del doc["services"]["vllm-gpu"]["restart_policy"]
    doc["services"]["vllm-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] = 0
    verdict = check_compose(yaml.safe_dump(doc), "schlimers-server/compose.yaml")
    assert any("services.vllm-gpu.deploy.resources.reservations.devices.0.device_ids: 0 is not of type 'array'" in e
               for e in verdict.errors), verdict.errors


def test_nginx_accepts_the_gateway_and_rejects_an_upstream_outside_the_lab(schlimers, tmp_path):
    _render(schlimers, tmp_path)
    verdict = validate_gateway(schlimers)
    assert verdict.passed, verdict.output
    assert "test is successful" in verdict.output
    site = (host_dir("sclimers-gateway") / "nginx" / "ai-idp.conf").read_text()
    broken = site.replace("server schlimers-server:8000;", "server schlimers-servr:8000;")
    verdict = check_nginx(broken, certificate=schlimers.gateway.tls.certificate, key=schlimers.gateway.tls.key,
                          host_names=[h.address for h in schlimers.hosts])
    assert not verdict.passed
    assert 'host not found in upstream "schlimers-servr:8000"' in verdict.text()


def test_nginx_rejects_a_syntax_error(local_lab, tmp_path):
    _render(local_lab, tmp_path)
    site = (host_dir("localhost") / "nginx" / "ai-idp.conf").read_text()
    verdict = check_nginx(site.replace("proxy_buffering off;", "proxy_buffering sometimes;"),
                          certificate=local_lab.gateway.tls.certificate, key=local_lab.gateway.tls.key,
                          host_names=["localhost"])
    assert not verdict.passed and 'invalid value "sometimes"' in verdict.text()


def test_promtool_accepts_the_monitoring_files(schlimers, tmp_path):
    _render(schlimers, tmp_path)
    config, rules, grafana = validate_monitoring(schlimers)
    assert config.passed, config.output
    assert rules.passed and "SUCCESS: 4 rules found" in rules.output
    assert grafana.passed, grafana.errors
    assert grafana.output.startswith("10 panels, 10 queries parsed")


def test_promtool_check_config_fails_without_the_scrape_key_file(schlimers, tmp_path):
    _render(schlimers, tmp_path)
    prom = host_dir("sclimers-observation") / "prometheus"
    (prom / "keys" / "llamacpp-cpu").unlink()
    verdict = check_prometheus_config(prom / "prometheus.yml")
    assert not verdict.passed
    assert 'error checking authorization credentials or bearer token file "keys/llamacpp-cpu"' in verdict.text()


def test_promtool_check_rules_fails_on_an_unparsable_alert(tmp_path):
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"alert": "GpuHot", "expr": "max(DCGM_FI_DEV_GPU_TEMP > 83"}]}]}))
    verdict = check_rules([path])
    assert not verdict.passed and "unclosed left parenthesis" in verdict.text()


def test_the_seed_dashboard_fails_on_metric_names_parsing_and_datasources():
    seed = {"uid": "seed", "panels": [
        {"id": 1, "title": "vLLM Throughput (tok/s)", "datasource": {"type": "prometheus", "uid": "idp-prometheus"},
         "targets": [{"refId": "A", "expr": "rate(vllm_tokens_generated_total[1m])"}]},
        {"id": 1, "title": "Inference Latency (P95)", "datasource": {"type": "prometheus", "uid": "prom"},
         "targets": [{"refId": "A", "expr": "histogram_quantile(0.95, vllm_request_duration_seconds_bucket"}]},
    ]}
    verdict = check_grafana(json.dumps(seed), {"idp-prometheus"}, 15, {"vllm", "dcgm", "prometheus"})
    assert not verdict.passed
    text = "\n".join(verdict.errors)
    assert "metric 'vllm_tokens_generated_total' is in no pinned exporter list" in text
    assert "panel id 1 is used by 'vLLM Throughput (tok/s)' and 'Inference Latency (P95)'" in text
    assert "datasource uid 'prom' is not provisioned" in text
    assert "unclosed left parenthesis" in text


def test_a_query_on_an_exporter_the_lab_does_not_run_is_an_error():
    dash = {"uid": "d", "panels": [{"id": 1, "title": "GPU", "datasource": {"uid": "u"},
                                    "targets": [{"refId": "A", "expr": "DCGM_FI_DEV_GPU_UTIL"}]}]}
    verdict = check_grafana(json.dumps(dash), {"u"}, 15, {"llamacpp", "prometheus"})
    assert verdict.errors == ["panel 'GPU': metric 'DCGM_FI_DEV_GPU_UTIL' comes from dcgm, which the lab does not run"]


def test_metric_names_leave_out_functions_labels_and_grouping():
    expr = ('histogram_quantile(0.95, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket{job="x"}[5m])))'
            ' / on (job) group_left up')
    assert metric_names(expr) == {"vllm:e2e_request_latency_seconds_bucket", "up"}
    assert metric_names('100 * (1 - avg by (job) (rate(node_cpu_seconds_total{mode="idle"}[1m])))') == {
        "node_cpu_seconds_total"}
