"""The lab inventory: one typed model of lab.yaml, the only place hosts, ports, paths and model ids live.

`load_lab(path)` parses the file once; anything wrong fails with a single `LabError` that names the
file, the field (``endpoints[1].model``) and the fix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from idp_pipelines import settings


class LabError(ValueError):
    """The lab inventory cannot be used as written."""


# Names become asset partition keys, DuckDB values, MLflow params and note titles: keep them plain.
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
EnvVarName = Annotated[str, StringConstraints(pattern=r"^[A-Z_][A-Z0-9_]*$")]
HttpUrl = Annotated[str, StringConstraints(pattern=r"^https?://[^\s/]+(:\d+)?(/\S*)?$")]
RepoId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")]
QuantType = Literal[
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1",
    "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16",
]


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the lab file's folder, like docker-compose does."""
    path = value.expanduser()
    base = (info.context or {}).get("base_dir")
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return Path(os.path.normpath(path))


LabPath = Annotated[Path, AfterValidator(_resolve_path)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Gpu(_Strict):
    model: str
    memory_gb: float = Field(gt=0)
    memory_bandwidth_gb_s: float | None = Field(default=None, gt=0)
    count: int = Field(default=1, ge=1)


class Cpu(_Strict):
    model: str
    cores: int = Field(ge=1)
    threads: int = Field(ge=1)
    inference_threads: int | None = Field(default=None, ge=1)
    memory_bandwidth_gb_s: float | None = Field(default=None, gt=0)


class HostSsh(_Strict):
    """How the deploy job reaches a host over SSH: its config files, its validators, its Docker engine."""

    user: str | None = None             # default: the user of an ssh:// docker_host, else ssh's own default
    port: int = Field(default=22, ge=1, le=65535)
    identity_file: LabPath | None = None
    # The host's key must be in this file: a changed or unknown host key is an error, never a prompt.
    known_hosts: LabPath | None = None
    # Or the host's key itself ("ssh-ed25519 AAAA..."): the deploy pins it in a known_hosts file of its own.
    host_key: Annotated[str, StringConstraints(pattern=r"^(ssh-(ed25519|rsa)|ecdsa-sha2-nistp(256|384|521)) "
                                                       r"[A-Za-z0-9+/=]+$")] | None = None
    sudo: bool = False                  # file writes, validators and reloads through `sudo -n` (LXC services)
    # The engine's socket on the host, reached through an SSH-forwarded unix socket.
    docker_socket: Annotated[str, StringConstraints(pattern=r"^/[^\s:]*$")] = "/var/run/docker.sock"


class Host(_Strict):
    name: Name
    address: str
    role: str = ""
    description: str = ""
    memory_gb: float | None = Field(default=None, gt=0)
    gpu: Gpu | None = None
    cpu: Cpu | None = None
    docker_host: str | None = None
    config_dir: str | None = None
    dcgm_url: HttpUrl | None = None
    ssh: HostSsh | None = None  # set (or an ssh:// docker_host): the deploy job pushes over SSH


class Slo(_Strict):
    ttft_ms: float | None = Field(default=None, gt=0)
    tpot_ms: float | None = Field(default=None, gt=0)
    e2e_ms: float | None = Field(default=None, gt=0)


# Worst-case prompt tokens per benchmark prompt set: one token per byte (a byte-fallback tokenizer, as the
# tiny model's) of its longest prompt, plus 64 for the cache-busting prefix. tests/test_lab.py checks
# them against bench.suite.PROMPT_SETS, so a longer prompt cannot outgrow a slot unnoticed.
PROMPT_TOKEN_BUDGET = {"short": 96, "default": 160, "long": 1280}


class LlamaCppServer(_Strict):
    """llama.cpp's `llama-server` flags, typed (names are its long options with '_' for '-').

    A misspelt flag is an inventory error naming the field; a flag not modelled here goes in `extra_args`.
    """

    ctx_size: int | None = Field(default=None, ge=0)        # -c: the whole KV cache, split across the slots
    parallel: int | None = Field(default=None, ge=1)        # -np: slots (llama-server's default is 4, unified KV)
    threads: int | None = Field(default=None, ge=1)         # -t
    threads_batch: int | None = Field(default=None, ge=1)   # -tb (prompt processing)
    cont_batching: bool = True                              # -cb / -nocb
    metrics: bool = True                                    # --metrics: the Prometheus endpoint the harness scrapes
    cache_ram: int | None = Field(default=None, ge=-1)      # -cram, MiB of host-RAM prompt cache (0 off, -1 no limit)
    n_gpu_layers: int | Literal["auto", "all"] | None = None  # -ngl: layers offloaded (0: all on the CPU)
    batch_size: int | None = Field(default=None, ge=1)      # -b
    ubatch_size: int | None = Field(default=None, ge=1)     # -ub
    flash_attn: Literal["on", "off", "auto"] | None = None  # -fa
    kv_unified: bool | None = None                          # -kvu / -no-kvu
    extra_args: list[str] = Field(default_factory=list)     # passed verbatim, after the typed flags

    def ctx_per_slot(self) -> int | None:
        """Context each slot gets: llama.cpp splits -c evenly across -np slots, rounded up to 256
        (src/llama-context.cpp), unless the KV cache is unified (then a slot may use all of it)."""
        if not self.ctx_size or self.kv_unified:
            return self.ctx_size or None
        per = -(-self.ctx_size // (self.parallel or 1))
        return -(-per // 256) * 256

    def flags(self) -> list[str]:
        """The command-line flags for llama-server, in a stable order."""
        out: list[str] = []
        for flag, value in (("-c", self.ctx_size), ("-np", self.parallel), ("-t", self.threads),
                            ("-tb", self.threads_batch), ("-cram", self.cache_ram), ("-ngl", self.n_gpu_layers),
                            ("-b", self.batch_size), ("-ub", self.ubatch_size), ("-fa", self.flash_attn)):
            if value is not None:
                out += [flag, str(value)]
        out.append("--cont-batching" if self.cont_batching else "--no-cont-batching")
        if self.metrics:
            out.append("--metrics")
        if self.kv_unified is not None:
            out.append("--kv-unified" if self.kv_unified else "--no-kv-unified")
        return out + list(self.extra_args)

    def recorded(self) -> dict[str, int | float | str | bool]:
        """The typed settings as a flat record (what benchmarks store with the endpoint's settings)."""
        return {k: v for k, v in self.model_dump(exclude={"extra_args"}).items() if v is not None} | (
            {"extra_args": " ".join(self.extra_args)} if self.extra_args else {})


class VllmServer(_Strict):
    """vLLM's OpenAI server flags, typed (names are its long options with '_' for '-').

    A misspelt flag is an inventory error naming the field; a flag not modelled here goes in `extra_args`.
    The key is never a flag: vLLM reads VLLM_API_KEY from its environment (the host's .env).
    """

    quantization: str | None = None                          # fp8, awq, gptq, ... (auto-detected from the checkpoint)
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] | None = None
    dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] | None = None
    max_model_len: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    enable_chunked_prefill: bool | None = None
    enable_prefix_caching: bool | None = None
    block_size: Literal[8, 16, 32, 64, 128] | None = None
    tensor_parallel_size: int | None = Field(default=None, ge=1)
    # seed: --disable-log-stats also turns off vLLM's Prometheus /metrics, which the dashboards read.
    disable_log_stats: Literal[False] | None = None
    extra_args: list[str] = Field(default_factory=list)

    def flags(self) -> list[str]:
        """The command-line flags for vLLM's OpenAI server, in a stable order (booleans as bare flags)."""
        out: list[str] = []
        for name, value in self.model_dump(exclude={"extra_args"}).items():
            if value is None or value is False:
                continue
            flag = "--" + name.replace("_", "-")
            out += [flag] if value is True else [flag, str(value)]
        return out + list(self.extra_args)

    def recorded(self) -> dict[str, int | float | str | bool]:
        return {k: v for k, v in self.model_dump(exclude={"extra_args"}).items() if v is not None} | (
            {"extra_args": " ".join(self.extra_args)} if self.extra_args else {})


TritonApi = Literal["health", "metadata", "inference", "shared-memory", "model-config", "model-repository",
                    "statistics", "trace", "logging"]


class TritonServer(_Strict):
    """Triton's flags, typed. Triton has no bearer key: its admin APIs are restricted to a header instead."""

    model_repository: str                                    # the folder on the host, mounted read-only at /models
    model_control_mode: Literal["none", "poll", "explicit"] | None = None
    strict_model_config: bool | None = None
    log_verbose: int | None = Field(default=None, ge=0)
    # --http-restricted-api: these need the header `triton-admin-key: <the host's TRITON key>`.
    restricted_apis: list[TritonApi] = Field(default_factory=lambda: [
        "model-repository", "model-config", "shared-memory", "statistics", "trace", "logging"])
    extra_args: list[str] = Field(default_factory=list)

    def flags(self) -> list[str]:
        out = ["--model-repository=/models"]
        if self.model_control_mode:
            out.append(f"--model-control-mode={self.model_control_mode}")
        if self.strict_model_config is not None:
            out.append(f"--strict-model-config={str(self.strict_model_config).lower()}")
        if self.log_verbose is not None:
            out.append(f"--log-verbose={self.log_verbose}")
        return out + list(self.extra_args)

    def recorded(self) -> dict[str, int | float | str | bool]:
        out = {k: v for k, v in self.model_dump(exclude={"extra_args", "restricted_apis"}).items() if v is not None}
        return out | {"restricted_apis": ",".join(self.restricted_apis)}


class DcgmExporter(_Strict):
    """NVIDIA's dcgm-exporter flags, typed."""

    collect_interval_ms: int | None = Field(default=None, ge=100)  # -c
    collectors: str | None = None                                  # -f: a counters CSV inside the image

    def flags(self) -> list[str]:
        out: list[str] = []
        if self.collect_interval_ms is not None:
            out += ["-c", str(self.collect_interval_ms)]
        if self.collectors is not None:
            out += ["-f", self.collectors]
        return out


class Endpoint(_Strict):
    name: Name
    kind: Literal["vllm", "llamacpp", "triton", "openai"]
    host: str
    base_url: HttpUrl
    model: str | None = None
    served_model_name: str | None = None
    api_key_env: EnvVarName | None = None
    required: bool = True
    embedded: bool = False
    metrics_path: str | None = "/metrics"
    # Free-form engine settings, recorded with every benchmark (vLLM's max_num_seqs, ...): the escape hatch
    # for what is not typed. A llama.cpp endpoint's server flags are typed under `llamacpp:` and folded in
    # here too, so whoever reads `settings` sees what the server runs with.
    settings: dict[str, int | float | str | bool] = Field(default_factory=dict)
    llamacpp: LlamaCppServer | None = None
    vllm: VllmServer | None = None
    triton: TritonServer | None = None
    slo: Slo = Field(default_factory=Slo)
    concurrency: list[int] | None = None  # the sweep for this endpoint (default: benchmarks.concurrency)
    # The roofline's bytes per decoded token: the weights the server reads for each token. Given here, or
    # read from model_file (the GGUF the server loads), or from the model's last download/quantization.
    model_bytes: int | None = Field(default=None, gt=0)
    model_file: LabPath | None = None

    @model_validator(mode="after")
    def _typed_llamacpp(self) -> Endpoint:
        if self.llamacpp is not None and self.kind != "llamacpp":
            raise ValueError(f"llamacpp: holds llama-server flags, but this endpoint's kind is {self.kind!r}. "
                             f"Fix: remove the llamacpp: block, or set kind: llamacpp.")
        if self.kind != "llamacpp":
            return self
        typed = self.llamacpp or LlamaCppServer()
        clash = sorted(set(self.settings) & set(LlamaCppServer.model_fields))
        if clash:
            raise ValueError(f"settings.{clash[0]} is a llama-server flag with a typed field. Fix: move "
                             f"{', '.join(clash)} from settings: to llamacpp: (e.g. llamacpp: {{{clash[0]}: ...}}).")
        # frozen model: set once, here, while it is being built
        object.__setattr__(self, "llamacpp", typed)
        object.__setattr__(self, "settings", {**self.settings, **typed.recorded()})
        return self

    @model_validator(mode="after")
    def _typed_vllm_triton(self) -> Endpoint:
        for block, cls, kind in (("vllm", VllmServer, "vllm"), ("triton", TritonServer, "triton")):
            typed = getattr(self, block)
            if typed is not None and self.kind != kind:
                raise ValueError(f"{block}: holds {kind} flags, but this endpoint's kind is {self.kind!r}. "
                                 f"Fix: remove the {block}: block, or set kind: {kind}.")
            if self.kind != kind:
                continue
            clash = sorted(set(self.settings) & set(cls.model_fields))
            if clash:
                raise ValueError(f"settings.{clash[0]} is a {kind} flag with a typed field. Fix: move "
                                 f"{', '.join(clash)} from settings: to {block}: (e.g. {block}: {{{clash[0]}: ...}}).")
            if typed is None and kind == "vllm":
                typed = VllmServer()
                object.__setattr__(self, "vllm", typed)
            if typed is not None:
                object.__setattr__(self, "settings", {**self.settings, **typed.recorded()})
        return self

    @field_validator("base_url")
    @classmethod
    def _no_trailing_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @property
    def openai_compatible(self) -> bool:
        """Streams /v1/completions: what the benchmark harness drives. Triton's own API is KServe v2."""
        return self.kind in ("vllm", "llamacpp", "openai")

    def api_key(self, env: Mapping[str, str] | None = None) -> str | None:
        """The endpoint's key: the environment variable the inventory names (never the file), else the
        key the deploy group generated for it in its host's key store (service_secrets)."""
        if not self.api_key_env:
            return None
        from idp_pipelines.secrets import stored_key

        return (os.environ if env is None else env).get(self.api_key_env) or stored_key(self.host, self.api_key_env)

    @property
    def port(self) -> int:
        from urllib.parse import urlsplit

        parts = urlsplit(self.base_url)
        return parts.port or (443 if parts.scheme == "https" else 80)


class Model(_Strict):
    name: Name
    repo_id: RepoId
    revision: str = "main"
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None
    format: Literal["gguf", "safetensors"]
    quantize: list[QuantType] = Field(default_factory=list)
    serving_quantization: str | None = None
    serve_on: list[str] = Field(default_factory=list)
    description: str = ""

    @property
    def pinned(self) -> bool:
        return re.fullmatch(r"[0-9a-f]{40}", self.revision) is not None


class GitRepo(_Strict):
    name: Name
    path: LabPath
    branches: list[str] = Field(default_factory=lambda: ["main"], min_length=1)


class Vault(_Strict):
    path: LabPath
    daily_folder: str = "Dev Log"
    date_format: str = "YYYY-MM-DD"


class ModelCache(_Strict):
    path: LabPath
    budget_gb: float = Field(gt=0)
    # Every cached file is re-hashed within this many days (a slice a day, schedules.rehash_cron).
    rehash_days: int = Field(default=30, ge=1, le=3650)


# `[user@]host:/path`: rsync's remote form. A local path never has a ':' before its first '/'.
_SSH_TARGET = re.compile(r"^(?:(?P<user>[A-Za-z0-9._-]+)@)?(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*):(?P<path>.*)$")
BackupState = Literal["warehouse", "mlflow", "dagster", "keys", "vault"]


class BackupSsh(_Strict):
    """How rsync and the verification reach an SSH target (`backup.target: host:/path`)."""

    user: str | None = None            # default: the user in the target, else ssh's own default
    port: int = Field(default=22, ge=1, le=65535)
    identity_file: LabPath | None = None
    known_hosts: LabPath | None = None  # the host key must be in it: no trust on first use


class Backup(_Strict):
    """Daily hard-link snapshots of the model cache (and the state that cannot be downloaded again)."""

    target: str  # a local path, a mounted share, or [user@]host:/path over SSH
    method: str = "rsync"
    keep_daily: int = Field(default=7, ge=1)
    keep_weekly: int = Field(default=4, ge=0)
    host: str | None = None  # the host that holds the model cache and runs rsync (hosts[].name)
    free_space_margin_gb: float = Field(default=1.0, ge=0)  # left free on the target after a snapshot
    bwlimit_kib_s: int | None = Field(default=None, ge=1)  # rsync --bwlimit, KiB/s
    verify_days: int = Field(default=28, ge=1, le=3650)  # every target file re-hashed within this many runs
    debounce_s: int = Field(default=600, ge=0)  # after a new model artefact, wait this long for more
    drill_cron: str = "0 5 * * 0"  # the weekly restore drill (a random model restored into a temp cache)
    include: list[BackupState] = Field(default_factory=lambda: ["warehouse", "mlflow", "dagster", "keys"])
    ssh: BackupSsh = Field(default_factory=BackupSsh)

    @field_validator("method")
    @classmethod
    def _rsync_only(cls, v: str) -> str:
        if v == "restic":
            raise ValueError(
                "method 'restic' is not implemented: backups are rsync hard-link snapshots, a plain tree on "
                "the target that `cp -a` or rsync restores without any tool, and the Hub cache is already "
                "content-addressed (restic's deduplication would add a repository format and gain nothing). "
                "Fix: write method: rsync (or remove the key).")
        if v != "rsync":
            raise ValueError(f"method {v!r} is unknown. Fix: use method: rsync.")
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v: str, info: ValidationInfo) -> str:
        if not v.strip():
            raise ValueError("target is empty. Fix: a local path, a mounted share or host:/path over SSH.")
        m = _SSH_TARGET.match(v)
        if m and not v.startswith(("/", ".", "~")):
            if not m["path"].startswith("/"):
                raise ValueError(f"target {v!r}: the path on {m['host']} must be absolute (rsync would take it "
                                 f"relative to the remote home). Fix: write {m['host']}:/{m['path'] or 'path'}.")
            return v
        return str(_resolve_path(Path(v), info))

    @property
    def ssh_host(self) -> str | None:
        """The SSH host of a `host:/path` target, None for a local path or mounted share."""
        m = _SSH_TARGET.match(self.target)
        return m["host"] if m and not self.target.startswith(("/", ".", "~")) else None

    @property
    def ssh_user(self) -> str | None:
        m = _SSH_TARGET.match(self.target)
        return (m["user"] if m and self.ssh_host else None) or self.ssh.user

    @property
    def path(self) -> str:
        """The target's folder: on the SSH host for a remote target, else on this machine."""
        return _SSH_TARGET.match(self.target)["path"] if self.ssh_host else self.target


