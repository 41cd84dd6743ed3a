"""Benchmarks: sweeps of every endpoint into DuckDB, RPC latency per host, tuning and the findings report."""

import hashlib
import json
import time
from collections.abc import Callable

import dagster as dg

from idp_pipelines import settings
from idp_pipelines.assets.common import FOLLOW_UPDATES, Throttle, check_result
from idp_pipelines.bench.checks import NO_REGRESSION, SANE
from idp_pipelines.files import atomic_write
from idp_pipelines.lab import Lab
from idp_pipelines.markdown import md_table
from idp_pipelines.resources import LabResource, WarehouseResource

TRIGGER_TAG = "idp/trigger"
BENCHMARKS_JOB = "benchmarks_job"



def _step_progress(log) -> Callable[[str, int, int], None]:
    throttle = Throttle(log.info)
    return lambda step, done, total: throttle(f"step {step}: {done}/{total} requests", final=done == total)


def _fmt(v, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:,.1f}{unit}"


def build(inventory: Lab) -> dg.Definitions:
    benchmarked = [e for e in inventory.endpoints if e.openai_compatible]  # Triton's own API is KServe v2
    endpoint_names = [e.name for e in benchmarked]
    endpoint_partitions = dg.StaticPartitionsDefinition(endpoint_names)
    hosts = list(dict.fromkeys(e.host for e in inventory.endpoints))
    host_partitions = dg.StaticPartitionsDefinition(hosts)
    served = {}
    for e in benchmarked:
        if e.model:
            served.setdefault(e.model, []).append(e.name)

    @dg.asset(
        partitions_def=endpoint_partitions,
        group_name="benchmarks",
        kinds={"duckdb", "python"},
        # One measurement at a time: concurrent runs on the same host distort each other (the llama.cpp
        # CPU endpoint shares schlimers-server with vLLM), so every endpoint takes the one `gpu` slot.
        pool="gpu",
        # The model an endpoint serves, downloaded and quantized, is part of each run's lineage.
        deps=[dg.AssetDep(key, partition_mapping=dg.StaticPartitionMapping(served))
              for key in ("hub_model", "gguf_model")] if served else [],
        description="A closed-loop concurrency sweep of the endpoint: one run row, one row per step and per request.",
        check_specs=[
            dg.AssetCheckSpec(NO_REGRESSION, asset="benchmark_runs",
                              description="Throughput and TTFT within tolerance of the median of recent nightly runs."),
            dg.AssetCheckSpec(SANE, asset="benchmark_runs",
                              description="Error rate, honoured output length, the memory-bandwidth roofline, prompt-cache "
                                          "hits with cache_bust on, and the host's load from other processes."),
        ],
    )
    def benchmark_runs(context: dg.AssetExecutionContext, lab: LabResource,
                       warehouse: WarehouseResource) -> dg.MaterializeResult:
        from idp_pipelines.bench import checks
        from idp_pipelines.bench.suite import baseline, run_endpoint

        inv = lab.load()
        wh = warehouse.get(context.log)
        trigger = context.run.tags.get(TRIGGER_TAG, "manual")
        out = run_endpoint(inv, context.partition_key, wh, trigger=trigger, dagster_run_id=context.run.run_id,
                           progress=_step_progress(context.log), log=context.log.info)
        head = out.headline()
        cfg = inv.benchmarks
        regression = checks.regression(head, baseline(wh, out.endpoint, out.run_id, cfg.baseline_runs),
                                       cfg.regression_tolerance)
        sane = checks.sanity(out.steps, cache_bust=cfg.cache_bust, max_other_load_cores=cfg.max_other_load_cores,
                             run_error=out.error)
        rows = [{k: s.get(k) for k in ("concurrency", "n_ok", "n_requests", "ttft_ms_p50", "ttft_ms_p95", "tpot_ms_p50",
                                        "output_tokens_per_s", "goodput_fraction", "error_rate")} for s in out.steps]
        return dg.MaterializeResult(
            metadata={
                "run_id": out.run_id,
                "trigger": trigger,
                "status": out.status,  # "failed" when nothing answered (the SANE check says why)
                "steps": dg.MetadataValue.md(md_table(rows, list(rows[0]) if rows else ["concurrency"])),
                "ttft_ms_p50_c1": dg.MetadataValue.float(head.get("ttft_ms_p50") or float("nan")),
                "output_tokens_per_s_max_c": dg.MetadataValue.float(head.get("output_tokens_per_s") or float("nan")),
                "decode_ceiling_tok_s": dg.MetadataValue.float(out.decode_ceiling_tok_s or float("nan")),
                "ceiling_source": out.ceiling_source,
            },
            data_version=dg.DataVersion(out.run_id),
            check_results=[check_result(regression), check_result(sane)],
        )

    @dg.asset(
        partitions_def=host_partitions,
        group_name="benchmarks",
        kinds={"duckdb", "python"},
        pool="gpu",
        description="Round-trip latency to the host (the seed's Jetson USB4 probe done right), trended in DuckDB.",
    )
    def rpc_latency(context: dg.AssetExecutionContext, lab: LabResource,
                    warehouse: WarehouseResource) -> dg.MaterializeResult:
        from idp_pipelines.bench.rpc import measure_rpc_latency, rpc_target, store_rpc_latency
        from idp_pipelines.bench.suite import host_slot

        inv = lab.load()
        url = rpc_target(inv, context.partition_key)
        if url is None:
            raise dg.Failure(f"host {context.partition_key!r} serves no endpoint in {lab.path}: nothing to probe")
        with host_slot(context.partition_key, holder=f"an RPC latency probe (Dagster run {context.run.run_id})",
                       log=context.log.info):
            result = measure_rpc_latency(url, probes=inv.benchmarks.rpc_probes)
        row = result.row()
        trend = store_rpc_latency(warehouse.get(context.log), context.partition_key, result, context.run.run_id)
        context.log.info(f"{context.partition_key}: p50 {_fmt(row.get('p50_ms'), ' ms')}, "
                         f"p95 {_fmt(row.get('p95_ms'), ' ms')}, {row.get('failures')} failures")
        return dg.MaterializeResult(metadata={
            "target": url,
            **{k: dg.MetadataValue.float(float(row[k])) for k in ("min_ms", "p50_ms", "p95_ms", "max_ms", "stdev_ms")
               if row.get(k) is not None},
            "probes": row.get("probes"), "failures": row.get("failures"),
            "trend": dg.MetadataValue.md(md_table([{"measured_at": str(t), "p50_ms": a, "p95_ms": b}
                                                   for t, a, b in trend], ["measured_at", "p50_ms", "p95_ms"])),
        })

    @dg.asset(
        group_name="benchmarks",
        kinds={"duckdb"},
        deps=[benchmark_runs],
        automation_condition=FOLLOW_UPDATES,
        description="Per endpoint, the highest concurrency that meets its SLOs: the recommended --max-num-seqs / -np.",
    )
    def benchmark_tuning(context: dg.AssetExecutionContext, lab: LabResource,
                         warehouse: WarehouseResource) -> dg.MaterializeResult:
        from idp_pipelines.bench.tuning import store_recommendations, tune_endpoint

        inv = lab.load()
        wh = warehouse.get(context.log)
        recs = [r for r in (tune_endpoint(wh, inv, ep.name) for ep in inv.endpoints) if r]
        store_recommendations(wh, recs, context.run.run_id)
        rows = [{**r.row(), "reason": r.reason} for r in recs]
        path = settings.reports_dir() / "benchmark_tuning.json"
        atomic_write(path, json.dumps({r["endpoint"]: {k: r[k] for k in ("setting", "recommended", "current",
                                                                         "run_id", "reason")} for r in rows},
                                      indent=2, default=str))
        return dg.MaterializeResult(metadata={
            "endpoints": len(rows),
            "recommendations": dg.MetadataValue.md(md_table(rows, ["endpoint", "setting", "current", "recommended",
                                                                   "reason", "run_id"])),
            "path": dg.MetadataValue.path(str(path)),
        })

    @dg.asset(
        group_name="benchmarks",
        kinds={"markdown"},
        deps=[benchmark_runs, rpc_latency, dg.AssetKey("inference_endpoints")],
        automation_condition=FOLLOW_UPDATES,
        description="Each claim of the seed's 'Expected Results' judged against the measurements.",
    )
    def hardware_findings(context: dg.AssetExecutionContext, lab: LabResource,
                          warehouse: WarehouseResource) -> dg.MaterializeResult:
        from idp_pipelines.bench.findings import build_findings

        inv = lab.load()
        report = build_findings(warehouse.get(context.log), inv)
        text = report.to_markdown()
        path = settings.reports_dir() / "hardware_findings.md"
        atomic_write(path, text)
        # The report as it stood when each benchmark run was first judged: what MLflow attaches to that run.
        for run_id in {v.measurement.run_id for v in report.verdicts if v.measurement and v.measurement.run_id}:
            per_run = settings.findings_path(run_id)
            if not per_run.exists():
                atomic_write(per_run, text)
        counts: dict[str, int] = {}
        for v in report.verdicts:
            counts[v.verdict] = counts.get(v.verdict, 0) + 1
        return dg.MaterializeResult(metadata={"report": dg.MetadataValue.md(text),
                                              "path": dg.MetadataValue.path(str(path)),
                                              **{f"claims_{k.replace(' ', '_')}": n for k, n in counts.items()}})

    nightly_job = dg.define_asset_job(BENCHMARKS_JOB, selection=[benchmark_runs])
    rpc_job = dg.define_asset_job("rpc_latency_job", selection=[rpc_latency])

    def nightly(name: str, job, keys: list[str], description: str) -> dg.ScheduleDefinition:
        @dg.schedule(name=name, job=job, cron_schedule=inventory.schedules.benchmarks_cron,
                     execution_timezone=inventory.schedules.timezone, default_status=dg.DefaultScheduleStatus.RUNNING,
                     description=description)
        def _schedule(context: dg.ScheduleEvaluationContext):
            day = context.scheduled_execution_time.strftime("%Y-%m-%d")
            return [dg.RunRequest(partition_key=k, run_key=f"nightly:{day}:{k}", tags={TRIGGER_TAG: "nightly"})
                    for k in keys]

        return _schedule

    nightly_benchmarks_schedule = nightly("nightly_benchmarks_schedule", nightly_job, endpoint_names,
                                          "Every endpoint, every night (lab.yaml schedules.benchmarks_cron).")
    nightly_rpc_latency_schedule = nightly(
        "nightly_rpc_latency_schedule", rpc_job, hosts,
        "RPC latency to every endpoint host, nightly (queued behind the benchmarks by the gpu pool).")

    @dg.sensor(
        name="benchmark_trigger_sensor",
        job=nightly_job,
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Benchmarks an endpoint without waiting for the night when its serving settings change or "
                    "its model is re-materialised (debounced by benchmarks.debounce_s).",
    )
    def benchmark_trigger_sensor(context: dg.SensorEvaluationContext, lab: LabResource):
        return evaluate_benchmark_triggers(context, lab.load(), time.time())

    return dg.Definitions(
        assets=[benchmark_runs, rpc_latency, benchmark_tuning, hardware_findings],
        jobs=[nightly_job, rpc_job],
        schedules=[nightly_benchmarks_schedule, nightly_rpc_latency_schedule],
        sensors=[benchmark_trigger_sensor],
    )


