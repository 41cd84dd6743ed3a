"""GGUF quantization core: llama.cpp's own `llama-quantize` and `llama-server` binaries plus GGUF inspection.

Plain Python, no Dagster. ``numpy`` and ``gguf`` are imported inside functions so importing this module is
cheap; the binaries come from :func:`idp_pipelines.llama_tools.tool` (built once per machine).

- :func:`quantize_gguf` quantizes an F32/F16/BF16 GGUF to a named type (Q4_K_M, Q8_0, ...) atomically:
  `llama-quantize` writes a temporary file next to the destination, which is moved into place with
  ``os.replace`` only after it was read back successfully; on any failure the temporary file is removed and
  the destination is untouched.
- :func:`inspect_gguf` summarises a GGUF file (architecture, tensor types, tensors not in the expected type).
- :func:`smoke_generate` loads a GGUF in `llama-server` (one thread) and generates a few tokens greedily.
- :func:`expected_size_ratio` gives plausible (low, high) bounds of dst_size / src_size.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from idp_pipelines.files import sha256_file

__all__ = [
    "QuantizeError",
    "QuantResult",
    "GGUFSummary",
    "QUANT_TYPES",
    "SOURCE_DTYPES",
    "quant_type_names",
    "normalize_quant_type",
    "ftype_for",
    "expected_tensor_types",
    "expected_size_ratio",
    "inspect_gguf",
    "source_dtype",
    "quantize_gguf",
    "smoke_generate",
]


class QuantizeError(Exception):
    """A quantization input or step failed. The message names the file and how to fix it."""


# name -> (llama_ftype value of llama.h, expected 2-D tensor types in the output of a llama-style model).
# The expected sets follow llama.cpp's mixture rules (src/llama-quant.cpp): e.g. Q4_K_M keeps output.weight
# and about half of attn_v / ffn_down in Q6_K; the legacy types (Q4_0, Q5_x) put output.weight in Q6_K.
# Types that need an importance matrix (IQ1/IQ2/IQ3_XXS, Q2_K_S) are left out on purpose.
QUANT_TYPES: dict[str, tuple[int, frozenset[str]]] = {
    "F32": (0, frozenset({"F32"})),
    "F16": (1, frozenset({"F16"})),
    "BF16": (32, frozenset({"BF16"})),
    "Q8_0": (7, frozenset({"Q8_0"})),
    "Q4_0": (2, frozenset({"Q4_0", "Q6_K"})),
    "Q4_1": (3, frozenset({"Q4_1", "Q6_K"})),
    "Q5_0": (8, frozenset({"Q5_0", "Q6_K"})),
    "Q5_1": (9, frozenset({"Q5_1", "Q6_K"})),
    "Q2_K": (10, frozenset({"Q2_K", "Q3_K", "Q4_K", "Q6_K"})),
    "Q3_K_S": (11, frozenset({"Q3_K", "Q6_K"})),
    "Q3_K_M": (12, frozenset({"Q3_K", "Q4_K", "Q5_K", "Q6_K"})),
    "Q3_K_L": (13, frozenset({"Q3_K", "Q5_K", "Q6_K"})),
    "Q4_K_S": (14, frozenset({"Q4_K", "Q5_K", "Q6_K"})),
    "Q4_K_M": (15, frozenset({"Q4_K", "Q6_K"})),
    "Q5_K_S": (16, frozenset({"Q5_K", "Q6_K"})),
    "Q5_K_M": (17, frozenset({"Q5_K", "Q6_K"})),
    "Q6_K": (18, frozenset({"Q6_K"})),
    "IQ4_NL": (25, frozenset({"IQ4_NL", "Q5_K", "Q6_K"})),
    "IQ4_XS": (30, frozenset({"IQ4_XS", "Q5_K", "Q6_K"})),
}

# llama_ftype values -> our names, to read general.file_type of a GGUF.
_FTYPE_VALUES: dict[int, str] = {ftype: name for name, (ftype, _) in QUANT_TYPES.items()}

SOURCE_DTYPES = ("F32", "F16", "BF16")

# Bits per weight of the GGML block formats (block bytes * 8 / block size).
_BPW: dict[str, float] = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5,
    "Q5_1": 6.0, "Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625,
    "IQ4_NL": 4.5, "IQ4_XS": 4.25,
}

_SHAPE_FALLBACK_NOTE = (
    "K-quants need tensor row widths (ne0) that are multiples of 256; other tensors fall back to "
    "Q5_0/Q5_1/Q8_0/F16"
)


@dataclass(frozen=True)
class GGUFSummary:
    path: str
    file_bytes: int
    architecture: str | None
    name: str | None
    file_type: int | None  # general.file_type (llama_ftype), if present
    file_type_name: str | None
    tensor_count: int
    n_params: int
    type_counts: dict[str, int]  # tensor type name -> number of tensors
    type_bytes: dict[str, int]  # tensor type name -> bytes of tensor data
    expected_types: list[str]  # expected types of the quantized (2-D) tensors; [] if unknown
    fallbacks: dict[str, str]  # 2-D tensor name -> its type, for tensors not in expected_types
    tensor_types: dict[str, str] = field(repr=False, default_factory=dict)  # tensor name -> type

    @property
    def dominant_type(self) -> str | None:
        """The type holding most tensor bytes among tensors with >= 2 dims."""
        return max(self.type_bytes, key=self.type_bytes.get) if self.type_bytes else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class QuantResult:
    src: str
    dst: str
    quant_type: str
    ftype: int
    src_dtype: str
    src_sha256: str
    dst_sha256: str
    src_bytes: int
    dst_bytes: int
    size_ratio: float  # dst_bytes / src_bytes
    seconds: float  # llama-quantize's own "quantize time" (the wall time of the run if it printed none)
    total_seconds: float  # including validation, hashing and the read-back
    nthread: int
    params: dict[str, Any]  # what llama-quantize was asked: ftype, nthread, allow_requantize, tool
    tensor_types: dict[str, int]  # output tensor type -> count
    fallbacks: dict[str, str]  # output 2-D tensors not in the expected types of quant_type
    llama_log_tail: str = ""  # last lines llama-quantize printed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- names


def quant_type_names() -> list[str]:
    return list(QUANT_TYPES)


def normalize_quant_type(quant_type: str) -> str:
    """'q4_k_m' / 'Q4_K_M' / 'q4-k-m' -> 'Q4_K_M'; unknown -> QuantizeError listing the valid names."""
    key = str(quant_type).strip().upper().replace("-", "_")
    if key not in QUANT_TYPES:
        raise QuantizeError(
            f"unknown quant type {quant_type!r}; valid types: {', '.join(QUANT_TYPES)} "
            "(IQ1/IQ2/IQ3_XXS/Q2_K_S need an importance matrix and are not offered)"
        )
    return key


def ftype_for(quant_type: str) -> int:
    """llama.h's LLAMA_FTYPE_* value for a quant type name (what general.file_type of the output holds)."""
    return QUANT_TYPES[normalize_quant_type(quant_type)][0]


