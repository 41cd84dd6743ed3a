"""`idp`: the project's command line (the embedded lab, inventory checks, the tiny model)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _lab_check(args: argparse.Namespace) -> int:
    from idp_pipelines.lab import LabError, load_lab

    try:
        lab = load_lab(args.path)
    except LabError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{args.path or 'lab'}: ok: lab {lab.name!r}, {len(lab.hosts)} hosts, {len(lab.endpoints)} endpoints, "
          f"{len(lab.models)} models, {len(lab.git_repos)} git repos, {len(lab.expectations)} expectations")
    return 0


def _up(args: argparse.Namespace) -> int:
    from idp_pipelines.embedded.stack import up

    return up(lab_path=Path(args.lab).absolute() if args.lab else None, dagster_port=args.dagster_port,
              run_main_job=not args.no_run)


def _bench(args: argparse.Namespace) -> int:
    from idp_pipelines import settings
    from idp_pipelines.bench.client import BenchError
    from idp_pipelines.bench.suite import run_endpoint
    from idp_pipelines.lab import LabError, load_lab
    from idp_pipelines.markdown import md_cell
    from idp_pipelines.warehouse import Warehouse

    try:
        lab = load_lab(args.lab)
        names = [e.name for e in lab.endpoints]
        if args.endpoint not in names:
            print(f"unknown endpoint {args.endpoint!r}; the lab has: {', '.join(names)}", file=sys.stderr)
            return 2
        concurrency = [int(c) for c in args.concurrency.split(",")] if args.concurrency else None
    except (LabError, ValueError) as exc:
        print(exc if isinstance(exc, LabError) else f"--concurrency: {exc}", file=sys.stderr)
        return 2
    bars: dict = {}

    def progress(step: str, done: int, total: int) -> None:
        bar = bars.get(step)
        if bar is None:
            from tqdm import tqdm  # only once a request is done: start-up stays light

            bar = bars[step] = tqdm(total=total, desc=f"{args.endpoint} {step}", unit="req", leave=True)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    try:
        out = run_endpoint(lab, args.endpoint, Warehouse(settings.warehouse_path()), trigger="cli",
                           concurrency=concurrency, requests_per_step=args.requests, max_tokens=args.max_tokens,
                           progress=progress)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the steps already measured are in the warehouse", file=sys.stderr)
        return 130
    cols = ["concurrency", "n_ok", "n_requests", "ttft_ms_p50", "ttft_ms_p95", "tpot_ms_p50", "e2e_ms_p95",
            "output_tokens_per_s", "roofline_fraction", "error_rate"]
    widths = [max(len(c), 10) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in out.steps:
        print("  ".join(md_cell(row.get(c)).rjust(w) for c, w in zip(cols, widths)))
    if out.decode_ceiling_tok_s:
        print(f"roofline: ceiling {out.decode_ceiling_tok_s:,.1f} tok/s per request = {out.ceiling_source}; "
              "roofline_fraction is the measured per-request decode rate over it")
    else:
        print(f"roofline: {out.ceiling_source}")
    for row in out.steps:
        if row.get("ttft_server_prompt_ms") is not None:
            net = row.get("ttft_network_ms")
            print(f"TTFT p50 c={row['concurrency']}: {md_cell(row['ttft_ms_p50'])} ms = server prompt "
                  f"{md_cell(row['ttft_server_prompt_ms'])} + server queue/slot {md_cell(row['ttft_server_queue_ms'])}"
                  f" + client/network {md_cell(net)} ms (network: the probe's round trip; the server reports "
                  "no queue time, so that share is what remains)")
        if row.get("retries"):
            print(f"c={row['concurrency']}: {row['retries']} request(s) resent on a fresh connection after the "
                  "server had closed the pooled one (timed from the answered attempt; not errors)")
    print(f"run {out.run_id} ({out.status}) stored in {settings.warehouse_path()}")
    if out.status != "complete":  # its error names the most common failures, with a count and a message each
        print(f"error: the run failed: {out.error}", file=sys.stderr)
        return 1
    from idp_pipelines.bench.checks import describe_errors, sanity

    if out.errors:
        total = sum(count for count, _ in out.errors.values())
        print(f"{total} request(s) failed, most common: {describe_errors(out.errors)}")
    # what the asset's sanity check would say: prompt-cache hits, host load, lengths, roofline
    judged = sanity(out.steps, cache_bust=lab.benchmarks.cache_bust,
                    max_other_load_cores=lab.benchmarks.max_other_load_cores)
    if not judged.passed:
        print(f"warning: {judged.description}", file=sys.stderr)
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from idp_pipelines.embedded.tiny_model import write_tiny_gguf

    print(write_tiny_gguf(Path(args.out), seed=args.seed, dtype=args.dtype))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="idp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start the embedded lab: llama.cpp, MLflow and Dagster on 127.0.0.1")
    p.add_argument("--lab", help="lab inventory (default: $IDP_LAB or labs/local.yaml)")
    p.add_argument("--dagster-port", type=int, default=None, help="Dagster UI port (default $IDP_DAGSTER_PORT or 3000)")
    p.add_argument("--no-run", action="store_true", help="do not submit a run of the main job once up")
    p.set_defaults(fn=_up)

    p = sub.add_parser("lab-check", help="validate a lab inventory")
    p.add_argument("path", nargs="?", default=None)
    p.set_defaults(fn=_lab_check)

    p = sub.add_parser("bench", help="benchmark one endpoint of the lab now (same harness and tables as the asset)")
    p.add_argument("endpoint")
    p.add_argument("--concurrency", help="comma-separated sweep, e.g. 1,8,32 (default: from lab.yaml)")
    p.add_argument("--requests", type=int, default=None, help="requests per step (default: from lab.yaml)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--lab", default=None, help="lab inventory (default: $IDP_LAB or labs/local.yaml)")
    p.set_defaults(fn=_bench)

    p = sub.add_parser("tiny-model", help="write the tiny deterministic GGUF model")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    p.set_defaults(fn=_tiny_model)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
