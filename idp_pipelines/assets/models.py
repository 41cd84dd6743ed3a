"""Models: Hub downloads pinned and verified, their GGUF quantizations, the cache inventory and its re-hash."""

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from idp_pipelines.assets.common import FOLLOW_UPDATES, Throttle, check_result
from idp_pipelines.hub.checks import (
    CACHE_BUDGET, CACHE_COMPLETE, CACHE_INCOMPLETE, CACHE_ORPHANS, CACHE_UNUSED, REHASH_INTACT,
)
from idp_pipelines.lab import Lab
from idp_pipelines.markdown import md_table
from idp_pipelines.quantize.checks import GGUF_GENERATES, GGUF_SIZE, GGUF_TYPES
from idp_pipelines.resources import HubResource, LabResource, WarehouseResource

__all__ = [
    "CACHE_BUDGET", "CACHE_COMPLETE", "CACHE_INCOMPLETE", "CACHE_ORPHANS", "CACHE_UNUSED", "GGUF_GENERATES",
    "GGUF_SIZE", "GGUF_TYPES", "REHASH_INTACT", "build", "evaluate_hub_revisions", "model_cache_inventory",
    "model_cache_rehash",
]


def _progress(throttle: Throttle, label: str) -> Callable[[int, int, str], None]:
    def report(done: int, total: int, message: str) -> None:
        pct = f" ({100 * min(done, total) / total:.0f} %)" if total else ""
        throttle(f"{label}: {done / 1e6:,.1f} of {total / 1e6:,.1f} MB{pct} {message}",
                 final=bool(total) and done >= total)

    return report


def _log_throttle(log) -> Throttle:
    return Throttle(log.info, warn=log.warning, error=log.error)


def _blob_sha256(path: Path) -> str:
    """An LFS file's blob in the HF cache is named by its sha256 (verified at download): no re-hash."""
    name = Path(os.path.realpath(path)).name
    if re.fullmatch(r"[0-9a-f]{64}", name):
        return name
    from idp_pipelines.files import sha256_file

    return sha256_file(path)