class MLflow(_Strict):
    tracking_uri: HttpUrl
    embedded: bool = False


class Hub(_Strict):
    endpoint: HttpUrl = "https://huggingface.co"
    token_env: EnvVarName = "HF_TOKEN"
    max_workers: int = Field(default=8, ge=1, le=64)
    embedded: bool = False  # `make up` serves the lab's generated models from a local Hub-compatible server
    # How often the sensor asks the Hub whether a branch-tracked model moved.
    poll_interval_s: int = Field(default=3600, ge=30)


class Benchmarks(_Strict):
    """How endpoints are benchmarked (nightly, on changes, or by `idp bench`)."""

    api: Literal["completions", "chat"] = "completions"
    prompt_set: Literal["default", "short", "long"] = "default"
    concurrency: list[Annotated[int, Field(ge=1, le=1024)]] = Field(default_factory=lambda: [1, 4, 8, 16, 32],
                                                                  min_length=1)
    requests_per_step: int = Field(default=64, ge=1)
    warmup_requests: int = Field(default=2, ge=0)
    max_tokens: int = Field(default=128, ge=1)
    ignore_eos: bool = True        # pin the output length where the engine allows it
    cache_bust: bool = True        # a unique prefix per request: measure compute, not the prefix cache
    max_step_duration_s: float = Field(default=300, gt=0)
    request_timeout_s: float = Field(default=120, gt=0)
    regression_tolerance: float = Field(default=0.15, gt=0, lt=1)
    baseline_runs: int = Field(default=7, ge=1)
    debounce_s: int = Field(default=300, ge=0)
    rpc_probes: int = Field(default=400, ge=10)
    # A step during which other processes on the measuring host used more CPU than this (mean cores)
    # is flagged by the sanity check: its tail latencies are partly the host's, not the server's.
    max_other_load_cores: float = Field(default=0.5, gt=0)


