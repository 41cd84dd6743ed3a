"""Models: Hub downloads pinned and verified, their GGUF quantizations, and a sensor on new Hub revisions."""

import json
import os
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from idp_pipelines.assets.common import FOLLOW_UPDATES, Throttle
from idp_pipelines.lab import Lab
from idp_pipelines.markdown import md_table
from idp_pipelines.resources import HubResource, LabResource, WarehouseResource

GGUF_TYPES = "tensor_types_as_expected"
GGUF_GENERATES = "loads_and_generates"
GGUF_SIZE = "size_ratio_plausible"


def _download_progress(log, label: str) -> Callable[[int, int, str], None]:
    throttle = Throttle(log.info)

    def report(done: int, total: int, message: str) -> None:
        pct = f" ({100 * done / total:.0f} %)" if total else ""
        throttle(f"{label}: {done / 1e6:,.1f} of {total / 1e6:,.1f} MB{pct} {message}", final=bool(total) and done >= total)

    return report


def _blob_sha256(path: Path) -> str:
    """An LFS file's blob in the HF cache is named by its sha256 (verified at download): no re-hash."""
    name = Path(os.path.realpath(path)).name
    if re.fullmatch(r"[0-9a-f]{64}", name):
        return name
    from idp_pipelines.quantize import sha256_file

    return sha256_file(path)


