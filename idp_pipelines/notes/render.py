"""Render the knowledge notes: a dev log per day, a hub per repo, a note per benchmark run.

Pure functions from rows to `vault.Note`s; no I/O. Commits land in the day of their author time in
the lab's time zone. A commit that changed a service config links to the benchmark runs that came after
it (until the next config change: the runs that measured it), and each benchmark note names the config
change it ran on and how it compares with the endpoint's previous run.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import functools
import heapq
import html
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple
from zoneinfo import ZoneInfo

from idp_pipelines.notes.vault import (
    GENERATOR, GeneratedFile, Note, clean_text, daily_note_path, join, link, safe_folder, safe_name,
)

# Files whose change alters what a benchmark measures (the deployed services and the lab inventory).
SERVICE_CONFIG_PATTERNS = (
    "labs/*.yaml", "labs/*.yml", "*compose*.yaml", "*compose*.yml", "*.env", "*.env.*", "*.conf",
    "*nginx*", "*prometheus*.yml", "*prometheus*.yaml", "deploy/*", "*/deploy/*", "*Dockerfile*",
    "*.service", "*vllm*.yaml", "*triton*", "*llama*.yaml",
)


class CommitRow(NamedTuple):
    """One commit as the notes need it (a tuple: the first sync renders 100 000 of them)."""

    repo: str
    sha: str
    author_name: str
    author_time: dt.datetime  # aware
    commit_time: dt.datetime
    subject: str
    insertions: int = 0
    deletions: int = 0
    files_changed: int = 0
    n_parents: int = 1  # a merge has more than one
    rewritten: bool = False
    config_files: tuple[str, ...] = ()  # service config paths the commit changed


@dataclass(frozen=True)
class BenchRun:
    run_id: str
    endpoint: str
    started_at: dt.datetime
    status: str
    model: str | None = None
    quantization: str | None = None
    finished_at: dt.datetime | None = None
    dagster_run_id: str | None = None
    mlflow_url: str | None = None
    mlflow_experiment: str | None = None
    trigger: str | None = None
    error: str | None = None
    steps: tuple[dict, ...] = ()

    @property
    def best_tok_s(self) -> float | None:
        vals = [s.get("output_tokens_per_s") for s in self.steps if s.get("output_tokens_per_s") is not None]
        return max(vals) if vals else None


@dataclass(frozen=True)
class RepoInfo:
    name: str
    path: str
    branches: dict[str, str | None] = field(default_factory=dict)  # branch -> last synced head


@dataclass(frozen=True)
class Layout:
    daily_folder: str = "Dev Log"
    date_format: str = "YYYY-MM-DD"
    repos_folder: str = "Repos"
    benchmarks_folder: str = "Benchmarks"
    tz: dt.tzinfo = ZoneInfo("UTC")
    dagster_url: str = "http://127.0.0.1:3000"

    def day_path(self, day: dt.date) -> str:
        return daily_note_path(day, self.daily_folder, self.date_format)

    def repo_path(self, repo: str) -> str:
        return join(safe_folder(self.repos_folder), safe_name(repo)) + ".md"

    def bench_stem(self, run: BenchRun) -> str:
        when = run.started_at.astimezone(self.tz)
        name = safe_name(f"{when:%Y-%m-%d %H%M} {run.endpoint} {run.run_id[:8]}")
        return join(safe_folder(self.benchmarks_folder), name)


def is_service_config(path: str, patterns: Sequence[str] = SERVICE_CONFIG_PATTERNS) -> bool:
    p = path.lower()
    return any(fnmatch.fnmatchcase(p, pat.lower()) for pat in patterns)


# ------------------------------------------------------------------------------------------ text

# Markdown, wikilink, tag, comment, HTML and table syntax, each escaped with a backslash
_MD_SPECIAL = re.compile(r"[\\`*_\[\]#<>|%^~=$!{}]")


def _backslashed(m: re.Match) -> str:
    return "\\" + m.group()


def md_inline(text: str, limit: int = 160) -> str:
    """Any text as one inert Markdown line: no links, tags, comments, HTML or table breaks."""
    text = " ".join(clean_text(text).split())  # runs of whitespace (newlines too) become one space
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return _MD_SPECIAL.sub(_backslashed, text)


def tag(*parts: str) -> str:
    """A nested Obsidian tag (letters, digits, _ - /; never only digits)."""
    out = []
    for p in parts:
        s = re.sub(r"[^a-z0-9_-]+", "-", clean_text(p).lower()).strip("-") or "x"
        out.append(s if not s.isdigit() else f"n{s}")
    return "/".join(out)


@functools.lru_cache(maxsize=4096)
def _author(name: str) -> str:
    """An author's name for a commit line (a repo has few authors and many commits)."""
    return md_inline(name, 60)


