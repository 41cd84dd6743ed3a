"""The code location: merges each domain's Definitions. Importing this module does no I/O."""

import dagster as dg

from idp_pipelines import settings
from idp_pipelines.assets import backup, benchmarks, deploy, endpoints, knowledge, models, tracking
from idp_pipelines.lab import Lab, load_lab
from idp_pipelines.resources import HubResource, LabResource, MLflowResource, WarehouseResource

AUTOMATION_SENSOR = "default_automation_condition_sensor"


def resources() -> dict[str, dg.ConfigurableResource]:
    """Resource config from IDP_LAB / IDP_HOME; resources read the lab file when they run."""
    lab = LabResource(path=str(settings.lab_path()))
    return {
        "lab": lab,
        "warehouse": WarehouseResource(path=str(settings.warehouse_path())),
        "mlflow": MLflowResource(lab=lab),
        "hub": HubResource(lab=lab),
    }


def automation_sensor() -> dg.AutomationConditionSensorDefinition:
    """The sensor that evaluates every asset's automation condition, RUNNING from the first start.

    Dagster makes one of this name by itself when a location has automation conditions, but STOPPED:
    then tuning, findings, MLflow and the notes never follow their inputs until someone finds the toggle.
    Declaring it under the same name makes it part of the code location and running by default.
    """
    return dg.AutomationConditionSensorDefinition(
        AUTOMATION_SENSOR,
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Evaluates the automation conditions of every asset (declarative automation): what "
                    "follows its inputs (tuning, findings, MLflow, the cache inventory, the notes) moves.",
    )


def build_defs(inventory: Lab) -> dg.Definitions:
    """The whole code location for one inventory (partitions are the inventory's models and endpoints)."""
    return dg.Definitions.merge(
        endpoints.defs(),
        models.build(inventory),
        benchmarks.build(inventory),
        knowledge.build(inventory),
        tracking.build(inventory),
        deploy.build(inventory),
        backup.build(inventory),
        dg.Definitions(sensors=[automation_sensor()], resources=resources()),
    )


@dg.definitions
def defs() -> dg.Definitions:
    # Called by the loader, not at import: the one small read of lab.yaml happens here, so an invalid
    # inventory shows in the UI as a code location error that names the file, the field and the fix.
    return build_defs(load_lab(settings.lab_path()))
