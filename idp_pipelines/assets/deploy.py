"""Deploy: the lab's service configs (compose, .env, NGINX, Prometheus, Grafana) rendered and checked.

Thin shells over idp_pipelines.deploy: read the inventory and the model assets' latest paths, call the
core, return metadata (key names, never values) and the real validators' verdicts as asset checks.
Rendering changes nothing on a host: the `deploy` job (deployed_state[host]) pushes and applies them,
and the drift sensor reports what differs on a host afterwards.
"""

import hashlib
import json

import dagster as dg

from idp_pipelines.assets.common import FOLLOW_UPDATES
from idp_pipelines.lab import Lab
from idp_pipelines.markdown import md_table
from idp_pipelines.resources import LabResource, WarehouseResource
from idp_pipelines.settings import reports_dir

ENV_PRIVATE = "env_file_private"
COMPOSE_SCHEMA = "compose_schema"
MOUNTS_PRODUCED = "model_mounts_produced_by_model_assets"
KEYS_IN_ENV = "keys_in_env"
NGINX_T = "nginx_t"
UPSTREAMS = "upstreams_exist"
PROM_CONFIG = "promtool_check_config"
PROM_RULES = "promtool_check_rules"
GRAFANA = "grafana_dashboard"
SCRAPE_TARGETS = "scrape_targets_exist"


class SecretsConfig(dg.Config):
    """`rotate`: key names to replace (or ["all"]); the run's metadata says which were rotated."""

    rotate: list[str] = []


def _artifacts(instance: dg.DagsterInstance, inv: Lab, host: str | None = None):
    """The latest hub_model / gguf_model paths of the models the host's services serve (None: all)."""
    from pathlib import Path

    from idp_pipelines.deploy.models import ModelArtifact

    out = {}
    for svc in inv.services:
        if (host is not None and svc.host != host) or not svc.endpoint:
            continue
        model = inv.endpoint(svc.endpoint).model
        if not model:
            continue
        for asset in ("hub_model", "gguf_model"):
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[model]), limit=1).records
            meta = records[0].asset_materialization.metadata if records else {}
            if "path" in meta:
                out[(asset, model)] = ModelArtifact(model, asset, Path(str(meta["path"].value)), records[0].run_id)
    return out


def _previous_tuned(instance: dg.DagsterInstance, host: str) -> dict[str, int]:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("service_configs"), asset_partitions=[host]), limit=1).records
    if not records:
        return {}
    raw = records[0].asset_materialization.metadata.get("tuned_values")
    values = raw.value if raw is not None else {}
    try:
        return {k: int(v["value"]) for k, v in (json.loads(values) if isinstance(values, str) else values).items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}  # an older rendering without the record: start again from the inventory


def _check(name: str, verdict, asset: str | None = None) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name=name, passed=verdict.passed, asset_key=asset,
                               description=verdict.text()[:2000],
                               metadata={"seconds": dg.MetadataValue.float(round(verdict.seconds, 3)),
                                         "tool_seconds": dg.MetadataValue.float(round(verdict.tool_seconds, 3))})


def _rule(name: str, problems: list[str], ok: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name=name, passed=not problems, description="; ".join(problems)[:2000] or ok,
                               metadata={"violations": len(problems)})


