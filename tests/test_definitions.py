"""The code location loads, and its graph matches the reviewed snapshot (an accidental change shows in review).

After an intended change to assets, checks, jobs, schedules or sensors: UPDATE_SNAPSHOTS=1 make test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from idp_pipelines.settings import REPO_ROOT

SNAPSHOT = Path(__file__).parent / "snapshots" / "graph.json"


def graph_snapshot(defs: dg.Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "kinds": sorted(node.kinds),
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "partitions": type(node.partitions_def).__name__ if node.partitions_def else None,
            "pools": sorted(node.pools or []),
            "automation": str(node.automation_condition.get_label() or node.automation_condition.name)
            if node.automation_condition else None,
        }
    checks = sorted(f"{c.asset_key.to_user_string()}:{c.name}" for c in graph.asset_check_keys)
    repo = defs.get_repository_def()
    return {
        "assets": assets,
        "checks": checks,
        "jobs": sorted(j.name for j in repo.get_all_jobs() if not j.name.startswith("__")),
        "schedules": sorted(s.name for s in repo.schedule_defs),
        "sensors": sorted(s.name for s in repo.sensor_defs),
        "resources": sorted(defs.resources or {}),
    }


def test_definitions_load_and_match_snapshot():
    from idp_pipelines.definitions import build_defs
    from idp_pipelines.lab import load_lab

    defs = build_defs(load_lab(REPO_ROOT / "labs" / "local.yaml"))
    dg.Definitions.validate_loadable(defs)
    snap = graph_snapshot(defs)
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(snap, indent=2, sort_keys=True) + "\n")
    assert SNAPSHOT.exists(), f"no snapshot yet: run UPDATE_SNAPSHOTS=1 make test and commit {SNAPSHOT}"
    assert snap == json.loads(SNAPSHOT.read_text()), "graph changed: review, then UPDATE_SNAPSHOTS=1 make test"


def test_the_seed_lab_builds_the_same_graph_with_its_own_partitions():
    from idp_pipelines.definitions import build_defs
    from idp_pipelines.lab import load_lab

    defs = build_defs(load_lab(REPO_ROOT / "labs" / "schlimers.yaml"))
    dg.Definitions.validate_loadable(defs)
    snap = graph_snapshot(defs)
    assert snap == json.loads(SNAPSHOT.read_text())  # same graph, whatever the inventory
    hub_model = defs.resolve_asset_graph().get(dg.AssetKey("hub_model"))
    assert hub_model.partitions_def.get_partition_keys() == ["llama-3.1-8b-fp8", "llama-3.2-3b-q4", "llama-3.2-1b-q4"]


def test_dg_check_defs_passes():
    dg_bin = Path(sys.executable).parent / "dg"
    out = subprocess.run([str(dg_bin), "check", "defs"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "All definitions loaded successfully" in out.stdout + out.stderr


def test_importing_the_code_location_does_no_io_and_stays_light(tmp_path):
    """Import with IDP_LAB pointing at a missing file and IDP_HOME unwritable: nothing may notice."""
    code = (
        "import sys, time; import dagster; t=time.perf_counter(); import idp_pipelines.definitions as d; "
        "print(time.perf_counter()-t); heavy=[m for m in ('mlflow','duckdb','pandas','huggingface_hub','docker','jsonschema','check_jsonschema','gguf','matplotlib') "
        "if m in sys.modules]; print(heavy)"
    )
    env = {**os.environ, "IDP_LAB": str(tmp_path / "missing.yaml"), "IDP_HOME": "/proc/nonexistent/idp"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seconds, heavy = out.stdout.splitlines()
    assert heavy == "[]"  # heavy libraries are imported inside assets, not at load
    assert not (tmp_path / "missing.yaml").exists()


def test_every_sensor_and_schedule_runs_by_default_including_declarative_automation():
    """An asset with an automation condition and no running sensor to evaluate it never moves."""
    from idp_pipelines.definitions import build_defs
    from idp_pipelines.lab import load_lab

    repo = build_defs(load_lab(REPO_ROOT / "labs" / "local.yaml")).get_repository_def()
    status = {s.name: s.default_status for s in [*repo.sensor_defs, *repo.schedule_defs]}
    assert status["default_automation_condition_sensor"] == dg.DefaultSensorStatus.RUNNING
    stopped = [name for name, st in status.items() if st.value != "RUNNING"]
    assert stopped == []
    automation = next(s for s in repo.sensor_defs if s.name == "default_automation_condition_sensor")
    assert isinstance(automation, dg.AutomationConditionSensorDefinition)
    # it evaluates every asset that has a condition (tuning, findings, MLflow, the cache inventory, the notes)
    graph = repo.asset_graph
    with_condition = {k for k in graph.materializable_asset_keys if graph.get(k).automation_condition}
    assert with_condition <= automation.asset_selection.resolve(graph)
    assert {"benchmark_tuning", "hardware_findings", "mlflow_experiments", "obsidian_notes"} <= {
        k.to_user_string() for k in with_condition}


def test_an_invalid_inventory_is_a_code_location_error_naming_file_field_and_fix(tmp_path):
    """Loaded as the webserver loads it (workspace.yaml, the code location's loader): the error is the inventory's."""
    import yaml

    data = yaml.safe_load((REPO_ROOT / "labs" / "local.yaml").read_text())
    data["endpoints"][0]["model"] = "gpt-5"
    data["endpoints"][0]["llamacpp"]["paralel"] = 8
    bad = tmp_path / "mylab.yaml"
    bad.write_text(yaml.safe_dump(data, sort_keys=False))
    (tmp_path / "dagster").mkdir()
    env = {**os.environ, "IDP_LAB": str(bad), "IDP_HOME": str(tmp_path / "home"), "NO_COLOR": "1",
           "DAGSTER_HOME": str(tmp_path / "dagster")}
    # workspace.yaml is what `make up`'s webserver loads
    out = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate",
                          "-w", str(REPO_ROOT / "workspace.yaml")], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert f"Invalid lab inventory {bad}:" in text
    assert "endpoints[0].llamacpp.paralel: unknown key 'paralel'. Fix: remove it or use one of:" in text
    assert "Validation for 1 code locations failed" in text
    assert not (tmp_path / "home").exists()  # loading a broken inventory writes no state
