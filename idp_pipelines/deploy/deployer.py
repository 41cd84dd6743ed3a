"""One host's deploy: the plan (file diffs, containers to create/replace/leave), then push, apply, health.

Plain Python over `push` (files), `apply` (containers) and `ssh`; the Dagster shell only reads the
inventory, logs the plan and records the result. A dry run computes the same plan and changes nothing.
"""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from idp_pipelines.lab import Lab
from idp_pipelines.secrets import read_env_file, service_env_path, stored_keys

from . import DeployError, host_dir
from .apply import Action, ApplyReport, ContainerState, Project, apply, load_project, observe, plan, render_plan
from .compose import COMPOSE_FILE
from .gateway import SITE_FILE
from .lxc import (
    GRAFANA_PORT, key_groups, lxc_kinds, place, reload_grafana, reload_prometheus, site_link, validate_command,
)
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


def _target(lab: Lab, host: str, folder: str):
    conn = ssh_for(lab, host)
    return SshDir(conn, folder) if conn else LocalDir(folder)


def target_for(lab: Lab, host: str):
    h = lab.host(host)
    if not h.config_dir:
        raise DeployError(f"host {host!r} has no config_dir: the deploy job does not know where its files go. "
                          f"Fix: set hosts[].config_dir in {lab._source}.")
    return _target(lab, host, h.config_dir)


@dataclass
class FileGroup:
    """Files going to one folder of the host, and what the plan says about each."""

    target: object
    files: dict[str, tuple[bytes, int]]
    changes: list[FileChange]
    key_group: str | None = None  # key files (mode 0640) go to this group


def deploy_hosts(lab: Lab) -> list[str]:
    """Every host the deploy job reaches: the Docker hosts, then the gateway's and monitoring's LXC hosts."""
    out = list(lab.docker_hosts())
    for h in (lab.gateway.host if lab.gateway else None,
              lab.monitoring.prometheus_host if lab.monitoring else None,
              lab.monitoring.grafana_host if lab.monitoring else None):
        if h and h not in out:
            out.append(h)
    return out


@contextlib.contextmanager
def docker_client(lab: Lab, host: str) -> Iterator[tuple[object, str] | None]:
    """(Docker SDK client, description) for the host's engine; None for a host without docker_host."""
    import docker

    url = lab.host(host).docker_host
    if not url:
        yield None
        return
    if url.startswith("unix://") and not Path(url.removeprefix("unix://")).exists():
        # The embedded lab names this machine's engine; with no engine running, the deploy is the files alone.
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


def make_plan(lab: Lab, host: str, client, home: Path | None = None
              ) -> tuple[HostPlan, list[FileGroup], Project | None]:
    root = host_dir(host, home)
    if not root.is_dir():
        raise DeployError(f"nothing rendered for {host!r} under {root}. Fix: materialise the deploy group "
                          f"(service_secrets, service_configs, gateway_config, monitoring_config) first.")
    files = rendered_files(root, stored_keys(home))
    kinds = lxc_kinds(lab, host)
    if kinds:
        target_for(lab, host)  # a host without config_dir fails here, with the fix
        config_dir = lab.host(host).config_dir
        key_group = key_groups(kinds, config_dir)
        groups = [FileGroup(_target(lab, host, folder), fs, [], key_group.get(folder))
                  for folder, fs in place(files, kinds, config_dir).items()]
    else:
        groups = [FileGroup(target_for(lab, host), files, [])]
    shown = []
    for g in groups:
        g.changes = plan_files(g.files, g.target, host)
        shown += [replace(c, rel=f"{g.target.root}/{c.rel}") if kinds else c for c in g.changes]
    project = None if kinds else load_host_project(lab, host, home)
    hp = HostPlan(host, ", ".join(str(g.target) for g in groups), None, shown)
    if project is not None and client is not None:
        hp.engine = lab.host(host).docker_host
        hp.containers = plan(client, project)
    elif project is not None:
        hp.engine = f"none: no Docker engine at {lab.host(host).docker_host} (files only; containers not applied)"
    return hp, groups, project


@dataclass
class DeployResult:
    plan: HostPlan
    dry_run: bool
    pushed: list[str] = field(default_factory=list)
    applied: ApplyReport | None = None
    containers: list[ContainerState] = field(default_factory=list)
    files: dict[str, FileState] = field(default_factory=dict)
    services: list[str] = field(default_factory=list)  # LXC hosts: validators and reloads
    deployed_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


