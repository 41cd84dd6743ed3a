"""The chain model -> backup through the real daemon of the embedded lab (`idp up --no-run`): a model
materialised, and without a click a snapshot of the cache that holds it follows (backup_after_new_models_sensor,
debounced by labs/local.yaml's backup.debounce_s), then its verification (declarative automation)."""

from __future__ import annotations

import pytest

from tests.test_automation import WAIT_S, _wait, lab  # noqa: F401 - `lab` is the module's fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _meta(mat: dict, label: str) -> str | None:
    return next((e.get("text") for e in mat["metadataEntries"] if e["label"] == label), None)


def test_a_new_model_is_followed_by_a_snapshot_and_its_verification(lab):  # noqa: F811
    assert lab.sensor_status("backup_after_new_models_sensor") == "RUNNING"
    lab.backfill("hub_model", ["tiny-llama"])
    model = _wait("hub_model[tiny-llama] materialised", lambda: lab.latest("hub_model"))
    snap = _wait("a cache_backup after the model", lambda: (m := lab.latest("cache_backup"))
                 and int(m["timestamp"]) > int(model["timestamp"]) and m, timeout_s=WAIT_S)
    name = _meta(snap, "snapshot")
    assert name and (lab.home / "backup" / name / "cache").is_dir()
    assert list((lab.home / "backup" / name / "cache").glob("models--*tiny-llama/snapshots/*/*.gguf"))
    _wait("backup_verification after the snapshot", lambda: (v := lab.latest("backup_verification"))
          and int(v["timestamp"]) >= int(snap["timestamp"]))