class Schedules(_Strict):
    timezone: str = "UTC"
    benchmarks_cron: str = "0 2 * * *"
    backup_cron: str = "0 4 * * *"
    rehash_cron: str = "0 3 * * *"  # the model cache's daily re-hash slice


class Expectation(_Strict):
    """A claim of the seed plan, judged later against measurements (hardware_findings)."""

    name: Name
    claim: str
    metric: str
    low: float
    high: float
    unit: str
    endpoint: str | None = None
    host: str | None = None
    source: str = ""


# ----------------------------------------------------------------------------------- deployed services

ServiceKind = Literal["vllm", "llamacpp", "triton", "dcgm-exporter", "node-exporter", "nginx", "prometheus",
                      "grafana"]
# The seed runs the gateway, Prometheus and Grafana as LXC services (systemd), not as containers.
SYSTEMD_KINDS = frozenset({"nginx", "prometheus", "grafana"})
ENGINE_KINDS = frozenset({"vllm", "llamacpp", "triton"})
AbsPath = Annotated[str, StringConstraints(pattern=r"^/[^\s:]*$")]
Port = Annotated[int, Field(ge=1, le=65535)]


class ServicePort(_Strict):
    name: Literal["http", "grpc", "metrics"] = "http"
    container: Port
    # Published on the host's address; one service per host port. An engine's http port may leave it out:
    # it is then the port of the endpoint's base_url (one place for it).
    host: Port | None = None