def build(lab: Lab) -> dg.Definitions:
    model_partitions = dg.StaticPartitionsDefinition([m.name for m in lab.models])

    @dg.asset(
        partitions_def=model_partitions,
        group_name="models",
        kinds={"huggingface", "duckdb"},
        description="A model of the inventory downloaded from the Hub, pinned to a commit sha and hash-verified.",
    )
    def hub_model(context: dg.AssetExecutionContext, lab: LabResource, hub: HubResource,
                  warehouse: WarehouseResource) -> dg.MaterializeResult:
        model = lab.load().model(context.partition_key)
        context.log.info(f"{model.name}: {model.repo_id}@{model.revision}")
        result = hub.download(model, progress=_download_progress(context.log, model.name))
        with warehouse.get(context.log).write() as con:
            con.execute(
                "INSERT INTO model_downloads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [datetime.now(timezone.utc), context.run.run_id, model.name, model.repo_id, model.revision,
                 result.sha, len(result.files), result.total_bytes, result.bytes_downloaded, result.seconds,
                 result.mb_per_s, str(result.snapshot_path)],
            )
        files = [{"file": f.path, "bytes": f.size, "hash": f"{f.algo}:{f.hash[:16]}…",
                  "verified": f.verified, "fetched": f.redownloaded or f.hashed_now} for f in result.files]
        context.log.info(f"{model.name}: {result.sha} ({result.total_bytes / 1e6:,.1f} MB, "
                         f"{result.bytes_downloaded / 1e6:,.1f} MB fetched in {result.seconds:.1f} s)")
        return dg.MaterializeResult(
            metadata={
                "repo_id": model.repo_id,
                "revision": model.revision,
                "commit_sha": result.sha,
                "files": len(result.files),
                "bytes": dg.MetadataValue.int(result.total_bytes),
                "bytes_downloaded": dg.MetadataValue.int(result.bytes_downloaded),
                "seconds": dg.MetadataValue.float(round(result.seconds, 3)),
                "mb_per_s": dg.MetadataValue.float(round(result.mb_per_s, 1)),
                "path": dg.MetadataValue.path(str(result.snapshot_path)),
                "file_list": dg.MetadataValue.md(md_table(files, ["file", "bytes", "hash", "verified", "fetched"])),
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
        from idp_pipelines.quantize import expected_size_ratio, inspect_gguf, smoke_generate
        from idp_pipelines.quantize.targets import ensure_quantized, find_source, output_path

        inv = lab.load()
        model = inv.model(context.partition_key)
        if not model.quantize:
            how = (f"quantized on the fly by the serving engine ({model.serving_quantization})"
                   if model.serving_quantization else "served as downloaded")
            context.log.info(f"{model.name}: no quantize targets; {how}")
            na = [dg.AssetCheckResult(check_name=c, passed=True, description=f"no GGUF made: {how}")
                  for c in (GGUF_TYPES, GGUF_GENERATES, GGUF_SIZE)]
            return dg.MaterializeResult(metadata={"serving": how, "outputs": 0}, check_results=na)
        if model.format != "gguf":
            from idp_pipelines.quantize import QuantizeError

            raise QuantizeError(
                f"{model.name}: quantize targets {model.quantize} need a GGUF source, but the model's format is "
                f"{model.format}. Fix: point the model at a repo with an F16/BF16 GGUF, or remove `quantize`."
            )
        sha, snapshot = hub.snapshot(model)
        source = find_source(snapshot)
        src_sha256 = _blob_sha256(source)
        rows, type_fail, gen_fail, size_fail = [], [], [], []
        for qtype in model.quantize:
            dst = output_path(inv.model_cache.path, model.name, sha, source, qtype)
            context.log.info(f"{model.name}: {source.name} -> {qtype}")
            result, reused = ensure_quantized(source, dst, qtype, src_sha256)
            summary = inspect_gguf(dst, qtype)
            smoke = smoke_generate(dst, max_tokens=8)
            low, high = expected_size_ratio(qtype, result.src_dtype)
            if summary.fallbacks:
                type_fail.append(f"{qtype}: {len(summary.fallbacks)} tensor(s) fell back "
                                 f"({', '.join(f'{k}={v}' for k, v in list(summary.fallbacks.items())[:5])})")
            if smoke["tokens"] < 1:
                gen_fail.append(f"{qtype}: generated no token")
            if not low <= result.size_ratio <= high:
                size_fail.append(f"{qtype}: size ratio {result.size_ratio:.3f} outside [{low:.3f}, {high:.3f}]")
            rows.append({"quant": qtype, "file": str(dst), "bytes": result.dst_bytes,
                         "ratio": round(result.size_ratio, 4), "seconds": round(result.seconds, 3),
                         "fallbacks": len(summary.fallbacks), "tokens": smoke["tokens"], "reused": reused,
                         "sha256": result.dst_sha256, "src_dtype": result.src_dtype, "params": result.params})
            context.log.info(f"{model.name} {qtype}: {result.dst_bytes / 1e6:,.1f} MB, ratio {result.size_ratio:.3f}, "
                             f"{'reused' if reused else f'{result.seconds:.2f} s'}, {smoke['tokens']} tokens generated")
        with warehouse.get(context.log).write() as con:
            for r in rows:
                con.execute(
                    "INSERT INTO quantizations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [datetime.now(timezone.utc), context.run.run_id, model.name, sha, source.name, src_sha256,
                     r["src_dtype"], r["quant"], r["file"], r["sha256"], r["bytes"], r["ratio"], r["seconds"],
                     r["fallbacks"], json.dumps(r["params"], default=str), r["reused"]],
                )

        def check(name: str, failures: list[str], ok: str, severity=dg.AssetCheckSeverity.ERROR):
            return dg.AssetCheckResult(check_name=name, passed=not failures, severity=severity,
                                       description="; ".join(failures) or ok)

        return dg.MaterializeResult(
            metadata={
                "source_commit_sha": sha,
                "source_file": source.name,
                "source_sha256": src_sha256,
                "outputs": len(rows),
                "quantizations": dg.MetadataValue.md(md_table(
                    rows, ["quant", "bytes", "ratio", "seconds", "fallbacks", "tokens", "reused", "file"])),
                "path": dg.MetadataValue.path(str(Path(rows[0]["file"]).parent)),
            },
            data_version=dg.DataVersion(f"{src_sha256[:16]}:{','.join(model.quantize)}"),
            check_results=[
                check(GGUF_TYPES, type_fail, "every tensor has its quant type's type",
                      dg.AssetCheckSeverity.WARN),
                check(GGUF_GENERATES, gen_fail, "every output loads in llama.cpp and generates"),
                check(GGUF_SIZE, size_fail, "every output's size ratio is plausible"),
            ],
        )

    @dg.sensor(
        name="hub_revision_sensor",
        asset_selection=[hub_model],
        minimum_interval_seconds=lab.hub.poll_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="A new commit on the Hub branch a model tracks requests a new download; pinned models never change.",
    )
    def hub_revision_sensor(context: dg.SensorEvaluationContext, lab: LabResource, hub: HubResource):
        return evaluate_hub_revisions(context, lab.load(), hub)

    return dg.Definitions(assets=[hub_model, gguf_model, model_cache_inventory], sensors=[hub_revision_sensor])


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


CACHE_BUDGET = "within_budget"
CACHE_ORPHANS = "no_orphaned_blobs"
CACHE_INCOMPLETE = "no_incomplete_downloads"
CACHE_UNUSED = "no_unused_revisions"


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
    ],
)
def model_cache_inventory(context: dg.AssetExecutionContext, lab: LabResource,
                          warehouse: WarehouseResource) -> dg.MaterializeResult:
    from idp_pipelines.hub.inventory import human_bytes, scan_model_cache

    inv = lab.load()
    used: dict[str, set[str]] = {}
    for m in inv.models:
        used.setdefault(m.repo_id, set()).add(m.revision)
    budget = int(inv.model_cache.budget_gb * 1e9)
    cache = scan_model_cache(inv.model_cache.path, used=used, budget_bytes=budget)
    now = datetime.now(timezone.utc)
    used_commits = {(r["repo_id"], r["commit"]): r["used"] for r in cache.revisions}
    with warehouse.get(context.log).write() as con:
        con.execute(
            "INSERT INTO model_cache_scans VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [now, context.run.run_id, str(inv.model_cache.path), cache.total_bytes, cache.snapshot_bytes, budget,
             len(cache.repos), len(cache.revisions), len(cache.files), cache.orphaned_bytes,
             cache.incomplete_bytes, cache.unused_bytes],
        )
        if cache.files:
            con.executemany(
                "INSERT INTO model_cache_files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [[now, f["repo_id"], f["repo_type"], f["commit"], f["refs"], f["path"], f["size"], f["blob_path"],
                  f["hash"], f["algo"], f["verified"], used_commits.get((f["repo_id"], f["commit"])),
                  f["last_modified"], f["last_accessed"]] for f in cache.files],
            )
    warn = dg.AssetCheckSeverity.WARN

    def listing(rows: list[dict], key: str, size: str = "bytes") -> str:
        shown = [f"{r[key]} ({human_bytes(r[size])})" for r in rows[:10]]
        return "; ".join(shown) + (f"; and {len(rows) - 10} more" if len(rows) > 10 else "")

    checks = [
        dg.AssetCheckResult(
            check_name=CACHE_BUDGET, passed=not cache.over_budget,
            description=f"{human_bytes(cache.total_bytes)} of {human_bytes(budget)} ({100 * cache.budget_used:.1f} %)"),
        dg.AssetCheckResult(
            check_name=CACHE_ORPHANS, passed=not cache.orphaned_blobs, severity=warn,
            description=(f"{len(cache.orphaned_blobs)} orphaned blob(s) hold {human_bytes(cache.orphaned_bytes)}: "
                         + listing(cache.orphaned_blobs, "path")) if cache.orphaned_blobs else "none"),
        dg.AssetCheckResult(
            check_name=CACHE_INCOMPLETE, passed=not cache.incomplete_downloads, severity=warn,
            description=(f"{len(cache.incomplete_downloads)} incomplete download(s) hold "
                         f"{human_bytes(cache.incomplete_bytes)}: " + listing(cache.incomplete_downloads, "path"))
            if cache.incomplete_downloads else "none"),
        dg.AssetCheckResult(
            check_name=CACHE_UNUSED, passed=not cache.unused_revisions, severity=warn,
            description=(f"{len(cache.unused_revisions)} revision(s) no model uses hold "
                         f"{human_bytes(cache.unused_bytes)}: "
                         + "; ".join(f"{r['repo_id']}@{r['commit'][:12]} ({human_bytes(r['bytes'])})"
                                     for r in cache.unused_revisions[:10])) if cache.unused_revisions else "none"),
    ]
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
        check_results=checks,
    )
