"""The applier against a real dockerd: busybox httpd stand-ins created, replaced one by one, rolled back."""

from __future__ import annotations

import httpx
import pytest
import yaml

from idp_pipelines.deploy.apply import LABEL_HASH, LABEL_PROJECT, LABEL_SERVICE, ApplyError, apply, load_project, plan
from idp_pipelines.processes import free_port
from tests.support_docker import httpd_service

KEY = "f" * 64


def compose(services: dict) -> str:
    return yaml.safe_dump({"name": "idp-testhost", "services": services})


def project(services: dict, env=None):
    return load_project(compose(services), env or {"STANDIN_API_KEY": KEY}, "/srv/idp", "idp-testhost")


def get(port: int, path: str = "/health") -> str:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).text.strip()


def test_apply_creates_healthy_then_replaces_only_the_changed_container(client):
    pa, pb = free_port(), free_port()
    services = {"alpha": httpd_service(pa, say="a1"), "beta": httpd_service(pb, say="b1")}
    report = apply(client, project(services))
    assert [a.action for a in report.actions] == ["create", "create"]
    assert get(pa) == "a1" and get(pb) == "b1"
    by = {c.name: c for c in client.containers.list()}
    assert set(by) == {"idp-testhost-alpha-1", "idp-testhost-beta-1"}
    alpha = by["idp-testhost-alpha-1"]
    assert alpha.labels[LABEL_PROJECT] == "idp-testhost" and alpha.labels[LABEL_SERVICE] == "alpha"
    assert client.api.inspect_container(alpha.id)["State"]["Health"]["Status"] == "healthy"
    beta_id = by["idp-testhost-beta-1"].id

    # nothing changed: nothing touched
    again = apply(client, project(services))
    assert [a.action for a in again.actions] == ["leave", "leave"]
    assert {c.name: c.id for c in client.containers.list()} == {n: c.id for n, c in by.items()}

    services["alpha"] = httpd_service(pa, say="a2")
    changed = project(services)
    assert [(a.service, a.action) for a in plan(client, changed)] == [("alpha", "replace"), ("beta", "leave")]
    apply(client, changed)
    after = {c.name: c for c in client.containers.list(all=True)}
    assert set(after) == {"idp-testhost-alpha-1", "idp-testhost-beta-1"}  # the previous one is gone
    assert after["idp-testhost-beta-1"].id == beta_id
    assert after["idp-testhost-alpha-1"].id != alpha.id
    assert after["idp-testhost-alpha-1"].labels[LABEL_HASH] == changed.services["alpha"].hash
    assert get(pa) == "a2"


def test_never_healthy_successor_is_rolled_back_with_its_logs(client):
    pa = free_port()
    apply(client, project({"alpha": httpd_service(pa, say="good")}))
    old = client.containers.get("idp-testhost-alpha-1")
    broken = httpd_service(pa, say="bad", health_port=free_port())  # its healthcheck asks a closed port
    broken["command"] = ["echo starting the broken one; " + broken["command"][0]]
    with pytest.raises(ApplyError) as err:
        apply(client, project({"alpha": broken}))
    text = str(err.value)
    assert "idp-testhost-alpha-1" in text and "never became healthy" in text
    assert "starting the broken one" in text            # the successor's last log lines
    assert "was put back and is healthy" in text
    now = client.containers.list(all=True)
    assert [c.name for c in now] == ["idp-testhost-alpha-1"] and now[0].id == old.id
    assert now[0].status == "running"
    assert get(pa) == "good"


def test_container_stopped_by_hand_is_started_again_and_keys_never_in_errors(client):
    pa = free_port()
    svc = httpd_service(pa)
    svc["env_file"] = [".env"]
    apply(client, project({"alpha": svc}))
    c = client.containers.get("idp-testhost-alpha-1")
    assert f"STANDIN_API_KEY={KEY}" in c.attrs["Config"]["Env"]  # env_file reached the container
    c.stop(timeout=1)
    assert [a.action for a in plan(client, project({"alpha": svc}))] == ["start"]
    apply(client, project({"alpha": svc}))
    assert client.containers.get("idp-testhost-alpha-1").id == c.id
    # a rotated key replaces the container (its hash covers the values it reads)
    assert [a.action for a in plan(client, project({"alpha": svc}, {"STANDIN_API_KEY": "e" * 64}))] == ["replace"]
    bad = dict(svc, command=[f"echo key is {KEY}; exit 3"])
    with pytest.raises(ApplyError) as err:
        apply(client, project({"alpha": bad}))
    assert KEY not in str(err.value) and "key is [redacted]" in str(err.value)


def test_missing_variable_and_missing_image_fail_before_anything_changes(client):
    pa = free_port()
    apply(client, project({"alpha": httpd_service(pa)}))
    before = [(c.name, c.id, c.status) for c in client.containers.list(all=True)]
    svc = httpd_service(pa)
    svc["environment"] = {"LLAMA_API_KEY": "${NOPE_KEY:?NOPE_KEY is missing from .env: materialise service_secrets}"}
    with pytest.raises(ApplyError, match="services.alpha.environment.LLAMA_API_KEY: NOPE_KEY is missing from .env"):
        project({"alpha": svc})
    with pytest.raises(ApplyError, match="image idp-test/absent:1 is not on the host and cannot be pulled.*Nothing"):
        apply(client, project({"alpha": httpd_service(pa, image="idp-test/absent:1")}))
    assert [(c.name, c.id, c.status) for c in client.containers.list(all=True)] == before
    assert get(pa) == "ok"


def test_a_service_dropped_from_the_file_is_removed_and_an_interrupted_replacement_is_put_back(client):
    pa, pb = free_port(), free_port()
    both = {"alpha": httpd_service(pa), "beta": httpd_service(pb)}
    apply(client, project(both))
    # a deploy killed after renaming alpha aside and before its successor existed
    alpha = client.containers.get("idp-testhost-alpha-1")
    alpha.stop(timeout=1)
    alpha.rename("idp-testhost-alpha-1-idp-previous")
    report = apply(client, project({"alpha": httpd_service(pa)}))
    assert [(a.service, a.action) for a in report.actions] == [("alpha", "leave"), ("beta", "remove")]
    now = client.containers.list(all=True)
    assert [(c.name, c.id, c.status) for c in now] == [("idp-testhost-alpha-1", alpha.id, "running")]
    assert get(pa) == "ok"


def test_a_crashing_new_service_fails_at_once_with_its_exit_and_logs(client):
    pa = free_port()
    crash = httpd_service(pa)
    crash["command"] = ["echo cannot open the model file; exit 7"]
    with pytest.raises(ApplyError, match=r"never became healthy: exited with code 7[\s\S]*cannot open the model file"):
        apply(client, project({"alpha": crash}))
    assert client.containers.list(all=True) == []   # no dead service left behind
