"""Time llama.cpp's `llama-quantize` on the tiny test model (not a test).

    .venv/bin/python benchmarks/bench_quantize.py [--reps 5] [--nthread 0] [--types Q8_0 Q4_K_M]

Prints, per source dtype (F32, F16) and quant type, the median / min / max wall time of
the quantization as llama-quantize reports it (``QuantResult.seconds``) and of the whole quantize_gguf call
(validation, sha256, starting the process, read-back, rename: ``total_seconds``), plus the output size and
ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from idp_pipelines.embedded.tiny_model import write_tiny_gguf  # noqa: E402
from idp_pipelines.quantize import quantize_gguf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--nthread", type=int, default=0, help="0 = all hardware threads")
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q4_K_M"])
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        d = Path(tmp)
        print(f"{'src':4} {'type':7} {'reps':>4} {'quant median':>13} {'min':>8} {'max':>8} "
              f"{'total median':>13} {'out bytes':>10} {'ratio':>6}")
        for src_dtype in ("f32", "f16"):
            src = write_tiny_gguf(d / f"tiny-{src_dtype}.gguf", dtype=src_dtype)
            quantize_gguf(src, d / "warmup.gguf", args.types[0], nthread=args.nthread)  # warm the page cache
            for q in args.types:
                quant, total = [], []
                for i in range(args.reps):
                    r = quantize_gguf(src, d / f"out-{q}.gguf", q, nthread=args.nthread)
                    quant.append(r.seconds)
                    total.append(r.total_seconds)
                print(f"{src_dtype.upper():4} {q:7} {args.reps:>4} {statistics.median(quant):>12.4f}s "
                      f"{min(quant):>7.4f}s {max(quant):>7.4f}s {statistics.median(total):>12.4f}s "
                      f"{r.dst_bytes:>10} {r.size_ratio:>6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