def expected_tensor_types(quant_type: str) -> frozenset[str]:
    return QUANT_TYPES[normalize_quant_type(quant_type)][1]


def expected_size_ratio(quant_type: str, src_dtype: str = "F32") -> tuple[float, float]:
    """Plausible (low, high) bounds of dst_bytes / src_bytes for quantizing a src_dtype model.

    Built from the bits per weight of the types the mixture may use: low = cheapest type / source bits
    * 0.9, high = most expensive type / source bits * 1.1 + 0.03. The + 0.03 absorbs what does not shrink:
    GGUF metadata (the vocabulary) and 1-D F32 norm tensors, which weigh ~1 % of a tiny test model and
    ~0 % of a real one. Measured on the tiny test model (write_tiny_gguf, 1.44 M params, llama.cpp in
    llama-cpp-python 0.3.36): Q8_0 from F32 0.268 (band 0.239-0.322), from F16 0.534 (0.478-0.614);
    Q4_K_M from F32 0.157 (0.127-0.256), from F16 0.312 (0.253-0.481); Q6_K from F32 0.208; Q2_K from F32
    0.104. Large models: Q4_K_M from F16 ~0.30, from F32 ~0.15; Q8_0 from F16 ~0.53.
    The bands catch gross errors (nothing quantized, everything fell back to Q8_0/F16, truncated output),
    not mixture details.
    """
    name = normalize_quant_type(quant_type)
    src = str(src_dtype).strip().upper()
    if src not in SOURCE_DTYPES:
        raise QuantizeError(f"source dtype must be one of {', '.join(SOURCE_DTYPES)}, got {src_dtype!r}")
    src_bits = _BPW[src]
    bits = [_BPW[t] for t in QUANT_TYPES[name][1]]
    low = min(bits) / src_bits * 0.9
    high = min(max(bits) / src_bits * 1.1 + 0.03, 2.05)
    return round(low, 4), round(high, 4)


