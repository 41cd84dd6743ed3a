"""Apply a rendered compose file through a host's Docker engine (the Docker SDK), container by container.

Why the SDK and not Compose: Debian 12 ships docker-compose 1.29 (v1) only, which rejects the
Compose Specification's top-level `name` our files carry, and `up -d` recreates a container by
stopping and removing it: it cannot keep the old one aside and put it back when the successor never
becomes healthy. The SDK gives that control; the containers still carry Compose's names and labels
(`<project>-<service>-1`, `com.docker.compose.project/service/...`), so `docker compose ps` on the host
shows them. Our own label `io.idp.spec-hash` says what was applied: only a changed hash is replaced.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from . import DeployError

LABEL_PROJECT = "com.docker.compose.project"
LABEL_SERVICE = "com.docker.compose.service"
LABEL_NUMBER = "com.docker.compose.container-number"
LABEL_ONEOFF = "com.docker.compose.oneoff"
LABEL_WORKDIR = "com.docker.compose.project.working_dir"
LABEL_FILES = "com.docker.compose.project.config_files"
LABEL_HASH = "io.idp.spec-hash"
# compose's stop_grace_period, kept on the container: removing it after its service left the file waits
# as long as its spec said (the SDK's create() cannot set the engine's own StopTimeout)
LABEL_STOP = "io.idp.stop-timeout"
PREVIOUS = "-idp-previous"
LOG_LINES = 30


class ApplyError(DeployError):
    """A deploy could not bring the host to its rendered state (what failed, the logs, what was put back)."""


@dataclass
class ServiceSpec:
    name: str
    container: str        # Compose's name: <project>-<service>-1
    image: str
    hash: str
    create: dict[str, Any] = field(repr=False)  # the SDK's create() arguments: may hold key values, never logged
    health_budget_s: float = 60.0
    stop_timeout_s: int = 10  # compose's stop_grace_period: how long `stop` waits before SIGKILL


@dataclass
class Project:
    name: str
    services: dict[str, ServiceSpec]
    secrets: list[str] = field(default_factory=list, repr=False)

    def redact(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "[redacted]")
        return text


@dataclass
class Action:
    service: str
    action: str            # create | replace | start | leave | remove
    container: str
    old_hash: str | None = None
    new_hash: str | None = None
    why: str = ""

    @property
    def changes(self) -> bool:
        return self.action != "leave"


@dataclass
class ContainerState:
    service: str
    name: str
    id: str
    image: str
    spec_hash: str | None
    status: str
    health: str | None
    ports: list[str]

    def row(self) -> dict:
        return asdict(self)


_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[?-])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: dict[str, str], where: str) -> Any:
    """Compose's variable substitution (`${X}`, `${X:?msg}`, `${X:-default}`, `$X`, `$$`) over a spec."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        got = env.get(name)
        if op and op.endswith("?") and not got:
            raise ApplyError(f"{where}: {arg or f'{name} is not set'} (the compose file needs ${name} from .env)")
        if op and op.endswith("-") and not got:
            return arg
        return got or ""

    return _VAR.sub(sub, value)


def _duration_ns(text: str | int | None, default_s: float) -> int:
    if text is None:
        return int(default_s * 1e9)
    if isinstance(text, (int, float)):
        return int(text * 1e9)
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", text):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[unit]
    return int(total * 1e9)


