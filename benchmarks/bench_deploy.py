"""Rendering and validating every deploy file of labs/schlimers.yaml (goal: the project's share under 0.5 s).

Renders the compose files, the .env key stores, the gateway and the monitoring files into a throwaway
IDP_HOME (a model cache laid out like the Hub's stands in for the downloads), then runs every validator
(the Compose schema, nginx -t in its sandbox, promtool check config / rules, the Grafana checks) and the
cross-file rules. Prints the total, the validators' processes' share (their start-up dominates), and
the bare start-up of each tool for comparison.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS = 5


def fake_cache(lab, root: Path) -> dict:
    from idp_pipelines.deploy.models import ModelArtifact

    arts = {}
    for m in lab.models:
        owner, name = m.repo_id.split("/")
        snap = root / f"models--{owner}--{name}" / "snapshots" / ("0" * 40)
        snap.mkdir(parents=True, exist_ok=True)
        for f in (m.allow_patterns or []):
            if "*" not in f:
                (snap / f).write_bytes(b"GGUF")
        arts[("hub_model", m.name)] = ModelArtifact(m.name, "hub_model", snap, "bench")
    return arts


def one_round(home: Path) -> dict[str, float]:
    from idp_pipelines.deploy import compose as compose_mod, host_dir, keys, render, validate
    from idp_pipelines.lab import load_lab
    from idp_pipelines.settings import REPO_ROOT

    os.environ["IDP_HOME"] = str(home)
    t0 = time.perf_counter()
    lab = load_lab(REPO_ROOT / "labs" / "schlimers.yaml")
    arts = fake_cache(lab, home / "cache")
    for host in lab.docker_hosts():
        keys.ensure_keys(lab, host)
    render.render_everything(lab, arts, {})
    t_render = time.perf_counter() - t0
    verdicts = [validate.check_compose((host_dir(h) / compose_mod.COMPOSE_FILE).read_text(), h)
                for h in lab.docker_hosts()]
    verdicts.append(render.validate_gateway(lab))
    verdicts += list(render.validate_monitoring(lab))
    cross = render.cross_checks(lab, render.produced_paths(lab, arts))
    total = time.perf_counter() - t0
    failed = [v.name for v in verdicts if not v.passed] + [k for k, v in cross.items() if v]
    if failed:
        sys.exit(f"validation failed: {failed}")
    tools = sum(v.tool_seconds for v in verdicts)
    return {"total": total, "render": t_render, "tools": tools, "project": total - tools}


def startup(cmd: list[str]) -> float:
    times = []
    for _ in range(ROUNDS):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    rounds = []
    for i in range(ROUNDS + 1):
        with tempfile.TemporaryDirectory() as tmp:
            r = one_round(Path(tmp))
        if i:  # the first round pays the imports and the schema load once
            rounds.append(r)
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"render + validate every file of labs/schlimers.yaml (median of {ROUNDS}, after one warm-up):")
    print(f"  total           {med['total']:.3f} s")
    print(f"  rendering       {med['render']:.3f} s  (inventory, keys, 2 compose files, gateway, monitoring)")
    print(f"  validators      {med['tools']:.3f} s  (openssl, nginx -t, 3x promtool: their processes)")
    print(f"  project's share {med['project']:.3f} s  (goal < 0.5 s)")
    print("bare start-up of each tool (median):")
    for name, cmd in (("promtool --version", ["promtool", "--version"]), ("nginx -v", ["nginx", "-v"]),
                      ("openssl version", ["openssl", "version"]), ("unshare -m true", ["unshare", "-m", "true"])):
        print(f"  {name:<20} {startup(cmd) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