def build(inventory: Lab) -> dg.Definitions:
    hosts = inventory.docker_hosts()
    if not hosts:
        return dg.Definitions()
    host_partitions = dg.StaticPartitionsDefinition(hosts)
    served: dict[str, list[str]] = {}
    for svc in inventory.services:
        if svc.container and svc.endpoint and (model := inventory.endpoint(svc.endpoint).model):
            served.setdefault(model, [])
            if svc.host not in served[model]:
                served[model].append(svc.host)

    @dg.asset(
        partitions_def=host_partitions,
        group_name="deploy",
        kinds={"dotenv"},
        description="The host's .env: one key per service that needs one, from a CSPRNG, mode 0600, kept across "
                    "materialisations; rotation is the run config `rotate`.",
        check_specs=[dg.AssetCheckSpec(ENV_PRIVATE, asset="service_secrets",
                                       description="The .env is mode 0600 and every key is 32 random bytes in hex.")],
    )
    def service_secrets(context: dg.AssetExecutionContext, config: SecretsConfig,
                        lab: LabResource) -> dg.MaterializeResult:
        import re

        from idp_pipelines.deploy.keys import env_mode, ensure_keys, host_keys

        host = context.partition_key
        report = ensure_keys(lab.load(), host, rotate=config.rotate)
        context.log.info(f"{host}: {report.summary()}")  # names only
        keys = host_keys(host)
        mode = env_mode(host)
        weak = [k for k, v in keys.items() if not re.fullmatch(r"[0-9a-f]{64}", v)]
        problems = ([f"mode is {oct(mode or 0)}, not 0o600"] if mode != 0o600 else []) + \
                   [f"{k} is not 32 bytes of hex" for k in weak]
        fingerprint = hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(keys.items())).encode()).hexdigest()[:16]
        return dg.MaterializeResult(
            metadata={"path": dg.MetadataValue.path(str(report.path)), "keys": ", ".join(sorted(keys)) or "none",
                      "created": ", ".join(report.created) or "none", "rotated": ", ".join(report.rotated) or "none",
                      "kept": ", ".join(report.kept) or "none", "dropped": ", ".join(report.dropped) or "none",
                      "mode": oct(mode or 0)},
            data_version=dg.DataVersion(fingerprint),
            check_results=[_rule(ENV_PRIVATE, problems, "mode 0600, every key 64 hex digits")],
        )

    model_deps = [dg.AssetDep(key, partition_mapping=dg.StaticPartitionMapping(served))
                  for key in ("hub_model", "gguf_model")] if served else []

    @dg.asset(
        partitions_def=host_partitions,
        group_name="deploy",
        kinds={"docker", "yaml"},
        deps=[service_secrets, *model_deps, dg.AssetKey("benchmark_tuning")],
        automation_condition=FOLLOW_UPDATES,
        description="The host's compose file: pinned images, read-only model mounts from the model assets, NVIDIA "
                    "reservations, healthchecks, restart and no-new-privileges, keys through env_file; tuned values "
                    "from benchmark_tuning.",
        check_specs=[
            dg.AssetCheckSpec(COMPOSE_SCHEMA, asset="service_configs",
                              description="Valid against the Compose Specification's JSON schema."),
            dg.AssetCheckSpec(MOUNTS_PRODUCED, asset="service_configs",
                              description="Every mounted model path is what a model asset last produced."),
            dg.AssetCheckSpec(KEYS_IN_ENV, asset="service_configs",
                              description="Every key a service uses is in the host's .env."),
        ],
    )
    def service_configs(context: dg.AssetExecutionContext, lab: LabResource) -> dg.MaterializeResult:
        from idp_pipelines.deploy import crossfile, deploy_dir
        from idp_pipelines.deploy.compose import render_host
        from idp_pipelines.deploy.keys import host_keys
        from idp_pipelines.deploy.render import produced_paths, tuned_values, write_host
        from idp_pipelines.deploy.tuning import read_recommendations
        from idp_pipelines.deploy.validate import check_compose

        inv, host = lab.load(), context.partition_key
        artifacts = _artifacts(context.instance, inv, host)
        tuning_path = reports_dir() / "benchmark_tuning.json"
        tuned = tuned_values(inv, host, read_recommendations(tuning_path), _previous_tuned(context.instance, host))
        bundle = render_host(inv, host, artifacts, tuned)
        written = write_host(bundle)
        text = bundle.compose_text()
        schema = check_compose(text, f"{host}/compose.yaml")
        composes = crossfile.load_composes(deploy_dir(), [host])
        mounts = crossfile.check_model_mounts(composes, produced_paths(inv, artifacts))
        keys = crossfile.check_keys(composes, {host: host_keys(host)})
        for t in bundle.tuned:
            context.log.info(f"{t.endpoint}: {t.setting}={t.value} ({t.source}: {t.why})")
        tuned_rows = [{"endpoint": t.endpoint, "setting": t.setting, "value": t.value, "source": t.source,
                       "benchmark_run": t.run_id or "-", "why": t.why} for t in bundle.tuned]
        mount_rows = [{"model": m.model, "asset": m.asset, "materialised_by_run": m.run_id, "mounted": str(m.source),
                       "engine_opens": m.model_path} for m in bundle.mounts]
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(written[0])),
                "services": ", ".join(bundle.compose["services"]),
                "model_mounts": dg.MetadataValue.md(md_table(mount_rows, list(mount_rows[0]) if mount_rows else ["model"])),
                "tuned": dg.MetadataValue.md(md_table(tuned_rows, ["endpoint", "setting", "value", "source",
                                                                   "benchmark_run", "why"])),
                "tuned_values": dg.MetadataValue.json({t.endpoint: t.record() for t in bundle.tuned}),
                "benchmark_tuning_report": dg.MetadataValue.path(str(tuning_path)),
                "files": ", ".join(p.name for p in written),
            },
            data_version=dg.DataVersion(hashlib.sha256(text.encode()).hexdigest()[:16]),
            check_results=[_check(COMPOSE_SCHEMA, schema),
                           _rule(MOUNTS_PRODUCED, mounts, "every model mount is a model asset's latest output"),
                           _rule(KEYS_IN_ENV, keys, "every key used is in the host's .env")],
        )

    gateway_assets = []
    if inventory.gateway is not None:
        @dg.asset(
            group_name="deploy",
            kinds={"nginx"},
            deps=[service_configs],
            automation_condition=FOLLOW_UPDATES,
            description="NGINX for the gateway: TLS, HTTP to HTTPS, an upstream per endpoint with keepalive, "
                        "streaming-safe proxying, Authorization passed through, /metrics from the LAN only.",
            check_specs=[
                dg.AssetCheckSpec(NGINX_T, asset="gateway_config",
                                  description="nginx -t in a sandbox (throwaway certificate, the lab's host names)."),
                dg.AssetCheckSpec(UPSTREAMS, asset="gateway_config",
                                  description="Every upstream is a port a compose file publishes on that host."),
            ],
        )
        def gateway_config(context: dg.AssetExecutionContext, lab: LabResource) -> dg.MaterializeResult:
            from idp_pipelines.deploy import crossfile, deploy_dir
            from idp_pipelines.deploy.gateway import upstreams
            from idp_pipelines.deploy.render import validate_gateway, write_gateway

            inv = lab.load()
            path = write_gateway(inv)
            verdict = validate_gateway(inv)
            text = path.read_text(encoding="utf-8")
            problems = crossfile.check_upstreams(inv, text, crossfile.load_composes(deploy_dir(), inv.docker_hosts()))
            ups = [{"upstream": k, "server": v} for k, v in upstreams(text).items()]
            return dg.MaterializeResult(
                metadata={"path": dg.MetadataValue.path(str(path)), "host": inv.gateway.host,
                          "upstreams": dg.MetadataValue.md(md_table(ups, ["upstream", "server"])),
                          "tls": inv.gateway.tls.issuer or "see lab.yaml gateway.tls"},
                data_version=dg.DataVersion(hashlib.sha256(text.encode()).hexdigest()[:16]),
                check_results=[_check(NGINX_T, verdict),
                               _rule(UPSTREAMS, problems, "every upstream is published by a compose file")],
            )

        gateway_assets.append(gateway_config)

    monitoring_assets = []
    if inventory.monitoring is not None:
        @dg.asset(
            group_name="deploy",
            kinds={"prometheus", "grafana"},
            deps=[service_configs, service_secrets],
            automation_condition=FOLLOW_UPDATES,
            description="Prometheus scrape config, alert rules (GPU temperature, GPU memory, target down) and "
                        "retention flag; Grafana datasource (explicit uid) and the seed's dashboards.",
            check_specs=[
                dg.AssetCheckSpec(PROM_CONFIG, asset="monitoring_config", description="promtool check config."),
                dg.AssetCheckSpec(PROM_RULES, asset="monitoring_config", description="promtool check rules."),
                dg.AssetCheckSpec(GRAFANA, asset="monitoring_config",
                                  description="Unique uids and panel ids, provisioned datasource, every query's metrics "
                                              "in the pinned lists and parsed by promtool."),
                dg.AssetCheckSpec(SCRAPE_TARGETS, asset="monitoring_config",
                                  description="Every scrape target is a port a compose file publishes on that host."),
            ],
        )
        def monitoring_config(context: dg.AssetExecutionContext, lab: LabResource) -> dg.MaterializeResult:
            from idp_pipelines.deploy import crossfile, deploy_dir
            from idp_pipelines.deploy.keys import host_keys
            from idp_pipelines.deploy.monitoring import render_monitoring
            from idp_pipelines.deploy.render import validate_monitoring, write_monitoring

            inv = lab.load()
            bundle = render_monitoring(inv, {h: host_keys(h) for h in inv.docker_hosts()})
            written = write_monitoring(bundle)
            config, rules, grafana = validate_monitoring(inv)
            prom_yml = next(p for p in written if p.name == "prometheus.yml")
            problems = crossfile.check_scrape_targets(inv, prom_yml.read_text(encoding="utf-8"),
                                                      crossfile.load_composes(deploy_dir(), inv.docker_hosts()))
            targets = [{"job": t.job, "target": t.address, "auth": "bearer (key file)" if t.key_name else "none"}
                       for t in bundle.targets]
            return dg.MaterializeResult(
                metadata={"path": dg.MetadataValue.path(str(prom_yml)),
                          "targets": dg.MetadataValue.md(md_table(targets, ["job", "target", "auth"])),
                          "queries": dg.MetadataValue.md(md_table(bundle.queries, ["panel", "expr"])),
                          "retention_days": inv.monitoring.retention_days,
                          "files": len(written)},
                check_results=[_check(PROM_CONFIG, config), _check(PROM_RULES, rules), _check(GRAFANA, grafana),
                               _rule(SCRAPE_TARGETS, problems, "every scrape target is published by a compose file")],
            )

        monitoring_assets.append(monitoring_config)

    from idp_pipelines.deploy.deployer import deploy_hosts

    targets = deploy_hosts(inventory)
    deploy_partitions = host_partitions if targets == hosts else dg.StaticPartitionsDefinition(targets)
    deployed_state, deploy_job, drift_sensor = _deploy_defs(inventory, deploy_partitions, service_configs,
                                                            [*gateway_assets, *monitoring_assets],
                                                            {h: h for h in hosts})
    return dg.Definitions(assets=[service_secrets, service_configs, *gateway_assets, *monitoring_assets,
                                  deployed_state], jobs=[deploy_job], sensors=[drift_sensor])


