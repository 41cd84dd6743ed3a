from __future__ import annotations

import json

import pytest

from idp_pipelines.bench.tuning import (
    Recommendation,
    recommend_concurrency,
    setting_for,
    store_recommendations,
    tune_endpoint,
)
from idp_pipelines.lab import LabError, load_lab
from idp_pipelines.settings import REPO_ROOT
from idp_pipelines.warehouse import Warehouse


@pytest.fixture(scope="module")
def lab():
    return load_lab(REPO_ROOT / "labs" / "schlimers.yaml")


@pytest.fixture
def wh(tmp_path):
    return Warehouse(tmp_path / "wh.duckdb")


def _insert(con, table: str, row: dict) -> None:
    con.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))


def add_run(con, run_id: str, endpoint: str, started_at: str, *, status: str = "complete", kind: str = "vllm",
            host: str = "schlimers-server", engine_settings: dict | None = None) -> None:
    _insert(con, "benchmark_runs", {
        "run_id": run_id, "endpoint": endpoint, "kind": kind, "host": host, "base_url": "http://x:8000",
        "engine_settings": json.dumps(engine_settings or {}), "load_model": "concurrency",
        "harness_version": "test", "trigger": "test", "started_at": started_at, "status": status,
    })


def add_step(con, run_id: str, index: int, concurrency: int | None, **cols) -> None:
    row = {"run_id": run_id, "step_index": index, "step": f"c{concurrency}",
           "mode": "concurrency" if concurrency else "rate", "concurrency": concurrency,
           "started_at": "2026-01-12 02:00:00+00", "n_requests": 200, "n_ok": 200, "n_errors": 0,
           "error_rate": 0.0}
    row.update(cols)
    _insert(con, "benchmark_steps", row)


def step(c: int, ttft95: float | None, e2e95: float = 2000.0, *, err: float = 0.0, tok_s: float = 0.0,
         ttft50: float | None = None, tpot50: float = 20.0) -> dict:
    return {"concurrency": c, "step": f"c{c}", "ttft_ms_p50": ttft50 if ttft50 is not None else (ttft95 or 0) * 0.7,
            "ttft_ms_p95": ttft95, "tpot_ms_p50": tpot50, "e2e_ms_p95": e2e95, "error_rate": err,
            "goodput_fraction": 1.0 - err, "output_tokens_per_s": tok_s or 50.0 * c}


SWEEP = [step(1, 60), step(2, 70), step(4, 90), step(8, 140), step(16, 190), step(32, 400, err=0.05)]
VLLM_SLO = {"ttft_ms": 150, "tpot_ms": None, "e2e_ms": 5000}


def test_setting_for():
    assert setting_for("vllm") == "max_num_seqs"
    assert setting_for("llamacpp") == "parallel"
    assert setting_for("triton") is None and setting_for("openai") is None


def test_highest_concurrency_meeting_every_slo():
    rec = recommend_concurrency(SWEEP, VLLM_SLO)
    assert isinstance(rec, Recommendation)
    assert rec.recommended == 8
    assert rec.slo == {"ttft_ms": 150.0, "e2e_ms": 5000.0}
    verdicts = {v.concurrency: v for v in rec.evidence}
    assert [c for c, v in verdicts.items() if v.meets] == [1, 2, 4, 8]
    assert verdicts[16].reasons == ["TTFT p95 190.0 ms > 150 ms"]
    assert "error rate 5.0% > 1%" in verdicts[32].reasons
    assert "TTFT p95 400.0 ms > 150 ms" in verdicts[32].reasons
    assert "16 fails: TTFT p95 190.0 ms > 150 ms" in rec.reason


def test_every_slo_and_error_rate_is_checked():
    steps = [step(1, 50, tpot50=20), step(2, 60, tpot50=45), step(4, 70, e2e95=6000), step(8, 80, err=0.02)]
    rec = recommend_concurrency(steps, {"ttft_ms": 150, "tpot_ms": 40, "e2e_ms": 5000})
    v = {x.concurrency: x for x in rec.evidence}
    assert v[1].meets
    assert v[2].reasons == ["TPOT p50 45.0 ms > 40 ms"]
    assert v[4].reasons == ["E2E p95 6000.0 ms > 5000 ms"]
    assert v[8].reasons == ["error rate 2.0% > 1%"]
    assert rec.recommended == 1
    # metrics.SLO_KEYS spelling works too
    assert recommend_concurrency(steps, {"ttft_ms_max": 150, "tpot_ms_max": 40}).recommended == 4


def test_missing_p95_falls_back_to_p50_and_says_so():
    steps = [step(1, None, ttft50=100), step(2, None, ttft50=200)]
    rec = recommend_concurrency(steps, {"ttft_ms": 150})
    assert rec.recommended == 1
    assert rec.evidence[0].meets and "judged on p50" in rec.evidence[0].notes[0]
    assert rec.evidence[1].reasons == ["TTFT p50 200.0 ms > 150 ms"]
    assert any("p95 could not be bounded" in n for n in rec.notes)


