"""LXC hosts: Prometheus' files pushed, checked by promtool there, reloaded (Debian's prometheus, started by
the test with --web.enable-lifecycle); a file that fails the check is put back; Grafana's provisioning
reload against a stand-in that checks the admin credentials."""

from __future__ import annotations

import base64
import grp
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from idp_pipelines.deploy import DeployError, host_dir
from idp_pipelines.deploy.deployer import deploy_host
from idp_pipelines.deploy.keys import ensure_keys, host_keys
from idp_pipelines.deploy.lxc import key_groups, place, reload_grafana, site_link
from idp_pipelines.deploy.monitoring import render_monitoring
from idp_pipelines.deploy.render import write_monitoring
from idp_pipelines.processes import free_port, stop_process_group, wait_http
from idp_pipelines.files import atomic_write
from idp_pipelines.lab import load_lab
from tests.deploy.conftest import lab_with


def obs_lab(tmp_path, prom_port, sshd=None):
    """labs/local.yaml with Prometheus on an LXC-like host "obs": this machine's folders, or over SSH."""
    ssh = ({"ssh": {"user": "root", "port": sshd.port, "identity_file": str(sshd.key),
                    "known_hosts": str(sshd.known_hosts)}} if sshd else {})

    def edit(d):
        d["hosts"].append({"name": "obs", "address": "127.0.0.1", "config_dir": str(tmp_path / "etc" / "prometheus"),
                           **ssh})
        d["monitoring"].update(prometheus_host="obs", prometheus_port=prom_port, scrape_interval_s=17)
        d["monitoring"].pop("grafana_host")
        d["endpoints"][0]["api_key_env"] = "LOCAL_LLAMA_KEY"   # Prometheus gets a key file for its /metrics
        d.pop("gateway")
    return load_lab(lab_with(tmp_path, "local", edit))


@pytest.mark.parametrize("reach", ["local", "ssh"])
def test_prometheus_host_pushed_checked_reloaded_and_a_broken_file_put_back(tmp_path, reach, request):
    port = free_port()
    lab = obs_lab(tmp_path, port, request.getfixturevalue("sshd") if reach == "ssh" else None)
    ensure_keys(lab, "localhost")
    write_monitoring(render_monitoring(lab, {"localhost": host_keys("localhost")}))
    etc = tmp_path / "etc" / "prometheus"
    atomic_write(etc / "prometheus.yml", "global: {scrape_interval: 60s}\n")
    log = (tmp_path / "prom.log").open("wb")
    proc = subprocess.Popen(["prometheus", f"--config.file={etc / 'prometheus.yml'}", "--web.enable-lifecycle",
                             f"--web.listen-address=127.0.0.1:{port}", f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", proc=proc, timeout_s=60, log=tmp_path / "prom.log")
        result = deploy_host(lab, "obs")
        assert result.plan.target.startswith("obs:" if reach == "ssh" else str(tmp_path))
        assert any(f.rel == f"{etc}/prometheus.yml" and f.action == "update" for f in result.plan.files)
        assert (tmp_path / "etc" / "default" / "prometheus").read_text().count("--storage.tsdb.retention.time=7d") == 1
        assert "prometheus: `promtool check config" in result.services[0]
        assert result.services[1] == f"prometheus: POST http://127.0.0.1:{port}/-/reload: 200"
        config = httpx.get(f"http://127.0.0.1:{port}/api/v1/status/config", timeout=10).json()["data"]["yaml"]
        assert "scrape_interval: 17s" in config                         # the rendered file is what runs
        key = host_keys("localhost")["LOCAL_LLAMA_KEY"]
        (key_file,) = [p for p in etc.rglob("*") if p.is_file() and key in p.read_text()]
        # Debian's prometheus runs as user prometheus: its scrape credentials are 0640 to group prometheus,
        # readable by it (0600 root was not) and by no one else
        assert key_file.stat().st_mode & 0o777 == 0o640
        assert key_file.stat().st_gid == grp.getgrnam("prometheus").gr_gid
        for folder in [p for p in key_file.parents if str(p).startswith("/tmp/")]:
            folder.chmod(folder.stat().st_mode | 0o111)  # pytest's folders are 0700: let the users reach the file
        as_prometheus = subprocess.run(["runuser", "-u", "prometheus", "--", "cat", str(key_file)], capture_output=True)
        assert as_prometheus.returncode == 0 and as_prometheus.stdout.decode().strip() == key
        as_nobody = subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(key_file)], capture_output=True)
        assert as_nobody.returncode != 0 and b"Permission denied" in as_nobody.stderr
        assert all(key not in f.diff for f in result.plan.files)

        # a rendered file that promtool rejects: the run fails with its output, the host keeps the good file
        good = (etc / "prometheus.yml").read_bytes()
        rendered = host_dir("obs") / "prometheus" / "prometheus.yml"
        atomic_write(rendered, rendered.read_text().replace("scrape_interval: 17s", "scrape_interval: soon"))
        with pytest.raises(DeployError, match=r"promtool check config .* failed on the host after the push.*put back"
                                              r"[\s\S]*soon"):
            deploy_host(lab, "obs")
        assert (etc / "prometheus.yml").read_bytes() == good
    finally:
        stop_process_group(proc)
        log.close()


