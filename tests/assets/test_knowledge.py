"""git_commits -> obsidian_notes on real git repos and a real DuckDB file, and git_commit_sensor ticks."""

from __future__ import annotations

import json
import os

import dagster as dg
import pytest

from idp_pipelines.assets import knowledge
from idp_pipelines.assets.knowledge import INSIDE_VAULT, OWNER_EDITS
from idp_pipelines.lab import load_lab
from idp_pipelines.resources import LabResource, WarehouseResource
from idp_pipelines.warehouse import Warehouse
from tests.notes.gitutil import Repo
from tests.support import write_lab


@pytest.fixture
def repo(tmp_path) -> Repo:
    return Repo(tmp_path / "repos" / "lab-configs")


def _lab(tmp_path, repos: dict[str, tuple], vault_extra: dict | None = None):
    return write_lab(tmp_path / "lab.yaml", extra={
        "git_repos": [{"name": n, "path": str(p), "branches": list(b)} for n, (p, b) in repos.items()],
        "vault": {"path": str(tmp_path / "vault"), **(vault_extra or {})},
    })


def _resources(lab_file, tmp_path):
    return {"lab": LabResource(path=str(lab_file)), "warehouse": WarehouseResource(path=str(tmp_path / "wh.duckdb"))}


def _assets(lab_file):
    return {a.key.to_user_string(): a for a in knowledge.build(load_lab(lab_file)).assets}


