"""Write the rendered files under IDP_HOME/deploy/<host>/ (what each host's config_dir receives)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from idp_pipelines.files import atomic_write
from idp_pipelines.lab import Lab

from . import crossfile, host_dir, deploy_dir
from .compose import COMPOSE_FILE, SYNC_SCRIPT, HostBundle, render_host
from .gateway import SITE_FILE, render_gateway
from .keys import host_keys
from .models import ModelArtifact
from .monitoring import DASHBOARD_JSON, DATASOURCE_YML, PROMETHEUS_YML, MonitoringBundle, render_monitoring
from .tuning import Tuned, choose
from . import validate


def tuned_values(lab: Lab, host: str, recs: dict[str, dict], previous: dict[str, int]) -> dict[str, Tuned]:
    """The concurrency setting of each engine on the host: benchmark_tuning's, with hysteresis, or the inventory's."""
    out = {}
    for svc in lab.services:
        if svc.host != host or not svc.endpoint:
            continue
        ep = lab.endpoint(svc.endpoint)
        current = (ep.vllm.max_num_seqs if ep.vllm else ep.llamacpp.parallel if ep.llamacpp else None)
        t = choose(ep.name, ep.kind, current, recs, previous.get(ep.name), lab.deploy.tuning_hysteresis,
                   lab.deploy.use_tuning)
        if t is not None:
            out[ep.name] = t
    return out


def write_host(bundle: HostBundle, home: Path | None = None) -> list[Path]:
    root = host_dir(bundle.host, home)
    written = [root / COMPOSE_FILE]
    atomic_write(root / COMPOSE_FILE, bundle.compose_text())
    if bundle.sync_script:
        atomic_write(root / SYNC_SCRIPT, bundle.sync_script, mode=0o755)
        written.append(root / SYNC_SCRIPT)
    return written


def write_gateway(lab: Lab, home: Path | None = None) -> Path:
    path = host_dir(lab.gateway.host, home) / SITE_FILE
    atomic_write(path, render_gateway(lab))
    return path


def write_monitoring(bundle: MonitoringBundle, home: Path | None = None) -> list[Path]:
    written = []
    for rel, text in bundle.files.items():
        host = bundle.grafana_host if rel.startswith("grafana/") else bundle.prometheus_host
        path = host_dir(host, home) / rel
        atomic_write(path, text)
        written.append(path)
    for rel, key in bundle.secret_files.items():
        path = host_dir(bundle.prometheus_host, home) / rel
        atomic_write(path, key, mode=0o600)
        written.append(path)
    return written


@dataclass
class Validation:
    verdicts: list[validate.Verdict] = field(default_factory=list)
    cross: dict[str, list[str]] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return sum(v.seconds for v in self.verdicts)

    @property
    def tool_seconds(self) -> float:
        return sum(v.tool_seconds for v in self.verdicts)


def host_names(lab: Lab) -> list[str]:
    return [h.address for h in lab.hosts] + [h.name for h in lab.hosts]


def validate_gateway(lab: Lab, home: Path | None = None) -> validate.Verdict:
    text = (host_dir(lab.gateway.host, home) / SITE_FILE).read_text(encoding="utf-8")
    return validate.check_nginx(text, certificate=lab.gateway.tls.certificate, key=lab.gateway.tls.key,
                                host_names=host_names(lab))


def validate_monitoring(lab: Lab, home: Path | None = None) -> tuple[validate.Verdict, validate.Verdict, validate.Verdict]:
    mon = lab.monitoring
    prom = host_dir(mon.prometheus_host, home) / PROMETHEUS_YML
    config = validate.check_prometheus_config(prom)
    rules = validate.check_rules(sorted((prom.parent / "rules").glob("*.yml")))
    if mon.grafana_host:
        gdir = host_dir(mon.grafana_host, home)
        ds = yaml.safe_load((gdir / DATASOURCE_YML).read_text(encoding="utf-8"))
        uids = {d.get("uid") for d in ds.get("datasources", [])}
        exporters = {"prometheus"} | {_EXPORTER[s.kind] for s in lab.services if s.kind in _EXPORTER}
        dashboards = {p.name: p.read_text(encoding="utf-8") for p in sorted((gdir / DASHBOARD_JSON).parent.glob("*.json"))}
        grafana = validate.check_grafana_files(dashboards, uids, mon.scrape_interval_s, exporters)
    else:
        grafana = validate.Verdict("grafana_dashboard", True, output="no grafana_host: nothing to check")
    return config, rules, grafana


_EXPORTER = {"vllm": "vllm", "llamacpp": "llamacpp", "triton": "triton", "dcgm-exporter": "dcgm",
             "node-exporter": "node"}


def cross_checks(lab: Lab, produced: dict[str, str], home: Path | None = None) -> dict[str, list[str]]:
    """Every cross-file rule over the files on disk: {rule: violations}."""
    root = deploy_dir(home)
    composes = crossfile.load_composes(root, lab.docker_hosts())
    envs = {h: host_keys(h, home) for h in lab.docker_hosts()}
    out = {"model_mounts": crossfile.check_model_mounts(composes, produced),
           "keys_in_env": crossfile.check_keys(composes, envs)}
    if lab.gateway is not None and (p := host_dir(lab.gateway.host, home) / SITE_FILE).exists():
        out["upstreams_exist"] = crossfile.check_upstreams(lab, p.read_text(encoding="utf-8"), composes)
    if lab.monitoring is not None and (p := host_dir(lab.monitoring.prometheus_host, home) / PROMETHEUS_YML).exists():
        out["scrape_targets_exist"] = crossfile.check_scrape_targets(lab, p.read_text(encoding="utf-8"), composes)
    return out


def produced_paths(lab: Lab, artifacts: dict[tuple[str, str], ModelArtifact]) -> dict[str, str]:
    """{path a model asset produced: 'asset[model] run'}: the snapshot folder, each GGUF file in it or in
    the quantization folder (what a compose file may mount)."""
    out = {}
    for (asset, model), art in artifacts.items():
        label = f"{asset}[{model}] run {art.run_id or '?'}"
        out[str(art.path)] = label
        if art.path.is_dir():
            for f in art.path.glob("*.gguf"):
                out[str(f)] = label
    return out


def render_everything(lab: Lab, artifacts: dict[tuple[str, str], ModelArtifact], recs: dict[str, dict],
                      home: Path | None = None) -> dict[str, HostBundle]:
    """Render every file of the lab (keys must exist already): what the benchmark script and tests use."""
    bundles = {}
    for host in lab.docker_hosts():
        bundle = render_host(lab, host, artifacts, tuned_values(lab, host, recs, {}))
        write_host(bundle, home)
        bundles[host] = bundle
    if lab.gateway is not None:
        write_gateway(lab, home)
    if lab.monitoring is not None:
        keys = {h: host_keys(h, home) for h in lab.docker_hosts()}
        write_monitoring(render_monitoring(lab, keys), home)
    return bundles
