"""The inventory's SSH settings per host: how the deploy reaches it, and errors with file/field/fix."""

from __future__ import annotations

import pytest

from idp_pipelines.deploy.ssh import SshError, ssh_for
from idp_pipelines.lab import LabError, load_lab
from idp_pipelines.settings import REPO_ROOT
from tests.deploy.conftest import lab_with

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBvCkP8rS0mS4AUv1Xq0fuTgXqz2f0u0i4i0JmdG2rXu"


def test_schlimers_hosts_are_reached_over_ssh_from_their_docker_host():
    lab = load_lab(REPO_ROOT / "labs" / "schlimers.yaml")
    conn = ssh_for(lab, "schlimers-server")
    assert (conn.user, conn.host, conn.port, conn.sudo) == ("ubuntu", "schlimers-server", 22, False)
    assert ssh_for(lab, "jetson-orin").host == "192.168.1.50"
    assert ssh_for(lab, "sclimers-gateway") is None  # no ssh: block, no ssh:// engine: files on this machine
    assert "-o" in conn.argv() and "StrictHostKeyChecking=yes" in conn.argv() and "BatchMode=yes" in conn.argv()


def test_host_key_pinned_and_bad_settings_named(tmp_path):
    def pinned(d):
        d["hosts"][0]["ssh"] = {"user": "deploy", "port": 2222, "host_key": KEY, "sudo": True}
    lab = load_lab(lab_with(tmp_path, "local", pinned))
    conn = ssh_for(lab, "localhost")
    assert (conn.user, conn.port, conn.sudo) == ("deploy", 2222, True)
    assert open(conn.known_hosts).read() == f"[127.0.0.1]:2222 {KEY}\n"
    assert conn.wrap("nginx -t") == "sudo -n sh -c 'nginx -t'"

    def both(d):
        d["hosts"][0]["ssh"] = {"host_key": KEY, "known_hosts": "/etc/ssh/ssh_known_hosts"}
    with pytest.raises(SshError, match=r"both known_hosts and host_key are set\. Fix: keep one"):
        ssh_for(load_lab(lab_with(tmp_path, "local", both)), "localhost")

    def typo(d):
        d["hosts"][0]["ssh"] = {"host_key": "AAAAC3Nza-not-a-key", "sudo": True}
    with pytest.raises(LabError, match=r"hosts\[0\]\.ssh\.host_key: 'AAAAC3Nza-not-a-key' is not valid"):
        load_lab(lab_with(tmp_path, "local", typo))

    def unknown(d):
        d["hosts"][0]["ssh"] = {"identity": "~/.ssh/id"}
    with pytest.raises(LabError, match=r"hosts\[0\]\.ssh\.identity: unknown key 'identity'.*identity_file"):
        load_lab(lab_with(tmp_path, "local", unknown))