class Mount(_Strict):
    source: AbsPath   # on the Docker host
    target: AbsPath   # in the container
    read_only: bool = True


class Service(_Strict):
    """A container (or, for the gateway, Prometheus and Grafana, a systemd service) the deploy group renders."""

    name: Name
    kind: ServiceKind
    host: str
    endpoint: str | None = None       # the inference endpoint it serves (engines): its model, port and key
    image: str | None = None
    tag: str | None = None
    ports: list[ServicePort] = Field(default_factory=list)
    gpus: list[Annotated[str, StringConstraints(pattern=r"^[0-9]+$")]] = Field(default_factory=list)
    mounts: list[Mount] = Field(default_factory=list)
    # Which gguf_model output to serve (a quantize target of the endpoint's model); unset: the file the
    # hub_model download holds.
    quant: QuantType | None = None
    # The host has no copy of the model cache: the bundle's sync-models.sh copies the file into
    # <config_dir>/models before the service starts (the Jetson).
    model_sync: bool = False
    dcgm: DcgmExporter | None = None
    # The engine's binary, for an image whose entrypoint does not start it (the typed flags follow).
    entrypoint: list[str] | None = None
    # Escape hatch: extra non-secret environment variables, passed verbatim (documented in the README).
    environment: dict[EnvVarName, str] = Field(default_factory=dict)

    def port(self, name: str) -> ServicePort | None:
        return next((p for p in self.ports if p.name == name), None)

    @property
    def container(self) -> bool:
        return self.kind not in SYSTEMD_KINDS


