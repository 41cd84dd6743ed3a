"""Drift: a deployed file or container that differs from its rendered asset (edited, stopped or replaced by hand)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .apply import ContainerState, Project
from .push import FileChange


@dataclass(frozen=True)
class Drift:
    kind: str     # file | container
    name: str     # path under config_dir, or the container's name
    what: str     # edited | missing | mode | stopped | replaced | unhealthy | unexpected
    detail: str   # a unified diff (no secret values), or the container's state

    def row(self) -> dict:
        return asdict(self)


def file_drift(changes: list[FileChange]) -> list[Drift]:
    """push.plan_files' answer read as drift: what is on the host against what was rendered."""
    what = {"create": "missing", "update": "edited", "mode": "mode"}
    return [Drift("file", c.rel, what[c.action], c.diff) for c in changes if c.changes]


def container_drift(project: Project, observed: list[ContainerState], deployed_ids: dict[str, str]) -> list[Drift]:
    """Each rendered service against the engine: missing, stopped, replaced (another spec hash, or another
    container than the deploy left), unhealthy; and containers of the project no service renders."""
    by_name = {c.name: c for c in observed}
    out = []
    for svc in project.services.values():
        c = by_name.pop(svc.container, None)
        if c is None:
            out.append(Drift("container", svc.container, "missing", "no such container on the engine"))
            continue
        if c.spec_hash != svc.hash:
            out.append(Drift("container", c.name, "replaced",
                             f"spec hash {c.spec_hash or '(no idp label)'} on the engine, {svc.hash} rendered"))
        elif svc.container in deployed_ids and not deployed_ids[svc.container].startswith(c.id[:12]):
            out.append(Drift("container", c.name, "replaced",
                             f"container {c.id[:12]} is not the {deployed_ids[svc.container][:12]} the deploy left"))
        if c.status != "running":
            out.append(Drift("container", c.name, "stopped", f"status {c.status}"))
        elif c.health == "unhealthy":
            out.append(Drift("container", c.name, "unhealthy", "its healthcheck fails"))
    for name, c in sorted(by_name.items()):
        out.append(Drift("container", name, "unexpected", f"service {c.service} is not in the compose file"))
    return out


def fingerprint(drifts: list[Drift]) -> str:
    """Stable over ticks while the drift stays the same (the sensor reports a change, not every tick)."""
    payload = json.dumps(sorted((d.kind, d.name, d.what, d.detail) for d in drifts))
    return hashlib.sha256(payload.encode()).hexdigest()[:16] if drifts else ""
