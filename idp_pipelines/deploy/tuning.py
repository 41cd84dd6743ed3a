"""benchmark_tuning's recommendations in the rendered configs, with hysteresis against a tune-deploy loop."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

SETTINGS = {"vllm": "max_num_seqs", "llamacpp": "parallel"}


@dataclass(frozen=True)
class Tuned:
    endpoint: str
    setting: str
    value: int
    source: str          # "benchmark_tuning", "kept" or "inventory"
    run_id: str | None   # the benchmark run that chose the value (or the recommendation that was declined)
    why: str

    def record(self) -> dict:
        return asdict(self)


def read_recommendations(path: Path) -> dict[str, dict]:
    """benchmark_tuning.json ({endpoint: {setting, recommended, current, run_id, reason}}); {} if absent."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        from . import DeployError

        raise DeployError(f"{path} is not readable JSON ({exc}). Fix: re-materialise benchmark_tuning.") from None
    return data if isinstance(data, dict) else {}


def choose(endpoint: str, kind: str, inventory_value: int | None, recs: dict[str, dict],
           previous: int | None, hysteresis: float, use_tuning: bool = True) -> Tuned | None:
    """The value to render for the endpoint's concurrency setting, and why.

    `previous` is the value the last rendering used. A recommendation moves it only when it differs by
    more than `hysteresis` of that value: a sweep that wobbles by a slot changes nothing on the host, so a
    deploy triggers one benchmark and not a loop of them.
    """
    setting = SETTINGS.get(kind)
    if setting is None or inventory_value is None:
        return None
    current = previous if previous is not None else inventory_value
    rec = recs.get(endpoint) if use_tuning else None
    if not rec or rec.get("setting") != setting or not isinstance(rec.get("recommended"), int):
        why = ("deploy.use_tuning is off" if not use_tuning else
               f"benchmark_tuning has no recommendation for {endpoint}" +
               (f" ({rec.get('reason')})" if rec and rec.get("reason") else ""))
        return Tuned(endpoint, setting, inventory_value, "inventory", None, why)
    recommended = int(rec["recommended"])
    run_id = rec.get("run_id")
    if abs(recommended - current) <= hysteresis * current:
        return Tuned(endpoint, setting, current, "kept" if previous is not None else "inventory", run_id,
                     f"benchmark run {run_id} recommends {recommended}, within {hysteresis:.0%} of {current}: "
                     f"unchanged")
    return Tuned(endpoint, setting, recommended, "benchmark_tuning", run_id,
                 f"benchmark run {run_id} recommends {recommended} (was {current}): {rec.get('reason', '')}".strip())