# ---------------------------------------------------------------------------------------------- inspect


def _open_reader(path: Path):
    from gguf import GGUFReader

    if not path.exists():
        raise QuantizeError(f"GGUF file not found: {path}; check the path (download or build the model first)")
    if not path.is_file():
        raise QuantizeError(f"not a regular file: {path}; pass the path of a .gguf file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise QuantizeError(f"cannot read {path}: {exc}; fix the file permissions") from exc
    if magic != b"GGUF":
        raise QuantizeError(
            f"{path} is not a GGUF file (magic {magic!r}); convert the model with llama.cpp's "
            "convert_hf_to_gguf.py first"
        )
    try:
        return GGUFReader(path, "r")
    except Exception as exc:  # truncated / corrupt files raise various errors
        raise QuantizeError(f"cannot parse GGUF file {path}: {exc}; the file is truncated or corrupt, re-download it") from exc


def _field_value(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # pragma: no cover - unusual field encodings
        return None


def inspect_gguf(path: str | os.PathLike[str], quant_type: str | None = None) -> GGUFSummary:
    """Summarise a GGUF file with gguf.GGUFReader.

    ``fallbacks`` lists the tensors with >= 2 dims whose type is not among the expected types of
    ``quant_type`` (or, if not given, of the file's general.file_type). 1-D tensors (norms, biases) always
    stay F32 in llama.cpp and are never counted as fallbacks.
    """
    p = Path(path)
    reader = _open_reader(p)
    arch = _field_value(reader, "general.architecture")
    name = _field_value(reader, "general.name")
    ftype = _field_value(reader, "general.file_type")
    ftype = int(ftype) if ftype is not None else None
    ftype_name = _FTYPE_VALUES.get(ftype) if ftype is not None else None

    qname = normalize_quant_type(quant_type) if quant_type is not None else ftype_name
    expected = sorted(QUANT_TYPES[qname][1]) if qname in QUANT_TYPES else []

    type_counts: Counter[str] = Counter()
    type_bytes: Counter[str] = Counter()
    tensor_types: dict[str, str] = {}
    fallbacks: dict[str, str] = {}
    n_params = 0
    for t in reader.tensors:
        tname = t.tensor_type.name
        tensor_types[t.name] = tname
        type_counts[tname] += 1
        n_params += int(t.n_elements)
        if len(t.shape) >= 2:  # llama.cpp only quantizes tensors with >= 2 dims
            type_bytes[tname] += int(t.n_bytes)
            if expected and tname not in expected:
                fallbacks[t.name] = tname
    return GGUFSummary(
        path=str(p),
        file_bytes=p.stat().st_size,
        architecture=str(arch) if arch is not None else None,
        name=str(name) if name is not None else None,
        file_type=ftype,
        file_type_name=ftype_name,
        tensor_count=len(reader.tensors),
        n_params=n_params,
        type_counts=dict(sorted(type_counts.items())),
        type_bytes=dict(sorted(type_bytes.items())),
        expected_types=expected,
        fallbacks=fallbacks,
        tensor_types=tensor_types,
    )


def source_dtype(summary: GGUFSummary) -> str:
    """The source dtype (F32/F16/BF16) of an unquantized GGUF, else QuantizeError naming the file."""
    bad = {t: n for t, n in summary.type_counts.items() if t not in SOURCE_DTYPES}
    if bad:
        raise QuantizeError(
            f"{summary.path} is already quantized (tensor types {bad}); quantize from the F32/F16/BF16 GGUF "
            "instead (re-quantizing loses quality and is disabled)"
        )
    if not summary.type_bytes:
        raise QuantizeError(f"{summary.path} has no 2-D weight tensors; it is not a model to quantize")
    return summary.dominant_type or "F32"


# ---------------------------------------------------------------------------------------------- llama.cpp


def _tool(name: str) -> Path:
    from idp_pipelines.llama_tools import LlamaToolsError, tool

    try:
        return tool(name)
    except LlamaToolsError as exc:
        raise QuantizeError(str(exc)) from exc


def _error_lines(output: str) -> str:
    keep = [ln.strip() for ln in output.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
    return "; ".join(keep[-3:])


def _exit_text(rc: int) -> str:
    return f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"


# `[  12/ 291] blk.1.attn_v.weight - [...], type = f16, converting to q6_K .. size = ...` (src/llama-quant.cpp)
_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_QUANTIZE_MS = re.compile(r"quantize time =\s*([0-9.]+) ms")

Progress = Callable[[int, int, str], None]  # (tensors done, tensors total, tensor name)


def _run_quantize(argv: list[str], progress: Progress | None) -> tuple[int, str]:
    """Run llama-quantize, streaming its merged output so a long run reports progress per tensor."""
    lines: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          text=True, errors="replace", bufsize=1) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if progress is not None and (m := _TENSOR_LINE.match(line)):
                    progress(int(m.group(1)), int(m.group(2)), m.group(3))
            rc = proc.wait()
        except BaseException:
            # An interrupted run (a Dagster termination, Ctrl-C) must not leave llama-quantize writing.
            proc.kill()
            proc.wait()
            raise
    return rc, "".join(lines)


def quantize_gguf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    quant_type: str,
    *,
    nthread: int | None = None,
    progress: Progress | None = None,
) -> QuantResult:
    """Quantize the F32/F16/BF16 GGUF ``src`` to ``dst`` as ``quant_type`` with llama.cpp's `llama-quantize`.

    Atomic: `llama-quantize` writes ``.<dst name>.<random>.tmp`` next to ``dst``; it is read back with
    GGUFReader and moved to ``dst`` with os.replace. On any failure the temporary file is removed and ``dst``
    is left as it was. ``nthread`` None/<=0 lets llama.cpp use all hardware threads. ``progress(done, total,
    tensor)`` is called per tensor.
    """
    t_total = time.perf_counter()
    qname = normalize_quant_type(quant_type)
    src_p = Path(src)
    dst_p = Path(dst)

    src_summary = inspect_gguf(src_p)  # missing / not GGUF / corrupt -> QuantizeError
    src_dt = source_dtype(src_summary)  # already quantized -> QuantizeError
    try:
        same = dst_p.exists() and os.path.samefile(src_p, dst_p)
    except OSError:
        same = False
    if same or src_p.resolve() == dst_p.resolve():
        raise QuantizeError(f"destination {dst_p} is the source file; choose another output path")
    if dst_p.is_dir():
        raise QuantizeError(f"destination {dst_p} is a directory; pass a file path such as {dst_p / 'model.gguf'}")

    binary = _tool("llama-quantize")
    ftype = ftype_for(qname)

    try:
        dst_p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dst_p.name}.", suffix=".tmp", dir=dst_p.parent)
        os.close(fd)
    except OSError as exc:
        raise QuantizeError(
            f"cannot write to the destination directory {dst_p.parent} for {dst_p.name}: {exc}; "
            "choose a writable output path or fix the directory permissions"
        ) from exc
    tmp = Path(tmp_name).absolute()

    threads = int(nthread) if nthread and nthread > 0 else 0
    # Absolute paths: llama-quantize reads a second positional argument that parses as a type name or a
    # number ("7", "q8_0") as the type, not as the output path; an absolute path never does.
    argv = [str(binary), str(src_p.absolute()), str(tmp), qname] + ([str(threads)] if threads else [])
    params = {"tool": "llama-quantize", "ftype": ftype, "nthread": threads, "allow_requantize": False}
    try:
        src_sha = sha256_file(src_p)
        t0 = time.perf_counter()
        try:
            rc, output = _run_quantize(argv, progress)
        except OSError as exc:
            raise QuantizeError(f"cannot run {binary} for {src_p}: {exc}; rebuild llama.cpp's tools "
                                "(`make install`)") from exc
        wall = time.perf_counter() - t0
        if rc != 0:
            detail = _error_lines(output) or _exit_text(rc)
            raise QuantizeError(
                f"llama.cpp failed to quantize {src_p} to {qname}: {detail}; check that the source is a "
                "complete F32/F16/BF16 GGUF of a llama.cpp-supported architecture and that the disk has room"
            )
        m = _QUANTIZE_MS.search(output)
        seconds = float(m.group(1)) / 1000 if m else wall
        try:
            out_summary = inspect_gguf(tmp, qname)
        except QuantizeError as exc:
            raise QuantizeError(f"quantized output for {dst_p} is unreadable: {exc}") from exc
        os.chmod(tmp, 0o644)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        dst_sha = sha256_file(tmp)
        try:
            os.replace(tmp, dst_p)
        except OSError as exc:
            raise QuantizeError(
                f"cannot move the quantized file into place at {dst_p}: {exc}; "
                "check that the destination is writable and not a directory"
            ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

    src_bytes = src_summary.file_bytes
    dst_bytes = dst_p.stat().st_size
    return QuantResult(
        src=str(src_p),
        dst=str(dst_p),
        quant_type=qname,
        ftype=ftype,
        src_dtype=src_dt,
        src_sha256=src_sha,
        dst_sha256=dst_sha,
        src_bytes=src_bytes,
        dst_bytes=dst_bytes,
        size_ratio=dst_bytes / src_bytes if src_bytes else float("nan"),
        seconds=seconds,
        total_seconds=time.perf_counter() - t_total,
        nthread=threads or (os.cpu_count() or 1),
        params=params,
        tensor_types=out_summary.type_counts,
        fallbacks=out_summary.fallbacks,
        llama_log_tail=output[-2000:],
    )


def smoke_generate(
    path: str | os.PathLike[str],
    prompt: str = "Hello",
    max_tokens: int = 8,
    *,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Load a GGUF in llama.cpp's `llama-server` (one thread, CPU only, 127.0.0.1), generate greedily, report.

    Returns {"tokens", "prompt_tokens", "text", "finish_reason", "load_seconds", "generate_seconds",
    "seconds"}: `tokens` is the server's own count of generated tokens (`tokens_predicted`). Raises
    QuantizeError if the file does not load or nothing is generated.

    Why the server and not `llama-simple`: llama-simple has no thread flag and always starts 4 threads,
    which spin at every barrier; on two busy cores 8 tokens of the tiny model took 12-20 s (2.4 s a
    token) where the server with `-t 1` takes under a millisecond a token.
    """
    import httpx

    from idp_pipelines.processes import free_port, stop_process_group

    p = Path(path)
    if not p.is_file():
        raise QuantizeError(f"GGUF file not found: {p}; quantize or download it first")
    binary = _tool("llama-server")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # -ngl 0: a smoke test must not take VRAM from the serving engine on a GPU host.
    argv = [str(binary), "-m", str(p.absolute()), "--host", "127.0.0.1", "--port", str(port), "-t", "1",
            "-tb", "1", "-c", "512", "-np", "1", "-ngl", "0", "--no-webui", "--no-warmup"]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as exc:
            raise QuantizeError(f"cannot run {binary} for {p}: {exc}; rebuild llama.cpp's tools (`make install`)") from exc

        def output() -> str:
            log.seek(0)
            return log.read().decode("utf-8", "replace")

        try:
            deadline = t0 + timeout_s
            with httpx.Client(base_url=base, timeout=30.0, trust_env=False) as client:
                while True:  # bounded by the deadline; the server says 503 while it loads
                    if proc.poll() is not None:
                        text = output()
                        if "failed to load model" in text or "unable to load model" in text:
                            raise QuantizeError(f"llama.cpp cannot load {p}: {_error_lines(text)}; the file is "
                                                "corrupt or of an unsupported architecture")
                        raise QuantizeError(f"llama.cpp exited ({_exit_text(proc.returncode)}) while loading {p}: "
                                            f"{_error_lines(text) or 'no error line'}")
                    try:
                        if client.get("/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.perf_counter() > deadline:
                        raise QuantizeError(f"llama.cpp did not load {p} within {timeout_s:.0f} s; the model is "
                                            "too large for a CPU smoke test here")
                    time.sleep(0.05)
                loaded = time.perf_counter()
                try:
                    reply = client.post("/completion", json={
                        "prompt": prompt, "n_predict": int(max_tokens), "temperature": 0, "cache_prompt": False},
                        timeout=max(1.0, deadline - time.perf_counter()))
                    reply.raise_for_status()
                    body = reply.json()
                except (httpx.HTTPError, ValueError) as exc:
                    raise QuantizeError(f"llama.cpp failed to generate with {p} ({exc}): "
                                        f"{_error_lines(output()) or 'no error line'}; the file loads but does not "
                                        "run: re-quantize it or check the llama.cpp build") from exc
        finally:
            stop_process_group(proc, timeout_s=10)
    seconds = time.perf_counter() - t0
    tokens = int(body.get("tokens_predicted") or 0)
    timings = body.get("timings") or {}
    generate_seconds = (timings.get("predicted_ms") or 0) / 1000
    return {
        "tokens": tokens,
        "prompt_tokens": int(body.get("tokens_evaluated") or timings.get("prompt_n") or 0),
        "text": body.get("content", ""),
        "finish_reason": "length" if tokens >= max_tokens else "stop",
        "load_seconds": loaded - t0,
        "generate_seconds": min(generate_seconds, seconds),
        "seconds": seconds,
    }
