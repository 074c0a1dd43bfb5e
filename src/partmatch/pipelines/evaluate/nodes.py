"""Evaluate nodes: the model's own preprocessing, then leave-one-out scoring of the new source."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from partmatch import config
from partmatch.ml import workflow
from partmatch.tracking import as_mlflow_metrics

logger = logging.getLogger(__name__)


def model_preprocessing(model: dict, params: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing the model was trained with (image size, colour mode), overriding the current one."""
    current = config.parse("preprocessing", params).model_dump()
    return {**current, **model.get("preprocessing", {})}


def evaluate_source(model: dict, image_array: np.ndarray, image_index: pd.DataFrame,
                    params: dict[str, Any]) -> tuple[dict, dict]:
    """Leave-one-out retrieval and pair verification over the new source; ``open_set_`` metrics."""
    p = config.parse("evaluate", params)
    counts = image_index["label"].value_counts()
    keep = image_index["label"].map(counts).to_numpy() >= 2
    if keep.sum() < 2 or counts[counts >= 2].size < 2:
        raise ValueError("evaluate needs at least 2 categories with 2+ photos each in evaluate.source.")
    metrics = workflow.evaluate_unseen(model, image_array[keep], image_index.loc[keep, "label"].reset_index(drop=True),
                                       seed=p.seed)
    metrics["model"] = p.model
    logger.info("evaluate %s: open-set precision@1 %.4f, MAP@R %.4f on %d images / %d categories.", p.model,
                metrics["open_set_precision_at_1"], metrics["open_set_map_at_r"], metrics["open_set_images"],
                metrics["open_set_categories"])
    return metrics, as_mlflow_metrics({k: v for k, v in metrics.items() if k != "model"})
