"""The real validators: the Compose Specification's JSON schema, `nginx -t`, `promtool`, and Grafana JSON.

Each returns a `Verdict` (passed, the tool's own text, seconds it took); a missing tool is a DeployError
that says what to install, never a silent pass.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from . import DeployError

TOOL_TIMEOUT_S = 120


@dataclass
class Verdict:
    name: str
    passed: bool
    errors: list[str] = field(default_factory=list)
    output: str = ""
    seconds: float = 0.0
    tool_seconds: float = 0.0   # of which: the validator processes (start-up included)

    def text(self) -> str:
        return "; ".join(self.errors) if self.errors else (self.output.strip().splitlines() or ["ok"])[-1]


def _tool(name: str, package: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        raise DeployError(f"{name} is not installed, so the {name} check cannot run. Fix: apt-get install {package} "
                          f"(make install does it).")
    return path


def _run(cmd: list[str], **kw) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, **kw)
    return proc, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ compose


@functools.lru_cache(maxsize=1)
def _compose_validator():
    import jsonschema

    try:
        ref = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
        schema = json.loads(ref.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise DeployError(f"the Compose Specification schema is not available ({exc}). Fix: pip install "
                          f"check-jsonschema (it ships a copy of compose-spec.json).") from None
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def check_compose(text: str, where: str) -> Verdict:
    """A compose file against the Compose Specification's JSON schema (docker-compose v1 is no judge:
    it rejects keys the spec allows, and the lab runs Compose v2)."""
    t0 = time.perf_counter()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return Verdict("compose_schema", False, [f"{where}: not YAML: {exc}"], seconds=time.perf_counter() - t0)
    errors = []
    for err in sorted(_compose_validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        at = ".".join(str(p) for p in err.absolute_path) or "(top level)"
        errors.append(f"{where}: {at}: {err.message}")
    return Verdict("compose_schema", not errors, errors, output="valid against the Compose Specification",
                   seconds=time.perf_counter() - t0)


# -------------------------------------------------------------------------------------------- nginx


_IP = re.compile(r"^(\d{1,3}(\.\d{1,3}){3}|\[?[0-9a-fA-F:]+\]?)$")


def check_nginx(site: str, *, certificate: str, key: str, host_names: list[str]) -> Verdict:
    """`nginx -t` on the site file inside a throwaway prefix: a self-signed certificate stands in for the
    real one, and the lab's host names resolve through a private /etc/hosts (a mount namespace), so an
    upstream naming a host that is not in the lab still fails as it would on the gateway."""
    nginx, openssl, unshare = _tool("nginx", "nginx"), _tool("openssl", "openssl"), _tool("unshare", "util-linux")
    t0 = time.perf_counter()
    tool_s = 0.0
    with tempfile.TemporaryDirectory(prefix="idp-nginx-") as tmp:
        root = Path(tmp)
        (root / "tmp").mkdir()
        # an EC key: RSA-2048 generation alone took 0.14 s here, P-256 7 ms; nginx -t only loads it
        proc, s = _run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                        "-days", "1", "-subj", "/CN=idp-check",
                        "-keyout", str(root / "key.pem"), "-out", str(root / "cert.pem")])
        tool_s += s
        if proc.returncode != 0:
            raise DeployError(f"openssl could not make the throwaway certificate: {proc.stderr.strip()}")
        sandboxed = site.replace(certificate, str(root / "cert.pem")).replace(key, str(root / "key.pem"))
        (root / "site.conf").write_text(sandboxed)
        (root / "nginx.conf").write_text(
            f"pid {root}/nginx.pid;\nerror_log {root}/error.log;\nevents {{}}\nhttp {{\n    access_log off;\n"
            f"    client_body_temp_path {root}/tmp;\n    proxy_temp_path {root}/tmp;\n    fastcgi_temp_path {root}/tmp;\n"
            f"    uwsgi_temp_path {root}/tmp;\n    scgi_temp_path {root}/tmp;\n    include {root}/site.conf;\n}}\n")
        names = sorted({n for n in host_names if not _IP.match(n)})
        (root / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n" + "".join(f"127.0.0.1 {n}\n" for n in names))
        test = f"mount --bind {root}/hosts /etc/hosts && exec {nginx} -t -p {root} -c {root}/nginx.conf -e {root}/error.log"
        cmd = [unshare, "-m", "sh", "-c", test] if os.geteuid() == 0 else [unshare, "-rm", "sh", "-c", test]
        proc, s = _run(cmd)
        tool_s += s
        out = (proc.stdout + proc.stderr).replace(str(root), "<sandbox>")
    errors = [line for line in out.splitlines() if "[emerg]" in line or "failed" in line]
    return Verdict("nginx_t", proc.returncode == 0, [] if proc.returncode == 0 else errors or [out.strip()],
                   output=out, seconds=time.perf_counter() - t0, tool_seconds=tool_s)


# ----------------------------------------------------------------------------------------- promtool


def check_prometheus_config(prometheus_yml: Path) -> Verdict:
    """`promtool check config` (it also checks every rule file and credentials file the config names)."""
    promtool = _tool("promtool", "prometheus")
    t0 = time.perf_counter()
    proc, s = _run([promtool, "check", "config", prometheus_yml.name], cwd=prometheus_yml.parent)
    out = proc.stdout + proc.stderr
    errors = [line.strip() for line in out.splitlines() if "FAILED" in line or "error" in line.lower()]
    return Verdict("promtool_check_config", proc.returncode == 0, [] if proc.returncode == 0 else errors or [out],
                   output=out, seconds=time.perf_counter() - t0, tool_seconds=s)


def check_rules(paths: list[Path]) -> Verdict:
    promtool = _tool("promtool", "prometheus")
    t0 = time.perf_counter()
    proc, s = _run([promtool, "check", "rules", *map(str, paths)])
    out = proc.stdout + proc.stderr
    lines = out.splitlines()
    errors = [line.strip() for line in lines if re.search(r"could not parse|error|FAILED:\s*\S", line)]
    return Verdict("promtool_check_rules", proc.returncode == 0, [] if proc.returncode == 0 else errors or [out],
                   output=out, seconds=time.perf_counter() - t0, tool_seconds=s)


# ------------------------------------------------------------------------------------ metric names


@functools.lru_cache(maxsize=1)
def pinned_metrics() -> dict[str, str]:
    """{metric name: exporter} from the pinned lists in deploy/metrics/*.txt (histograms expanded)."""
    out: dict[str, str] = {}
    for ref in sorted(resources.files("idp_pipelines.deploy.metrics").iterdir(), key=lambda r: r.name):
        if not ref.name.endswith(".txt"):
            continue
        for line in ref.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, kind = line.split()
            exporter = ref.name.removesuffix(".txt")
            out[name] = exporter
            if kind == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    out[name + suffix] = exporter
    return out


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                 "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, aggregations, labels and ranges left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)                  # strings
    text = re.sub(r"\{[^}]*\}", "", text)                           # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                          # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)\b(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


def substitute_grafana_vars(expr: str, scrape_interval_s: int) -> str:
    """Grafana's variables replaced by what it sends Prometheus ($__rate_interval is >= 4 scrape intervals)."""
    rate = f"{4 * scrape_interval_s}s"
    for var, value in (("$__rate_interval", rate), ("${__rate_interval}", rate), ("$__interval", f"{scrape_interval_s}s"),
                       ("${__interval}", f"{scrape_interval_s}s"), ("$__range", "1h")):
        expr = expr.replace(var, value)
    return expr


def check_grafana(dashboard_text: str, provisioned_uids: set[str], scrape_interval_s: int,
                  exporters: set[str]) -> Verdict:
    """Unique uids and panel ids, every datasource uid provisioned, every query's metrics in the pinned
    lists of the lab's exporters, and every query parsed by promtool (wrapped as a recording rule)."""
    t0 = time.perf_counter()
    errors: list[str] = []
    try:
        dash = json.loads(dashboard_text)
    except ValueError as exc:
        return Verdict("grafana_dashboard", False, [f"dashboard is not JSON: {exc}"], seconds=time.perf_counter() - t0)
    ids: dict[int, str] = {}
    for panel in dash.get("panels", []):
        pid, title = panel.get("id"), panel.get("title", "?")
        if pid in ids:
            errors.append(f"panel id {pid} is used by {ids[pid]!r} and {title!r}")
        ids.setdefault(pid, title)
    pinned = pinned_metrics()
    rules = []
    for panel in dash.get("panels", []):
        title = panel.get("title", "?")
        refs = [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]
        for ref in refs:
            if isinstance(ref, dict) and ref.get("uid") not in provisioned_uids:
                errors.append(f"panel {title!r}: datasource uid {ref.get('uid')!r} is not provisioned "
                              f"(provisioned: {sorted(provisioned_uids)})")
        for t in panel.get("targets", []):
            expr = t.get("expr", "")
            for name in sorted(metric_names(expr)):
                exporter = pinned.get(name)
                if exporter is None:
                    errors.append(f"panel {title!r}: metric {name!r} is in no pinned exporter list "
                                  f"(idp_pipelines/deploy/metrics/*.txt)")
                elif exporter not in exporters:
                    errors.append(f"panel {title!r}: metric {name!r} comes from {exporter}, which the lab does not run")
            rules.append({"record": f"idp:panel_{panel.get('id')}_{t.get('refId', 'A')}",
                          "expr": substitute_grafana_vars(expr, scrape_interval_s)})
    if not dash.get("uid"):
        errors.append("the dashboard has no uid (Grafana would give it a new one at every provisioning)")
    tool_s = 0.0
    if rules:
        with tempfile.TemporaryDirectory(prefix="idp-promql-") as tmp:
            path = Path(tmp) / "grafana-queries.yml"
            path.write_text(yaml.safe_dump({"groups": [{"name": "grafana-queries", "rules": rules}]}, sort_keys=False))
            parsed = check_rules([path])
            tool_s = parsed.tool_seconds
            if not parsed.passed:
                errors += [e.replace(str(path), "grafana query") for e in parsed.errors]
    return Verdict("grafana_dashboard", not errors, errors, output=f"{len(ids)} panels, {len(rules)} queries parsed",
                   seconds=time.perf_counter() - t0, tool_seconds=tool_s)


def check_grafana_files(dashboards: dict[str, str], provisioned_uids: set[str], scrape_interval_s: int,
                        exporters: set[str]) -> Verdict:
    """check_grafana over several dashboards, plus dashboard uids unique across them."""
    verdicts = [check_grafana(text, provisioned_uids, scrape_interval_s, exporters) for text in dashboards.values()]
    errors = [f"{name}: {e}" for name, v in zip(dashboards, verdicts) for e in v.errors]
    seen: dict[str, str] = {}
    for name, text in dashboards.items():
        try:
            uid = json.loads(text).get("uid")
        except ValueError:
            continue
        if uid in seen:
            errors.append(f"dashboard uid {uid!r} is used by both {seen[uid]} and {name}")
        seen.setdefault(uid, name)
    return Verdict("grafana_dashboard", not errors, errors, output="; ".join(v.output for v in verdicts),
                   seconds=sum(v.seconds for v in verdicts), tool_seconds=sum(v.tool_seconds for v in verdicts))