def build(inventory: Lab) -> dg.Definitions:
    model_partitions = dg.StaticPartitionsDefinition([m.name for m in inventory.models])

    @dg.asset(
        partitions_def=model_partitions,
        group_name="models",
        kinds={"huggingface", "duckdb"},
        description="A model of the inventory downloaded from the Hub, pinned to a commit sha and hash-verified.",
    )
    def hub_model(context: dg.AssetExecutionContext, lab: LabResource, hub: HubResource,
                  warehouse: WarehouseResource) -> dg.MaterializeResult:
        from idp_pipelines.hub.records import record_download, record_plan

        model = lab.load().model(context.partition_key)
        context.log.info(f"{model.name}: {model.repo_id}@{model.revision}")
        wh = warehouse.get(context.log)
        throttle = _log_throttle(context.log)

        def on_plan(plan) -> None:
            with wh.write() as con:
                record_plan(con, run_id=context.run.run_id, model=model.name, plan=plan)

        result = hub.download(model, progress=_progress(throttle, model.name), warn=throttle.warning,
                              on_plan=on_plan)
        with wh.write() as con:
            record_download(con, run_id=context.run.run_id, model=model.name, result=result)
        files = [{"file": f.path, "bytes": f.size, "hash": f"{f.algo}:{f.hash[:16]}…",
                  "verified": f.verified, "fetched": f.redownloaded or f.hashed_now,
                  "repaired": f"bad {f.bad_copy} copy: {f.bad_hash[:16]}…" if f.redownloaded else ""}
                 for f in result.files]
        context.log.info(f"{model.name}: {result.sha} ({result.total_bytes / 1e6:,.1f} MB, "
                         f"{result.bytes_downloaded / 1e6:,.1f} MB fetched in {result.seconds:.1f} s)")
        return dg.MaterializeResult(
            metadata={
                "repo_id": model.repo_id,
                "revision": model.revision,
                "commit_sha": result.sha,
                "files": len(result.files),
                "repaired_files": dg.MetadataValue.int(len(result.repaired_files)),
                "bytes": dg.MetadataValue.int(result.total_bytes),
                "bytes_downloaded": dg.MetadataValue.int(result.bytes_downloaded),
                "seconds": dg.MetadataValue.float(round(result.seconds, 3)),
                "mb_per_s": dg.MetadataValue.float(round(result.mb_per_s, 1)),
                "path": dg.MetadataValue.path(str(result.snapshot_path)),
                "file_list": dg.MetadataValue.md(md_table(
                    files, ["file", "bytes", "hash", "verified", "fetched", "repaired"])),
            },
            data_version=dg.DataVersion(result.sha),
        )

    @dg.asset(
        partitions_def=model_partitions,
        group_name="models",
        kinds={"gguf", "llama.cpp"},
        deps=[hub_model],
        pool="gpu",
        # A new download (a new Hub revision, via hub_revision_sensor) re-quantizes without a click.
        automation_condition=dg.AutomationCondition.eager(),
        description="The model's GGUF quantizations (lab.yaml `quantize`), made with llama.cpp's quantizer.",
        check_specs=[
            dg.AssetCheckSpec(GGUF_TYPES, asset="gguf_model",
                              description="Each output parses as GGUF with the quant type's tensor types."),
            dg.AssetCheckSpec(GGUF_GENERATES, asset="gguf_model",
                              description="Each output loads in llama.cpp and generates tokens."),
            dg.AssetCheckSpec(GGUF_SIZE, asset="gguf_model",
                              description="Each output's size relative to its source fits the quant type."),
        ],
    )
    def gguf_model(context: dg.AssetExecutionContext, lab: LabResource, hub: HubResource,
                   warehouse: WarehouseResource) -> dg.MaterializeResult:
        from idp_pipelines.quantize import QuantizeError, inspect_gguf, smoke_generate
        from idp_pipelines.quantize.checks import Output, judge_nothing_to_make, judge_outputs
        from idp_pipelines.quantize.records import record_quantizations
        from idp_pipelines.quantize.targets import ensure_quantized, find_source, output_path

        inv = lab.load()
        model = inv.model(context.partition_key)
        if not model.quantize:
            how = (f"quantized on the fly by the serving engine ({model.serving_quantization})"
                   if model.serving_quantization else "served as downloaded")
            context.log.info(f"{model.name}: no quantize targets; {how}")
            return dg.MaterializeResult(metadata={"serving": how, "outputs": 0},
                                        check_results=[check_result(j) for j in judge_nothing_to_make(how)])
        if model.format != "gguf":
            raise QuantizeError(
                f"{model.name}: quantize targets {model.quantize} need a GGUF source, but the model's format is "
                f"{model.format}. Fix: point the model at a repo with an F16/BF16 GGUF, or remove `quantize`."
            )
        sha, snapshot = hub.snapshot(model)
        source = find_source(snapshot)
        src_sha256 = _blob_sha256(source)
        throttle = _log_throttle(context.log)
        outputs, table = [], []
        for qtype in model.quantize:
            dst = output_path(inv.model_cache.path, model.name, sha, source, qtype)
            context.log.info(f"{model.name}: {source.name} -> {qtype}")

            def progress(done: int, total: int, tensor: str, q=qtype) -> None:
                throttle(f"{model.name} {q}: tensor {done} of {total} ({tensor})", final=done >= total)

            result, reused = ensure_quantized(source, dst, qtype, src_sha256, progress=progress)
            out = Output(result, inspect_gguf(dst, qtype), smoke_generate(dst, max_tokens=8)["tokens"])
            outputs.append((out, reused))
            table.append({"quant": qtype, "file": str(dst), "bytes": result.dst_bytes,
                          "ratio": round(result.size_ratio, 4), "seconds": round(result.seconds, 3),
                          "fallbacks": len(out.summary.fallbacks), "tokens": out.tokens,
                          "reused": "yes" if reused else "no"})
            context.log.info(f"{model.name} {qtype}: {result.dst_bytes / 1e6:,.1f} MB, ratio {result.size_ratio:.3f}, "
                             f"{'reused' if reused else f'{result.seconds:.2f} s'}, {out.tokens} tokens generated")
        with warehouse.get(context.log).write() as con:
            record_quantizations(con, run_id=context.run.run_id, model=model.name, commit_sha=sha,
                                 source_file=source.name, source_sha256=src_sha256, outputs=outputs)
        return dg.MaterializeResult(
            metadata={
                "source_commit_sha": sha,
                "source_file": source.name,
                "source_sha256": src_sha256,
                "outputs": len(table),
                "reused": dg.MetadataValue.int(sum(reused for _, reused in outputs)),
                "quantizations": dg.MetadataValue.md(md_table(
                    table, ["quant", "bytes", "ratio", "seconds", "fallbacks", "tokens", "reused", "file"])),
                "path": dg.MetadataValue.path(str(Path(table[0]["file"]).parent)),
            },
            data_version=dg.DataVersion(f"{src_sha256[:16]}:{','.join(model.quantize)}"),
            check_results=[check_result(j) for j in judge_outputs([o for o, _ in outputs])],
        )

    @dg.sensor(
        name="hub_revision_sensor",
        asset_selection=[hub_model],
        minimum_interval_seconds=inventory.hub.poll_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="A new commit on the Hub branch a model tracks requests a new download; pinned models never change.",
    )
    def hub_revision_sensor(context: dg.SensorEvaluationContext, lab: LabResource, hub: HubResource):
        return evaluate_hub_revisions(context, lab.load(), hub)

    rehash_job = dg.define_asset_job("model_cache_rehash_job", selection=[model_cache_rehash])
    model_cache_rehash_schedule = dg.ScheduleDefinition(
        name="model_cache_rehash_schedule", job=rehash_job, cron_schedule=inventory.schedules.rehash_cron,
        execution_timezone=inventory.schedules.timezone, default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Re-hash a slice of the model cache a day, all of it within model_cache.rehash_days "
                    "(lab.yaml schedules.rehash_cron).",
    )
    return dg.Definitions(assets=[hub_model, gguf_model, model_cache_inventory, model_cache_rehash],
                          sensors=[hub_revision_sensor], jobs=[rehash_job],
                          schedules=[model_cache_rehash_schedule])


