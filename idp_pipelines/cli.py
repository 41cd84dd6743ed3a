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

    p = sub.add_parser("tiny-model", help="write the tiny deterministic GGUF model")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    p.set_defaults(fn=_tiny_model)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
