"""One ConfigurableResource per external system. Runtime methods do the I/O; construction does none."""

from idp_pipelines.resources.hub import HubResource
from idp_pipelines.resources.lab import LabResource
from idp_pipelines.resources.mlflow import MLflowResource
from idp_pipelines.resources.warehouse import WarehouseResource

__all__ = ["HubResource", "LabResource", "MLflowResource", "WarehouseResource"]
