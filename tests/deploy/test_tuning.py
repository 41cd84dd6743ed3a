"""benchmark_tuning's value in the configs: used with its run, declined within the hysteresis, else the inventory's."""

from __future__ import annotations

import pytest

from idp_pipelines.deploy import DeployError
from idp_pipelines.deploy.tuning import choose, read_recommendations

REC = {"vllm-gpu": {"setting": "max_num_seqs", "recommended": 16, "current": 32, "run_id": "r-7", "reason": "SLO"}}


def test_a_recommendation_far_from_the_current_value_is_used_and_names_its_run():
    t = choose("vllm-gpu", "vllm", 32, REC, previous=None, hysteresis=0.25)
    assert (t.value, t.source, t.run_id) == (16, "benchmark_tuning", "r-7") and "recommends 16 (was 32)" in t.why


def test_a_recommendation_within_the_hysteresis_changes_nothing():
    t = choose("vllm-gpu", "vllm", 32, REC, previous=18, hysteresis=0.25)
    assert (t.value, t.source) == (18, "kept") and "within 25% of 18: unchanged" in t.why


def test_without_a_recommendation_or_with_tuning_off_the_inventory_value_is_used():
    assert choose("llamacpp-cpu", "llamacpp", 8, REC, None, 0.25).source == "inventory"
    off = choose("vllm-gpu", "vllm", 32, REC, None, 0.25, use_tuning=False)
    assert (off.value, off.why) == (32, "deploy.use_tuning is off")
    assert choose("triton-gpu", "triton", None, REC, None, 0.25) is None


def test_an_unreadable_report_is_an_error_naming_it(tmp_path):
    path = tmp_path / "benchmark_tuning.json"
    assert read_recommendations(path) == {}
    path.write_text("{not json")
    with pytest.raises(DeployError, match="benchmark_tuning.json is not readable JSON"):
        read_recommendations(path)