def _fmt(v: float | None, digits: int = 1) -> str:
    return "" if v is None else f"{v:,.{digits}f}"


def _day(t: dt.datetime, tz: dt.tzinfo) -> dt.date:
    return t.astimezone(tz).date()


# ----------------------------------------------------------------------------------- cross links


def link_configs_to_runs(commits: Iterable[CommitRow], runs: Sequence[BenchRun],
                         cap: int = 10) -> tuple[dict[str, list[BenchRun]], dict[str, CommitRow]]:
    """(config commit sha -> runs that measured it, run id -> the config commit it ran on)."""
    configs = sorted((c for c in commits if c.config_files and not c.rewritten), key=lambda c: c.commit_time)
    runs = sorted(runs, key=lambda r: r.started_at)
    after: dict[str, list[BenchRun]] = {}
    on: dict[str, CommitRow] = {}
    for i, c in enumerate(configs):
        until = configs[i + 1].commit_time if i + 1 < len(configs) else None
        measured = [r for r in runs if r.started_at >= c.commit_time and (until is None or r.started_at < until)]
        if measured:
            after[c.sha] = measured[:cap]
            for r in measured:
                on[r.run_id] = c
    return after, on


# ---------------------------------------------------------------------------------------- notes


def iter_notes(commits: Sequence[CommitRow], runs: Sequence[BenchRun], repos: Sequence[RepoInfo],
               layout: Layout = Layout()) -> Iterator[Note | GeneratedFile]:
    """Every note, one at a time: write_notes writes each before the next is rendered."""
    after, on = link_configs_to_runs(commits, runs) if runs else ({}, {})
    by_day: dict[dt.date, list[CommitRow]] = defaultdict(list)
    for c in commits:
        by_day[_day(c.author_time, layout.tz)].append(c)
    runs_by_day: dict[dt.date, list[BenchRun]] = defaultdict(list)
    for r in runs:
        runs_by_day[_day(r.started_at, layout.tz)].append(r)
    for day in sorted(set(by_day) | set(runs_by_day)):
        yield daily_note(day, by_day.get(day, []), runs_by_day.get(day, []), layout, after)
    commits_by_repo: dict[str, list[CommitRow]] = defaultdict(list)
    for c in commits:
        commits_by_repo[c.repo].append(c)
    for repo in repos:
        yield repo_note(repo, commits_by_repo.get(repo.name, []), layout)
    previous: dict[str, BenchRun] = {}
    for r in sorted(runs, key=lambda r: r.started_at):
        yield from bench_note(r, layout, on.get(r.run_id), previous.get(r.endpoint))
        if r.status == "complete" or r.best_tok_s is not None:
            previous[r.endpoint] = r


def _commit_line(c: CommitRow, layout: Layout, after: dict[str, list[BenchRun]]) -> str:
    t = c.author_time.astimezone(layout.tz)
    hhmm = f"{t.hour:02d}:{t.minute:02d}"
    if c.rewritten:
        text = f"~~{hhmm} `{c.sha[:10]}` {md_inline(c.subject)}~~ (rewritten away by a force-push)"
    else:
        stats = f"+{c.insertions} −{c.deletions}, {c.files_changed} file{'s' if c.files_changed != 1 else ''}"
        merge = " (merge)" if c.n_parents > 1 else ""
        text = f"{hhmm} `{c.sha[:10]}` {md_inline(c.subject)}{merge} — {_author(c.author_name)} ({stats})"
    lines = [f"- {text}"]
    if c.config_files:
        shown = ", ".join(md_inline(p, 80) for p in c.config_files[:5])
        more = f" and {len(c.config_files) - 5} more" if len(c.config_files) > 5 else ""
        lines.append(f"    - service config changed: {shown}{more}")
        runs = after.get(c.sha, [])
        if runs:
            links = ", ".join(link(layout.bench_stem(r), f"{r.endpoint} {r.started_at.astimezone(layout.tz):%m-%d %H:%M}")
                              for r in runs)
            lines.append(f"    - benchmarks after this change: {links}")
    return "\n".join(lines)