def test_no_step_meets_the_slos():
    rec = recommend_concurrency([step(1, 300), step(2, 400)], VLLM_SLO)
    assert rec.recommended is None
    assert "no measured concurrency meets the SLOs" in rec.reason
    assert "TTFT p95 300.0 ms > 150 ms" in rec.reason
    assert not any(v.meets for v in rec.evidence)


def test_no_slo_picks_best_throughput():
    steps = [step(1, 50, tok_s=40), step(2, 60, tok_s=75), step(4, 900, tok_s=90), step(8, 2000, tok_s=85, err=0.2)]
    rec = recommend_concurrency(steps, {"ttft_ms": None, "tpot_ms": None, "e2e_ms": None})
    assert rec.recommended == 4  # c=8 has more errors than allowed
    assert "no SLO set" in rec.reason and rec.notes
    assert recommend_concurrency(steps, {}).recommended == 4


def test_all_slos_pass_suggests_extending_the_sweep():
    rec = recommend_concurrency([step(1, 50), step(2, 60)], VLLM_SLO)
    assert rec.recommended == 2
    assert any("extend the sweep" in n for n in rec.notes)


def test_empty_and_open_loop_only():
    assert recommend_concurrency([], VLLM_SLO).recommended is None
    rec = recommend_concurrency([{"concurrency": None, "step": "r2", "ttft_ms_p95": 10}], VLLM_SLO)
    assert rec.recommended is None and "no closed-loop" in rec.reason


def test_tune_endpoint_reads_latest_complete_multistep_run(wh, lab):
    with wh.write() as con:
        add_run(con, "run-a", "vllm-gpu", "2026-01-10 02:00:00+00")
        for i, s in enumerate(SWEEP):  # would recommend 8
            add_step(con, "run-a", i, s["concurrency"], ttft_ms_p50=s["ttft_ms_p50"], ttft_ms_p95=s["ttft_ms_p95"],
                     tpot_ms_p50=s["tpot_ms_p50"], e2e_ms_p95=s["e2e_ms_p95"], error_rate=s["error_rate"],
                     output_tokens_per_s=s["output_tokens_per_s"])
        add_run(con, "run-b", "vllm-gpu", "2026-01-11 02:00:00+00")  # the one to use: recommends 4
        for i, (c, t) in enumerate([(1, 70), (2, 90), (4, 120), (8, 180)]):
            add_step(con, "run-b", i, c, ttft_ms_p50=t * 0.7, ttft_ms_p95=t, tpot_ms_p50=20, e2e_ms_p95=3000,
                     output_tokens_per_s=40.0 * c)
        add_step(con, "run-b", 4, None, rate_rps=2.0, ttft_ms_p95=50)  # open-loop step: ignored
        add_run(con, "run-c", "vllm-gpu", "2026-01-12 02:00:00+00", status="failed")
        for i, c in enumerate([1, 2, 4]):
            add_step(con, "run-c", i, c, ttft_ms_p95=10, e2e_ms_p95=10)
        add_run(con, "run-d", "vllm-gpu", "2026-01-13 02:00:00+00")  # complete but a single step
        add_step(con, "run-d", 0, 1, ttft_ms_p95=10, e2e_ms_p95=10)
        add_run(con, "run-e", "llamacpp-cpu", "2026-01-14 02:00:00+00", kind="llamacpp")  # another endpoint
        for i, c in enumerate([1, 2]):
            add_step(con, "run-e", i, c, ttft_ms_p95=10, e2e_ms_p95=10)

    rec = tune_endpoint(wh, lab, "vllm-gpu")
    assert rec is not None
    assert (rec.endpoint, rec.run_id, rec.setting, rec.recommended, rec.current) == (
        "vllm-gpu", "run-b", "max_num_seqs", 4, 32)
    assert [v.concurrency for v in rec.evidence] == [1, 2, 4, 8]
    row = rec.row()
    assert set(row) == {"endpoint", "run_id", "setting", "recommended", "current", "evidence"}
    evidence = json.loads(row["evidence"])
    assert evidence["steps"][3]["reasons"] == ["TTFT p95 180.0 ms > 150 ms"]
    assert store_recommendations(wh, [rec], "dagster-7") == 1  # the core's writer fits benchmark_tuning
    with wh.read() as con:
        assert con.execute("SELECT endpoint, setting, recommended, current, dagster_run_id FROM benchmark_tuning"
                           ).fetchall() == [("vllm-gpu", "max_num_seqs", 4, 32, "dagster-7")]

    cpu = tune_endpoint(wh, lab, "llamacpp-cpu")
    assert (cpu.setting, cpu.current, cpu.run_id) == ("parallel", 8, "run-e")


def test_tune_endpoint_without_data(wh, lab):
    assert tune_endpoint(wh, lab, "jetson-edge") is None
    with pytest.raises(LabError, match=r"schlimers.yaml: no endpoint named 'nope' in endpoints .* Fix: add it"):
        tune_endpoint(wh, lab, "nope")
