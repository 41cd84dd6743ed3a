"""The deploy job and the drift sensor on a real Dagster instance, against the tests' own dockerd."""

from __future__ import annotations

import dagster as dg
import httpx
import yaml
from dagster._serdes import serialize_value

from idp_pipelines.assets import deploy
from idp_pipelines.processes import free_port
from idp_pipelines.files import atomic_write
from idp_pipelines.lab import load_lab
from idp_pipelines.resources import LabResource, WarehouseResource
from idp_pipelines.settings import idp_home
from idp_pipelines.warehouse import Warehouse
from tests.deploy.conftest import lab_with
from tests.support_docker import BUSYBOX_IMAGE, httpd_service

KEY = "5e" * 32
HOST = "localhost"


def stand_in_lab(tmp_path, engine_url: str, port: int, side: int, auto_repair: bool = False):
    """labs/local.yaml with its Docker target on the tests' engine: the endpoint is a busybox stand-in."""
    def edit(d):
        d["hosts"][0].update(docker_host=engine_url, config_dir=str(tmp_path / "config"))
        d["endpoints"][0].update(base_url=f"http://127.0.0.1:{port}", api_key_env="STANDIN_API_KEY")
        d["services"] = [
            {"name": "local-llamacpp", "kind": "llamacpp", "host": HOST, "endpoint": "local-llamacpp",
             "image": BUSYBOX_IMAGE.split(":")[0], "tag": "1", "ports": [{"name": "http", "container": port}]},
            {"name": "sidecar", "kind": "node-exporter", "host": HOST, "image": BUSYBOX_IMAGE.split(":")[0],
             "tag": "1", "ports": [{"name": "metrics", "container": side, "host": side}]}]
        d.pop("gateway"), d.pop("monitoring")
        d["deploy"] = {"auto_repair": auto_repair, "drift_interval_s": 30}
    return lab_with(tmp_path, "local", edit)


def render_stand_in(port: int, side: int, say: str = "ok") -> None:
    """What service_secrets and service_configs leave for the host (their own tests render the real ones)."""
    root = idp_home() / "deploy" / HOST
    llama = httpd_service(port, say=say)
    llama["env_file"] = [".env"]
    compose = {"name": f"idp-{HOST}", "services": {"local-llamacpp": llama, "sidecar": httpd_service(side)}}
    atomic_write(root / "compose.yaml", "# rendered\n" + yaml.safe_dump(compose, sort_keys=False))
    atomic_write(root / ".env", f"STANDIN_API_KEY={KEY}\n", mode=0o600)


def run(instance, lab_file, dry_run=False):
    asset = next(a for a in deploy.build(load_lab(lab_file)).assets if a.key.to_user_string() == "deployed_state")
    return dg.materialize([asset], partition_key=HOST, instance=instance, raise_on_error=False,
                          run_config={"ops": {"deployed_state": {"config": {"dry_run": dry_run}}}},
                          resources={"lab": LabResource(path=str(lab_file)),
                                     "warehouse": WarehouseResource(path=str(idp_home() / "warehouse.duckdb"))})


def tick(instance, lab_file, cursor):
    """One evaluation of the drift sensor as the daemon runs it (evaluate_tick with its resources)."""
    defs = deploy.build(load_lab(lab_file))
    sensor = next(s for s in defs.sensors if s.name == deploy.DRIFT_SENSOR)
    repo = dg.Definitions.merge(defs, dg.Definitions(resources={
        "lab": LabResource(path=str(lab_file)), "warehouse": WarehouseResource(path=str(idp_home() / "w.duckdb"))}))
    return sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor,
                                                        repository_def=repo.get_repository_def(),
                                                        resources={"lab": LabResource(path=str(lab_file))}))


def observations(instance):
    recs = instance.fetch_observations(dg.AssetKey("deployed_state"), limit=100).records
    return [r.asset_observation.metadata for r in recs]


