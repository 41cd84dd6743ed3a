"""Pushing a host's rendered files: a local config_dir and one over SSH (the tests' own sshd on 127.0.0.1)."""

from __future__ import annotations

import subprocess

import pytest

from idp_pipelines.deploy.deployer import deploy_host
from idp_pipelines.deploy.push import LocalDir, SshDir, plan_files, push, rendered_files
from idp_pipelines.deploy.ssh import SshConn, SshError
from idp_pipelines.files import atomic_write
from idp_pipelines.lab import load_lab
from idp_pipelines.settings import idp_home
from tests.deploy.conftest import lab_with

KEY_A, KEY_B = "a" * 64, "b" * 64


def rendered(root, key=KEY_A, compose="services: {web: {image: x:1}}\n"):
    atomic_write(root / "compose.yaml", compose)
    atomic_write(root / ".env", f"# keys\nWEB_API_KEY={key}\n", mode=0o600)
    atomic_write(root / "prometheus" / "key-web", key + "\n", mode=0o600)
    return rendered_files(root, [key])


def conn(sshd, **kw) -> SshConn:
    return SshConn(host="127.0.0.1", name="testhost", user="root", port=sshd.port, identity_file=str(sshd.key),
                   known_hosts=str(sshd.known_hosts), **kw)


def check_roundtrip(target, root, read_mode):
    files = rendered(root)
    first = plan_files(files, target, "testhost")
    assert {c.rel: c.action for c in first} == {"compose.yaml": "create", ".env": "create", "prometheus/key-web": "create"}
    assert all(KEY_A not in c.diff for c in first)
    push(files, target, first)
    assert read_mode(".env") == 0o600 and read_mode("prometheus/key-web") == 0o600
    assert [c.action for c in plan_files(files, target, "testhost")] == ["same", "same", "same"]
    files = rendered(root, key=KEY_B, compose="services: {web: {image: x:2}}\n")
    second = {c.rel: c for c in plan_files(files, target, "testhost")}
    assert second["compose.yaml"].action == "update"
    assert "-services: {web: {image: x:1}}" in second["compose.yaml"].diff
    assert "+services: {web: {image: x:2}}" in second["compose.yaml"].diff
    assert second[".env"].diff == "(secret file .env: values not shown) WEB_API_KEY: changed"
    assert all(KEY_A not in c.diff and KEY_B not in c.diff for c in second.values())
    push(files, target, list(second.values()))
    assert target.read(".env").decode().endswith(f"WEB_API_KEY={KEY_B}\n")
    assert read_mode(".env") == 0o600


def test_push_to_a_local_config_dir(tmp_path):
    target = LocalDir(tmp_path / "config")
    check_roundtrip(target, tmp_path / "rendered", lambda rel: (tmp_path / "config" / rel).stat().st_mode & 0o777)


def test_push_over_ssh_keeps_env_private_and_refuses_a_changed_host_key(tmp_path, sshd):
    far = tmp_path / "far" / "config"
    target = SshDir(conn(sshd), str(far))
    check_roundtrip(target, tmp_path / "rendered", lambda rel: (far / rel).stat().st_mode & 0o777)
    assert not list(far.rglob("*.idp-tmp"))

    # the host is "reinstalled": a new host key behind the same address and port
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    pub = (tmp_path / "other.pub").read_text().split()
    bad_kh = tmp_path / "known_hosts.changed"
    bad_kh.write_text(f"[127.0.0.1]:{sshd.port} {pub[0]} {pub[1]}\n")
    before = (far / "compose.yaml").read_bytes()
    changed = SshDir(SshConn(**{**conn(sshd).__dict__, "known_hosts": str(bad_kh)}), str(far))
    with pytest.raises(SshError, match=r"host 'testhost' over SSH .*the host key CHANGED from the one in .*known_hosts.changed"):
        push(rendered(tmp_path / "rendered", compose="services: {}\n"), changed,
             plan_files(rendered(tmp_path / "rendered", compose="services: {}\n"), changed, "testhost"))
    assert (far / "compose.yaml").read_bytes() == before

    empty = tmp_path / "known_hosts.empty"
    empty.write_text("")
    unknown = SshDir(SshConn(**{**conn(sshd).__dict__, "known_hosts": str(empty)}), str(far))
    with pytest.raises(SshError, match="its host key is not in .*known_hosts.empty: no trust on first use"):
        unknown.listing()


def test_embedded_lab_without_an_engine_deploys_its_files_only(tmp_path):
    """labs/local.yaml names this machine's engine; when none runs, the deploy is the files alone, said so."""
    def edit(d):
        d["hosts"][0].update(docker_host=f"unix://{tmp_path}/no-engine.sock", config_dir=str(tmp_path / "target"))
    lab = load_lab(lab_with(tmp_path, "local", edit))
    atomic_write(idp_home() / "deploy" / "localhost" / "compose.yaml", "name: idp-localhost\nservices: {}\n")
    result = deploy_host(lab, "localhost")
    assert result.plan.engine.startswith(f"none: no Docker engine at unix://{tmp_path}/no-engine.sock")
    assert result.pushed == ["%s/compose.yaml" % (tmp_path / "target")] and result.containers == []
    assert (tmp_path / "target" / "compose.yaml").exists()


def test_the_jetsons_sync_script_copies_its_model_over_ssh(sshd, tmp_path):
    """The rendered sync-models.sh, run as the owner runs it, puts the GGUF the Jetson serves where its
    compose file mounts it: through the inventory's port, key and known_hosts (a Jetson on port 2222 works)."""
    from idp_pipelines.deploy import host_dir
    from idp_pipelines.deploy.keys import ensure_keys
    from idp_pipelines.deploy.render import render_everything
    from tests.deploy.conftest import artifacts_for

    jetson_dir = tmp_path / "jetson"

    def edit(d):
        (h,) = [h for h in d["hosts"] if h["name"] == "jetson-orin"]
        h.update(address="127.0.0.1", docker_host=f"ssh://root@127.0.0.1:{sshd.port}", config_dir=str(jetson_dir),
                 ssh={"user": "root", "port": sshd.port, "identity_file": str(sshd.key),
                      "known_hosts": str(sshd.known_hosts)})
    lab = load_lab(lab_with(tmp_path, "schlimers", edit))
    for host in lab.docker_hosts():
        ensure_keys(lab, host)
    arts = artifacts_for(lab, tmp_path / "cache")
    render_everything(lab, arts, {})
    script = host_dir("jetson-orin") / "sync-models.sh"
    src = arts[("hub_model", "llama-3.2-1b-q4")].path / "Llama-3.2-1B-Instruct-Q4_K_M.gguf"
    compose = (host_dir("jetson-orin") / "compose.yaml").read_text()
    mounted = jetson_dir / "models" / "llama-3.2-1b-q4"
    assert f"source: {mounted}" in compose
    run = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    copied = mounted / src.name
    assert copied.is_file() and not copied.is_symlink() and copied.read_bytes() == src.resolve().read_bytes()
    again = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr  # a second run (nothing new) succeeds too
