"""Rules between the rendered files; each violation names both sides (file and what it points at)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from idp_pipelines.lab import Lab

from .compose import X_KEYS, X_MODELS
from .gateway import upstreams

_KEY_REF = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)")


def published(lab: Lab, composes: dict[str, dict]) -> dict[str, dict[int, str]]:
    """{host address: {published port: 'host/compose.yaml service'}} of the compose files."""
    out: dict[str, dict[int, str]] = {}
    for host, doc in composes.items():
        address = lab.host(host).address
        for name, svc in (doc.get("services") or {}).items():
            for spec in svc.get("ports") or []:
                port = int(str(spec).split(":")[-2] if str(spec).count(":") >= 1 else spec)
                out.setdefault(address, {})[port] = f"{host}/compose.yaml service {name!r}"
    return out


def _target_rule(what: str, targets: dict[str, str], lab: Lab, composes: dict[str, dict]) -> list[str]:
    pub = published(lab, composes)
    problems = []
    for label, target in targets.items():
        address, _, port = target.rpartition(":")
        ports = pub.get(address, {})
        if not port.isdigit() or int(port) not in ports:
            have = ", ".join(f"{p} ({s})" for p, s in sorted(ports.items())) or "nothing"
            problems.append(f"{what} {label} points at {target}, but no compose file publishes port {port} on "
                            f"{address} (published there: {have}). Fix: correct the service's ports in lab.yaml "
                            f"and re-materialise service_configs.")
    return problems


def check_upstreams(lab: Lab, gateway_conf: str, composes: dict[str, dict]) -> list[str]:
    """Every proxied upstream is a port a compose file publishes on that host."""
    return _target_rule("gateway nginx/ai-idp.conf upstream", upstreams(gateway_conf), lab, composes)


def check_scrape_targets(lab: Lab, prometheus_yml: str, composes: dict[str, dict]) -> list[str]:
    """Every scrape target is a port a compose file publishes on that host."""
    config = yaml.safe_load(prometheus_yml) or {}
    targets = {}
    for job in config.get("scrape_configs") or []:
        for sc in job.get("static_configs") or []:
            for t in sc.get("targets") or []:
                targets[f"prometheus.yml job {job.get('job_name')!r}"] = t
    return _target_rule("scrape target of", targets, lab, composes)


def check_model_mounts(composes: dict[str, dict], produced: dict[str, str]) -> list[str]:
    """Every mounted model path is what a model asset produced ({produced path: 'hub_model[m] run r'})."""
    problems = []
    for host, doc in composes.items():
        x_models = doc.get(X_MODELS) or {}
        for name, svc in (doc.get("services") or {}).items():
            for vol in svc.get("volumes") or []:
                if not str(vol.get("target", "")).startswith("/models/"):
                    continue
                source = vol.get("source")
                info = x_models.get(source)
                if info is None:
                    problems.append(f"{host}/compose.yaml service {name!r} mounts {source} as a model, but the file "
                                    f"does not say which model asset produced it ({X_MODELS}). Fix: re-render it.")
                elif info.get("produced") not in produced:
                    latest = ", ".join(f"{p} ({a})" for p, a in produced.items() if info.get("model") in a) or "none"
                    problems.append(f"{host}/compose.yaml service {name!r} mounts {source} for "
                                    f"{info.get('asset')}[{info.get('model')}] = {info.get('produced')}, which is not "
                                    f"what the model assets last produced ({latest}). Fix: re-materialise service_configs.")
    return problems


def check_keys(composes: dict[str, dict], envs: dict[str, dict[str, str]]) -> list[str]:
    """Every key a service uses is in its host's .env."""
    problems = []
    for host, doc in composes.items():
        env = envs.get(host, {})
        for name, svc in (doc.get("services") or {}).items():
            used = set(svc.get(X_KEYS) or [])
            for value in (svc.get("environment") or {}).values():
                used |= set(_KEY_REF.findall(str(value)))
            for cmd in svc.get("command") or []:
                used |= set(re.findall(r"\$\$([A-Z_][A-Z0-9_]*)", str(cmd)))
            for key in sorted(used):
                if key not in env:
                    problems.append(f"{host}/compose.yaml service {name!r} uses {key}, which {host}/.env does not "
                                    f"define (it has {sorted(env)}). Fix: materialise service_secrets[{host}].")
            if used and ".env" not in (svc.get("env_file") or []):
                problems.append(f"{host}/compose.yaml service {name!r} uses {sorted(used)} but has no env_file .env. "
                                f"Fix: re-render it.")
    return problems


def load_composes(root: Path, hosts: list[str]) -> dict[str, dict]:
    out = {}
    for host in hosts:
        path = root / host / "compose.yaml"
        if path.exists():
            out[host] = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return out