class GatewayTls(_Strict):
    certificate: AbsPath
    key: AbsPath
    # seed: Let's Encrypt issues no certificate for `.local` names (not a public suffix). Say who does.
    issuer: str = ""


class GatewayRoute(_Strict):
    endpoint: str
    path: Annotated[str, StringConstraints(pattern=r"^/[a-z0-9][a-z0-9-]*/$")]


class Gateway(_Strict):
    """NGINX on the gateway host: TLS, one route per endpoint, /metrics only from the LAN."""

    host: str
    server_names: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.-]+$")]] = Field(min_length=1)
    tls: GatewayTls
    lan_cidrs: list[str] = Field(min_length=1)
    routes: list[GatewayRoute] = Field(default_factory=list)
    keepalive: int = Field(default=32, ge=1)
    read_timeout_s: int = Field(default=300, ge=1)
    max_body_mb: int = Field(default=16, ge=1)

    @field_validator("lan_cidrs")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        import ipaddress

        for c in v:
            try:
                ipaddress.ip_network(c, strict=True)
            except ValueError as exc:
                raise ValueError(f"{c!r} is not a network in CIDR form ({exc}). Fix: e.g. 192.168.1.0/24.") from None
        return v


class Monitoring(_Strict):
    """Prometheus (scrape config, alert rules, retention flags) and Grafana provisioning."""

    prometheus_host: str
    prometheus_port: Port = 9090
    grafana_host: str | None = None
    scrape_interval_s: int = Field(default=15, ge=1)
    # A command-line flag of Prometheus (--storage.tsdb.retention.time), not a prometheus.yml setting.
    retention_days: int = Field(default=30, ge=1)
    datasource_uid: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,40}$")] = "idp-prometheus"
    alertmanager: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9.-]+:\d+$")] | None = None
    gpu_temperature_c: float = Field(default=83, gt=0)
    gpu_memory_fraction: float = Field(default=0.95, gt=0, le=1)
    target_down_for: Annotated[str, StringConstraints(pattern=r"^\d+[smh]$")] = "5m"


class Deploy(_Strict):
    """How the deploy group uses benchmark_tuning's recommendations."""

    use_tuning: bool = True
    # A recommendation within this fraction of the value in use changes nothing: no tune-deploy-benchmark loop.
    tuning_hysteresis: float = Field(default=0.25, ge=0, lt=1)
    # The drift sensor requests a re-deploy of a drifted host (off: it only reports the difference).
    auto_repair: bool = False
    drift_interval_s: int = Field(default=300, ge=30)
    probe_timeout_s: float = Field(default=120, gt=0)  # after the containers are healthy, for the endpoints


