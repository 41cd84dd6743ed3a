"""A compose file per Docker host, from the inventory's services and the model assets' paths.

Every container: pinned image, read-only model mounts, NVIDIA device reservations, a healthcheck,
`restart: unless-stopped`, `no-new-privileges`, keys through `env_file` (never on a command line: the
file holds `${NAME}` references at most, and diffs or drift reports of it print no key).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import yaml

from idp_pipelines.lab import Lab, Service

from . import DeployError
from .models import ModelArtifact, ModelMount, model_mount
from .tuning import Tuned

COMPOSE_FILE = "compose.yaml"
ENV_FILE = ".env"
SYNC_SCRIPT = "sync-models.sh"
# Extension fields (x-*) the Compose Specification allows: where each model mount came from and which
# keys each service reads, so the cross-file rules check the file, not the inventory.
X_MODELS = "x-idp-models"
X_KEYS = "x-idp-keys"
# llama-server reads its key from LLAMA_API_KEY; the .env holds it under the endpoint's api_key_env.
ENGINE_KEY_VAR = {"vllm": "VLLM_API_KEY", "llamacpp": "LLAMA_API_KEY"}


@dataclass
class HostBundle:
    host: str
    compose: dict
    mounts: list[ModelMount] = field(default_factory=list)
    tuned: list[Tuned] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sync_script: str | None = None

    def compose_text(self) -> str:
        head = (f"# Rendered by idp_pipelines (service_configs[{self.host}]) from the lab inventory. Do not edit:\n"
                f"# change lab.yaml and re-materialise. Keys come from .env (service_secrets[{self.host}]).\n")
        return head + yaml.safe_dump(self.compose, sort_keys=False, width=120)


def _healthcheck(cmd: list[str], start_period: str = "60s") -> dict:
    return {"test": ["CMD", *cmd], "interval": "30s", "timeout": "10s", "retries": 3, "start_period": start_period}


def _gpu_reservation(svc: Service) -> dict:
    return {"resources": {"reservations": {"devices": [
        {"driver": "nvidia", "device_ids": list(svc.gpus), "capabilities": ["gpu"]}]}}}


def _key_ref(name: str) -> str:
    return f"${{{name}:?{name} is missing from .env: materialise service_secrets}}"


def _service(lab: Lab, svc: Service, mount: ModelMount | None, tuned: Tuned | None) -> tuple[dict, list[str]]:
    """(the compose service, the keys it reads from .env)."""
    out: dict = {"image": f"{svc.image}:{svc.tag}"}
    keys: list[str] = []
    env: dict[str, str] = {}
    ep = lab.endpoint(svc.endpoint) if svc.endpoint else None
    http = svc.port("http")
    if svc.kind == "vllm":
        assert ep is not None and ep.vllm is not None and mount is not None
        flags = ep.vllm
        if tuned is not None:
            flags = flags.model_copy(update={"max_num_seqs": tuned.value})
        out["command"] = ["--model", mount.model_path, "--served-model-name", ep.served_model_name or ep.model,
                          "--host", "0.0.0.0", "--port", str(http.container), *flags.flags()]
        env["HF_HUB_OFFLINE"] = "1"  # the model is mounted: never download at start-up
        out["ipc"] = "host"          # PyTorch's shared memory between vLLM's processes
        out["healthcheck"] = _healthcheck(
            ["python3", "-c", f"import urllib.request; urllib.request.urlopen('http://localhost:{http.container}/health')"],
            start_period="600s")
    elif svc.kind == "llamacpp":
        assert ep is not None and ep.llamacpp is not None and mount is not None
        server = ep.llamacpp
        if tuned is not None and tuned.value != server.parallel:
            # keep each slot's context: llama.cpp splits -c across the -np slots
            per_slot = server.ctx_per_slot()
            update = {"parallel": tuned.value}
            if per_slot and not server.kv_unified:
                update["ctx_size"] = per_slot * tuned.value
            server = server.model_copy(update=update)
        out["command"] = ["-m", mount.model_path, "--host", "0.0.0.0", "--port", str(http.container),
                          "--alias", ep.served_model_name or ep.model, "--no-webui", *server.flags()]
        out["healthcheck"] = _healthcheck(["curl", "-fsS", f"http://localhost:{http.container}/health"], "300s")
    elif svc.kind == "triton":
        assert ep is not None and ep.triton is not None
        flags = ep.triton.flags()
        if ep.api_key_env and ep.triton.restricted_apis:
            # Triton has no bearer key: its admin APIs answer only with this header. The shell expands the
            # key inside the container ($$ is compose's escape), so the file holds the name, not the value.
            flags.append(f"--http-restricted-api={','.join(ep.triton.restricted_apis)}:triton-admin-key="
                         f"$${ep.api_key_env}")
        out["entrypoint"] = ["/bin/sh", "-c"]
        out["command"] = ["exec tritonserver " + " ".join(shlex.quote(f) if "$$" not in f else f for f in flags)]
        out["healthcheck"] = _healthcheck(["curl", "-fsS", f"http://localhost:{http.container}/v2/health/ready"], "300s")
        out["shm_size"] = "1gb"
    elif svc.kind == "dcgm-exporter":
        out["command"] = (svc.dcgm.flags() if svc.dcgm else [])
        out["cap_add"] = ["SYS_ADMIN"]  # DCGM's profiling metrics (DCGM_FI_PROF_*)
        port = svc.port("metrics")
        out["healthcheck"] = _healthcheck(["curl", "-fsS", f"http://localhost:{port.container}/health"])
    elif svc.kind == "node-exporter":
        out["command"] = ["--path.rootfs=/host"]
        out["pid"] = "host"
        port = svc.port("metrics")
        out["healthcheck"] = _healthcheck(["wget", "-qO-", f"http://localhost:{port.container}/metrics"])
    else:  # pragma: no cover - the inventory keeps systemd kinds out of compose files
        raise DeployError(f"service {svc.name!r} ({svc.kind}) is not a container")
    if svc.entrypoint is not None:
        out = {"image": out["image"], "entrypoint": list(svc.entrypoint),
               **{k: v for k, v in out.items() if k != "image"}}
    if ep is not None and ep.api_key_env:
        keys.append(ep.api_key_env)
        native = ENGINE_KEY_VAR.get(svc.kind)
        if native and native != ep.api_key_env:
            env[native] = _key_ref(ep.api_key_env)
    if keys:
        out["env_file"] = [ENV_FILE]
    env.update(svc.environment)
    if env:
        out["environment"] = env
    if svc.ports:
        out["ports"] = [f"{p.host}:{p.container}" for p in svc.ports]
    volumes = []
    if mount is not None:
        volumes.append({"type": "bind", "source": str(mount.source), "target": mount.target, "read_only": True})
    if ep is not None and ep.triton is not None:
        volumes.append({"type": "bind", "source": ep.triton.model_repository, "target": "/models", "read_only": True})
    if svc.kind == "node-exporter":
        volumes.append({"type": "bind", "source": "/", "target": "/host", "read_only": True,
                        "bind": {"propagation": "rslave"}})
    volumes += [{"type": "bind", "source": m.source, "target": m.target, "read_only": m.read_only} for m in svc.mounts]
    if volumes:
        out["volumes"] = volumes
    if svc.gpus:
        out["deploy"] = _gpu_reservation(svc)
    out["restart"] = "unless-stopped"
    out["security_opt"] = ["no-new-privileges:true"]
    if keys:
        out[X_KEYS] = keys
    return out, keys


def render_host(lab: Lab, host: str, artifacts: dict[tuple[str, str], ModelArtifact],
                tuned: dict[str, Tuned] | None = None) -> HostBundle:
    """The compose file (and, for a host without a model cache, its sync-models.sh) of one Docker host."""
    tuned = tuned or {}
    services = [s for s in lab.services if s.host == host and s.container]
    if not services:
        raise DeployError(f"host {host!r} runs no container service in the inventory. Fix: add services for it "
                          f"or drop the partition.")
    bundle = HostBundle(host=host, compose={"name": f"idp-{host}", "services": {}})
    x_models: dict[str, dict] = {}
    sync_lines: list[str] = []
    for svc in services:
        mount = model_mount(lab, svc, artifacts)
        t = tuned.get(svc.endpoint) if svc.endpoint else None
        spec, _ = _service(lab, svc, mount, t)
        bundle.compose["services"][svc.name] = spec
        if t is not None:
            bundle.tuned.append(t)
        if mount is not None:
            bundle.mounts.append(mount)
            x_models[str(mount.source)] = {"model": mount.model, "asset": mount.asset, "produced": str(mount.produced),
                                           "run_id": mount.run_id}
            if mount.sync_from is not None:
                sync_lines.append(_sync_line(lab, host, mount))
    bundle.compose["networks"] = {"default": {"name": "ai-idp-network"}}
    if x_models:
        bundle.compose[X_MODELS] = x_models
    if sync_lines:
        bundle.sync_script = ("#!/bin/sh\n# Rendered by idp_pipelines: copies the verified model files from the model "
                              f"cache to {host}.\n# Run on the host that holds the cache, before `docker compose up`.\n"
                              "set -eu\n" + "".join(sync_lines))
    return bundle


def _sync_line(lab: Lab, host: str, mount: ModelMount) -> str:
    from .ssh import ssh_for

    dst = f"{mount.source}/{mount.sync_from.name}"
    conn = ssh_for(lab, host)
    if conn is not None:
        # the deploy's own way in: port, key, known_hosts and sudo from the inventory (`ssh user@host:2222`,
        # as docker_host spells it, is no ssh command)
        ssh = shlex.join(conn.argv())
        mkdir = conn.wrap(f"mkdir -p {shlex.quote(str(mount.source))}")
        return (f"{ssh} -- {shlex.quote(conn.host)} {shlex.quote(mkdir)}\n"
                f"rsync -a --copy-links --partial -e {shlex.quote(ssh)} {shlex.quote(str(mount.sync_from))} "
                f"{shlex.quote(f'{conn.host}:{dst}')}\n")
    return (f"mkdir -p {shlex.quote(str(mount.source))}\n"
            f"cp --dereference {shlex.quote(str(mount.sync_from))} {shlex.quote(dst)}\n")
