import os
from pathlib import Path
from typing import Callable, Optional

import dagster as dg

from idp_pipelines.lab import Model
from idp_pipelines.resources.lab import LabResource


class HubResource(dg.ConfigurableResource):
    """The Hugging Face Hub (or the lab's Hub-compatible endpoint); the token comes from the lab's token_env."""

    lab: LabResource

    def _settings(self):
        inv = self.lab.load()
        return inv.hub, inv.model_cache

    def token(self) -> Optional[str]:
        hub, _ = self._settings()
        return os.environ.get(hub.token_env) or None

    def resolve(self, model: Model) -> str:
        from idp_pipelines.hub import resolve_revision

        hub, _ = self._settings()
        return resolve_revision(model.repo_id, model.revision, endpoint=hub.endpoint, token=self.token(),
                                lab_file=self.lab.path)

    def download(self, model: Model, progress: Optional[Callable[[int, int, str], None]] = None,
                 warn: Optional[Callable[[str], None]] = None, on_plan: Optional[Callable] = None):
        from idp_pipelines.hub import download_model

        hub, cache = self._settings()
        return download_model(
            model.repo_id, model.revision, cache_dir=cache.path, allow_patterns=model.allow_patterns,
            ignore_patterns=model.ignore_patterns, max_workers=hub.max_workers, token=self.token(),
            endpoint=hub.endpoint, budget_bytes=int(cache.budget_gb * 1e9), progress=progress, warn=warn,
            on_plan=on_plan, lab_file=self.lab.path,
        )

    def snapshot(self, model: Model) -> tuple[str, Path]:
        from idp_pipelines.hub import local_snapshot

        _, cache = self._settings()
        return local_snapshot(cache.path, model.repo_id, model.revision)