class Lab(_Strict):
    name: Name
    description: str = ""
    hosts: list[Host] = Field(min_length=1)
    endpoints: list[Endpoint] = Field(default_factory=list)
    models: list[Model] = Field(default_factory=list)
    git_repos: list[GitRepo] = Field(default_factory=list)
    vault: Vault
    model_cache: ModelCache
    backup: Backup
    mlflow: MLflow
    hub: Hub = Field(default_factory=Hub)
    schedules: Schedules = Field(default_factory=Schedules)
    benchmarks: Benchmarks = Field(default_factory=Benchmarks)
    expectations: list[Expectation] = Field(default_factory=list)
    services: list[Service] = Field(default_factory=list)
    gateway: Gateway | None = None
    monitoring: Monitoring | None = None
    deploy: Deploy = Field(default_factory=Deploy)

    @model_validator(mode="after")
    def _engine_ports_from_endpoints(self) -> Lab:
        endpoints = {e.name: e for e in self.endpoints}
        for svc in self.services:
            ep = endpoints.get(svc.endpoint or "")
            for port in svc.ports:
                if port.host is None and port.name == "http" and ep is not None:
                    object.__setattr__(port, "host", ep.port)  # frozen: set once, while the lab is built
        return self

    # The source file, set by load_lab (errors name it); not a field of the inventory.
    _source: str = PrivateAttr(default="the lab inventory")

    def _find(self, items: list[Any], section: str, name: str) -> Any:
        for item in items:
            if item.name == name:
                return item
        raise LabError(
            f"{self._source}: no {section[:-1]} named {name!r} in {section} (it has "
            f"{[i.name for i in items]}). Fix: add it under {section}, or drop what still refers to it "
            f"(a partition left over after an edit of the inventory: wipe it in the Dagster UI)."
        )

    def host(self, name: str) -> Host:
        return self._find(self.hosts, "hosts", name)

    def model(self, name: str) -> Model:
        return self._find(self.models, "models", name)

    def endpoint(self, name: str) -> Endpoint:
        return self._find(self.endpoints, "endpoints", name)

    def git_repo(self, name: str) -> GitRepo:
        return self._find(self.git_repos, "git_repos", name)

    def service(self, name: str) -> Service:
        return self._find(self.services, "services", name)

    def docker_hosts(self) -> list[str]:
        """Hosts with a container service: one compose file and one .env each."""
        return list(dict.fromkeys(s.host for s in self.services if s.container))


# ---------------------------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; an inventory must not."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _fmt_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _expand_vars(node: Any, loc: tuple[Any, ...], env: dict[str, str], problems: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _expand_vars(v, (*loc, k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_vars(v, (*loc, i), env, problems) for i, v in enumerate(node)]
    if isinstance(node, str):
        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in env:
                problems.append(
                    f"{_fmt_loc(loc)}: environment variable ${{{m.group(1)}}} is not set. "
                    f"Fix: export {m.group(1)}=... or write the value in the file."
                )
                return m.group(0)
            return env[m.group(1)]

        return _VAR.sub(sub, node)
    return node


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at `loc` (for 'unknown key' errors)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return []
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        current = args[0] if args else ann
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _fix_for(err: dict[str, Any]) -> str:
    kind, loc = err["type"], tuple(err["loc"])
    if kind == "extra_forbidden":
        allowed = _allowed_keys(Lab, loc)
        return f"unknown key {loc[-1]!r}. Fix: remove it or use one of: {', '.join(allowed)}."
    if kind == "missing":
        return "required key is missing. Fix: add it."
    if kind == "string_pattern_mismatch":
        field = loc[-1] if not isinstance(loc[-1], int) else loc[-2]
        hints = {
            "name": "lowercase letters, digits, '.', '-' and '_' (it becomes a partition key)",
            "repo_id": "'owner/name' as on the Hub",
            "api_key_env": "the NAME of an environment variable, e.g. VLLM_API_KEY (never the key itself)",
            "token_env": "the NAME of an environment variable, e.g. HF_TOKEN",
        }
        hint = hints.get(str(field), "a URL like http://host:port" if "url" in str(field) or "uri" in str(field) or field == "endpoint" else "see labs/local.yaml")
        return f"{err['input']!r} is not valid. Fix: use {hint}."
    if kind == "value_error":  # our validators write the whole message, fix included
        return str(err["ctx"]["error"])
    if kind == "literal_error":
        return f"{err['msg']}; got {err['input']!r}. Fix: use one of the listed values."
    got = err.get("input")
    shown = f"; got {got!r}" if not isinstance(got, (dict, list)) else ""
    return f"{err['msg']}{shown}. Fix: correct the value's type."


