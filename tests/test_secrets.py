"""Secret values found from the environment and the inventory, and replaced wherever they appear."""

from __future__ import annotations

from idp_pipelines.lab import load_lab
from idp_pipelines.secrets import REDACTED, Redactor
from tests.support import write_lab

SECRET = "sk-test-0123456789abcdef"


def test_redactor_replaces_secret_values_and_secret_named_keys():
    red = Redactor.from_env({"VLLM_API_KEY": SECRET, "HOME": "/root", "SHORT_TOKEN": "abc", "HF_PAT": "hf_abcdefgh"},
                            names=["HF_PAT"])
    assert red.text(f"Bearer {SECRET}; hf_abcdefgh") == f"Bearer {REDACTED}; {REDACTED}"
    assert red.value("engine.api_key", "anything") == REDACTED
    assert red.value("engine.max_num_batched_tokens", "8192") == "8192"
    assert red.value("idp.asset_key", "benchmark_runs") == "benchmark_runs"
    assert red.text("/root is home") == "/root is home"  # only secret-named variables count
    assert red.leaks(SECRET.encode()) and not red.leaks(b"nothing here")


def test_for_lab_also_takes_the_env_vars_the_inventory_names(tmp_path):
    lab = load_lab(write_lab(tmp_path / "lab.yaml", extra={"hub": {"token_env": "MY_HUB_PAT"}}))
    env = {"MY_HUB_PAT": "pat-1234567890", "HOME": "/root"}  # not named like a secret, but named by the lab
    assert Redactor.from_env(env).text("pat-1234567890") == "pat-1234567890"
    assert Redactor.for_lab(lab, env).text("use pat-1234567890") == f"use {REDACTED}"