class DeployConfig(dg.Config):
    """`dry_run`: show the plan (file diffs, containers to create/replace/leave) and change nothing."""

    dry_run: bool = False


DRIFT_SENSOR = "deploy_drift_sensor"


def _deployed_record(instance: dg.DagsterInstance, host: str):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("deployed_state"), asset_partitions=[host]), limit=1).records
    return records[0] if records else None


def deployed_settings(instance: dg.DagsterInstance, host: str) -> dict[str, dict] | None:
    """{endpoint: settings} the last deploy of `host` put in place (None: never deployed)."""
    rec = _deployed_record(instance, host)
    raw = rec.asset_materialization.metadata.get("endpoint_settings") if rec else None
    return dict(raw.value) if raw is not None else None


def _endpoint_settings(instance: dg.DagsterInstance, inv: Lab, host: str) -> dict[str, dict]:
    """The settings each endpoint on the host is deployed with: the inventory's, with the tuned values
    service_configs rendered (what the compose file the deploy applies carries)."""
    tuned = _previous_tuned(instance, host)
    out = {}
    for ep in inv.endpoints:
        if ep.host != host:
            continue
        settings = dict(ep.settings)
        if ep.name in tuned:
            settings["max_num_seqs" if ep.kind == "vllm" else "parallel"] = tuned[ep.name]
        out[ep.name] = settings
    return out


