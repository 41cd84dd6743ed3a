"""`idp up`: start the embedded lab (llama.cpp server, MLflow server, Dagster) and keep it running.

Each service runs in its own process group with its log under $IDP_HOME/logs. The launcher waits until
every service answers, prints the URLs, starts the main job (every asset and every partition, what the
UI's "Materialize all" does, in three backfills: everything but the measurements, then the
measurements, then what follows them, so a benchmark does not share the cores with the first
materialisation), and on Ctrl-C (SIGINT) or SIGTERM stops everything it started. A second `idp up` on the same IDP_HOME finds the first one's lock,
prints its URLs and leaves it alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from idp_pipelines import llama_tools, settings
from idp_pipelines.embedded.mlflow_server import server_argv
from idp_pipelines.processes import answers, stop_process_group
from idp_pipelines.lab import Lab, load_lab
from idp_pipelines.locks import LockTimeout, file_lock

TINY_MODEL_FILE = "tiny-llama-f32.gguf"
# Assets that measure the lab: the main job runs them after everything else, and what follows them after.
MEASUREMENT_ASSETS = ("benchmark_runs", "rpc_latency")

LAUNCH_BACKFILL = """
mutation($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on PartitionSetNotFoundError { message }
    ... on PartitionKeysNotFoundError { message }
    ... on UnauthorizedError { message }
  }
}"""
BACKFILL_STATUS = """
query($id: String!) { partitionBackfillOrError(backfillId: $id) { ... on PartitionBackfill { status } } }"""


class StackError(RuntimeError):
    """The embedded lab could not be started."""


@dataclass
class Service:
    name: str
    argv: list[str]
    ready_url: str
    ui_url: str
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log: Path | None = None


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _default_signals() -> None:
    """In the child: SIGINT and SIGTERM back to their defaults. A `make up &` from a script starts us
    with SIGINT ignored, the children inherit that across exec, and dagster dev then sat out SIGTERM
    for 20 s until it was killed."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _llama_server() -> Path:
    try:
        return llama_tools.tool("llama-server")
    except llama_tools.LlamaToolsError as exc:
        raise StackError(str(exc)) from None


def ensure_tiny_model(home: Path) -> Path:
    """The embedded endpoint's model, generated once from a fixed seed (deterministic bytes)."""
    from idp_pipelines.embedded.tiny_model import write_tiny_gguf

    path = home / "embedded" / TINY_MODEL_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tiny_gguf(path, seed=0, dtype="f32")
    return path


def ensure_hub_repos(lab: Lab, home: Path) -> dict[str, Path]:
    """The embedded Hub serves each generated model as a repo: the tiny model, as one F32 GGUF."""
    repos: dict[str, Path] = {}
    model_file = ensure_tiny_model(home)
    for model in lab.models:
        folder = home / "embedded" / "hub" / model.name
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / model_file.name
        if not target.exists():
            os.link(model_file, target)
        repos[model.repo_id] = folder
    return repos


def ensure_dagster_home(home: Path) -> Path:
    dh = home / "dagster"
    dh.mkdir(parents=True, exist_ok=True)
    src = settings.REPO_ROOT / "dagster.yaml"
    dst = dh / "dagster.yaml"
    if not dst.exists() or dst.read_bytes() != src.read_bytes():
        shutil.copyfile(src, dst)
    return dh


