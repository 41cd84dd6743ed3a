"""Fixtures of the deploy tests: the inventories with a model cache laid out like the Hub's, in tmp."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from idp_pipelines.deploy.models import ModelArtifact
from idp_pipelines.lab import Lab, load_lab
from idp_pipelines.settings import REPO_ROOT

SHA = "0123456789abcdef0123456789abcdef01234567"


def hub_snapshot(cache: Path, lab: Lab, model: str, sha: str = SHA) -> Path:
    """A Hub cache repo folder as huggingface_hub lays it out: blobs/ and snapshot files linking into it."""
    m = lab.model(model)
    owner, name = m.repo_id.split("/")
    repo = cache / f"models--{owner}--{name}"
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    files = [p for p in (m.allow_patterns or []) if "*" not in p] or ["model.safetensors", "config.json"]
    for f in files:
        blob = repo / "blobs" / f"blob-{f}"
        blob.write_bytes(b"weights")
        link = snap / f
        if not link.exists():
            link.symlink_to(Path("../..") / "blobs" / blob.name)
    return snap


def artifacts_for(lab: Lab, cache: Path) -> dict[tuple[str, str], ModelArtifact]:
    """What hub_model / gguf_model would have recorded for every model the lab's services serve."""
    out = {}
    for m in lab.models:
        snap = hub_snapshot(cache, lab, m.name)
        out[("hub_model", m.name)] = ModelArtifact(m.name, "hub_model", snap, "hub-run-1")
        if m.quantize:
            folder = cache / "gguf" / m.name / SHA[:12]
            folder.mkdir(parents=True, exist_ok=True)
            for q in m.quantize:
                (folder / f"{m.name}-f32.{q}.gguf").write_bytes(b"GGUF")
            out[("gguf_model", m.name)] = ModelArtifact(m.name, "gguf_model", folder, "quant-run-1")
    return out


@pytest.fixture
def schlimers() -> Lab:
    return load_lab(REPO_ROOT / "labs" / "schlimers.yaml")


@pytest.fixture
def local_lab() -> Lab:
    return load_lab(REPO_ROOT / "labs" / "local.yaml")


def lab_with(tmp_path: Path, base: str, edit) -> Path:
    """A copy of labs/<base>.yaml changed by `edit(data)`, written to tmp."""
    data = yaml.safe_load((REPO_ROOT / "labs" / f"{base}.yaml").read_text())
    edit(data)
    path = tmp_path / f"{base}-edited.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