def deploy_host(lab: Lab, host: str, *, dry_run: bool = False, home: Path | None = None,
                log: Callable[[str], None] = lambda m: None, show_plan: Callable[[HostPlan], None] = lambda p: None,
                endpoints_ok: Callable[[], list[str]] | None = None) -> DeployResult:
    """Plan, show the plan, then (unless a dry run) push the files and apply the containers, or, on an LXC
    host, validate there and reload the services. One deploy per host at a time (a drift repair and a
    hand-launched run would otherwise replace the same containers twice)."""
    from idp_pipelines import settings
    from idp_pipelines.locks import file_lock

    lock = (home or settings.idp_home()) / "locks" / f"deploy-{host}.lock"
    with file_lock(lock, timeout_s=1800, what=f"the deploy of {host}", fix="wait for the other deploy run of this "
                   "host to finish (Dagster UI, runs of the `deploy` job)", on_wait=log, holder="deploy"), \
            docker_client(lab, host) as engine:
        client = engine[0] if engine else None
        hp, groups, project = make_plan(lab, host, client, home)
        show_plan(hp)
        result = DeployResult(hp, dry_run)
        if dry_run:
            return result
        previous = {(i, ch.rel): g.target.read(ch.rel) for i, g in enumerate(groups) for ch in g.changes
                    if ch.changes}
        for g in groups:
            for rel in push(g.files, g.target, g.changes, key_group=g.key_group):
                result.pushed.append(f"{g.target}/{rel}")
                log(f"{host}: wrote {rel} to {g.target}")
        if lxc_kinds(lab, host):
            result.services = _validate_and_reload(lab, host, groups, previous, bool(result.pushed), log, home)
        if project is not None and client is not None:
            result.applied = apply(client, project, network=_network(lab, host, home), log=log,
                                   endpoints_ok=endpoints_ok, probe_budget_s=lab.deploy.probe_timeout_s)
            result.containers = observe(client, project.name)
        for g in groups:
            result.files.update({f"{g.target.root}/{rel}" if len(groups) > 1 or lxc_kinds(lab, host) else rel: st
                                 for rel, st in g.target.listing().items() if rel in g.files})
        return result


def _validate_and_reload(lab: Lab, host: str, groups: list[FileGroup], previous: dict, changed: bool,
                         log: Callable[[str], None], home: Path | None) -> list[str]:
    """Each service's validator on the host; a failure puts every pushed file back, then fails the run.
    Services are reloaded only when a file changed."""
    config_dir = lab.host(host).config_dir
    runner = groups[0].target
    kinds = lxc_kinds(lab, host)
    done = []
    if "nginx" in kinds:
        runner.link(*site_link(config_dir, posixpath.basename(SITE_FILE)))
    for kind in kinds:
        cmd = validate_command(kind, config_dir)
        if cmd is None:
            continue
        code, out = runner.run(cmd)
        if code != 0:
            for (i, rel), old in previous.items():
                t = groups[i].target
                t.remove(rel) if old is None else t.write(rel, old, groups[i].files[rel][1], groups[i].key_group)
            raise DeployError(f"{host}: `{cmd}` failed on the host after the push, so every file this run wrote was "
                              f"put back as it was (the {kind} service keeps running its previous config):\n"
                              f"{out[-2000:]}")
        done.append(f"{kind}: `{cmd}` passed")
        log(f"{host}: {done[-1]}")
    if not changed:
        return done + ["nothing changed: no reload"]
    address = lab.host(host).address
    for kind in kinds:
        if kind == "nginx":
            code, out = runner.run("nginx -s reload")
            if code != 0:
                raise DeployError(f"{host}: `nginx -s reload` failed: {out[-1000:]}")
            done.append("nginx: reloaded (nginx -s reload)")
        elif kind == "prometheus":
            done.append("prometheus: " + reload_prometheus(f"http://{address}:{lab.monitoring.prometheus_port}",
                                                           runner.run))
        elif kind == "grafana":
            creds = read_env_file(service_env_path(host, home))
            user, password = creds.get("GRAFANA_ADMIN_USER", "admin"), creds.get("GRAFANA_ADMIN_PASSWORD")
            if not password:
                raise DeployError(f"{host}: Grafana's provisioning reload needs its admin password, which is not in "
                                  f"the key store {service_env_path(host, home)}. Fix: add GRAFANA_ADMIN_PASSWORD=... "
                                  f"(and GRAFANA_ADMIN_USER if not admin) there, mode 0600.")
            done.append("grafana: " + reload_grafana(f"http://{address}:{GRAFANA_PORT}", user, password))
        log(f"{host}: {done[-1]}")
    return done


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
