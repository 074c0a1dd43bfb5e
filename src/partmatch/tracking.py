"""Small helpers shared by nodes that hand metrics to kedro-mlflow."""

from __future__ import annotations

import math
from collections.abc import Mapping


def as_mlflow_metrics(values: Mapping[str, float], step: int = 0) -> dict[str, dict[str, float]]:
    """Turn ``{name: number}`` into kedro-mlflow's ``{name: {"value": v, "step": s}}``, skipping non-numbers."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        out[key] = {"value": float(value), "step": step}
    return out


def history_as_mlflow_metrics(history: list[Mapping[str, float]], keys: list[str]) -> dict[str, list[dict]]:
    """Turn per-epoch records into kedro-mlflow metric histories (one point per epoch)."""
    out: dict[str, list[dict]] = {}
    for key in keys:
        points = [{"value": float(h[key]), "step": int(h["epoch"])} for h in history
                  if key in h and h[key] is not None and math.isfinite(float(h[key]))]
        if points:
            out[key] = points
    return out