def plan_services(lab: Lab, home: Path, dagster_port: int) -> list[Service]:
    py = sys.executable
    services: list[Service] = []
    for ep in lab.endpoints:
        if not ep.embedded:
            continue
        if ep.kind != "llamacpp":
            raise StackError(f"{ep.name}: only llama.cpp endpoints can be embedded (kind is {ep.kind!r}). Fix: set "
                             f"embedded: false for it in the lab inventory, or kind: llamacpp.")
        host, port = _host_port(ep.base_url)
        model = ensure_tiny_model(home)
        env = {}
        if key := ep.api_key():
            # through llama-server's own variable, never argv: `ps` shows argv to every user
            env["LLAMA_API_KEY"] = key
        services.append(Service(
            name=f"llama.cpp ({ep.name})",
            argv=[str(_llama_server()), "-m", str(model), "--host", host, "--port", str(port),
                  "--alias", ep.served_model_name or ep.model or "model", "--no-webui", *ep.llamacpp.flags()],
            env=env, ready_url=f"{ep.base_url}/health", ui_url=f"{ep.base_url}/v1",
        ))
    if lab.hub.embedded:
        host, port = _host_port(lab.hub.endpoint)
        repos = ensure_hub_repos(lab, home)
        services.append(Service(
            name="Hub (local)",
            argv=[py, "-m", "idp_pipelines.embedded.hubserver", "--port", str(port),
                  *[arg for repo_id, folder in repos.items() for arg in ("--repo", f"{repo_id}={folder}")]],
            ready_url=f"{lab.hub.endpoint}/api/models/{next(iter(repos))}" if repos else lab.hub.endpoint,
            ui_url=lab.hub.endpoint,
        ))
    if lab.mlflow.embedded:
        host, port = _host_port(lab.mlflow.tracking_uri)
        store = home / "mlflow"
        store.mkdir(parents=True, exist_ok=True)
        services.append(Service(
            name="MLflow",
            argv=server_argv(host, port, store),
            # Without this, mlflow server starts a job runner: 15 processes and ~2.5 GB instead of 2 and 0.5.
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            ready_url=f"{lab.mlflow.tracking_uri}/health", ui_url=lab.mlflow.tracking_uri,
        ))
    dagster_home = ensure_dagster_home(home)
    services.append(Service(
        name="Dagster",
        argv=[py, "-m", "dagster", "dev", "-w", str(settings.REPO_ROOT / "workspace.yaml"),
              "-h", "127.0.0.1", "-p", str(dagster_port)],
        env={"DAGSTER_HOME": str(dagster_home)},
        ready_url=f"http://127.0.0.1:{dagster_port}/server_info", ui_url=f"http://127.0.0.1:{dagster_port}",
    ))
    return services