def _checks(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_commits_then_notes_round_trip_through_dagster(tmp_path, repo):
    first = repo.commit("Add vLLM compose\n", {"deploy/compose.yaml": "services: {}\n"})
    repo.commit("Tune \xfcber-batch\n".encode("latin-1"), {"notes.txt": "x\n"}, encoding="latin1")
    lab_file = _lab(tmp_path, {"lab-configs": (repo.path, ["main"])})
    res, assets = _resources(lab_file, tmp_path), _assets(lab_file)
    instance = dg.DagsterInstance.ephemeral()

    sync = dg.materialize([assets["git_commits"]], partition_key="lab-configs", resources=res, instance=instance)
    (mat,) = sync.asset_materializations_for_node("git_commits")
    assert mat.metadata["new_commits"].value == 2 and "| main | first |" in mat.metadata["branches"].value
    with Warehouse(tmp_path / "wh.duckdb").read() as con:
        rows = con.execute("SELECT sha, subject, branches, parents, files_changed, author_tz, files::VARCHAR "
                           "FROM git_commits ORDER BY author_time").fetchall()
        heads = con.execute("SELECT repo, branch, head_sha FROM git_branch_heads").fetchall()
    assert [r[1] for r in rows] == ["Add vLLM compose", "Tune über-batch"]
    assert rows[0][0] == first and rows[0][2] == ["main"] and rows[0][3] == [] and rows[1][3] == [first]
    assert rows[0][5] == "+0200" and json.loads(rows[0][6])[0]["path"] == "deploy/compose.yaml"
    assert heads == [("lab-configs", "main", repo.head())]

    notes = dg.materialize([assets["obsidian_notes"]], resources=res, instance=instance)
    checks = _checks(notes)
    assert checks[OWNER_EDITS].passed and checks[INSIDE_VAULT].passed
    day = tmp_path / "vault" / "Dev Log" / "2024-05-01.md"
    text = day.read_text()
    assert "Tune über-batch" in text and "service config changed: deploy/compose.yaml" in text
    assert (tmp_path / "vault" / "Repos" / "lab-configs.md").exists()

    # the owner writes; new commits arrive; a block edited by hand is kept and reported
    day.write_text(text.replace("# Dev log 2024-05-01\n", "# Dev log 2024-05-01\nGPU fan loud today.\n"))
    hub = tmp_path / "vault" / "Repos" / "lab-configs.md"
    hub.write_text(hub.read_text().replace("## Recent commits", "## Recent commits (mine)"))
    repo.commit("Third\n", {"c.txt": "c\n"})
    again = dg.materialize([assets["git_commits"]], partition_key="lab-configs", resources=res, instance=instance)
    assert again.asset_materializations_for_node("git_commits")[0].metadata["new_commits"].value == 1
    notes = dg.materialize([assets["obsidian_notes"]], resources=res, instance=instance)
    checks = _checks(notes)
    assert not checks[OWNER_EDITS].passed and checks[OWNER_EDITS].severity == dg.AssetCheckSeverity.WARN
    assert "Repos/lab-configs.md [recent]" in checks[OWNER_EDITS].description
    text = day.read_text()
    assert "GPU fan loud today." in text and "Third" in text and text.count("Add vLLM compose") == 1

    mtime = day.stat().st_mtime_ns
    still = dg.materialize([assets["obsidian_notes"]], resources=res, instance=instance)
    assert still.asset_materializations_for_node("obsidian_notes")[0].metadata["updated"].value == 0
    assert day.stat().st_mtime_ns == mtime


def test_force_push_marks_rewritten_commits_and_notes_keep_them(tmp_path, repo):
    base = repo.linear(2)[-1]
    wip = repo.commit("wip: try batch 64\n", {"w": "1"})
    lab_file = _lab(tmp_path, {"lab-configs": (repo.path, ["main"])})
    res, assets = _resources(lab_file, tmp_path), _assets(lab_file)
    dg.materialize([assets["git_commits"]], partition_key="lab-configs", resources=res)
    repo.git("reset", "-q", "--hard", base)
    fixed = repo.commit("batch 48\n", {"w": "2"})
    dg.materialize([assets["git_commits"]], partition_key="lab-configs", resources=res)
    with Warehouse(tmp_path / "wh.duckdb").read() as con:
        flags = dict(con.execute("SELECT sha, rewritten FROM git_commits").fetchall())
    assert flags[wip] is True and flags[fixed] is False and flags[base] is False
    dg.materialize([assets["obsidian_notes"]], resources=res)
    text = (tmp_path / "vault" / "Dev Log" / "2024-05-01.md").read_text()
    assert "~~" in text and "wip: try batch 64~~ (rewritten away by a force-push)" in text


def test_a_token_in_a_commit_never_reaches_the_vault(tmp_path, repo, monkeypatch):
    token = "hf_live_0123456789abcdefSECRET"
    monkeypatch.setenv("HF_TOKEN", token)  # the Hub token the inventory names (hub.token_env)
    repo.commit(f"Use token {token} for the gated model\n\nbody {token}\n", {"deploy/compose.yaml": "x: 1\n"},
                author=f"Ada {token}")
    lab_file = _lab(tmp_path, {"lab-configs": (repo.path, ["main"])})
    res, assets = _resources(lab_file, tmp_path), _assets(lab_file)
    dg.materialize([assets["git_commits"]], partition_key="lab-configs", resources=res)
    dg.materialize([assets["obsidian_notes"]], resources=res)
    files = [p for p in (tmp_path / "vault").rglob("*") if p.is_file()]
    # markdown escapes it (hf\\_live...): it must not be there escaped either
    assert files and not [p for p in files if token.encode() in p.read_bytes().replace(b"\\", b"")]
    day = (tmp_path / "vault" / "Dev Log" / "2024-05-01.md").read_text()
    assert "Use token \\[redacted\\] for the gated model" in day and "Ada \\[redacted\\]" in day


def test_a_missing_repo_fails_the_run_with_its_path(tmp_path):
    lab_file = _lab(tmp_path, {"gone": (tmp_path / "nowhere", ["main"])})
    result = dg.materialize([_assets(lab_file)["git_commits"]], partition_key="gone",
                            resources=_resources(lab_file, tmp_path), raise_on_error=False)
    assert not result.success
    assert f"git repo {tmp_path / 'nowhere'} does not exist" in str(result.failure_data_for_node("git_commits").error)


# ----------------------------------------------------------------------------------------- sensor


def _tick(lab_file, tmp_path, cursor):
    res = _resources(lab_file, tmp_path)
    defs = dg.Definitions.merge(knowledge.build(load_lab(lab_file)), dg.Definitions(resources=res))
    sensor = next(s for s in defs.sensors if s.name == "git_commit_sensor")
    with dg.build_sensor_context(cursor=cursor, resources={"lab": res["lab"]}, definitions=defs) as ctx:
        return sensor.evaluate_tick(ctx)


def test_sensor_first_run_fast_forward_and_no_change(tmp_path, repo):
    shas = repo.linear(50)  # a first run requests one run per branch, never one per commit
    repo.git("branch", "dev")
    lab_file = _lab(tmp_path, {"lab-configs": (repo.path, ["main", "dev"])})
    first = _tick(lab_file, tmp_path, None)
    assert sorted((r.partition_key, r.run_key, r.tags["idp/git_move"]) for r in first.run_requests) == [
        ("lab-configs", f"lab-configs:dev:{shas[-1]}", "first"), ("lab-configs", f"lab-configs:main:{shas[-1]}", "first")]
    assert json.loads(first.cursor) == {"lab-configs": {"dev": shas[-1], "main": shas[-1]}}

    same = _tick(lab_file, tmp_path, first.cursor)
    assert same.run_requests == [] and same.skip_message == "no new commits" and same.cursor == first.cursor

    new = repo.commit("more\n", {"m": "1"})
    moved = _tick(lab_file, tmp_path, first.cursor)
    assert [(r.run_key, r.tags["idp/git_move"]) for r in moved.run_requests] == [(f"lab-configs:main:{new}", "fast-forward")]
    assert json.loads(moved.cursor) == {"lab-configs": {"dev": shas[-1], "main": new}}


def test_sensor_force_push_and_lost_cursor_sha(tmp_path, repo):
    base = repo.linear(3)[-1]
    old = repo.commit("wip\n", {"w": "1"})
    lab_file = _lab(tmp_path, {"lab-configs": (repo.path, ["main"])})
    repo.git("reset", "-q", "--hard", base)
    fixed = repo.commit("fixed\n", {"w": "2"})
    tick = _tick(lab_file, tmp_path, json.dumps({"lab-configs": {"main": old}}))
    (req,) = tick.run_requests
    assert req.run_key == f"lab-configs:main:{fixed}" and req.tags["idp/git_move"] == "rewrite"
    assert req.tags["idp/git_merge_base"] == base
    assert json.loads(tick.cursor) == {"lab-configs": {"main": fixed}}

    gone = "0123456789abcdef0123456789abcdef01234567"  # gc'd, or outside a shallow clone
    lost = _tick(lab_file, tmp_path, json.dumps({"lab-configs": {"main": gone}}))
    assert [(r.run_key, r.tags["idp/git_move"]) for r in lost.run_requests] == [(f"lab-configs:main:{fixed}", "cursor-missing")]


def test_sensor_with_a_shallow_clone_whose_cursor_is_outside_it(tmp_path, repo):
    import subprocess

    shas = repo.linear(10)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--depth", "5", f"file://{repo.path}", str(clone)], check=True,
                   capture_output=True)
    lab_file = _lab(tmp_path, {"lab-configs": (clone, ["main"])})
    res, assets = _resources(lab_file, tmp_path), _assets(lab_file)
    with Warehouse(tmp_path / "wh.duckdb").write() as con:  # synced from the full repo before
        con.execute("INSERT INTO git_branch_heads VALUES ('lab-configs', 'main', ?, now(), NULL)", [shas[2]])
    tick = _tick(lab_file, tmp_path, json.dumps({"lab-configs": {"main": shas[2]}}))
    assert [r.tags["idp/git_move"] for r in tick.run_requests] == ["cursor-missing"]
    run = dg.materialize([assets["git_commits"]], partition_key="lab-configs", resources=res)
    (mat,) = run.asset_materializations_for_node("git_commits")
    assert mat.metadata["new_commits"].value == 5 and "shallow clone" in mat.metadata["notes"].value