def daily_note(day: dt.date, commits: list[CommitRow], runs: list[BenchRun], layout: Layout,
               after: dict[str, list[BenchRun]]) -> Note:
    repos = sorted({c.repo for c in commits})
    live = [c for c in commits if not c.rewritten]
    props = {
        "type": "dev-log",
        "date": day,
        "tags": ["dev-log", *(tag("repo", r) for r in repos), *(["benchmark"] if runs else [])],
        "repos": [link(layout.repo_path(r), r) for r in repos],
        "commits": len(live),
        "insertions": sum(c.insertions for c in live),
        "deletions": sum(c.deletions for c in live),
        "benchmark_runs": len(runs),
        "generator": GENERATOR,
    }
    parts = []
    for repo in repos:
        rows = sorted((c for c in commits if c.repo == repo), key=lambda c: (c.author_time, c.sha))
        parts.append(f"## {link(layout.repo_path(repo), repo)}\n\n" + "\n".join(_commit_line(c, layout, after) for c in rows))
    blocks = [("commits", "\n\n".join(parts) if parts else "No commits.")]
    if runs:
        lines = []
        for r in sorted(runs, key=lambda r: r.started_at):
            best = f", best {_fmt(r.best_tok_s)} tok/s" if r.best_tok_s is not None else ""
            lines.append(f"- {link(layout.bench_stem(r), f'{r.endpoint} {r.started_at.astimezone(layout.tz):%H:%M}')}"
                         f" — {md_inline(r.status, 20)}{best}")
        blocks.append(("benchmarks", "## Benchmarks\n\n" + "\n".join(lines)))
    return Note(layout.day_path(day), props, tuple(blocks), preamble=f"# Dev log {day.isoformat()}\n\n")


def repo_note(repo: RepoInfo, commits: list[CommitRow], layout: Layout, recent: int = 20, days: int = 30) -> Note:
    live = [c for c in commits if not c.rewritten]
    times = sorted(c.author_time for c in live)
    props = {
        "type": "repo",
        "repo": repo.name,
        "path": repo.path,
        "branches": list(repo.branches),
        "tags": ["repo", tag("repo", repo.name)],
        "commits": len(live),
        "rewritten_commits": len(commits) - len(live),
        "first_commit": _day(times[0], layout.tz) if times else None,
        "last_commit": _day(times[-1], layout.tz) if times else None,
        "generator": GENERATOR,
    }
    heads = "\n".join(f"| {md_inline(b, 60)} | `{(h or 'missing')[:12]}` |" for b, h in repo.branches.items())
    summary = (f"Path: `{md_inline(repo.path, 200)}`\n\n| branch | synced head |\n|---|---|\n{heads}\n\n"
               f"{len(live)} commits (+{sum(c.insertions for c in live)} −{sum(c.deletions for c in live)} lines)"
               + (f", {len(commits) - len(live)} rewritten away" if len(commits) != len(live) else ""))
    newest = heapq.nlargest(recent, commits, key=lambda c: (c.author_time, c.sha))
    recent_lines = []
    for c in newest:
        d = _day(c.author_time, layout.tz)
        mark = " (rewritten)" if c.rewritten else ""
        recent_lines.append(f"- {link(layout.day_path(d), d.isoformat())} `{c.sha[:10]}` {md_inline(c.subject)}{mark}")
    per_day: dict[dt.date, int] = defaultdict(int)
    for c in live:
        per_day[_day(c.author_time, layout.tz)] += 1
    day_lines = [f"- {link(layout.day_path(d), d.isoformat())}: {n} commit{'s' if n != 1 else ''}"
                 for d, n in sorted(per_day.items(), reverse=True)[:days]]
    blocks = (
        ("summary", summary),
        ("recent", "## Recent commits\n\n" + ("\n".join(recent_lines) or "None yet.")),
        ("days", "## Active days\n\n" + ("\n".join(day_lines) or "None yet.")),
    )
    return Note(layout.repo_path(repo.name), props, blocks, preamble=f"# {md_inline(repo.name, 100)}\n\n")


_STEP_COLS = [("step", "step"), ("concurrency", "conc."), ("n_requests", "requests"), ("n_errors", "errors"),
              ("requests_per_s", "req/s"), ("output_tokens_per_s", "tok/s"), ("ttft_ms_p50", "TTFT p50 ms"),
              ("tpot_ms_p50", "TPOT p50 ms"), ("e2e_ms_p95", "E2E p95 ms"), ("goodput_fraction", "goodput")]


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return _fmt(v, 2)
    return md_inline(str(v), 40)


