"""Training / evaluation nodes shared by every model pipeline (logic in partmatch.ml.workflow)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from partmatch import config
from partmatch.ml import plots, workflow
from partmatch.tracking import as_mlflow_metrics, history_as_mlflow_metrics


def cache_backbone_features(image_array: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Frozen pretrained backbone: its pooled features for every image, computed once (else an empty array)."""
    return workflow.backbone_features(image_array, config.parse("model", params, config.TrainingParams))


def train_model(image_array: np.ndarray, backbone_features: np.ndarray, split_index: pd.DataFrame,
                params: dict[str, Any], preprocessing: dict[str, Any]) -> tuple[dict, pd.DataFrame, dict]:
    """Train on the train split (early stopping on val); return the model bundle, per-epoch history and summary."""
    p = config.parse("model", params, config.TrainingParams)
    bundle, history, summary = workflow.train(image_array, split_index, p, p.checkpoint_dir, preprocessing,
                                              features=backbone_features if backbone_features.size else None)
    return bundle, pd.DataFrame(history), summary


def calibrate_threshold(trained_model: dict, image_array: np.ndarray, split_index: pd.DataFrame,
                        params: dict[str, Any]) -> tuple[dict, pd.DataFrame, Figure, Figure]:
    """Choose the pair threshold on training pairs and store it in the model; plot distances and curves."""
    p = config.parse("model", params, config.TrainingParams)
    model, curve, dist, same = workflow.calibrate_threshold(trained_model, image_array, split_index, p)
    return (model, curve, plots.pair_distance_histogram(dist, same, model["threshold"]),
            plots.threshold_curves(curve, model["threshold"]))


def evaluate_model(model: dict, image_array: np.ndarray, split_index: pd.DataFrame, history: pd.DataFrame,
                   summary: dict, params: dict[str, Any]) -> tuple[dict, dict, Figure]:
    """Score the model (closed set, open set, pairs) and merge training facts into metrics.json."""
    p = config.parse("model", params, config.TrainingParams)
    metrics = workflow.evaluate(model, image_array, split_index, p)
    metrics.update({"epochs": int(summary["epochs_run"]), "best_epoch": int(summary["best_epoch"]),
                    "train_images_per_second": float(summary["images_per_second"]), "device": summary["device"],
                    "train_wall_seconds": float(summary["wall_seconds"])})
    if summary.get("gpu_name"):
        metrics.update({"gpu_name": summary["gpu_name"], "gpu_peak_memory_mb": summary["gpu_peak_memory_mb"]})
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    records = history.to_dict("records")
    mlflow_metrics = {**as_mlflow_metrics({k: v for k, v in metrics.items() if v is not None}),
                      **history_as_mlflow_metrics(records, ["train_loss", "val_score", "images_per_second"])}
    json.dumps(metrics)  # fail here, not half-way through saving, if anything is not JSON
    return metrics, mlflow_metrics, plots.loss_curves(records)
