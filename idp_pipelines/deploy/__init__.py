"""The deploy domain: the lab's service configs rendered from the inventory and checked by the real tools.

Plain Python, no Dagster: `keys` (the hosts' .env key stores), `compose` (a compose file per Docker
host), `gateway` (NGINX), `monitoring` (Prometheus, alert rules, Grafana), `tuning` (benchmark_tuning's
values with hysteresis), `validate` (the Compose schema, nginx -t, promtool, Grafana JSON) and
`crossfile` (rules between the files). Applying them (issue 15): `push` (files to config_dir, local or
over SSH), `ssh` (the inventory's key and pinned known_hosts), `apply` (containers through the Docker SDK),
`lxc` (gateway, Prometheus, Grafana: validate there, reload), `drift`, and `deployer` (one host's plan and
deploy). Nothing here imports another domain's core.
"""

from __future__ import annotations

from pathlib import Path

from idp_pipelines import settings


class DeployError(RuntimeError):
    """A deploy file cannot be rendered as the inventory and the materialisations stand."""


deploy_dir = settings.deploy_dir


def host_dir(host: str, home: Path | None = None) -> Path:
    return deploy_dir(home) / host