def test_dry_run_then_deploy_then_drift_reported_and_no_key_in_any_event(tmp_path, engine, client):
    port, side = free_port(), free_port()
    lab_file = stand_in_lab(tmp_path, engine.url, port, side)
    render_stand_in(port, side)
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        dry = run(instance, lab_file, dry_run=True)
        assert dry.success
        assert client.containers.list(all=True) == []                  # nothing on the engine
        assert not (tmp_path / "config").exists()                       # nothing pushed
        assert not dry.get_asset_materialization_events()               # nothing recorded
        plan = observations(instance)[0]["plan"].value
        assert "create  compose.yaml" in plan and "+  local-llamacpp:" in plan
        assert "(secret file .env: values not shown) STANDIN_API_KEY: added" in plan
        assert "create   idp-localhost-local-llamacpp-1" in plan and "create   idp-localhost-sidecar-1" in plan

        done = run(instance, lab_file)
        assert done.success, done.all_events
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["data"][0]["id"] == "tiny-llama"
        assert (tmp_path / "config" / ".env").stat().st_mode & 0o777 == 0o600
        # the plan is in the run's events before the first change
        logs = instance.all_logs(done.run_id)
        plan_at = next(i for i, e in enumerate(logs)
                       if e.dagster_event is not None and e.dagster_event.event_type_value == "ASSET_OBSERVATION")
        wrote_at = next(i for i, e in enumerate(logs) if "wrote compose.yaml" in (e.user_message or ""))
        assert plan_at < wrote_at
        meta = done.get_asset_materialization_events()[0].materialization.metadata
        ids = meta["container_ids"].value
        assert set(ids) == {"idp-localhost-local-llamacpp-1", "idp-localhost-sidecar-1"}
        with Warehouse(idp_home() / "warehouse.duckdb").read() as con:
            rows = con.execute("SELECT kind, name, status, health, settings FROM deployed_state ORDER BY name").fetchall()
        assert ("container", "idp-localhost-sidecar-1", "running", "healthy", None) in rows
        assert ("file", ".env") in {r[:2] for r in rows} and ("file", "compose.yaml") in {r[:2] for r in rows}
        assert '"parallel": 4' in next(r[4] for r in rows if r[1] == "idp-localhost-local-llamacpp-1")

        # the spec of one service changes: only its container is replaced
        render_stand_in(port, side, say="v2")
        again = run(instance, lab_file)
        assert again.success
        now = {c.name: c.id[:12] for c in client.containers.list()}
        assert now["idp-localhost-sidecar-1"] == ids["idp-localhost-sidecar-1"]
        assert now["idp-localhost-local-llamacpp-1"] != ids["idp-localhost-local-llamacpp-1"]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).text.strip() == "v2"

        # the drift sensor: nothing drifted yet
        first = tick(instance, lab_file, None)
        assert not first.run_requests and not first.asset_events
        cursor = first.cursor
        assert yaml.safe_load(cursor) == {HOST: ""}

        # by hand: compose.yaml edited on the host, the sidecar stopped
        deployed = tmp_path / "config" / "compose.yaml"
        deployed.write_text(deployed.read_text().replace("exec httpd", "exec  httpd"))
        client.containers.get("idp-localhost-sidecar-1").stop(timeout=1)
        drifted = tick(instance, lab_file, cursor)
        assert not drifted.run_requests                                     # auto_repair is off
        (obs,) = drifted.asset_events
        drift = obs.metadata["drift"].value
        assert "| file | compose.yaml | edited |" in drift
        assert "| container | idp-localhost-sidecar-1 | stopped |" in drift
        assert "exec  httpd" in obs.metadata["detail"].value                # the difference itself
        assert yaml.safe_load(drifted.cursor)[HOST] not in ("", None) and drifted.cursor != cursor
        # the same drift on the next tick: no new observation, same cursor
        same = tick(instance, lab_file, drifted.cursor)
        assert not same.asset_events and same.cursor == drifted.cursor and "no change in drift" in same.skip_message

        # with deploy.auto_repair, the drift requests a re-deploy of the host
        repair_lab = stand_in_lab(tmp_path, engine.url, port, side, auto_repair=True)
        rep = tick(instance, repair_lab, cursor)
        (req,) = rep.run_requests
        assert req.partition_key == HOST and req.run_key.startswith(f"repair:{HOST}:")
        fixed = run(instance, repair_lab)
        assert fixed.success
        assert client.containers.get("idp-localhost-sidecar-1").status == "running"
        assert "exec  httpd" not in deployed.read_text()

        # no key in anything the instance recorded
        runs = instance.get_runs()
        assert len(runs) == 4
        for r in runs:
            for rec in instance.all_logs(r.run_id):
                assert KEY not in serialize_value(rec)
        for md in observations(instance):
            assert KEY not in serialize_value(md)
