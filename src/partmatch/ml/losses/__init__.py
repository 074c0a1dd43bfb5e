"""Losses: the hand-written ones (``handwritten``) and the registry of losses, miners and samplers by name
(``registry``, importable without torch, which ``partmatch.config`` validates the model parameters with).

``from partmatch.ml.losses import QuadrupletLoss`` still works: the hand-written losses are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_HANDWRITTEN = ("ProxyRepulsionLoss", "QuadrupletLoss", "StudyContrastiveLoss", "pairwise_distances",
                "rowwise_distance", "squared_distance")

__all__ = list(_HANDWRITTEN)


def __getattr__(name: str) -> Any:
    if name in _HANDWRITTEN:
        return getattr(importlib.import_module("partmatch.ml.losses.handwritten"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
