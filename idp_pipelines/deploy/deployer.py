"""One host's deploy: the plan (file diffs, containers to create/replace/leave), then push, apply, health.

Plain Python over `push` (files), `apply` (containers) and `ssh`; the Dagster shell only reads the
inventory, logs the plan and records the result. A dry run computes the same plan and changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from idp_pipelines.lab import Lab
from idp_pipelines.secrets import read_env_file, service_env_path, stored_keys

from . import DeployError, host_dir
from .apply import Action, ApplyReport, ContainerState, Project, apply, load_project, observe, plan, render_plan
from .compose import COMPOSE_FILE
from .push import FileChange, FileState, LocalDir, SshDir, plan_files, push, rendered_files
from .ssh import ssh_for


@dataclass
class HostPlan:
    host: str
    target: str                      # where the files go (config_dir, local or host:path)
    engine: str | None               # the Docker engine used, None for a host without containers
    files: list[FileChange]
    containers: list[Action] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        return any(f.changes for f in self.files) or any(a.changes for a in self.containers)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.containers:
            out[a.action] = out.get(a.action, 0) + 1
        return out

    def text(self) -> str:
        """The whole plan as a person reads it: files with their diffs, then containers."""
        lines = [f"Deploy plan for {self.host}: files to {self.target}, containers on {self.engine or 'no engine'}", ""]
        for f in self.files:
            lines.append(f"{f.action:7} {f.rel}")
            if f.diff and f.action != "same":
                lines.append(f.diff.rstrip("\n"))
        if self.containers:
            lines += ["", render_plan(self.containers)]
        return "\n".join(lines)


def target_for(lab: Lab, host: str):
    h = lab.host(host)
    if not h.config_dir:
        raise DeployError(f"host {host!r} has no config_dir: the deploy job does not know where its files go. "
                          f"Fix: set hosts[].config_dir in {lab._source}.")
    conn = ssh_for(lab, host)
    return SshDir(conn, h.config_dir) if conn else LocalDir(h.config_dir)


@contextlib.contextmanager
def docker_client(lab: Lab, host: str) -> Iterator[tuple[object, str] | None]:
    """(Docker SDK client, description) for the host's engine; None for a host without docker_host."""
    import docker

    url = lab.host(host).docker_host
    if not url:
        yield None
        return
    conn = ssh_for(lab, host) if url.startswith("ssh://") else None
    with (conn.docker_socket_forward() if conn else contextlib.nullcontext(url)) as base:
        client = docker.DockerClient(base_url=base, timeout=120)
        try:
            try:
                client.ping()
            except Exception as exc:  # noqa: BLE001 - the message is the finding
                raise DeployError(f"host {host!r}: the Docker engine at {url} does not answer ({exc}). Fix: start "
                                  f"dockerd there, or correct hosts[].docker_host.") from None
            yield client, url
        finally:
            client.close()


def load_host_project(lab: Lab, host: str, home: Path | None = None) -> Project | None:
    """The host's rendered compose file as containers to run, or None when it renders none."""
    compose = host_dir(host, home) / COMPOSE_FILE
    if not compose.exists():
        return None
    return load_project(compose.read_text(encoding="utf-8"), read_env_file(service_env_path(host, home)),
                        lab.host(host).config_dir or str(host_dir(host, home)), f"idp-{host}")


def make_plan(lab: Lab, host: str, client, home: Path | None = None) -> tuple[HostPlan, dict, Project | None]:
    root = host_dir(host, home)
    if not root.is_dir():
        raise DeployError(f"nothing rendered for {host!r} under {root}. Fix: materialise the deploy group "
                          f"(service_secrets, service_configs, gateway_config, monitoring_config) first.")
    target = target_for(lab, host)
    files = rendered_files(root, stored_keys(home))
    project = load_host_project(lab, host, home)
    hp = HostPlan(host, str(target), None, plan_files(files, target, host))
    if project is not None and client is not None:
        hp.engine = lab.host(host).docker_host
        hp.containers = plan(client, project)
    return hp, files, project


@dataclass
class DeployResult:
    plan: HostPlan
    dry_run: bool
    pushed: list[str] = field(default_factory=list)
    applied: ApplyReport | None = None
    containers: list[ContainerState] = field(default_factory=list)
    files: dict[str, FileState] = field(default_factory=dict)
    deployed_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


def deploy_host(lab: Lab, host: str, *, dry_run: bool = False, home: Path | None = None,
                log: Callable[[str], None] = lambda m: None, show_plan: Callable[[HostPlan], None] = lambda p: None,
                endpoints_ok: Callable[[], list[str]] | None = None) -> DeployResult:
    """Plan, show the plan, then (unless a dry run) push the files and apply the containers."""
    with docker_client(lab, host) as engine:
        client = engine[0] if engine else None
        hp, files, project = make_plan(lab, host, client, home)
        show_plan(hp)
        result = DeployResult(hp, dry_run)
        if dry_run:
            return result
        target = target_for(lab, host)
        result.pushed = push(files, target, hp.files)
        for rel in result.pushed:
            log(f"{host}: wrote {rel} to {target}")
        if project is not None and client is not None:
            result.applied = apply(client, project, network=_network(lab, host, home), log=log,
                                   endpoints_ok=endpoints_ok, probe_budget_s=lab.deploy.probe_timeout_s)
            result.containers = observe(client, project.name)
        result.files = target.listing()
        return result


def _network(lab: Lab, host: str, home: Path | None) -> str | None:
    import yaml

    doc = yaml.safe_load((host_dir(host, home) / COMPOSE_FILE).read_text(encoding="utf-8")) or {}
    return ((doc.get("networks") or {}).get("default") or {}).get("name")


def state_rows(result: DeployResult, run_id: str | None, settings: dict[str, dict]) -> list[dict]:
    """deployed_state rows: one per container (with its endpoint's deployed settings) and one per file."""
    rows = []
    for c in result.containers:
        rows.append({"deployed_at": result.deployed_at, "dagster_run_id": run_id, "host": result.plan.host,
                     "kind": "container", "name": c.name, "service": c.service, "container_id": c.id,
                     "image": c.image, "spec_hash": c.spec_hash, "status": c.status, "health": c.health,
                     "ports": c.ports, "mode": None, "settings": settings.get(c.service)})
    for rel, st in sorted(result.files.items()):
        rows.append({"deployed_at": result.deployed_at, "dagster_run_id": run_id, "host": result.plan.host,
                     "kind": "file", "name": rel, "service": None, "container_id": None, "image": None,
                     "spec_hash": st.sha256, "status": None, "health": None, "ports": None, "mode": st.mode,
                     "settings": None})
    return rows


def record_state(warehouse, rows: list[dict]) -> int:
    """The one writer of deployed_state."""
    import json

    from idp_pipelines.warehouse import insert_rows

    rows = [{**r, "settings": json.dumps(r["settings"]) if r["settings"] is not None else None} for r in rows]
    with warehouse.write() as con:
        return insert_rows(con, "deployed_state", rows)


def host_drift(lab: Lab, host: str, deployed_ids: dict[str, str], home: Path | None = None) -> list:
    """What differs on the host from its rendered files and compose services (read-only)."""
    from .drift import container_drift, file_drift

    with docker_client(lab, host) as engine:
        client = engine[0] if engine else None
        hp, _, project = make_plan(lab, host, client, home)
        drifts = file_drift(hp.files)
        if project is not None and client is not None:
            drifts += container_drift(project, observe(client, project.name), deployed_ids)
        return drifts
