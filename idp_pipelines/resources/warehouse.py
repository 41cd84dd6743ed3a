
import dagster as dg

from idp_pipelines.warehouse import Warehouse


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB warehouse file; writers are serialised across processes, readers are read-only."""

    path: str
    lock_timeout_s: float = 600.0

    def get(self, log=None) -> Warehouse:
        return Warehouse(self.path, lock_timeout_s=self.lock_timeout_s, on_wait=log.info if log else None)