def _endpoints_ok(inv: Lab, host: str):
    """The probe inference_endpoints uses, for every endpoint a container on the host serves."""
    from idp_pipelines.probe import probe_endpoint

    served = {s.endpoint for s in inv.services if s.host == host and s.container and s.endpoint}
    eps = [inv.endpoint(e) for e in sorted(served)]

    def check() -> list[str]:
        problems = []
        for ep in eps:
            r = probe_endpoint(ep, api_key=ep.api_key(), probes=1, timeout_s=5)
            if not r.up:
                problems.append(f"{ep.name}: {r.error}")
            elif r.model_served is False:
                problems.append(f"{ep.name}: up, but does not serve {r.expected_model} (serves {r.served_models})")
        return problems

    return check


def _deploy_defs(inventory: Lab, host_partitions, service_configs, other_assets, docker_hosts: dict[str, str]):
    @dg.asset(
        partitions_def=host_partitions,
        group_name="deploy",
        kinds={"docker", "ssh", "duckdb"},
        deps=[dg.AssetDep(service_configs, partition_mapping=dg.StaticPartitionMapping(docker_hosts)),
              *other_assets],
        output_required=False,
        description="What really runs on the host after a deploy (containers, images, spec hashes, health, "
                    "ports; the files in config_dir). Materialised by the `deploy` job: the plan first (file "
                    "diffs, containers to create/replace/leave), then push, apply, healthchecks and probes. "
                    "A dry run (config dry_run: true) shows the plan and records nothing.",
    )
    def deployed_state(context: dg.AssetExecutionContext, config: DeployConfig, lab: LabResource,
                       warehouse: WarehouseResource):
        from idp_pipelines.deploy.deployer import deploy_host, record_state, state_rows
        from idp_pipelines.secrets import Redactor

        inv, host = lab.load(), context.partition_key
        redactor = Redactor.for_lab(inv)
        plan_text: list[str] = []

        def show(hp) -> None:
            text = redactor.text(hp.text())
            plan_text.append(text)
            context.log.info(text)
            changed = [f.rel for f in hp.files if f.changes]
            context.log_event(dg.AssetObservation(
                asset_key="deployed_state", partition=host,
                metadata={"plan": dg.MetadataValue.md(f"```diff\n{text}\n```"), "dry_run": config.dry_run,
                          "files_changing": ", ".join(changed) or "none",
                          "containers": dg.MetadataValue.json(hp.counts())}))

        result = deploy_host(inv, host, dry_run=config.dry_run, log=lambda m: context.log.info(redactor.text(m)),
                             show_plan=show, endpoints_ok=_endpoints_ok(inv, host))
        if config.dry_run:
            context.log.info(f"{host}: dry run, nothing changed ({'changes pending' if result.plan.changes else 'up to date'})")
            return
        settings = _endpoint_settings(context.instance, inv, host)
        by_service = {s.name: settings.get(s.endpoint) for s in inv.services if s.host == host and s.endpoint}
        rows = state_rows(result, context.run.run_id, by_service)
        record_state(warehouse.get(context.log), rows)
        containers = [c.row() for c in result.containers]
        yield dg.MaterializeResult(metadata={
            "containers": dg.MetadataValue.md(md_table(containers, ["service", "name", "id", "image", "spec_hash",
                                                                    "status", "health"])),
            "container_ids": dg.MetadataValue.json({c.name: c.id for c in result.containers}),
            "files": dg.MetadataValue.json({rel: st.sha256 for rel, st in result.files.items()}),
            "pushed": ", ".join(result.pushed) or "none",
            "target": result.plan.target,
            "engine": result.plan.engine or "none (no container service)",
            "services": ", ".join(result.services) or "-",
            "applied": dg.MetadataValue.md("\n".join(f"- {s}" for s in (result.applied.steps if result.applied else []))
                                           or "nothing to apply"),
            "endpoint_settings": dg.MetadataValue.json(settings),
            "seconds": round(result.applied.seconds, 2) if result.applied else 0.0,
            "rows": len(rows),
        })

    deploy_job = dg.define_asset_job(
        "deploy", selection=[deployed_state],
        description="Deploy one host: the plan, then push the rendered files, apply the containers, wait for "
                    "health and the endpoints' probe. Launchpad config `dry_run: true` only shows the plan.")

    @dg.sensor(
        name=DRIFT_SENSOR,
        job=deploy_job,
        minimum_interval_seconds=inventory.deploy.drift_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Compares every deployed host with its rendered files and containers; reports a difference "
                    "(edited file, container stopped or replaced by hand) as an observation of deployed_state; "
                    "requests a re-deploy only if lab.yaml deploy.auto_repair.",
    )
    def deploy_drift_sensor(context: dg.SensorEvaluationContext, lab: LabResource):
        return evaluate_drift(context, lab.load())

    return deployed_state, deploy_job, deploy_drift_sensor


