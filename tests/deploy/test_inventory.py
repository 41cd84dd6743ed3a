"""The inventory's deploy sections: typed engine flags, port clashes, hosts without Docker, the seed fixed."""

from __future__ import annotations

import pytest

from idp_pipelines.lab import LabError, load_lab
from tests.deploy.conftest import lab_with


def _services(data):
    return {s["name"]: s for s in data["services"]}


def test_the_seed_lab_is_corrected(schlimers):
    jetson = schlimers.endpoint("jetson-edge")
    assert jetson.kind == "llamacpp" and schlimers.model(jetson.model).format == "gguf"
    cpu = schlimers.endpoint("llamacpp-cpu").llamacpp
    assert cpu.metrics and cpu.threads_batch <= schlimers.host("schlimers-server").cpu.threads
    ports = [(s.host, p.host) for s in schlimers.services for p in s.ports]
    assert len(ports) == len(set(ports))                     # the seed's 8003 clash cannot be written
    assert schlimers.service("triton-gpu").port("metrics").host == 8004
    assert "Let's Encrypt" not in schlimers.gateway.tls.issuer and "CA" in schlimers.gateway.tls.issuer
    assert schlimers.monitoring.retention_days == 30
    vllm = schlimers.endpoint("vllm-gpu")
    assert vllm.vllm.max_num_seqs == 32 and vllm.settings["max_num_seqs"] == 32   # still recorded for benchmarks


def test_two_services_on_one_host_port_is_an_error_naming_both(tmp_path):
    def clash(data):
        _services(data)["triton-gpu"]["ports"][2]["host"] = 8003     # the seed's Triton metrics port
    with pytest.raises(LabError) as err:
        load_lab(lab_with(tmp_path, "schlimers", clash))
    msg = str(err.value)
    assert "port 8003 on host 'schlimers-server' is published by both 'triton-gpu' and 'llamacpp-cpu'" in msg
    assert "services[2].ports[2].host" in msg and "Fix: publish one of them on another host port" in msg


def test_a_container_on_a_host_without_docker_is_an_error_but_the_gateway_is_not(tmp_path):
    def move(data):
        _services(data)["node-exporter"]["host"] = "sclimers-gateway"
        data["services"].append({"name": "gateway-nginx", "kind": "nginx", "host": "sclimers-gateway"})
    with pytest.raises(LabError) as err:
        load_lab(lab_with(tmp_path, "schlimers", move))
    msg = str(err.value)
    assert "service 'node-exporter' is a container, but host 'sclimers-gateway' has no docker_host" in msg
    assert "gateway-nginx" not in msg


def test_a_misspelt_vllm_flag_is_an_inventory_error(tmp_path):
    def typo(data):
        data["endpoints"][0]["vllm"]["max_num_seq"] = 16
    with pytest.raises(LabError) as err:
        load_lab(lab_with(tmp_path, "schlimers", typo))
    assert "endpoints[0].vllm.max_num_seq: unknown key 'max_num_seq'" in str(err.value)


def test_disabling_vllm_stats_is_refused_since_it_turns_off_metrics(tmp_path):
    def off(data):
        data["endpoints"][0]["vllm"]["disable_log_stats"] = True
    with pytest.raises(LabError, match=r"endpoints\[0\]\.vllm\.disable_log_stats"):
        load_lab(lab_with(tmp_path, "schlimers", off))


def test_a_route_to_an_unknown_endpoint_is_an_error(tmp_path):
    def bad(data):
        data["gateway"]["routes"].append({"endpoint": "vllm-gpu2", "path": "/other/"})
    with pytest.raises(LabError, match=r"gateway\.routes\[4\]\.endpoint: unknown endpoint 'vllm-gpu2'"):
        load_lab(lab_with(tmp_path, "schlimers", bad))


def test_a_lan_cidr_with_host_bits_is_an_error(tmp_path):
    def bad(data):
        data["gateway"]["lan_cidrs"] = ["192.168.1.1/24"]
    with pytest.raises(LabError, match=r"gateway\.lan_cidrs: '192\.168\.1\.1/24' is not a network in CIDR form"):
        load_lab(lab_with(tmp_path, "schlimers", bad))


def test_a_triton_service_without_its_flags_says_what_to_add(tmp_path):
    def untyped(data):
        del data["endpoints"][2]["triton"]
    with pytest.raises(LabError, match=r"services\[2\]\.endpoint: Triton's service needs the endpoint's triton: block"):
        load_lab(lab_with(tmp_path, "schlimers", untyped))
