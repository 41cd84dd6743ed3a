"""LXC hosts (gateway, Prometheus, Grafana): services, not containers. Push the file, validate there, reload.

Where each rendered file goes follows Debian's layout around the host's config_dir (the inventory's
`/etc/nginx/sites-available`, `/etc/prometheus`, `/etc/grafana/provisioning`): NGINX's site gets its
`sites-enabled` link, Prometheus' retention flag goes to `/etc/default/prometheus` (a command-line flag:
a restart, not a reload, applies it), Grafana's dashboards to the folder its provider reads. A file that
fails its validator on the host is put back as it was before the run fails.
"""

from __future__ import annotations

import base64
import posixpath
from collections.abc import Callable
from dataclasses import dataclass

from idp_pipelines.lab import Lab

from . import DeployError
from .monitoring import DASHBOARD_DIR
from .push import KEY_MODE

GRAFANA_PORT = 3000  # Grafana's default http_port; the reload goes to the host's address on it


@dataclass(frozen=True)
class Placement:
    prefix: str        # a rendered path prefix ("nginx/") or one rendered file ("prometheus/default")
    remote_dir: str    # the folder it goes to on the host
    rename: str | None = None  # for a single file: its name there
    # the group of the service that reads the folder's key files: they go there 0640 to that group, not
    # 0600 root (Debian's prometheus runs as user prometheus and could not read its scrape credentials)
    key_group: str | None = None


def lxc_kinds(lab: Lab, host: str) -> list[str]:
    """The systemd services of the host whose files the deploy group renders (none on a Docker host)."""
    if host in lab.docker_hosts():
        return []
    kinds = []
    if lab.gateway is not None and lab.gateway.host == host:
        kinds.append("nginx")
    if lab.monitoring is not None and lab.monitoring.prometheus_host == host:
        kinds.append("prometheus")
    if lab.monitoring is not None and lab.monitoring.grafana_host == host:
        kinds.append("grafana")
    return kinds


def placements(kind: str, config_dir: str) -> list[Placement]:
    etc = posixpath.dirname(config_dir.rstrip("/"))
    if kind == "nginx":
        return [Placement("nginx/", config_dir)]
    if kind == "prometheus":
        return [Placement("prometheus/default", posixpath.join(etc, "default"), "prometheus"),
                Placement("prometheus/", config_dir, key_group="prometheus")]
    if kind == "grafana":
        return [Placement("grafana/provisioning/", config_dir), Placement("grafana/dashboards/", DASHBOARD_DIR)]
    raise DeployError(f"no placement for a {kind} service")


def place(rendered: dict[str, tuple[bytes, int]], kinds: list[str], config_dir: str
          ) -> dict[str, dict[str, tuple[bytes, int]]]:
    """{remote folder: {relative path: (data, mode)}} for the host's services; other files stay home."""
    out: dict[str, dict[str, tuple[bytes, int]]] = {}
    taken: set[str] = set()
    for kind in kinds:
        for p in placements(kind, config_dir):
            for rel, (data, mode) in rendered.items():
                if rel in taken or not rel.startswith(p.prefix):
                    continue
                name = p.rename if p.rename else rel.removeprefix(p.prefix)
                out.setdefault(p.remote_dir, {})[name] = (data, KEY_MODE if p.key_group and mode == 0o600 else mode)
                taken.add(rel)
    return out


def key_groups(kinds: list[str], config_dir: str) -> dict[str, str]:
    """{remote folder: the group its key files are readable by} for the host's services."""
    return {p.remote_dir: p.key_group for kind in kinds for p in placements(kind, config_dir) if p.key_group}


def site_link(config_dir: str, site: str) -> tuple[str, str]:
    """(link in sites-enabled, its relative target), as Debian's nginx layout has it."""
    etc = posixpath.dirname(config_dir.rstrip("/"))
    return posixpath.join(etc, "sites-enabled", site), posixpath.join("..", posixpath.basename(config_dir), site)


def validate_command(kind: str, config_dir: str) -> str | None:
    """The validator run on the host after the push (None: the file was checked at render time)."""
    if kind == "nginx":
        return "nginx -t"
    if kind == "prometheus":
        return f"promtool check config {posixpath.join(config_dir, 'prometheus.yml')}"
    return None


def reload_prometheus(base_url: str, run: Callable[[str], tuple[int, str]]) -> str:
    """POST /-/reload (needs --web.enable-lifecycle); else SIGHUP through systemd, as Debian's unit does."""
    import httpx

    try:
        r = httpx.post(f"{base_url}/-/reload", timeout=30, trust_env=False)
        if r.status_code == 200:
            return f"POST {base_url}/-/reload: 200"
        why = f"{base_url}/-/reload answered {r.status_code} ({r.text.strip()[:200]})"
    except httpx.HTTPError as exc:
        why = f"{base_url}/-/reload: {exc}"
    code, out = run("systemctl reload prometheus")
    if code != 0:
        raise DeployError(f"Prometheus was not reloaded: {why}; `systemctl reload prometheus` failed: {out[-500:]}. "
                          f"Fix: start Prometheus with --web.enable-lifecycle, or let the SSH user reload it (sudo).")
    return f"systemctl reload prometheus ({why})"


def reload_grafana(base_url: str, user: str, password: str) -> str:
    """Grafana's provisioning reload (datasources, then dashboards) with its admin credentials."""
    import httpx

    auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    done = []
    for what in ("datasources", "dashboards"):
        url = f"{base_url}/api/admin/provisioning/{what}/reload"
        try:
            r = httpx.post(url, headers={"Authorization": auth}, timeout=30, trust_env=False)
        except httpx.HTTPError as exc:
            raise DeployError(f"Grafana at {base_url} did not answer the {what} reload: {exc}. Fix: check that "
                              f"Grafana runs on the host, port {GRAFANA_PORT}.") from None
        if r.status_code in (401, 403):
            raise DeployError(f"Grafana at {base_url} refused the admin credentials for the {what} reload "
                              f"(HTTP {r.status_code}). Fix: put the admin user's GRAFANA_ADMIN_USER and "
                              f"GRAFANA_ADMIN_PASSWORD in the Grafana host's key store (deploy/<host>/.env).")
        if r.status_code != 200:
            raise DeployError(f"Grafana at {base_url}: the {what} reload answered HTTP {r.status_code}: "
                              f"{r.text.strip()[:300]}")
        done.append(what)
    return f"Grafana reloaded its provisioned {' and '.join(done)}"
