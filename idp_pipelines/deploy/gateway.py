"""The NGINX gateway: TLS, HTTP to HTTPS, one upstream per routed endpoint, streaming-safe proxying."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from idp_pipelines.lab import Lab

from . import DeployError

SITE_FILE = "nginx/ai-idp.conf"


def _upstream_name(endpoint: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", endpoint) + "_backend"


def upstream_target(lab: Lab, endpoint: str) -> str:
    """host:port nginx connects to: the endpoint's host address and the port its service publishes."""
    ep = lab.endpoint(endpoint)
    host = urlsplit(ep.base_url).hostname
    return f"{host}:{ep.port}"


def render_gateway(lab: Lab) -> str:
    gw = lab.gateway
    if gw is None:
        raise DeployError("the inventory has no gateway: section. Fix: add one (server_names, tls, lan_cidrs, "
                          "routes), see labs/schlimers.yaml.")
    allow = "".join(f"        allow {c};\n" for c in gw.lan_cidrs)
    lines = [f"# Rendered by idp_pipelines (gateway_config) for {gw.host}. Do not edit: change lab.yaml.",
             f"# TLS: {gw.tls.issuer or 'see gateway.tls in lab.yaml'}.", ""]
    for route in gw.routes:
        lines += [f"upstream {_upstream_name(route.endpoint)} {{",
                  f"    server {upstream_target(lab, route.endpoint)};",
                  f"    keepalive {gw.keepalive};", "}", ""]
    names = " ".join(gw.server_names)
    lines += ["server {", "    listen 80;", "    listen [::]:80;", f"    server_name {names};",
              "    return 301 https://$host$request_uri;", "}", "",
              "server {", "    listen 443 ssl http2;", "    listen [::]:443 ssl http2;", f"    server_name {names};",
              f"    ssl_certificate {gw.tls.certificate};", f"    ssl_certificate_key {gw.tls.key};",
              "    ssl_protocols TLSv1.2 TLSv1.3;", "    ssl_prefer_server_ciphers off;",
              f"    client_max_body_size {gw.max_body_mb}m;", ""]
    for route in gw.routes:
        ep = lab.endpoint(route.endpoint)
        up = _upstream_name(route.endpoint)
        lines += [f"    # {ep.name}: {ep.kind} on {ep.host}",
                  f"    location {route.path} {{"]
        if ep.kind == "triton":
            # Triton has no bearer key: inference through the gateway only from the LAN.
            lines += [allow.rstrip("\n"), "        deny all;"]
        lines += [f"        proxy_pass http://{up}/;",
                  "        proxy_http_version 1.1;",
                  '        proxy_set_header Connection "";',
                  "        proxy_set_header Host $host;",
                  "        proxy_set_header X-Real-IP $remote_addr;",
                  "        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
                  "        proxy_set_header X-Forwarded-Proto $scheme;",
                  "        proxy_set_header Authorization $http_authorization;",
                  "        proxy_buffering off;", "        proxy_request_buffering off;", "        proxy_cache off;",
                  "        proxy_connect_timeout 10s;",
                  f"        proxy_send_timeout {gw.read_timeout_s}s;", f"        proxy_read_timeout {gw.read_timeout_s}s;",
                  "    }",
                  f"    location = {route.path}metrics {{", allow.rstrip("\n"), "        deny all;",
                  f"        proxy_pass http://{up}/metrics;",
                  "        proxy_http_version 1.1;", '        proxy_set_header Connection "";',
                  "        proxy_set_header Authorization $http_authorization;", "    }", ""]
    lines += ["    location /metrics {", allow.rstrip("\n"), "        deny all;", "        return 404;", "    }", "}", ""]
    return "\n".join(lines)


_UPSTREAM = re.compile(r"upstream\s+(\S+)\s*\{[^}]*?server\s+([^;\s]+)", re.S)


def upstreams(conf: str) -> dict[str, str]:
    """{upstream name: host:port} of a rendered gateway file."""
    return {m.group(1): m.group(2) for m in _UPSTREAM.finditer(conf)}
