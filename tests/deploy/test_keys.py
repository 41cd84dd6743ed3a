"""The key store: CSPRNG keys in a 0600 .env, kept, rotated on request, learnt by the redactor."""

from __future__ import annotations

import re

import pytest

from idp_pipelines.deploy import DeployError
from idp_pipelines.deploy.keys import ensure_keys, host_keys
from idp_pipelines.secrets import Redactor, service_env_path
from tests.deploy.conftest import lab_with
from idp_pipelines.lab import load_lab


def test_keys_are_random_private_and_kept(schlimers):
    first = ensure_keys(schlimers, "schlimers-server")
    assert first.created == ["LLAMACPP_API_KEY", "TRITON_API_KEY", "VLLM_API_KEY"]
    path = service_env_path("schlimers-server")
    assert path.stat().st_mode & 0o777 == 0o600
    keys = host_keys("schlimers-server")
    assert all(re.fullmatch(r"[0-9a-f]{64}", v) for v in keys.values()) and len(set(keys.values())) == 3
    before = path.stat().st_mtime_ns
    again = ensure_keys(schlimers, "schlimers-server")
    assert again.kept == sorted(keys) and not again.changed
    assert host_keys("schlimers-server") == keys and path.stat().st_mtime_ns == before


def test_rotation_replaces_only_what_it_names_and_says_so(schlimers):
    ensure_keys(schlimers, "schlimers-server")
    old = host_keys("schlimers-server")
    report = ensure_keys(schlimers, "schlimers-server", rotate=["VLLM_API_KEY"])
    new = host_keys("schlimers-server")
    assert report.rotated == ["VLLM_API_KEY"] and "rotated: VLLM_API_KEY" in report.summary()
    assert new["VLLM_API_KEY"] != old["VLLM_API_KEY"]
    assert {k: v for k, v in new.items() if k != "VLLM_API_KEY"} == {k: v for k, v in old.items() if k != "VLLM_API_KEY"}
    assert service_env_path("schlimers-server").stat().st_mode & 0o777 == 0o600
    with pytest.raises(DeployError, match=r"rotate names \['HF_TOKEN'\], which host 'schlimers-server' does not use"):
        ensure_keys(schlimers, "schlimers-server", rotate=["HF_TOKEN"])


def test_a_loosened_mode_is_put_back(schlimers):
    ensure_keys(schlimers, "jetson-orin")
    service_env_path("jetson-orin").chmod(0o644)
    report = ensure_keys(schlimers, "jetson-orin")
    assert report.mode_fixed and service_env_path("jetson-orin").stat().st_mode & 0o777 == 0o600


def test_the_redactor_and_the_harness_find_the_generated_keys(schlimers, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    ensure_keys(schlimers, "schlimers-server")
    key = host_keys("schlimers-server")["VLLM_API_KEY"]
    assert Redactor.for_lab(schlimers).text(f"Authorization: Bearer {key}") == "Authorization: Bearer [redacted]"
    assert schlimers.endpoint("vllm-gpu").api_key() == key
    monkeypatch.setenv("VLLM_API_KEY", "sk-from-the-environment")
    assert schlimers.endpoint("vllm-gpu").api_key() == "sk-from-the-environment"


def test_a_key_no_service_uses_any_more_is_dropped(tmp_path, schlimers):
    ensure_keys(schlimers, "schlimers-server")

    def no_triton_key(data):
        del data["endpoints"][2]["api_key_env"]
    lab = load_lab(lab_with(tmp_path, "schlimers", no_triton_key))
    report = ensure_keys(lab, "schlimers-server")
    assert report.dropped == ["TRITON_API_KEY"] and "TRITON_API_KEY" not in host_keys("schlimers-server")