class Stack:
    def __init__(self, lab_path: Path, home: Path, dagster_port: int, out=None) -> None:
        out = out or (lambda message: print(message, flush=True))
        self.lab_path, self.home, self.dagster_port, self.out = lab_path, home, dagster_port, out
        self.services: list[Service] = []
        self._lock: contextlib.ExitStack | None = None
        self._stopping: str | None = None  # the signal that asked supervise() to stop

    @property
    def state_file(self) -> Path:
        return self.home / "up.json"

    def _acquire(self) -> bool:
        """Take IDP_HOME's up.lock for the life of this stack (False: another `idp up` holds it)."""
        held = contextlib.ExitStack()
        try:
            held.enter_context(file_lock(self.home / "up.lock", timeout_s=0, what="the embedded lab's lock",
                                         fix="it is already running", holder=f"idp up (pid {os.getpid()})"))
        except LockTimeout:
            return False
        self._lock = held
        return True

    def start(self, timeout_s: float = 300.0) -> dict[str, str]:
        if not self._acquire():
            urls = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
            self.out(f"The embedded lab is already running from IDP_HOME={self.home} (leaving it alone):")
            for name, url in urls.get("urls", {}).items():
                self.out(f"  {name:<22} {url}")
            return {}
        lab = load_lab(self.lab_path)
        self.services = plan_services(lab, self.home, self.dagster_port)
        for svc in self.services:
            host, port = _host_port(svc.ready_url)
            if not _port_free(host, port):
                raise StackError(
                    f"{svc.name} cannot start: {host}:{port} is already in use by another program. Fix: stop "
                    f"it, or change the port ({'IDP_DAGSTER_PORT' if svc.name == 'Dagster' else self.lab_path})."
                )
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "IDP_HOME": str(self.home), "IDP_LAB": str(self.lab_path)}
        for svc in self.services:
            svc.log = logs / (svc.name.split(" ")[0].lower().replace(".", "") + ".log")
            with open(svc.log, "ab") as log:
                svc.proc = subprocess.Popen(svc.argv, env={**env, **svc.env}, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=settings.REPO_ROOT, start_new_session=True,
                                            preexec_fn=_default_signals)
            self.out(f"started {svc.name} (pid {svc.proc.pid}, log {svc.log})")
        self._wait_ready(timeout_s)
        urls = {svc.name: svc.ui_url for svc in self.services}
        self.state_file.write_text(json.dumps({"pid": os.getpid(), "urls": urls}, indent=2))
        return urls

    def _wait_ready(self, timeout_s: float) -> None:
        t0 = time.monotonic()
        pending = list(self.services)
        while pending:
            for svc in list(pending):
                if svc.proc.poll() is not None:
                    tail = svc.log.read_text(errors="replace").splitlines()[-15:] if svc.log else []
                    raise StackError(f"{svc.name} exited with code {svc.proc.returncode} while starting. "
                                     f"Last lines of {svc.log}:\n" + "\n".join(tail))
                if answers(svc.ready_url):
                    self.out(f"{svc.name} answers after {time.monotonic() - t0:.1f} s")
                    pending.remove(svc)
            if pending and time.monotonic() - t0 > timeout_s:
                raise StackError(f"{', '.join(s.name for s in pending)} did not answer within {timeout_s:.0f} s; "
                                 f"see the logs under {self.home / 'logs'}.")
            time.sleep(0.5)

    def _graphql(self, query: str, variables: dict) -> dict:
        """One request to the webserver's GraphQL API (plain HTTP: the client library's helper is private)."""
        import httpx

        r = httpx.post(f"http://127.0.0.1:{self.dagster_port}/graphql", json={"query": query, "variables": variables},
                       timeout=60, trust_env=False)
        r.raise_for_status()
        body = r.json()
        if body.get("errors"):
            raise RuntimeError("; ".join(e.get("message", str(e)) for e in body["errors"]))
        return body["data"]

    def main_job_stages(self) -> list[tuple[str, list[str]]]:
        """The main job: every asset, every partition, as (title, asset keys) backfills run one after another.

        The measurements wait for everything else and what follows them waits for the measurements: the
        first materialisation of the lab (downloads, quantization, git sync, run start-ups) must not run on
        the cores a benchmark measures. Later runs (a sensor's, automation's) are not held back: the
        measurement records the host's load and flags a step measured under it."""
        from idp_pipelines.definitions import build_defs

        import dagster as dg

        graph = build_defs(load_lab(self.lab_path)).resolve_asset_graph()
        every = {k.to_user_string() for k in graph.materializable_asset_keys}
        measured = {k for k in MEASUREMENT_ASSETS if k in every}
        below = dg.AssetSelection.assets(*measured).downstream().resolve(graph) if measured else set()
        after = {k.to_user_string() for k in below} & every - measured
        # What follows the measurements also runs in the first stage (on what is there yet): left out, declarative
        # automation would start it once its other inputs landed, perhaps during a measurement.
        stages = [("everything but the measurements", sorted(every - measured)),
                  (f"the measurements ({', '.join(sorted(measured))})", sorted(measured)),
                  ("what follows the measurements", sorted(after))]
        return [(title, keys) for title, keys in stages if keys]

    def launch_backfill(self, title: str, keys: list[str]) -> str | None:
        """Backfill `keys`, every partition; returns the backfill id (None if Dagster never took it)."""
        params = {"assetSelection": [{"path": k.split("/")} for k in keys], "allPartitions": True,
                  "title": f"make up: {title}"}
        deadline = time.monotonic() + 90
        while True:
            try:
                out = self._graphql(LAUNCH_BACKFILL, {"backfillParams": params})["launchPartitionBackfill"]
                if out["__typename"] == "LaunchBackfillSuccess":
                    return out["backfillId"]
                raise RuntimeError(out.get("message") or out)
            except Exception as exc:  # the code location may still be loading
                if self._stopping or time.monotonic() > deadline:
                    self.out(f"could not launch the backfill of {title}: {exc}")
                    return None
                time.sleep(1.0)

    def backfill_status(self, backfill_id: str) -> str | None:
        out = self._graphql(BACKFILL_STATUS, {"id": backfill_id})["partitionBackfillOrError"]
        return out.get("status")

    def stop(self) -> None:
        # all get SIGTERM first, so they wind down in parallel; then each is waited for (and killed)
        for svc in reversed(self.services):
            if svc.proc and svc.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(svc.proc.pid, signal.SIGTERM)
        for svc in self.services:
            if svc.proc and not stop_process_group(svc.proc, timeout_s=20):
                self.out(f"{svc.name} ignored SIGTERM for 20 s and was killed")
        if self._lock is not None:
            self.state_file.unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    def supervise(self, stages: list[tuple[str, list[str]]] | None = None) -> int:
        """Block until a signal or until a service dies, running the main job's stages one after another;
        returns the exit code."""
        def on_signal(signum, _frame):
            self._stopping = signal.Signals(signum).name

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        pending, current, next_poll = list(stages or []), None, 0.0
        while self._stopping is None:
            for svc in self.services:
                if svc.proc.poll() is not None:
                    self.out(f"{svc.name} exited with code {svc.proc.returncode}; see {svc.log}. Stopping the lab.")
                    return 1
            if (pending or current) and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + 2.0
                current = self._advance_main_job(pending, current)
            time.sleep(0.5)
        self.out(f"{self._stopping}: stopping the embedded lab")
        return 0

    def _advance_main_job(self, pending: list[tuple[str, list[str]]], current: tuple[str, str] | None):
        """Poll the running stage; when it has ended, launch the next one. Returns the running stage."""
        if current is not None:
            title, backfill = current
            try:
                status = self.backfill_status(backfill)
            except Exception as exc:  # a busy webserver: ask again at the next poll
                self.out(f"main job: could not read the status of {title}: {exc}")
                return current
            if status in (None, "REQUESTED", "CANCELING", "FAILING"):
                return current
            self.out(f"main job: {title} ended {status}")
        if not pending:
            self.out("main job: done")
            return None
        title, keys = pending.pop(0)
        backfill = self.launch_backfill(title, keys)
        if backfill is None:
            pending.clear()
            return None
        self.out(f"main job: {title}  http://127.0.0.1:{self.dagster_port}/runs/b/{backfill}")
        return title, backfill


def up(*, lab_path: Path | None = None, home: Path | None = None, dagster_port: int | None = None,
       run_main_job: bool = True) -> int:
    lab_path = lab_path or settings.lab_path()
    home = home or settings.idp_home()
    dagster_port = dagster_port or int(os.environ.get("IDP_DAGSTER_PORT", "3000"))
    stack = Stack(lab_path, home, dagster_port)
    t0 = time.monotonic()

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # Until supervise() takes over, SIGTERM must unwind through `finally` like Ctrl-C does.
    signal.signal(signal.SIGTERM, interrupt)
    try:
        urls = stack.start()
        if not urls:
            return 0
        print(f"\nThe embedded lab is up after {time.monotonic() - t0:.1f} s (IDP_HOME={home}, IDP_LAB={lab_path}):")
        for name, url in urls.items():
            print(f"  {name:<22} {url}")
        print("Ctrl-C stops everything.", flush=True)
        return stack.supervise(stack.main_job_stages() if run_main_job else None)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if stack.services:
            stack.stop()
            print("stopped.", flush=True)
