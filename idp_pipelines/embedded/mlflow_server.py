"""A throwaway `mlflow server` on 127.0.0.1 for tests and benchmarks, started the way `make up` starts it.

A new SQLite store costs ~4-8 s of migrations; `migrated_template` makes one per MLflow version and
`local_mlflow_server` starts from a copy of it (the server then answers in ~5 s instead of ~11 s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from idp_pipelines.processes import free_port, stop_process_group, wait_http


def server_argv(host: str, port: int, store: Path) -> list[str]:
    """`mlflow server` with one worker: ~0.5 GB and 2 processes (the default starts 15 and ~2.5 GB)."""
    return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination", str(store / "artifacts")]


def migrated_template(folder: Path) -> Path:
    """A fully migrated, empty SQLite tracking store under `folder`, made once per MLflow version."""
    from importlib.metadata import version

    db = folder / f"mlflow-{version('mlflow')}.db"
    if db.exists():
        return db
    folder.mkdir(parents=True, exist_ok=True)
    tmp = db.with_suffix(f".{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    code = ("import sys; from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore; "
            "SqlAlchemyStore('sqlite:///' + sys.argv[1], sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp), str(folder / "unused-artifacts")], check=True,
                   capture_output=True, timeout=300)
    os.replace(tmp, db)  # atomic: a concurrent session sees no half-migrated template
    return db


@contextlib.contextmanager
def local_mlflow_server(store: Path, *, template: Path | None = None, timeout_s: float = 120.0,
                        port: int | None = None) -> Iterator[str]:
    """Start `mlflow server` on 127.0.0.1 (a free port unless given) with its store under `store`; yields its URL."""
    store.mkdir(parents=True, exist_ok=True)
    if template is not None and not (store / "mlflow.db").exists():
        shutil.copyfile(template, store / "mlflow.db")
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = store / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "NO_PROXY": "127.0.0.1,localhost"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(server_argv("127.0.0.1", port, store), env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"{url}/health", proc=proc, timeout_s=timeout_s, log=log, poll_s=0.2)
        yield url
    finally:
        stop_process_group(proc, timeout_s=15)
