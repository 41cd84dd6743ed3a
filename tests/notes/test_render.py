"""Rendering: daily, repo and benchmark notes; hostile names and messages never escape the vault or the markup."""

from __future__ import annotations

import datetime as dt
import os

import yaml

from idp_pipelines.notes import render as r
from idp_pipelines.notes.render import BenchRun, CommitRow, Layout, RepoInfo, iter_notes
from idp_pipelines.notes.vault import find_blocks, split_frontmatter, write_notes

UTC = dt.timezone.utc


def commit(sha: str, hour: int, subject: str = "work", repo: str = "lab", day: int = 1, **kw) -> CommitRow:
    t = dt.datetime(2024, 5, day, hour, tzinfo=UTC)
    return CommitRow(repo=repo, sha=sha * 40 if len(sha) == 1 else sha, author_name="Ada", author_time=t,
                     commit_time=t, subject=subject, insertions=3, deletions=1, files_changed=1, **kw)


def run(run_id: str, hour: int, tok_s: float, day: int = 1) -> BenchRun:
    steps = tuple({"step": f"c{c}", "concurrency": c, "n_requests": 8, "n_errors": 0,
                   "output_tokens_per_s": tok_s * c / 4} for c in (1, 2, 4))
    return BenchRun(run_id=run_id, endpoint="vllm", started_at=dt.datetime(2024, 5, day, hour, tzinfo=UTC),
                    status="ok", model="llama-3.1-8b", dagster_run_id=f"dag-{run_id}",
                    mlflow_url=f"http://127.0.0.1:5000/#/experiments/1/runs/{run_id}", mlflow_experiment="bench",
                    steps=steps)


def render_all(commits, runs, repos, layout=Layout()):
    """Every note, as the obsidian_notes asset renders them (one at a time) before writing."""
    return list(iter_notes(commits, runs, repos, layout))


def by_path(notes):
    return {n.path: n for n in notes}


def test_config_commits_link_the_runs_that_measured_them_and_runs_compare():
    commits = [commit("a", 8, "Raise max_num_seqs", config_files=("deploy/vllm.env",)),
               commit("b", 9, "Docs only"),
               commit("c", 14, "Lower gpu_memory_utilization", config_files=("labs/lab.yaml",))]
    runs = [run("r1", 10, 100.0), run("r2", 12, 120.0), run("r3", 15, 90.0)]
    notes = by_path(render_all(commits, runs, [RepoInfo("lab", "/srv/lab", {"main": "c" * 40})],
                               Layout(dagster_url="http://127.0.0.1:3999")))
    day = notes["Dev Log/2024-05-01.md"]
    text = dict(day.blocks)["commits"]
    first = text.split("\n- ")[1]
    assert "Raise max\\_num\\_seqs" in first and "service config changed: deploy/vllm.env" in first
    assert "[[Benchmarks/2024-05-01 1000 vllm r1|" in first and "[[Benchmarks/2024-05-01 1200 vllm r2|" in first
    assert "r3" not in first  # r3 ran on the next config change
    assert "[[Benchmarks/2024-05-01 1500 vllm r3|" in text
    assert day.properties["benchmark_runs"] == 3 and "benchmark" in day.properties["tags"]
    assert "[[Benchmarks/2024-05-01 1000 vllm r1|vllm 10:00]]" in dict(day.blocks)["benchmarks"]

    bench = notes["Benchmarks/2024-05-01 1500 vllm r3.md"]
    assert bench.properties["dagster_run"] == "http://127.0.0.1:3999/runs/dag-r3"
    assert bench.properties["mlflow_run"].endswith("/runs/r3") and bench.properties["day"] == "[[Dev Log/2024-05-01]]"
    blocks = dict(bench.blocks)
    assert "| c4 | 4 | 8 | 0 |" in blocks["summary"] and "[bench](http://127.0.0.1:5000/" in blocks["summary"]
    assert blocks["plot"] == "![[Benchmarks/2024-05-01 1500 vllm r3.svg]]"
    assert "Ran on the config change `cccccccccc` Lower gpu\\_memory\\_utilization" in blocks["changes"]
    assert "25.0 % slower than the previous run [[Benchmarks/2024-05-01 1200 vllm r2|" in blocks["changes"]
    assert notes["Benchmarks/2024-05-01 1500 vllm r3.svg"].content.startswith(b"<svg")
    hub = notes["Repos/lab.md"]
    assert hub.properties["tags"] == ["repo", "repo/lab"] and hub.properties["commits"] == 3


