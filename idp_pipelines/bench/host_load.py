"""How busy the measuring host was with OTHER work during a step (psutil), so a step measured under
load is flagged instead of trusted.

The harness's own process and, for an endpoint on this machine, the server's processes are left out:
their CPU is the measurement. What is left (other Dagster runs, a build, a browser) competes with both
for the cores and shows up as tail latency that is not the server's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

__all__ = ["HostLoad", "HostLoadMeter", "local_server_pids"]

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
_TOP = 3


@dataclass
class HostLoad:
    """CPU used by other processes over one step: mean cores busy, and the busiest of them."""

    other_cpu_cores: float | None
    wall_s: float
    cores: int
    top: list[dict[str, Any]] = field(default_factory=list)  # [{"pid", "name", "cpu_cores"}]
    excluded_pids: list[int] = field(default_factory=list)
    error: str | None = None

    def describe(self) -> str:
        if self.other_cpu_cores is None:
            return f"host load unknown ({self.error})"
        who = ", ".join(f"{t['name']} (pid {t['pid']}) {t['cpu_cores']:.2f}" for t in self.top)
        return f"other processes used {self.other_cpu_cores:.2f} of {self.cores} cores" + (f": {who}" if who else "")


def local_server_pids(base_url: str) -> list[int]:
    """The processes (and their children) listening on the endpoint's port when it is on this machine."""
    import psutil

    parts = urlsplit(base_url)
    if (parts.hostname or "") not in _LOOPBACK:
        return []
    port = parts.port or (443 if parts.scheme == "https" else 80)
    pids: set[int] = set()
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, PermissionError):
        return []
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            pids.add(c.pid)
    # A server in the harness's own process (a test double) brings no children: the harness's children
    # are other work (a build, a test's busy loop), which is exactly what must be counted.
    for pid in list(pids - {os.getpid()}):
        try:
            pids.update(ch.pid for ch in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    return sorted(pids)


def _proc_cpu() -> dict[int, tuple[str, float]]:
    import psutil

    out: dict[int, tuple[str, float]] = {}
    for p in psutil.process_iter(["name", "cpu_times"]):
        t = p.info.get("cpu_times")
        if t is not None:
            out[p.pid] = (p.info.get("name") or "?", t.user + t.system)
    return out


class HostLoadMeter:
    """start() before the measured phase, stop() after; the scans run outside the timed requests."""

    def __init__(self, exclude_pids: list[int] | None = None) -> None:
        self.exclude = {os.getpid(), *(exclude_pids or [])}
        self._t0 = 0.0
        self._busy0 = 0.0
        self._procs0: dict[int, tuple[str, float]] = {}
        self._error: str | None = None

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        # guest time is already in user/nice; steal is another VM's, not a process of this host
        return sum(t) - t.idle - sum(getattr(t, f, 0.0) for f in ("iowait", "guest", "guest_nice", "steal"))

    def start(self) -> None:
        import time

        try:
            self._procs0 = _proc_cpu()
            self._busy0 = self._busy()
        except Exception as exc:  # noqa: BLE001 - no load figure costs the flag, never the step
            self._error = f"{type(exc).__name__}: {exc}"
        self._t0 = time.monotonic()

    def stop(self) -> HostLoad:
        import time

        import psutil

        wall = time.monotonic() - self._t0
        cores = psutil.cpu_count() or 1
        if self._error or wall <= 0:
            return HostLoad(None, wall, cores, error=self._error or "step too short")
        try:
            busy = self._busy() - self._busy0
            procs1 = _proc_cpu()
        except Exception as exc:  # noqa: BLE001
            return HostLoad(None, wall, cores, error=f"{type(exc).__name__}: {exc}")
        excluded = 0.0
        per: list[tuple[float, int, str]] = []
        for pid, (name, cpu1) in procs1.items():
            name0, cpu0 = self._procs0.get(pid, (name, 0.0))
            used = max(0.0, cpu1 - cpu0)
            if pid in self.exclude:
                excluded += used
            elif used > 0:
                per.append((used, pid, name))
        # system-wide busy time minus ours and the server's; processes that ended during the step are
        # in the system figure but not in any scan, which is why this is not a sum over processes
        other = max(0.0, busy - excluded)
        per.sort(reverse=True)
        top = [{"pid": pid, "name": name, "cpu_cores": round(used / wall, 3)} for used, pid, name in per[:_TOP]]
        return HostLoad(other / wall, wall, cores, top, sorted(self.exclude))
