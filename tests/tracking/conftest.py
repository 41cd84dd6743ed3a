"""One real `mlflow server` on 127.0.0.1 for the session, started from a copy of a migrated store."""

from __future__ import annotations

import uuid

import pytest

from idp_pipelines.embedded.mlflow_server import local_mlflow_server, migrated_template
from idp_pipelines.warehouse import Warehouse


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, request) -> str:
    # The migrated empty store is kept in pytest's cache (one per MLflow version): a new store costs
    # ~8 s of migrations, a copy costs nothing. Each session copies it, so sessions never share runs.
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    template = migrated_template(cache.mkdir("mlflow-store") if cache else tmp_path_factory.mktemp("template"))
    with local_mlflow_server(tmp_path_factory.mktemp("mlflow-store"), template=template) as url:
        yield url


@pytest.fixture
def prefix() -> str:
    """Experiments of their own per test: tests share the server, never a run."""
    return f"t{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def warehouse(tmp_path) -> Warehouse:
    return Warehouse(tmp_path / "warehouse.duckdb")


@pytest.fixture
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server)