def evaluate_hub_revisions(context: dg.SensorEvaluationContext, inv: Lab, hub: HubResource):
    from idp_pipelines.hub import HubError

    cursor = json.loads(context.cursor) if context.cursor else {}
    requests, unreachable = [], []
    for model in inv.models:
        if model.pinned:
            continue
        try:
            sha = hub.resolve(model)
        except HubError as exc:
            context.log.warning(f"hub_revision_sensor: skipping {model.name}: {exc}")
            unreachable.append(model.name)
            continue
        if cursor.get(model.name) == sha:
            continue
        context.log.info(f"{model.name}: {model.repo_id}@{model.revision} is now {sha}")
        requests.append(dg.RunRequest(partition_key=model.name, run_key=f"{model.name}@{sha}",
                                      tags={"idp/hub_commit": sha}))
        cursor[model.name] = sha
    if not requests:
        reason = (f"Hub unreachable for {', '.join(unreachable)}" if unreachable
                  else "no branch-tracked model moved")
        return dg.SensorResult(skip_reason=dg.SkipReason(reason), cursor=json.dumps(cursor, sort_keys=True))
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor, sort_keys=True))


@dg.asset(
    group_name="models",
    kinds={"huggingface", "duckdb"},
    deps=[dg.AssetKey("hub_model")],
    automation_condition=FOLLOW_UPDATES,
    description="Every repo, revision, file, size and hash in the model cache, against its size budget.",
    check_specs=[
        dg.AssetCheckSpec(CACHE_BUDGET, asset="model_cache_inventory", description="The cache fits its budget_gb."),
        dg.AssetCheckSpec(CACHE_ORPHANS, asset="model_cache_inventory", description="No blob is unreferenced."),
        dg.AssetCheckSpec(CACHE_INCOMPLETE, asset="model_cache_inventory", description="No download was left half-done."),
        dg.AssetCheckSpec(CACHE_UNUSED, asset="model_cache_inventory",
                          description="Every cached revision is one a model of the inventory uses."),
        dg.AssetCheckSpec(CACHE_COMPLETE, asset="model_cache_inventory",
                          description="Each model holds every file its latest hub_model download listed."),
    ],
)
def model_cache_inventory(context: dg.AssetExecutionContext, lab: LabResource,
                          warehouse: WarehouseResource) -> dg.MaterializeResult:
    from idp_pipelines.hub.checks import judge_cache
    from idp_pipelines.hub.inventory import human_bytes, scan_model_cache
    from idp_pipelines.hub.records import expected_snapshots, record_cache_scan

    inv = lab.load()
    used: dict[str, set[str]] = {}
    for m in inv.models:
        used.setdefault(m.repo_id, set()).add(m.revision)
    budget = int(inv.model_cache.budget_gb * 1e9)
    cache = scan_model_cache(inv.model_cache.path, used=used, budget_bytes=budget)
    with warehouse.get(context.log).write() as con:
        record_cache_scan(con, run_id=context.run.run_id, cache=cache)
        expected = expected_snapshots(con)
    judgements = judge_cache(cache, expected, [(m.name, m.repo_id) for m in inv.models], lab.path)
    context.log.info(f"model cache {inv.model_cache.path}: {human_bytes(cache.total_bytes)} in "
                     f"{len(cache.repos)} repo(s), {len(cache.revisions)} revision(s)")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(inv.model_cache.path)),
            "total_bytes": dg.MetadataValue.int(cache.total_bytes),
            "budget_bytes": dg.MetadataValue.int(budget),
            "budget_used_pct": dg.MetadataValue.float(round(100 * cache.budget_used, 2)),
            "repos": len(cache.repos),
            "revisions": len(cache.revisions),
            "files": len(cache.files),
            "reclaimable_bytes": dg.MetadataValue.int(cache.reclaimable_bytes),
            "summary": dg.MetadataValue.md(cache.to_markdown()),
        },
        check_results=[check_result(j) for j in judgements],
    )


