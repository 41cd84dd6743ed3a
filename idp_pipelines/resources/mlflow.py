from typing import TYPE_CHECKING, Optional

import dagster as dg

from idp_pipelines.resources.lab import LabResource

if TYPE_CHECKING:
    from mlflow import MlflowClient


class MLflowConfigError(ValueError):
    """The MLflow tracking URI cannot be used."""


def check_tracking_uri(uri: str) -> str:
    ok = uri.startswith(("http://", "https://", "sqlite:////", "file:///"))
    if not ok:
        raise MLflowConfigError(
            f"MLflow tracking URI {uri!r} is not absolute. Fix: use http://host:port, sqlite:////abs/path/mlflow.db "
            f"or file:///abs/path (a relative URI would depend on the process's current directory)."
        )
    return uri.rstrip("/")


class MLflowResource(dg.ConfigurableResource):
    """MLflow, at the lab's tracking URI (or an explicit absolute one); never the current directory's default."""

    lab: LabResource
    tracking_uri: Optional[str] = None
    # Prepended to experiment names ("benchmarks/<endpoint>", "quantizations"): two labs sharing one server.
    experiment_prefix: str = ""

    def uri(self) -> str:
        return check_tracking_uri(self.tracking_uri or self.lab.load().mlflow.tracking_uri)

    def client(self) -> "MlflowClient":
        from mlflow import MlflowClient  # ~2 s to import: only when used

        return MlflowClient(tracking_uri=self.uri())