def bench_note(run: BenchRun, layout: Layout, config: CommitRow | None,
               previous: BenchRun | None) -> list[Note | GeneratedFile]:
    stem = layout.bench_stem(run)
    day = _day(run.started_at, layout.tz)
    dagster_url = f"{layout.dagster_url.rstrip('/')}/runs/{run.dagster_run_id}" if run.dagster_run_id else None
    props = {
        "type": "benchmark",
        "date": day,
        "endpoint": run.endpoint,
        "model": run.model,
        "quantization": run.quantization,
        "status": run.status,
        "run_id": run.run_id,
        "tags": ["benchmark", tag("endpoint", run.endpoint)],
        "day": link(layout.day_path(day)),
        "steps": len(run.steps),
        "best_output_tok_s": round(run.best_tok_s, 2) if run.best_tok_s is not None else None,
        "mlflow_run": run.mlflow_url,
        "dagster_run": dagster_url,
        "generator": GENERATOR,
    }
    head = "| " + " | ".join(h for _, h in _STEP_COLS) + " |\n|" + "---|" * len(_STEP_COLS) + "\n"
    rows = "".join("| " + " | ".join(_cell(s.get(k)) for k, _ in _STEP_COLS) + " |\n" for s in run.steps)
    links = [f"- Day: {link(layout.day_path(day), day.isoformat())}"]
    if run.mlflow_url:
        links.append(f"- MLflow run: [{md_inline(run.mlflow_experiment or 'run', 60)}]({run.mlflow_url})")
    if dagster_url:
        links.append(f"- Dagster run: [{run.dagster_run_id[:8]}]({dagster_url})")
    status = md_inline(run.status, 20) + (f": {md_inline(run.error, 200)}" if run.error else "")
    summary = (f"Endpoint **{md_inline(run.endpoint, 60)}**, model {md_inline(run.model or '?', 80)}"
               f"{' (' + md_inline(run.quantization, 20) + ')' if run.quantization else ''}, status {status}, "
               f"started {run.started_at.astimezone(layout.tz):%Y-%m-%d %H:%M %Z}.\n\n"
               + (head + rows if run.steps else "No steps recorded.\n") + "\n" + "\n".join(links))
    change_lines = []
    if config is not None:
        cd = _day(config.author_time, layout.tz)
        change_lines.append(f"- Ran on the config change `{config.sha[:10]}` {md_inline(config.subject)} "
                            f"({md_inline(config.repo, 60)}, {link(layout.day_path(cd), cd.isoformat())})")
    if previous is not None and previous.best_tok_s and run.best_tok_s is not None:
        delta = 100 * (run.best_tok_s - previous.best_tok_s) / previous.best_tok_s
        word = "faster" if delta > 0 else "slower"
        change_lines.append(f"- {abs(delta):.1f} % {word} than the previous run "
                            f"{link(layout.bench_stem(previous), previous.started_at.astimezone(layout.tz).strftime('%Y-%m-%d %H:%M'))}"
                            f" ({_fmt(previous.best_tok_s)} → {_fmt(run.best_tok_s)} tok/s)")
    blocks: list[tuple[str, str]] = [("summary", summary)]
    out: list[Note | GeneratedFile] = []
    svg = plot_svg(run)
    if svg is not None:
        blocks.append(("plot", f"![[{stem}.svg]]"))
        out.append(GeneratedFile(stem + ".svg", svg))
    blocks.append(("changes", "## What changed\n\n" + ("\n".join(change_lines) or "No earlier run or config change known.")))
    title = f"# Benchmark {md_inline(run.endpoint, 60)} {run.started_at.astimezone(layout.tz):%Y-%m-%d %H:%M}\n\n"
    out.insert(0, Note(stem + ".md", props, tuple(blocks), preamble=title))
    return out


def plot_svg(run: BenchRun, width: int = 480, height: int = 240) -> bytes | None:
    """Output tokens/s per step as a small SVG line chart (no plotting library needed)."""
    pts = [(i, s.get("output_tokens_per_s")) for i, s in enumerate(run.steps)]
    pts = [(i, float(v)) for i, v in pts if v is not None]
    if not pts:
        return None
    pad, top = 40, max(v for _, v in pts) or 1.0
    n = max(len(run.steps) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return pad + (width - 2 * pad) * i / n, height - pad - (height - 2 * pad) * v / top

    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in pts))
    labels = "".join(
        f'<text x="{xy(i, 0)[0]:.1f}" y="{height - pad + 16}" font-size="10" text-anchor="middle">'
        f'{html.escape(str(run.steps[i].get("concurrency") or run.steps[i].get("step") or i))[:12]}</text>'
        for i, _ in pts)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#4a7cd6"/>' for x, y in (xy(i, v) for i, v in pts))
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<text x="{width / 2}" y="16" font-size="12" text-anchor="middle">output tok/s by step '
        f'({html.escape(clean_text(run.endpoint))[:40]})</text>'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>'
        f'<text x="{pad - 4}" y="{pad + 4}" font-size="10" text-anchor="end">{top:,.0f}</text>'
        f'<text x="{pad - 4}" y="{height - pad}" font-size="10" text-anchor="end">0</text>'
        f'<polyline fill="none" stroke="#4a7cd6" stroke-width="2" points="{line}"/>{dots}{labels}</svg>\n'
    )
    return svg.encode("utf-8")
