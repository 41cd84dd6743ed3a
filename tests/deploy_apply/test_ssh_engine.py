"""A host reached the way the seed's hosts are (docker_host ssh://): the tests' sshd on 127.0.0.1 in front of
the tests' dockerd; files pushed over SSH, containers applied through the forwarded engine socket."""

from __future__ import annotations

import httpx
import pytest

from idp_pipelines.deploy import DeployError
from idp_pipelines.deploy.deployer import deploy_host
from idp_pipelines.processes import free_port
from idp_pipelines.lab import load_lab
from tests.deploy.conftest import lab_with
from tests.deploy_apply.test_deploy_job import HOST, KEY, render_stand_in


def ssh_lab(tmp_path, sshd, engine, port, side, known_hosts=None):
    """The host's key pinned inline (hosts[].ssh.host_key), or a known_hosts file when one is given."""
    pin = ({"known_hosts": str(known_hosts)} if known_hosts else
           {"host_key": " ".join(sshd.host_key.with_suffix(".pub").read_text().split()[:2])})

    def edit(d):
        d["hosts"][0].update(docker_host=f"ssh://root@127.0.0.1:{sshd.port}", config_dir=str(tmp_path / "far"),
                             ssh={"identity_file": str(sshd.key), "docker_socket": str(engine.socket), **pin})
        d["endpoints"][0].update(base_url=f"http://127.0.0.1:{port}", api_key_env="STANDIN_API_KEY")
        d["services"] = [
            {"name": "local-llamacpp", "kind": "llamacpp", "host": HOST, "endpoint": "local-llamacpp",
             "image": "idp-test/busybox", "tag": "1", "ports": [{"name": "http", "container": port}]},
            {"name": "sidecar", "kind": "node-exporter", "host": HOST, "image": "idp-test/busybox",
             "tag": "1", "ports": [{"name": "metrics", "container": side, "host": side}]}]
        d.pop("gateway"), d.pop("monitoring")
    return load_lab(lab_with(tmp_path, "local", edit))


def test_deploy_over_ssh_to_the_engine_behind_it(tmp_path, sshd, engine, client):
    port, side = free_port(), free_port()
    lab = ssh_lab(tmp_path, sshd, engine, port, side)
    render_stand_in(port, side)
    logs: list[str] = []
    result = deploy_host(lab, HOST, log=logs.append)
    assert result.plan.engine.startswith("ssh://root@127.0.0.1")
    assert sorted(c.name for c in client.containers.list()) == ["idp-localhost-local-llamacpp-1", "idp-localhost-sidecar-1"]
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).text.strip() == "ok"
    assert (tmp_path / "far" / ".env").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "far" / ".env").read_text() == f"STANDIN_API_KEY={KEY}\n"
    assert set(result.files) == {"compose.yaml", ".env"}
    assert not any(KEY in line for line in logs)
    # a second deploy: nothing to change, nothing touched
    again = deploy_host(lab, HOST)
    assert not again.plan.changes and again.pushed == []
    assert [a.action for a in again.plan.containers] == ["leave", "leave"]


def test_a_changed_host_key_stops_the_deploy_before_anything_changes(tmp_path, sshd, engine, client):
    import subprocess

    port, side = free_port(), free_port()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    pub = (tmp_path / "other.pub").read_text().split()
    changed = tmp_path / "known_hosts.changed"
    changed.write_text(f"[127.0.0.1]:{sshd.port} {pub[0]} {pub[1]}\n")
    lab = ssh_lab(tmp_path, sshd, engine, port, side, known_hosts=changed)
    render_stand_in(port, side)
    with pytest.raises(DeployError, match="the host key CHANGED"):
        deploy_host(lab, HOST)
    assert client.containers.list(all=True) == [] and not (tmp_path / "far").exists()
