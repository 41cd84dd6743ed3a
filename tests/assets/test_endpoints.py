from __future__ import annotations

import dagster as dg

from idp_pipelines.assets import endpoints
from idp_pipelines.assets.endpoints import ENDPOINTS_UP
from idp_pipelines.lab import load_lab
from idp_pipelines.resources import LabResource, WarehouseResource
from idp_pipelines.warehouse import Warehouse
from tests.support import free_port, write_lab


def _materialize(lab_file, wh_path):
    (inference_endpoints,) = endpoints.build(load_lab(lab_file)).assets
    return dg.materialize(
        [inference_endpoints],
        resources={"lab": LabResource(path=str(lab_file)), "warehouse": WarehouseResource(path=str(wh_path))},
        raise_on_error=False,
    )


def _check(result) -> dg.AssetCheckEvaluation:
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == ENDPOINTS_UP]
    return evaluation


def test_probes_real_llama_cpp_server_into_duckdb(tmp_path, llama_base_url):
    lab = write_lab(tmp_path / "lab.yaml", endpoint_url=llama_base_url)
    wh = tmp_path / "wh.duckdb"
    result = _materialize(lab, wh)
    assert result.success
    assert _check(result).passed
    (mat,) = result.asset_materializations_for_node("inference_endpoints")
    assert mat.metadata["up"].value == 1 and mat.metadata["down"].value == []
    assert "local-llamacpp" in mat.metadata["probes"].value
    with Warehouse(wh).read() as con:
        row = con.execute("SELECT endpoint, up, served_models, model_served, probes, rtt_p50_ms, dagster_run_id "
                          "FROM endpoint_probes").fetchone()
    assert row[:5] == ("local-llamacpp", True, ["tiny-llama"], True, 5)
    assert 0 < row[5] < 5000 and row[6] == result.run_id


def test_check_fails_against_a_dead_port_and_the_row_is_kept(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    lab = write_lab(tmp_path / "lab.yaml", endpoint_url=dead)
    wh = tmp_path / "wh.duckdb"
    result = _materialize(lab, wh)
    assert result.success  # a dead endpoint is a finding, not a crash
    check = _check(result)
    assert not check.passed and check.severity == dg.AssetCheckSeverity.ERROR
    assert "local-llamacpp: cannot connect to" in check.description and dead in check.description
    with Warehouse(wh).read() as con:
        assert con.execute("SELECT up, error IS NOT NULL FROM endpoint_probes").fetchall() == [(False, True)]


def test_refused_api_key_is_reported_without_the_key(tmp_path, monkeypatch):
    from idp_pipelines.lab import Endpoint
    from idp_pipelines.probe import probe_endpoint
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    class Refuse(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ep = Endpoint(name="v", kind="vllm", host="h", base_url=f"http://127.0.0.1:{server.server_port}",
                      api_key_env="VLLM_API_KEY")
        r = probe_endpoint(ep, api_key="sk-secret-123")
    finally:
        server.shutdown()
    assert not r.up and r.status_code == 401
    assert "API key was refused (set VLLM_API_KEY)" in r.error
    assert "sk-secret-123" not in repr(r.row())
