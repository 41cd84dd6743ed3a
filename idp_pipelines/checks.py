"""The one shape of a check's verdict that the domain cores return (plain data, no Dagster).

Cores judge (hub, quantize, bench, backup); the asset shells turn a Judgement into Dagster's
AssetCheckResult with `assets.common.check_result`. Kept apart from every core so each can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Judgement:
    check: str
    passed: bool
    description: str
    severity: str = "ERROR"  # "ERROR" | "WARN"
    metadata: dict[str, Any] = field(default_factory=dict)
