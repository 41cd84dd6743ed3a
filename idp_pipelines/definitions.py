"""The code location: merges each domain's Definitions. Importing this module does no I/O."""

import dagster as dg

from idp_pipelines import settings
from idp_pipelines.assets import benchmarks, endpoints, knowledge, models, tracking
from idp_pipelines.lab import Lab, load_lab
from idp_pipelines.resources import HubResource, LabResource, MLflowResource, WarehouseResource

def resources() -> dict[str, dg.ConfigurableResource]:
    """Resource config from IDP_LAB / IDP_HOME; resources read the lab file when they run."""
    lab = LabResource(path=str(settings.lab_path()))
    return {
        "lab": lab,
        "warehouse": WarehouseResource(path=str(settings.warehouse_path())),
        "mlflow": MLflowResource(lab=lab),
        "hub": HubResource(lab=lab),
    }


def build_defs(lab: Lab) -> dg.Definitions:
    """The whole code location for one inventory (partitions are the inventory's models and endpoints)."""
    return dg.Definitions.merge(
        endpoints.build(lab),
        models.build(lab),
        benchmarks.build(lab),
        knowledge.build(lab),
        tracking.build(lab),
        dg.Definitions(resources=resources()),
    )


@dg.definitions
def defs() -> dg.Definitions:
    # Called by the loader, not at import: the one small read of lab.yaml happens here, so an invalid
    # inventory shows in the UI as a code location error that names the file, the field and the fix.
    return build_defs(load_lab(settings.lab_path()))
