"""MLflow experiment logs of benchmark runs and quantizations (plain Python: no Dagster here).

queries (DuckDB reads) -> specs (what a run holds) + artifacts (parquet, plots) -> protocol (the
idempotent MLflow calls) -> links (DuckDB's mlflow_runs); sync runs them in that order.
"""

from idp_pipelines.tracking.errors import TrackingError
from idp_pipelines.tracking.protocol import Logged, run_url
from idp_pipelines.tracking.specs import BENCHMARK, QUANTIZATION, RunSpec
from idp_pipelines.tracking.sync import MLflowLogger, SyncReport

__all__ = ["BENCHMARK", "QUANTIZATION", "Logged", "MLflowLogger", "RunSpec", "SyncReport", "TrackingError",
           "run_url"]
