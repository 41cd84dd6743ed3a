"""MLflow experiment logs of benchmark runs and quantizations (plain Python: no Dagster here)."""

from idp_pipelines.tracking.mlflow_log import (
    BENCHMARK,
    QUANTIZATION,
    Logged,
    MLflowLogger,
    Redactor,
    RunSpec,
    SyncReport,
    TrackingError,
)

__all__ = ["BENCHMARK", "QUANTIZATION", "Logged", "MLflowLogger", "Redactor", "RunSpec", "SyncReport",
           "TrackingError"]