def evaluate_drift(context: dg.SensorEvaluationContext, inv: Lab, home=None):
    """One tick: for each deployed host, the drift; an observation when it changed since the last tick
    (the cursor keeps each host's drift fingerprint), a re-deploy request if deploy.auto_repair."""
    from idp_pipelines.deploy import DeployError
    from idp_pipelines.deploy.deployer import host_drift
    from idp_pipelines.deploy.drift import fingerprint
    from idp_pipelines.secrets import Redactor

    cursor = json.loads(context.cursor) if context.cursor else {}
    redactor = Redactor.for_lab(inv)
    events, requests, seen = [], [], []
    from idp_pipelines.deploy.deployer import deploy_hosts

    for host in deploy_hosts(inv):
        rec = _deployed_record(context.instance, host)
        if rec is None:
            continue  # never deployed: nothing can have drifted
        raw = rec.asset_materialization.metadata.get("container_ids")
        try:
            drifts = host_drift(inv, host, dict(raw.value) if raw is not None else {}, home)
            fp, error = fingerprint(drifts), None
        except DeployError as exc:
            drifts, error = [], redactor.text(str(exc))
            fp = "unreachable:" + hashlib.sha256(error.encode()).hexdigest()[:12]
        seen.append(f"{host}: {len(drifts)} difference(s)" if not error else f"{host}: unreachable")
        changed = cursor.get(host, "") != fp
        cursor[host] = fp
        if not changed:
            continue
        rows = [{"kind": d.kind, "name": d.name, "what": d.what} for d in drifts]
        diffs = "\n\n".join(f"{d.kind} {d.name} ({d.what}):\n{d.detail}" for d in drifts)
        events.append(dg.AssetObservation(asset_key="deployed_state", partition=host, metadata={
            "drift": dg.MetadataValue.md(md_table(rows, ["kind", "name", "what"]) if rows else
                                         (f"cannot check: {error}" if error else "none: the host matches its rendered state")),
            "differences": len(drifts),
            "detail": dg.MetadataValue.md(f"```diff\n{redactor.text(diffs)}\n```" if diffs else "-"),
            "auto_repair": inv.deploy.auto_repair,
        }))
        if drifts and inv.deploy.auto_repair:
            requests.append(dg.RunRequest(partition_key=host, run_key=f"repair:{host}:{fp}",
                                          tags={"idp/trigger": "drift"}))
    new_cursor = json.dumps(cursor, sort_keys=True)
    if events or requests:
        return dg.SensorResult(asset_events=events, run_requests=requests, cursor=new_cursor)
    return dg.SensorResult(cursor=new_cursor, skip_reason=dg.SkipReason(
        "no change in drift: " + ("; ".join(seen) or "no host deployed yet")))
