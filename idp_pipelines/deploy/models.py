"""Where a served model lives: from the hub_model / gguf_model materialisations, never written by hand."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from idp_pipelines.lab import Lab, Service

from . import DeployError


@dataclass(frozen=True)
class ModelArtifact:
    """What a model asset's latest materialisation recorded: its `path` metadata and the run."""

    model: str
    asset: str          # "hub_model" or "gguf_model"
    path: Path          # hub_model: the snapshot folder; gguf_model: the folder of its quantizations
    run_id: str = ""


@dataclass(frozen=True)
class ModelMount:
    """A read-only bind mount of a model and the path the engine opens inside the container."""

    model: str
    produced: Path       # what the model asset produced (the snapshot folder or the GGUF file)
    source: Path         # mounted from the host
    target: str          # in the container
    model_path: str      # what the engine is given (--model / -m)
    asset: str
    run_id: str
    sync_from: Path | None = None  # the host has no model cache: copy this file to `source` first


def _pick_gguf(folder: Path, patterns: list[str] | None, model: str, asset: str) -> Path:
    files = sorted(p for p in folder.glob("*.gguf"))
    if patterns:
        files = [p for p in files if any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]
    if len(files) != 1:
        raise DeployError(
            f"{asset}[{model}] at {folder} holds {len(files)} GGUF file(s) matching {patterns or '*.gguf'} "
            f"({[p.name for p in files]}); a llama.cpp service needs exactly one. Fix: narrow the model's "
            f"allow_patterns, or set services[].quant to a quantize target.")
    return files[0]


def model_mount(lab: Lab, svc: Service, artifacts: dict[tuple[str, str], ModelArtifact]) -> ModelMount | None:
    """The mount for the model `svc` serves, from the latest materialisation (None: it serves no model)."""
    if not svc.endpoint:
        return None
    ep = lab.endpoint(svc.endpoint)
    if not ep.model:
        return None
    model = lab.model(ep.model)
    asset = "gguf_model" if svc.quant else "hub_model"
    art = artifacts.get((asset, model.name))
    if art is None:
        raise DeployError(
            f"service {svc.name!r} serves model {model.name!r}, but {asset}[{model.name}] has no materialisation "
            f"with a path. Fix: materialise {asset} for partition {model.name} first (the compose file mounts "
            f"what it produced).")
    target = f"/models/{model.name}"
    if asset == "gguf_model":
        folder = art.path
        produced = _pick_gguf(folder, [f"*.{svc.quant}.gguf"], model.name, asset)
        source, inside = folder, f"{target}/{produced.name}"
    else:
        snapshot = art.path
        # A snapshot's files are relative symlinks into the repo's blobs/: mount the repo folder.
        repo_dir = snapshot.parent.parent
        if snapshot.parent.name != "snapshots" or not repo_dir.name.startswith("models--"):
            raise DeployError(f"hub_model[{model.name}] recorded path {snapshot}, which is not a snapshot folder "
                              f"of a Hub cache (models--owner--name/snapshots/<sha>). Fix: re-materialise hub_model.")
        rel = snapshot.relative_to(repo_dir).as_posix()
        if svc.kind == "llamacpp":
            produced = _pick_gguf(snapshot, model.allow_patterns, model.name, asset)
            inside = f"{target}/{rel}/{produced.name}"
        else:
            produced, inside = snapshot, f"{target}/{rel}"
        source = repo_dir
    sync_from = None
    if svc.model_sync:
        # The Jetson has no model cache: sync-models.sh copies the one verified file into config_dir/models.
        if produced.is_dir():
            raise DeployError(f"service {svc.name!r} copies its model to the host, which needs a single file; "
                              f"{asset}[{model.name}] produced a folder. Fix: serve a GGUF model there.")
        config_dir = lab.host(svc.host).config_dir
        sync_from, source = produced, Path(f"{config_dir}/models/{model.name}")
        inside = f"{target}/{produced.name}"
    return ModelMount(model=model.name, produced=produced, source=source, target=target, model_path=inside,
                      asset=asset, run_id=art.run_id, sync_from=sync_from)