def test_sensor_skips_missing_and_refused_repos_without_crashing(tmp_path, repo):
    head = repo.linear(1)[0]
    other = Repo(tmp_path / "repos" / "other")
    other_head = other.linear(1)[0]
    lab_file = _lab(tmp_path, {"gone": (tmp_path / "nowhere", ["main"]), "lab-configs": (repo.path, ["main"]),
                               "other": (other.path, ["main"])})
    if os.geteuid() == 0:
        os.chown(other.path, 12345, 12345)  # git refuses a repo owned by someone else ("dubious ownership")
    else:
        os.chmod(other.path / ".git", 0)
    cursor = json.dumps({"gone": {"main": "a" * 40}, "other": {"main": other_head}})
    tick = _tick(lab_file, tmp_path, cursor)
    assert [r.run_key for r in tick.run_requests] == [f"lab-configs:main:{head}"]
    assert json.loads(tick.cursor) == {"gone": {"main": "a" * 40}, "lab-configs": {"main": head},
                                       "other": {"main": other_head}}  # nothing forgotten
    if os.geteuid() != 0:
        os.chmod(other.path / ".git", 0o755)


def test_recreate_true_brings_back_a_note_the_owner_deleted(tmp_path, repo):
    repo.commit("Add vLLM compose\n", {"deploy/compose.yaml": "services: {}\n"})
    lab_file = _lab(tmp_path, {"lab-configs": (repo.path, ["main"])})
    res, assets = _resources(lab_file, tmp_path), _assets(lab_file)
    dg.materialize([assets["git_commits"]], partition_key="lab-configs", resources=res)
    dg.materialize([assets["obsidian_notes"]], resources=res)
    day = tmp_path / "vault" / "Dev Log" / "2024-05-01.md"
    day.unlink()  # the owner's choice: the default run respects it

    kept_away = dg.materialize([assets["obsidian_notes"]], resources=res)
    md = kept_away.asset_materializations_for_node("obsidian_notes")[0].metadata
    assert (md["deleted_by_owner"].value, md["created"].value) == (1, 0) and not day.exists()

    asked = dg.materialize([assets["obsidian_notes"]], resources=res,
                           run_config={"ops": {"obsidian_notes": {"config": {"recreate": True}}}})
    md = asked.asset_materializations_for_node("obsidian_notes")[0].metadata
    assert (md["deleted_by_owner"].value, md["created"].value) == (0, 1)
    assert "Add vLLM compose" in day.read_text()