def _create_args(project: str, service: str, spec: dict, env_file: dict[str, str], working_dir: str) -> dict:
    """The SDK's containers.create() arguments for one compose service (the subset our renderer emits)."""
    import docker.types

    known = {"image", "command", "entrypoint", "environment", "env_file", "healthcheck", "network_mode", "ports",
             "volumes", "restart", "security_opt", "cap_add", "ipc", "pid", "shm_size", "deploy", "labels",
             "stop_grace_period", "stop_signal", "x-idp-keys"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ApplyError(f"service {service!r}: compose keys {unknown} are not applied by the deploy job "
                         f"(it applies what service_configs renders). Fix: render them as Compose options it knows.")
    env: dict[str, str] = {}
    if spec.get("env_file"):
        env.update(env_file)
    raw_env = spec.get("environment") or {}
    if isinstance(raw_env, list):
        raw_env = dict(item.split("=", 1) for item in raw_env)
    env.update({k: "" if v is None else str(v) for k, v in raw_env.items()})
    args: dict[str, Any] = {"image": spec["image"], "environment": env or None}
    for key in ("command", "entrypoint"):
        if key in spec:
            args[key] = spec[key]
    if hc := spec.get("healthcheck"):
        args["healthcheck"] = {"test": hc["test"], "interval": _duration_ns(hc.get("interval"), 30),
                               "timeout": _duration_ns(hc.get("timeout"), 30), "retries": int(hc.get("retries", 3)),
                               "start_period": _duration_ns(hc.get("start_period"), 0)}
    if spec.get("network_mode"):
        args["network_mode"] = spec["network_mode"]
    elif spec.get("ports"):
        ports = {}
        for p in spec["ports"]:
            host, _, container = str(p).rpartition(":")
            ports[f"{container}/tcp"] = int(host) if host else None
        args["ports"] = ports
    mounts = []
    for v in spec.get("volumes") or []:
        prop = (v.get("bind") or {}).get("propagation")
        mounts.append(docker.types.Mount(v["target"], v["source"], type=v.get("type", "bind"),
                                         read_only=bool(v.get("read_only")), propagation=prop))
    if mounts:
        args["mounts"] = mounts
    if spec.get("stop_signal"):
        args["stop_signal"] = spec["stop_signal"]
    if spec.get("restart"):
        args["restart_policy"] = {"Name": spec["restart"]}
    for src, dst in (("security_opt", "security_opt"), ("cap_add", "cap_add"), ("ipc", "ipc_mode"),
                     ("pid", "pid_mode"), ("shm_size", "shm_size")):
        if spec.get(src):
            args[dst] = spec[src]
    devices = (((spec.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    if devices:
        args["device_requests"] = [docker.types.DeviceRequest(driver=d.get("driver", "nvidia"),
                                                              device_ids=d.get("device_ids"),
                                                              capabilities=[d.get("capabilities", ["gpu"])])
                                   for d in devices]
    args["labels"] = {**(spec.get("labels") or {}), LABEL_PROJECT: project, LABEL_SERVICE: service,
                      LABEL_NUMBER: "1", LABEL_ONEOFF: "False", LABEL_WORKDIR: working_dir,
                      LABEL_FILES: f"{working_dir}/compose.yaml"}
    return args


def _budget_s(spec: dict) -> float:
    """How long a container may take to become healthy: its start period plus every retry, and a margin."""
    hc = spec.get("healthcheck")
    if not hc:
        return 30.0
    per_try = (_duration_ns(hc.get("interval"), 30) + _duration_ns(hc.get("timeout"), 30)) / 1e9
    return _duration_ns(hc.get("start_period"), 0) / 1e9 + per_try * (int(hc.get("retries", 3)) + 1) + 15


def spec_hash(service: str, spec: dict, env_used: dict[str, str]) -> str:
    """sha256 of the rendered service and the values it reads from .env (a key rotation replaces it; a
    sha256 of a 32-byte random key gives nothing away)."""
    payload = json.dumps({"service": service, "spec": spec, "env": env_used}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_project(compose_text: str, env_file: dict[str, str], working_dir: str, default_name: str) -> Project:
    """Parse a rendered compose file into what the engine must run (variables from the host's .env)."""
    try:
        doc = yaml.safe_load(compose_text) or {}
    except yaml.YAMLError as exc:
        raise ApplyError(f"{working_dir}/compose.yaml is not valid YAML: {exc}") from None
    name = doc.get("name") or default_name
    services = {}
    for svc, raw in (doc.get("services") or {}).items():
        spec = interpolate({k: v for k, v in raw.items() if not k.startswith("x-")}, env_file, f"services.{svc}")
        used = env_file if raw.get("env_file") else {}
        used = {**used, **{k: v for k, v in env_file.items() if f"${{{k}" in json.dumps(raw)}}
        create = _create_args(name, svc, spec, env_file, working_dir)
        container = f"{name}-{svc}-1"
        services[svc] = ServiceSpec(svc, container, spec["image"], spec_hash(svc, spec, used),
                                    {**create, "name": container}, _budget_s(spec),
                                    max(1, round(_duration_ns(spec.get("stop_grace_period"), 10) / 1e9)))
        services[svc].create["labels"][LABEL_HASH] = services[svc].hash
        services[svc].create["labels"][LABEL_STOP] = str(services[svc].stop_timeout_s)
    return Project(name, services, secrets=[v for v in env_file.values() if len(v) >= 8])


def _project_containers(client, project: str) -> list:
    return client.containers.list(all=True, filters={"label": f"{LABEL_PROJECT}={project}"})


def _health(c) -> str | None:
    return ((c.attrs.get("State") or {}).get("Health") or {}).get("Status")


def observe(client, project: str) -> list[ContainerState]:
    """What the engine really runs for the project: container, image, spec hash, state, health, ports."""
    out = []
    for c in _project_containers(client, project):
        labels = c.labels or {}
        ports = sorted(f"{(b or [{}])[0].get('HostPort', '')}->{k}" for k, b in
                       ((c.attrs.get("HostConfig") or {}).get("PortBindings") or {}).items())
        if (c.attrs.get("HostConfig") or {}).get("NetworkMode") == "host":
            ports = ["host network"]
        out.append(ContainerState(service=labels.get(LABEL_SERVICE, "?"), name=c.name, id=c.id[:12],
                                  image=(c.attrs.get("Config") or {}).get("Image", ""),
                                  spec_hash=labels.get(LABEL_HASH), status=c.status, health=_health(c), ports=ports))
    return sorted(out, key=lambda s: s.name)


def plan(client, project: Project) -> list[Action]:
    """Per service: create (none yet), replace (spec hash changed), start (stopped by hand), leave; and
    remove for a container of the project whose service left the compose file."""
    current = {c.name: c for c in _project_containers(client, project.name)}
    actions = []
    for svc in project.services.values():
        c = current.get(svc.container) or current.get(svc.container + PREVIOUS)
        if c is None:
            actions.append(Action(svc.name, "create", svc.container, None, svc.hash, "no container yet"))
            continue
        old = (c.labels or {}).get(LABEL_HASH)
        if old != svc.hash or c.name != svc.container:
            actions.append(Action(svc.name, "replace", svc.container, old, svc.hash,
                                  "spec changed" if old else "not deployed by idp (no spec-hash label)"))
        elif c.status != "running":
            actions.append(Action(svc.name, "start", svc.container, old, svc.hash, f"container is {c.status}"))
        else:
            actions.append(Action(svc.name, "leave", svc.container, old, svc.hash, "unchanged"))
    wanted = {s.container for s in project.services.values()}
    for name, c in sorted(current.items()):
        if name.removesuffix(PREVIOUS) not in wanted:
            actions.append(Action((c.labels or {}).get(LABEL_SERVICE, name), "remove", name,
                                  (c.labels or {}).get(LABEL_HASH), None, "service no longer in the compose file"))
    return actions


def _logs(c, project: Project) -> str:
    try:
        text = c.logs(tail=LOG_LINES).decode("utf-8", "replace")
    except Exception as exc:  # noqa: BLE001 - the container may be gone already
        text = f"(no logs: {exc})"
    return project.redact(text.strip()) or "(no output)"


def _last_exit_code(client, container_id: str) -> int | str:
    """The exit code of the container's last run. A crash-looping container caught running again has
    State.ExitCode reset to 0 by its restart, so read it from the engine's last `die` event."""
    try:
        events = client.events(since=0, until=int(time.time()) + 1, decode=True,
                               filters={"container": container_id, "event": "die"})
        codes = [e.get("Actor", {}).get("Attributes", {}).get("exitCode") for e in events]
    except Exception:  # noqa: BLE001 - the code is for the message only
        codes = []
    codes = [c for c in codes if c is not None]
    if codes:
        return int(codes[-1]) if str(codes[-1]).lstrip("-").isdigit() else codes[-1]
    return (client.containers.get(container_id).attrs.get("State") or {}).get("ExitCode", "unknown")


def wait_healthy(client, container_id: str, budget_s: float, poll_s: float = 0.5,
                 log: Callable[[str], None] | None = None) -> tuple[bool, str]:
    """(healthy, why): 'healthy' by its healthcheck, or running when it has none; fails early when unhealthy
    or exited. A long start (vLLM loading a model: minutes) is reported every 30 s."""
    start = time.monotonic()
    deadline, next_report = start + budget_s, start + 30
    while True:
        if log is not None and time.monotonic() >= next_report:
            next_report += 30
            log(f"{container_id[:12]}: waiting for health, {time.monotonic() - start:.0f} s of {budget_s:.0f} s")
        c = client.containers.get(container_id)
        health = _health(c)
        if c.status in ("exited", "dead"):
            code = (c.attrs.get("State") or {}).get("ExitCode")
            return False, f"exited with code {code}"
        if c.attrs.get("RestartCount"):  # crash-looping under `restart: unless-stopped`: no point waiting
            code = _last_exit_code(client, container_id)
            return False, f"exited with code {code} and was restarted {c.attrs['RestartCount']} time(s)"
        if health == "healthy" or (health is None and c.status == "running"):
            return True, health or "running"
        if health == "unhealthy":
            log = ((c.attrs.get("State") or {}).get("Health") or {}).get("Log") or []
            last = log[-1].get("Output", "").strip() if log else ""
            return False, f"healthcheck failed{': ' + last[:300] if last else ''}"
        if time.monotonic() > deadline:
            return False, f"not healthy within {budget_s:.0f} s (health: {health or c.status})"
        time.sleep(poll_s)


@dataclass
class ApplyReport:
    actions: list[Action]
    seconds: float = 0.0
    images_pulled: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)


def _ensure_image(client, image: str, pulled: list[str]) -> None:
    import docker.errors

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(image)
            pulled.append(image)
        except docker.errors.APIError as exc:
            raise ApplyError(f"image {image} is not on the host and cannot be pulled ({exc.explanation or exc}). "
                             f"Nothing was changed. Fix: check the tag in lab.yaml (services[].image/tag) or log "
                             f"the host in to its registry.") from None


def _ensure_network(client, project: Project, spec: ServiceSpec, network: str | None) -> None:
    import docker.errors

    if spec.create.get("network_mode") or not network:
        return
    try:
        client.networks.get(network)
    except docker.errors.NotFound:
        client.networks.create(network, driver="bridge", labels={LABEL_PROJECT: project.name})
    spec.create["network"] = network


def _recover_interrupted(client, project: Project, log: Callable[[str], None]) -> None:
    """A deploy killed between stopping a container and its successor's health leaves `<name>-idp-previous`:
    put it back if its successor is missing, drop it if the successor exists."""
    for c in _project_containers(client, project.name):
        if not c.name.endswith(PREVIOUS):
            continue
        base = c.name.removesuffix(PREVIOUS)
        try:
            client.containers.get(base)
            log(f"{c.name}: left by an interrupted deploy beside {base}: removed")
            c.remove(force=True)
        except Exception:  # noqa: BLE001 - the successor is missing: put the previous one back
            log(f"{c.name}: left by an interrupted deploy, {base} missing: renamed back and started")
            c.rename(base)
            c.start()


def apply(client, project: Project, *, network: str | None = None, log: Callable[[str], None] = lambda m: None,
          endpoints_ok: Callable[[], list[str]] | None = None, probe_budget_s: float = 120.0) -> ApplyReport:
    """Bring the engine to the project's rendered state; only create/replace/start what the plan says.

    A replaced container is stopped (host ports and GPU memory cannot be held twice) only once its new
    image is in place, renamed `<name>-idp-previous` until the successor is healthy, and put back when the
    successor never is: the run fails with the successor's last log lines and the host keeps its service.
    """
    t0 = time.monotonic()
    _recover_interrupted(client, project, log)
    actions = plan(client, project)
    report = ApplyReport(actions)
    changing = [a for a in actions if a.action in ("create", "replace")]
    for a in changing:  # every image first: a missing one fails the run before anything stops
        _ensure_image(client, project.services[a.service].image, report.images_pulled)
    for a in actions:
        if a.action == "leave":
            continue
        if a.action == "remove":
            c = client.containers.get(a.container)
            c.stop(timeout=int((c.labels or {}).get(LABEL_STOP, "10")))
            c.remove()
            report.steps.append(f"{a.container}: removed ({a.why})")
            log(report.steps[-1])
            continue
        spec = project.services[a.service]
        if a.action == "start":
            c = client.containers.get(a.container)
            c.start()
            ok, why = wait_healthy(client, c.id, spec.health_budget_s)
            if not ok:
                raise ApplyError(f"{a.container} was restarted but is not healthy ({why}). Last log lines:\n"
                                 f"{_logs(c, project)}")
            report.steps.append(f"{a.container}: started again ({a.why}), {why}")
            log(report.steps[-1])
            continue
        previous = None
        if a.action == "replace":
            previous = client.containers.get(a.container)
            log(f"{a.container}: stopping (spec {a.old_hash} -> {a.new_hash})")
            previous.stop(timeout=spec.stop_timeout_s)
            previous.rename(a.container + PREVIOUS)
        _ensure_network(client, project, spec, network)
        new = None
        try:
            new = client.containers.create(**spec.create)
            new.start()
            log(f"{a.container}: started {new.id[:12]}, waiting for its healthcheck (up to {spec.health_budget_s:.0f} s)")
            ok, why = wait_healthy(client, new.id, spec.health_budget_s, log=log)
        except Exception as exc:
            ok, why = False, f"{type(exc).__name__}: {project.redact(str(exc))}"
        if ok:
            if previous is not None:
                previous.remove()
            report.steps.append(f"{a.container}: {'replaced' if previous else 'created'} ({new.id[:12]}), {why}")
            log(report.steps[-1])
            continue
        logs = _logs(new, project) if new is not None else "(the container was not created)"
        if new is not None:
            new.remove(force=True)
        back = ""
        if previous is not None:
            previous.rename(a.container)
            previous.start()
            healthy, state = wait_healthy(client, previous.id, spec.health_budget_s)
            back = (f" The previous container ({previous.id[:12]}, spec {a.old_hash}) was put back and is "
                    f"{state}." if healthy else f" The previous container was put back but is not healthy: {state}.")
        raise ApplyError(f"{a.container} (spec {a.new_hash}) never became healthy: {why}.{back} "
                         f"Last {LOG_LINES} log lines of the new container:\n{logs}")
    if endpoints_ok is not None:
        deadline = time.monotonic() + probe_budget_s
        while problems := endpoints_ok():
            if time.monotonic() > deadline:
                raise ApplyError("containers are healthy, but endpoints do not answer the probe: "
                                 + "; ".join(project.redact(p) for p in problems))
            time.sleep(0.5)
    report.seconds = time.monotonic() - t0
    return report


def render_plan(actions: list[Action]) -> str:
    """The container part of the plan, one line per container."""
    return "\n".join(f"{a.action:8} {a.container}  {a.old_hash or '-'} -> {a.new_hash or '-'}  ({a.why})"
                     for a in actions)