def _cross_references(lab: Lab) -> list[str]:
    problems: list[str] = []

    def unique(items: list[Any], what: str, field: str) -> None:
        first: dict[str, int] = {}
        for i, item in enumerate(items):
            if item.name in first:
                problems.append(
                    f"{field}[{i}].name: duplicate {what} name {item.name!r} (also {field}[{first[item.name]}]). "
                    f"Fix: give every {what} a unique name."
                )
            first.setdefault(item.name, i)

    unique(lab.hosts, "host", "hosts")
    unique(lab.endpoints, "endpoint", "endpoints")
    unique(lab.models, "model", "models")
    unique(lab.git_repos, "git repo", "git_repos")
    unique(lab.expectations, "expectation", "expectations")
    hosts = {h.name for h in lab.hosts}
    models = {m.name for m in lab.models}
    endpoints = {e.name for e in lab.endpoints}

    def ref(value: str | None, known: set[str], what: str, field: str) -> None:
        if value is not None and value not in known:
            problems.append(
                f"{field}: unknown {what} {value!r}. Fix: use one of {sorted(known)} or add it under {what}s."
            )

    for i, ep in enumerate(lab.endpoints):
        ref(ep.host, hosts, "host", f"endpoints[{i}].host")
        ref(ep.model, models, "model", f"endpoints[{i}].model")
    for i, ep in enumerate(lab.endpoints):
        server = ep.llamacpp
        if server is None:
            continue
        per_slot, need = server.ctx_per_slot(), lab.benchmarks.max_tokens + PROMPT_TOKEN_BUDGET[lab.benchmarks.prompt_set]
        if per_slot is not None and per_slot < need:
            problems.append(
                f"endpoints[{i}].llamacpp.ctx_size: {server.ctx_size} split across {server.parallel or 1} slot(s) "
                f"gives each {per_slot} tokens, but a benchmark request needs up to {need} (benchmarks.max_tokens "
                f"{lab.benchmarks.max_tokens} + {PROMPT_TOKEN_BUDGET[lab.benchmarks.prompt_set]} for the "
                f"{lab.benchmarks.prompt_set!r} prompts). Fix: raise ctx_size to at least "
                f"{need * (server.parallel or 1)} or lower parallel."
            )
        cpu = next((h.cpu for h in lab.hosts if h.name == ep.host), None)
        for field in ("threads", "threads_batch"):
            value = getattr(server, field)
            if cpu is not None and value is not None and value > cpu.threads:
                problems.append(
                    f"endpoints[{i}].llamacpp.{field}: {value} is more than the {cpu.threads} hardware threads of "
                    f"host {ep.host!r}. Fix: use at most {cpu.threads} (hosts[].cpu.threads).")
    ref(lab.backup.host, hosts, "host", "backup.host")
    for i, m in enumerate(lab.models):
        for j, h in enumerate(m.serve_on):
            ref(h, hosts, "host", f"models[{i}].serve_on[{j}]")
    problems += _service_problems(lab)
    for i, x in enumerate(lab.expectations):
        ref(x.endpoint, endpoints, "endpoint", f"expectations[{i}].endpoint")
        ref(x.host, hosts, "host", f"expectations[{i}].host")
        if x.low > x.high:
            problems.append(f"expectations[{i}].low: {x.low} is above high {x.high}. Fix: swap them.")
    return problems