def _latest(instance: dg.DagsterInstance, key: str, partition: str):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition]), limit=1).records
    return records[0] if records else None


def deployed_endpoint_settings(instance: dg.DagsterInstance, inv: Lab, endpoint: str) -> dict | None:
    """The settings the last deploy put in place for the endpoint (deployed_state[host]), None if never."""
    ep = inv.endpoint(endpoint)
    rec = _latest(instance, "deployed_state", ep.host)
    raw = rec.asset_materialization.metadata.get("endpoint_settings") if rec else None
    return (raw.value or {}).get(endpoint) if raw is not None else None


def settings_fingerprint(inv: Lab, endpoint: str, deployed: dict | None = None) -> str:
    """What a benchmark of the endpoint measures: the deployed settings when the deploy job has recorded
    them (so a benchmark follows what really runs), else the inventory's."""
    ep = inv.endpoint(endpoint)
    state = {"settings": ep.settings if deployed is None else deployed, "model": ep.model,
             "served_model_name": ep.served_model_name, "base_url": ep.base_url}
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:16]


def unbenchmarked_model(instance: dg.DagsterInstance, inv: Lab, endpoint: str):
    """The newest materialisation of the endpoint's model (download or quantization) that no
    benchmark of the endpoint has followed yet, or None."""
    ep = inv.endpoint(endpoint)
    if not ep.model:
        return None
    models = [r for r in (_latest(instance, "hub_model", ep.model), _latest(instance, "gguf_model", ep.model)) if r]
    if not models:
        return None
    newest = max(models, key=lambda r: r.storage_id)
    bench = _latest(instance, "benchmark_runs", ep.name)
    return newest if bench is None or newest.storage_id > bench.storage_id else None


