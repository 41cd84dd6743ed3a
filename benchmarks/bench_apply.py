"""Deploying one host (goal: under 2 s when nothing changed, most of it the health probe).

A private dockerd (as the tests start it) and two busybox httpd stand-ins: an inference endpoint answering
inference_endpoints' probe, and a neighbour. Times, median of ROUNDS:
  - a deploy where nothing changed: plan (file listing + container inspection), apply (nothing), probe;
  - a deploy where one container changed (its replacement waits for the healthcheck);
  - the raw Docker SDK calls that replacement makes (get image, stop, rename, create, start, wait healthy,
    remove), without the plan, the push or the probe: the floor the deploy job is compared with.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROUNDS = 5


def main() -> None:
    import shutil

    home = Path(tempfile.mkdtemp(prefix="idp-bench-apply-"))
    try:
        run(home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run(home: Path) -> None:
    os.environ["IDP_HOME"] = str(home / "idp")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    from idp_pipelines.assets.deploy import _endpoints_ok
    from idp_pipelines.deploy.apply import wait_healthy
    from idp_pipelines.deploy.deployer import deploy_host, load_host_project
    from idp_pipelines.processes import free_port
    from idp_pipelines.lab import load_lab
    from tests.deploy.conftest import lab_with
    from tests.deploy_apply.test_deploy_job import HOST, render_stand_in
    from tests.support_docker import busybox_image, docker_engine

    with tempfile.TemporaryDirectory(prefix="idpb-", dir="/tmp") as root, docker_engine(Path(root) / "e") as engine:
        client = engine.client()
        busybox_image(client)
        port, side = free_port(), free_port()

        def edit(d):
            d["hosts"][0].update(docker_host=engine.url, config_dir=str(home / "config"))
            d["endpoints"][0].update(base_url=f"http://127.0.0.1:{port}", api_key_env="STANDIN_API_KEY")
            d["services"] = [
                {"name": "local-llamacpp", "kind": "llamacpp", "host": HOST, "endpoint": "local-llamacpp",
                 "image": "idp-test/busybox", "tag": "1", "ports": [{"name": "http", "container": port}]},
                {"name": "sidecar", "kind": "node-exporter", "host": HOST, "image": "idp-test/busybox", "tag": "1",
                 "ports": [{"name": "metrics", "container": side, "host": side}]}]
            d.pop("gateway"), d.pop("monitoring")
        lab = load_lab(lab_with(home, "local", edit))
        render_stand_in(port, side)
        probe = _endpoints_ok(lab, HOST)
        deploy_host(lab, HOST, endpoints_ok=probe)

        nochange, probes = [], []
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            r = deploy_host(lab, HOST, endpoints_ok=probe)
            nochange.append(time.perf_counter() - t0)
            assert not r.plan.changes
            t1 = time.perf_counter()
            probe()
            probes.append(time.perf_counter() - t1)

        changed = []
        for i in range(ROUNDS):
            render_stand_in(port, side, say=f"v{i}")
            t0 = time.perf_counter()
            r = deploy_host(lab, HOST, endpoints_ok=probe)
            changed.append(time.perf_counter() - t0)
            assert [a.action for a in r.plan.containers] == ["replace", "leave"]

        raw = []
        for i in range(ROUNDS):
            render_stand_in(port, side, say=f"raw{i}")
            spec = load_host_project(lab, HOST).services["local-llamacpp"]
            t0 = time.perf_counter()
            client.images.get(spec.image)
            old = client.containers.get(spec.container)
            old.stop(timeout=spec.stop_timeout_s)
            old.rename(spec.container + "-old")
            new = client.containers.create(**spec.create)
            new.start()
            ok, _ = wait_healthy(client, new.id, spec.health_budget_s)
            old.remove()
            raw.append(time.perf_counter() - t0)
            assert ok
        client.close()

    def row(name, xs):
        print(f"{name:58} median {statistics.median(xs):6.2f} s   min {min(xs):6.2f} s   max {max(xs):6.2f} s")

    print(f"deploy of one host, 2 stand-in containers, {ROUNDS} rounds each (this machine, {os.cpu_count()} cores)")
    row("no change: whole deploy (plan, push nothing, probe)", nochange)
    row("  of which the endpoint probe alone", probes)
    row("one container changed: whole deploy", changed)
    row("  raw SDK calls of that replacement (no plan/push/probe)", raw)
    print("goal: no-change deploy under 2 s")


if __name__ == "__main__":
    main()