@dg.asset(
    group_name="models",
    kinds={"huggingface", "duckdb"},
    deps=[dg.AssetKey("hub_model")],
    description="Today's slice of the model cache re-hashed against the hashes that name its blobs, so the "
                "whole cache is read within model_cache.rehash_days (bit rot in a trusted file).",
    check_specs=[dg.AssetCheckSpec(REHASH_INTACT, asset="model_cache_rehash",
                                   description="Every blob of the slice still has the hash that names it.")],
)
def model_cache_rehash(context: dg.AssetExecutionContext, lab: LabResource,
                       warehouse: WarehouseResource) -> dg.MaterializeResult:
    from idp_pipelines.hub.checks import judge_rehash
    from idp_pipelines.hub.records import last_rehash_cursor, record_rehash
    from idp_pipelines.hub.rehash import rehash_slice

    inv = lab.load()
    cache_dir = str(inv.model_cache.path)
    wh = warehouse.get(context.log)
    with wh.read() as con:
        cursor = last_rehash_cursor(con, cache_dir)
    throttle = _log_throttle(context.log)
    report = rehash_slice(cache_dir, period_days=inv.model_cache.rehash_days, cursor=cursor,
                          progress=_progress(throttle, "re-hash"))
    for f in report.findings:
        throttle.warning(f"hash mismatch in the model cache: {f['blob']} ({', '.join(f['files'])}): expected "
                         f"{f['algo']} {f['expected']}, got {f['actual']}")
    with wh.write() as con:
        record_rehash(con, run_id=context.run.run_id, report=report)
    models_by_repo: dict[str, list[str]] = {}
    for m in inv.models:
        models_by_repo.setdefault(m.repo_id, []).append(m.name)
    judgement = judge_rehash(report, models_by_repo)
    context.log.info(f"re-hash of {cache_dir}: {report.slice.describe()} in {report.seconds:.1f} s")
    rows = [{"blob": c["blob"], "bytes": c["size"], "files": ", ".join(c["files"])} for c in report.checked]
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(cache_dir),
            "period_days": inv.model_cache.rehash_days,
            "files": len(report.checked),
            "bytes": dg.MetadataValue.int(report.slice.bytes),
            "cache_files": report.slice.total_items,
            "cache_bytes": dg.MetadataValue.int(report.slice.total_bytes),
            "mismatches": len(report.findings),
            "cursor": report.slice.cursor or "",
            "wrapped": report.slice.wrapped,
            "seconds": dg.MetadataValue.float(round(report.seconds, 3)),
            "slice": dg.MetadataValue.md(md_table(rows, ["blob", "bytes", "files"]) if rows else "empty cache"),
        },
        check_results=[check_result(judgement)],
    )