IN_FLIGHT = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
             dg.DagsterRunStatus.STARTED]


def benchmark_in_flight(instance: dg.DagsterInstance, endpoint: str) -> bool:
    """Whether a run that materialises benchmark_runs[endpoint] is queued or running."""
    runs = instance.get_runs(dg.RunsFilter(statuses=IN_FLIGHT, tags={"dagster/partition": endpoint}), limit=50)
    key = dg.AssetKey("benchmark_runs")
    return any(r.job_name == BENCHMARKS_JOB or (r.asset_selection is not None and key in r.asset_selection)
               for r in runs)


def evaluate_benchmark_triggers(context: dg.SensorEvaluationContext, inv: Lab, now: float):
    """Benchmark an endpoint when its serving settings changed or its model was re-materialised.

    Debounced: a settings change must stay unchanged, and a model materialisation stay the newest, for
    `benchmarks.debounce_s`, so editing lab.yaml three times in a minute, or downloading a model and
    then quantizing it, gives one run. The first tick only records the settings (the nightly run covers
    the starting state); a model that a benchmark already followed (the nightly, or `make up`'s
    backfill) triggers nothing.
    """
    cursor = json.loads(context.cursor) if context.cursor else {}
    debounce = inv.benchmarks.debounce_s
    requests, waiting, busy = [], [], []
    for ep in (e for e in inv.endpoints if e.openai_compatible):
        fp = settings_fingerprint(inv, ep.name, deployed_endpoint_settings(context.instance, inv, ep.name))
        entry = cursor.setdefault(ep.name, {"settings": fp})
        reasons = []
        if entry["settings"] != fp:
            if entry.get("pending") != fp:
                entry.update(pending=fp, since=now)
            elif now - entry["since"] >= debounce:
                reasons.append(f"settings:{fp}")
        else:
            entry.pop("pending", None)
            entry.pop("since", None)
        model = unbenchmarked_model(context.instance, inv, ep.name)
        if model is not None and model.storage_id != entry.get("model_fired"):
            if now - model.timestamp >= debounce:
                reasons.append(f"model:{model.storage_id}")
        if reasons and benchmark_in_flight(context.instance, ep.name):
            # a queued or running benchmark of this endpoint (by hand, a backfill, the nightly) will measure
            # the change: a second one now would only queue behind it and measure the same thing again
            busy.append(ep.name)
            continue
        if reasons:
            requests.append(dg.RunRequest(partition_key=ep.name, run_key=f"change:{ep.name}:{'+'.join(reasons)}",
                                          tags={TRIGGER_TAG: "sensor", "idp/change": ", ".join(reasons)}))
            entry["settings"] = entry.pop("pending", entry["settings"])
            entry.pop("since", None)
            if model is not None:
                entry["model_fired"] = model.storage_id
        elif "pending" in entry or (model is not None and model.storage_id != entry.get("model_fired")):
            waiting.append(ep.name)
    new_cursor = json.dumps(cursor, sort_keys=True)
    if requests:
        return dg.SensorResult(run_requests=requests, cursor=new_cursor)
    reason = "; ".join(
        ([f"waiting {debounce} s for changes to settle: {', '.join(waiting)}"] if waiting else [])
        + ([f"a benchmark is already queued or running for: {', '.join(busy)}"] if busy else [])) or "no endpoint changed"
    return dg.SensorResult(skip_reason=dg.SkipReason(reason), cursor=new_cursor)
