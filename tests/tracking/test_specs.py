"""Run specs without a server: MLflow-safe keys, the tuned step, per-step metrics."""

from __future__ import annotations

import json

from idp_pipelines.tracking.specs import TUNED_BY_GOODPUT, TUNED_BY_SLO, mlflow_key, step_metrics, tuned_step


def test_keys_become_what_mlflow_accepts():
    assert mlflow_key("engine.max_num_seqs") == "engine.max_num_seqs"
    assert mlflow_key("idp.lab_git_sha.idp-pipelines:main") == "idp.lab_git_sha.idp-pipelines:main"
    assert mlflow_key("engine.rope{scaling}") == "engine.rope_scaling_"
    assert mlflow_key("/a//b/../c/") == "a/b/_/c"


def test_tuned_step_is_the_most_goodput_and_ties_go_to_fewer_sequences():
    steps = [{"concurrency": 1, "goodput_requests_per_s": 2.0}, {"concurrency": 4, "goodput_requests_per_s": 6.0},
             {"concurrency": 8, "goodput_requests_per_s": 6.0}, {"concurrency": 16, "goodput_requests_per_s": None}]
    assert tuned_step(steps) == (steps[1], TUNED_BY_GOODPUT)
    assert tuned_step([{"concurrency": 2, "output_tokens_per_s": 9.0}])[0]["concurrency"] == 2
    assert tuned_step([{"concurrency": 2}]) == (None, TUNED_BY_GOODPUT)


def test_tuned_step_is_the_recommended_one_when_a_recommendation_is_handed_in():
    steps = [{"concurrency": 1, "goodput_requests_per_s": 2.0}, {"concurrency": 4, "goodput_requests_per_s": 6.0},
             {"concurrency": 8, "goodput_requests_per_s": 7.0}]
    seen = []

    def recommend(given, slos):
        seen.append((given, slos))
        return 4

    assert tuned_step(steps, {"ttft_ms": 100.0}, recommend) == (steps[1], TUNED_BY_SLO)
    assert seen == [(steps, {"ttft_ms": 100.0})]
    # no SLO, or nothing recommended: the most goodput, and the tag says which rule chose it
    assert tuned_step(steps, None, recommend) == (steps[2], TUNED_BY_GOODPUT)
    assert tuned_step(steps, {"ttft_ms": 1.0}, lambda s, slo: None) == (steps[2], TUNED_BY_GOODPUT)


def test_step_metrics_take_columns_then_summary_then_server_numbers():
    m = step_metrics({"run_id": "r", "step_index": 0, "concurrency": 4, "ttft_ms_p95": 120.0, "ttft_ms_p99": None,
                      "summary": json.dumps({"ttft_ms_p95": 999.0, "ttft_ms_p90": 110.0, "slos": {"ttft_ms": 2000},
                                             "ttft_ms_p95_sufficient": True, "errors_by_kind": {"auth": 2}}),
                      "server_metrics": json.dumps({"kv_cache_usage": {"max": 0.5}})})
    assert m == {"ttft_ms_p95": 120.0, "ttft_ms_p90": 110.0, "errors_by_kind.auth": 2.0,
                 "server.kv_cache_usage.max": 0.5}