def test_a_key_in_a_benchmark_error_comes_out_redacted_in_its_note(tmp_path, repo, monkeypatch):
    from datetime import datetime, timezone

    from tests.tracking.synthetic import insert_benchmark_run

    key = "sk-live-0123456789abcdefKEY"
    monkeypatch.setenv("LOCAL_LLAMACPP_API_KEY", key)  # named like a key: the lab's redactor knows its value
    repo.commit("Add vLLM compose\n", {"deploy/compose.yaml": "services: {}\n"})
    lab_file = _lab(tmp_path, {"lab-configs": (repo.path, ["main"])})
    res, assets = _resources(lab_file, tmp_path), _assets(lab_file)
    with Warehouse(tmp_path / "wh.duckdb").write() as con:
        insert_benchmark_run(con, "run-key", "local-llamacpp", kind="llamacpp", status="failed",
                             started_at=datetime(2024, 5, 1, 9, tzinfo=timezone.utc), concurrencies=(1,))
        con.execute("UPDATE benchmark_runs SET error = ? WHERE run_id = 'run-key'",
                    [f"HTTP 401 from http://127.0.0.1:18003/v1/chat/completions: invalid api key {key}"])
    dg.materialize([assets["obsidian_notes"]], resources=res)

    (note,) = (tmp_path / "vault" / "Benchmarks").glob("*run-key.md")
    assert "invalid api key \\[redacted\\]" in note.read_text()  # the error is there, the key is not
    files = [p for p in (tmp_path / "vault").rglob("*") if p.is_file()]
    assert not [p for p in files if key.encode() in p.read_bytes().replace(b"\\", b"")]


def test_a_partition_dropped_from_the_inventory_fails_naming_it_and_the_file(tmp_path, repo):
    repo.linear(1)
    lab_file = _lab(tmp_path, {"lab-configs": (repo.path, ["main"]), "old-repo": (repo.path, ["main"])})
    assets = _assets(lab_file)  # the code location was loaded while old-repo was still in lab.yaml
    _lab(tmp_path, {"lab-configs": (repo.path, ["main"])})
    result = dg.materialize([assets["git_commits"]], partition_key="old-repo",
                            resources=_resources(lab_file, tmp_path), raise_on_error=False)
    assert not result.success
    error = str(result.failure_data_for_node("git_commits").error)
    assert f"{lab_file}: no git_repo named 'old-repo'" in error and "Fix:" in error
