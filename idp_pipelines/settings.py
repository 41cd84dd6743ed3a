"""Where the lab inventory and the state live. Pure path arithmetic: nothing here touches the disk."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LAB = REPO_ROOT / "labs" / "local.yaml"


def idp_home() -> Path:
    """All mutable state (Dagster home, DuckDB, MLflow store, demo vault and caches): $IDP_HOME or .idp/."""
    return Path(os.environ.get("IDP_HOME") or REPO_ROOT / ".idp").expanduser().absolute()


def lab_path() -> Path:
    """The inventory in use: $IDP_LAB (relative to the current directory) or labs/local.yaml."""
    raw = os.environ.get("IDP_LAB")
    return Path(raw).expanduser().absolute() if raw else DEFAULT_LAB


def warehouse_path() -> Path:
    return idp_home() / "warehouse.duckdb"


def dagster_home() -> Path:
    return idp_home() / "dagster"


def dagster_url() -> str:
    """The Dagster UI that links in notes and MLflow point at: $IDP_DAGSTER_URL or the embedded lab's."""
    return (os.environ.get("IDP_DAGSTER_URL") or "http://127.0.0.1:3000").rstrip("/")


def deploy_dir(home: Path | None = None) -> Path:
    """Rendered service configs, one folder per host (what goes to its config_dir); each Docker host's
    `.env` there is the lab's key store."""
    return (home or idp_home()) / "deploy"


def reports_dir() -> Path:
    """Reports other tools read: hardware_findings.md, benchmark_tuning.json, findings/<run>.md."""
    return idp_home() / "reports"


def findings_path(run_id: str) -> Path:
    """The findings report as it stood when a benchmark run was first judged (MLflow attaches it)."""
    return reports_dir() / "findings" / f"{run_id}.md"