def test_rewritten_commits_are_kept_and_marked():
    notes = by_path(render_all([commit("a", 8), commit("b", 9, "wip", rewritten=True)], [],
                               [RepoInfo("lab", "/srv/lab")]))
    text = dict(notes["Dev Log/2024-05-01.md"].blocks)["commits"]
    assert "~~09:00 `bbbbbbbbbb` wip~~ (rewritten away by a force-push)" in text
    assert notes["Dev Log/2024-05-01.md"].properties["commits"] == 1


def test_days_follow_the_labs_time_zone_and_the_owners_date_format():
    late = CommitRow(repo="lab", sha="d" * 40, author_name="Ada", subject="late",
                     author_time=dt.datetime(2024, 5, 1, 23, 30, tzinfo=UTC),
                     commit_time=dt.datetime(2024, 5, 1, 23, 30, tzinfo=UTC))
    from zoneinfo import ZoneInfo

    layout = Layout(daily_folder="Daily", date_format="YYYY/MM/DD ddd", tz=ZoneInfo("Europe/Berlin"))
    notes = by_path(render_all([late], [], [], layout))
    assert "Daily/2024/05/02 Thu.md" in notes  # 01:30 in Berlin


HOSTILE = [
    "../../../etc/passwd", "/abs", "a|b#c^d[e]f", "%% idp:end commits %%", "[[Secret]] #tag <script>x</script>",
    "ctrl\x00\x07\x1b[2Jchars\r\nnext line", "\udcff invalid" .encode("utf-8", "surrogateescape").decode("latin-1"),
    "x" * 5000, "\u202eevil", "`code` *bold* $math$ ==hl== ~~s~~",
]


def test_hostile_repo_branch_author_and_messages_stay_inside_the_vault_and_inert(tmp_path):
    vault = tmp_path / "box" / "vault"
    commits = [CommitRow(repo=h[:80], sha=f"{i:040x}", author_name=h, subject=h, author_time=dt.datetime(
        2024, 5, 1, 8, i, tzinfo=UTC), commit_time=dt.datetime(2024, 5, 1, 8, i, tzinfo=UTC),
        config_files=(h,)) for i, h in enumerate(HOSTILE)]
    runs = [BenchRun(run_id=h[:40] or "x", endpoint=h, started_at=dt.datetime(2024, 5, 1, 9, i, tzinfo=UTC),
                     status="ok", error=h, steps=({"step": h, "output_tokens_per_s": 1.0},))
            for i, h in enumerate(HOSTILE)]
    repos = [RepoInfo(h[:80], h, {h: None}) for h in HOSTILE]
    layout = Layout(daily_folder="../../outside", date_format="[../]YYYY-MM-DD", repos_folder="/etc",
                    benchmarks_folder="..")
    notes = render_all(commits, runs, repos, layout)
    report = write_notes(vault, notes)
    assert not report.refused and len(report.created) == len(notes)
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == ["vault"]  # nothing next to the vault
    for path in vault.rglob("*"):
        assert os.path.realpath(path).startswith(str(vault) + os.sep)
        if path.suffix != ".md":
            continue
        text = path.read_text()
        fm, body = split_frontmatter(text)
        assert isinstance(yaml.safe_load(fm), dict)  # the properties still parse
        blocks = find_blocks(body)
        assert blocks and all(b.content is not None for b in blocks.values())
        for b in blocks.values():
            for line in b.content.splitlines():
                assert not line.startswith("%% idp:")
                assert "[[Secret]]" not in line and "<script>" not in line and "\x1b" not in line
                assert "%%" not in line
    again = write_notes(vault, notes)
    assert again.written == [] and not again.edited_blocks  # hostile text round-trips through the hashes


def test_md_inline_and_tags():
    assert r.md_inline("a\nb\tc  d") == "a b c d"
    assert r.md_inline("[[x]] #t %%") == "\\[\\[x\\]\\] \\#t \\%\\%"
    assert len(r.md_inline("y" * 500)) == 160
    assert r.tag("repo", "Lab.Configs v2") == "repo/lab-configs-v2" and r.tag("repo", "2024") == "repo/n2024"
    assert r.is_service_config("deploy/compose.yaml") and r.is_service_config("labs/schlimers.yaml")
    assert not r.is_service_config("idp_pipelines/lab.py")