def _service_problems(lab: Lab) -> list[str]:
    """services:, gateway: and monitoring: against the hosts and endpoints (file/field/fix per problem)."""
    problems: list[str] = []
    hosts = {h.name: h for h in lab.hosts}
    endpoints = {e.name: e for e in lab.endpoints}
    first: dict[str, int] = {}
    for i, svc in enumerate(lab.services):
        if svc.name in first:
            problems.append(f"services[{i}].name: duplicate service name {svc.name!r} (also services[{first[svc.name]}]). "
                            f"Fix: give every service a unique name.")
        first.setdefault(svc.name, i)
    published: dict[tuple[str, int], tuple[int, int, str]] = {}
    for i, svc in enumerate(lab.services):
        at = f"services[{i}]"
        host = hosts.get(svc.host)
        if host is None:
            problems.append(f"{at}.host: unknown host {svc.host!r}. Fix: use one of {sorted(hosts)} or add it under hosts.")
            continue
        if svc.container:
            if not host.docker_host:
                problems.append(
                    f"{at}.host: service {svc.name!r} is a container, but host {svc.host!r} has no docker_host. "
                    f"Fix: set hosts[].docker_host for {svc.host!r} (e.g. ssh://user@{host.address}), or move the "
                    f"service to a Docker host (only nginx, prometheus and grafana run as systemd services).")
            if not svc.image or not svc.tag:
                problems.append(f"{at}.image: a container needs image and tag (got image={svc.image!r}, "
                                f"tag={svc.tag!r}). Fix: set both, e.g. image: vllm/vllm-openai, tag: v0.7.1.")
        if svc.gpus:
            if host.gpu is None:
                problems.append(f"{at}.gpus: host {svc.host!r} has no gpu. Fix: remove gpus or describe hosts[].gpu.")
            else:
                bad = [g for g in svc.gpus if int(g) >= host.gpu.count]
                if bad:
                    problems.append(f"{at}.gpus: device(s) {bad} do not exist: host {svc.host!r} has "
                                    f"{host.gpu.count} GPU(s) (ids 0..{host.gpu.count - 1}). Fix: use existing ids.")
        for j, port in enumerate(svc.ports):
            if port.host is None:
                problems.append(f"{at}.ports[{j}].host: the host port is missing (only an engine's http port "
                                f"takes its endpoint's). Fix: set host: <port>.")
                continue
            key = (svc.host, port.host)
            if key in published:
                k, m, other = published[key]
                problems.append(
                    f"{at}.ports[{j}].host: port {port.host} on host {svc.host!r} is published by both {svc.name!r} "
                    f"and {other!r} (services[{k}].ports[{m}]). Fix: publish one of them on another host port.")
            else:
                published[key] = (i, j, svc.name)
        if svc.kind in ENGINE_KINDS:
            ep = endpoints.get(svc.endpoint or "")
            if ep is None:
                problems.append(f"{at}.endpoint: a {svc.kind} service serves an endpoint; got {svc.endpoint!r}. "
                                f"Fix: use one of {sorted(endpoints)}.")
                continue
            if ep.kind != svc.kind or ep.host != svc.host:
                problems.append(f"{at}.endpoint: endpoint {ep.name!r} is a {ep.kind} endpoint on {ep.host!r}, but "
                                f"service {svc.name!r} is {svc.kind} on {svc.host!r}. Fix: make them agree.")
            if svc.kind == "triton" and ep.triton is None:
                problems.append(f"{at}.endpoint: Triton's service needs the endpoint's triton: block (at least "
                                f"model_repository). Fix: add triton: {{model_repository: /path/on/{svc.host}}} to "
                                f"endpoint {ep.name!r}.")
            if svc.kind in ("vllm", "llamacpp") and not ep.model:
                problems.append(f"{at}.endpoint: a {svc.kind} service serves the endpoint's model, but endpoint "
                                f"{ep.name!r} names none. Fix: set endpoints[].model.")
            http = svc.port("http")
            if http is None or http.host != ep.port:
                problems.append(f"{at}.ports: endpoint {ep.name!r} is reached on port {ep.port} ({ep.base_url}), but "
                                f"the service publishes its http port on {http.host if http else 'no port'}. Fix: "
                                f"publish the http port on {ep.port} or change endpoints[].base_url.")
            if svc.quant is not None:
                model = next((m for m in lab.models if m.name == ep.model), None)
                if model is not None and svc.quant not in model.quantize:
                    problems.append(f"{at}.quant: {svc.quant} is not a quantize target of model {model.name!r} "
                                    f"({model.quantize}). Fix: add it to models[].quantize or pick one of those.")
            if svc.model_sync and not host.config_dir:
                problems.append(f"{at}.model_sync: the model is copied into <config_dir>/models, but host "
                                f"{svc.host!r} has no config_dir. Fix: set hosts[].config_dir.")
        elif svc.endpoint is not None:
            problems.append(f"{at}.endpoint: a {svc.kind} service serves no inference endpoint. Fix: remove endpoint.")
        if svc.dcgm is not None and svc.kind != "dcgm-exporter":
            problems.append(f"{at}.dcgm: dcgm-exporter flags on a {svc.kind} service. Fix: remove the dcgm: block.")
    for i, ep in enumerate(lab.endpoints):
        if ep.kind == "triton" and ep.triton is not None:
            svc = next((s for s in lab.services if s.endpoint == ep.name), None)
            if svc is not None and svc.port("metrics") is None and ep.metrics_path:
                problems.append(f"endpoints[{i}].metrics_path: Triton serves /metrics on its own port. Fix: add a "
                                f"ports entry named metrics to service {svc.name!r} or set metrics_path: null.")
    gw = lab.gateway
    if gw is not None:
        if gw.host not in hosts:
            problems.append(f"gateway.host: unknown host {gw.host!r}. Fix: use one of {sorted(hosts)}.")
        seen: dict[str, int] = {}
        paths: dict[str, int] = {}
        for j, route in enumerate(gw.routes):
            if route.endpoint not in endpoints:
                problems.append(f"gateway.routes[{j}].endpoint: unknown endpoint {route.endpoint!r}. "
                                f"Fix: use one of {sorted(endpoints)}.")
            if route.endpoint in seen:
                problems.append(f"gateway.routes[{j}].endpoint: endpoint {route.endpoint!r} already has a route "
                                f"(gateway.routes[{seen[route.endpoint]}]). Fix: one route per endpoint.")
            if route.path in paths:
                problems.append(f"gateway.routes[{j}].path: {route.path!r} is also gateway.routes[{paths[route.path]}]'s. "
                                f"Fix: give every route its own path.")
            seen.setdefault(route.endpoint, j)
            paths.setdefault(route.path, j)
    mon = lab.monitoring
    if mon is not None:
        for field in ("prometheus_host", "grafana_host"):
            value = getattr(mon, field)
            if value is not None and value not in hosts:
                problems.append(f"monitoring.{field}: unknown host {value!r}. Fix: use one of {sorted(hosts)}.")
    return problems


def load_lab(path: str | os.PathLike[str] | None = None) -> Lab:
    """Read and validate a lab inventory; raise LabError naming the file, field and fix."""
    path = Path(path) if path is not None else settings.lab_path()
    where = str(path)

    def fail(problems: list[str]) -> LabError:
        return LabError(f"Invalid lab inventory {where}:\n" + "\n".join(f"  {p}" for p in problems))

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LabError(
            f"Lab inventory {where} does not exist. Fix: set IDP_LAB to an existing file "
            f"(e.g. labs/local.yaml) or create it."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LabError(f"Lab inventory {where} cannot be read: {exc}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(exc, "problem", None) or str(exc)
        raise fail([f"{at}: not valid YAML: {problem}. Fix: check indentation, quoting and duplicate keys there."]) from None
    if not isinstance(raw, dict):
        raise fail(["(top level): expected a mapping of sections (name, hosts, endpoints, ...). Fix: see labs/local.yaml."])

    problems: list[str] = []
    env = dict(os.environ)
    env.setdefault("IDP_HOME", str(settings.idp_home()))
    raw = _expand_vars(raw, (), env, problems)
    if problems:
        raise fail(problems)
    try:
        lab = Lab.model_validate(raw, context={"base_dir": path.absolute().parent})
    except ValidationError as exc:
        raise fail([f"{_fmt_loc(tuple(e['loc']))}: {_fix_for(e)}" for e in exc.errors()]) from None
    problems = _cross_references(lab)
    if problems:
        raise fail(problems)
    lab._source = where
    return lab
