"""The code location: merges each domain's Definitions. Importing this module does no I/O."""

import dagster as dg

from idp_pipelines import settings
from idp_pipelines.assets import endpoints
from idp_pipelines.resources import LabResource, MLflowResource, WarehouseResource

MAIN_JOB = "lab_refresh"


def resources() -> dict[str, dg.ConfigurableResource]:
    """Resource config from IDP_LAB / IDP_HOME; the lab file itself is read only when an asset runs."""
    lab = LabResource(path=str(settings.lab_path()))
    return {
        "lab": lab,
        "warehouse": WarehouseResource(path=str(settings.warehouse_path())),
        "mlflow": MLflowResource(lab=lab),
    }


def build_defs() -> dg.Definitions:
    main_job = dg.define_asset_job(MAIN_JOB, selection=dg.AssetSelection.all(),
                                   description="Materialise the whole lab, end to end.")
    return dg.Definitions.merge(
        endpoints.defs(),
        dg.Definitions(jobs=[main_job], resources=resources()),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_defs()