def test_placement_follows_debians_layout():
    files = {"nginx/ai-idp.conf": (b"server {}", 0o644), "prometheus/prometheus.yml": (b"x", 0o644),
             "prometheus/default": (b"ARGS=", 0o644), "grafana/provisioning/datasources/idp.yaml": (b"d", 0o644),
             "grafana/dashboards/ai-idp-inference.json": (b"{}", 0o644), ".env": (b"K=v", 0o600),
             "prometheus/keys/llm": (b"k", 0o600)}
    assert place(files, ["prometheus"], "/etc/prometheus") == {
        "/etc/default": {"prometheus": (b"ARGS=", 0o644)},
        "/etc/prometheus": {"prometheus.yml": (b"x", 0o644), "keys/llm": (b"k", 0o640)}}  # its key: group-readable
    assert key_groups(["prometheus", "grafana"], "/etc/prometheus") == {"/etc/prometheus": "prometheus"}
    assert place(files, ["grafana"], "/etc/grafana/provisioning") == {
        "/etc/grafana/provisioning": {"datasources/idp.yaml": (b"d", 0o644)},
        "/var/lib/grafana/dashboards/idp": {"ai-idp-inference.json": (b"{}", 0o644)}}
    assert place(files, ["nginx"], "/etc/nginx/sites-available") == {
        "/etc/nginx/sites-available": {"ai-idp.conf": (b"server {}", 0o644)}}
    assert site_link("/etc/nginx/sites-available", "ai-idp.conf") == (
        "/etc/nginx/sites-enabled/ai-idp.conf", "../sites-available/ai-idp.conf")


class _Grafana(BaseHTTPRequestHandler):
    """Grafana's admin provisioning API as far as the reload uses it: basic auth, POST, 200 + message."""

    calls: list[str] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        ok = self.headers.get("Authorization") == "Basic " + base64.b64encode(b"admin:s3cret-pass").decode()
        if not ok:
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"message":"invalid username or password"}')
            return
        self.calls.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"message":"Dashboards config reloaded"}')

    def log_message(self, *args):
        pass


def test_grafana_reload_with_admin_credentials_against_a_stand_in():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Grafana)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert reload_grafana(url, "admin", "s3cret-pass") == "Grafana reloaded its provisioned datasources and dashboards"
        assert _Grafana.calls == ["/api/admin/provisioning/datasources/reload",
                                  "/api/admin/provisioning/dashboards/reload"]
        with pytest.raises(DeployError, match="refused the admin credentials .*GRAFANA_ADMIN_PASSWORD"):
            reload_grafana(url, "admin", "wrong")
    finally:
        server.shutdown()
        server.server_close()
