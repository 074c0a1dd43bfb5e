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
from partmatch.ml.retrieval import GalleryIndex, IndexConfig

# splits whose photos are catalogue items of the gallery index ("excluded" = identical pixels under two names)
GALLERY_SPLITS = ("train", "val", "test", "open")


def cache_backbone_features(image_array: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Frozen pretrained backbone: its pooled features for every image, computed once (else an empty array)."""
    return workflow.backbone_features(image_array, config.parse("model", params, config.TrainingParams))


def train_model(image_array: np.ndarray, split_index: pd.DataFrame, params: dict[str, Any],
                preprocessing: dict[str, Any]) -> tuple[dict, pd.DataFrame, dict]:
    """Train on the train split (early stopping on val); return the model bundle, per-epoch history and summary.
    A frozen pretrained backbone (``train_mode: frozen``) has its features computed here, kept in memory only
    (the ``siamese_pretrained`` pipeline caches them as a dataset instead)."""
    features = cache_backbone_features(image_array, params)
    return train_model_on_features(image_array, features, split_index, params, preprocessing)


def train_model_on_features(image_array: np.ndarray, backbone_features: np.ndarray, split_index: pd.DataFrame,
                            params: dict[str, Any], preprocessing: dict[str, Any]) -> tuple[dict, pd.DataFrame, dict]:
    """As :func:`train_model`, the head trained on cached frozen-backbone features when there are some."""
    p = config.parse("model", params, config.TrainingParams)
    bundle, history, summary = workflow.train(image_array, split_index, p, p.checkpoint_dir, preprocessing,
                                              features=backbone_features if backbone_features.size else None)
    return bundle, pd.DataFrame(history), summary


def embed_images(uncalibrated_model: dict, image_array: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """Every image's embedding (row i = image i), computed once per trained model."""
    p = config.parse("model", params, config.TrainingParams)
    return workflow.embed_all(uncalibrated_model, image_array, device=p.device, batch_size=p.eval_batch_size)


def embed_cached_features(uncalibrated_model: dict, image_array: np.ndarray, backbone_features: np.ndarray,
                          params: dict[str, Any]) -> np.ndarray:
    """Every image's embedding from the cached backbone features (frozen mode: the backbone does not run again)."""
    p = config.parse("model", params, config.TrainingParams)
    return workflow.embed_all(uncalibrated_model, image_array, backbone_features, device=p.device,
                              batch_size=p.eval_batch_size)


def calibrate_threshold(uncalibrated_model: dict, embeddings: np.ndarray, split_index: pd.DataFrame,
                        params: dict[str, Any]) -> tuple[dict, pd.DataFrame, Figure, Figure]:
    """Choose the pair threshold on training pairs and store it in the model; plot distances and curves."""
    p = config.parse("model", params, config.TrainingParams)
    model, sweep, dist, same = workflow.calibrate_threshold(uncalibrated_model, embeddings, split_index, p)
    return (model, sweep, plots.pair_distance_histogram(dist, same, model["threshold"]),
            plots.threshold_curves(sweep, model["threshold"]))


def evaluate_model(model: dict, embeddings: np.ndarray, split_index: pd.DataFrame, history: pd.DataFrame,
                   summary: dict, params: dict[str, Any]) -> tuple[dict, Figure]:
    """Score the model (closed set, open set, pairs) and merge training facts into metrics.json."""
    p = config.parse("model", params, config.TrainingParams)
    metrics = workflow.evaluate(model, embeddings, split_index, p)
    metrics.update({"epochs": int(summary["epochs_run"]), "best_epoch": int(summary["best_epoch"]),
                    "train_images_per_second": float(summary["images_per_second"]), "device": summary["device"],
                    "train_wall_seconds": float(summary["wall_seconds"]),
                    "train_processes": int(summary.get("world_size", 1))})
    metrics.update({k: summary[k] for k in ("pca_components", "pca_explained_variance", "pca_fit_seconds")
                    if k in summary})
    if summary.get("gpu_name"):
        metrics.update({"gpu_name": summary["gpu_name"], "gpu_peak_memory_mb": summary["gpu_peak_memory_mb"]})
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    json.dumps(metrics)  # fail here, not half-way through saving, if anything is not JSON
    return metrics, plots.loss_curves(history.to_dict("records"))


def interpret_embeddings(model: dict, embeddings: np.ndarray, split_index: pd.DataFrame, image_array: np.ndarray,
                         params: dict[str, Any]) -> tuple[Figure, Figure, Figure, Figure, pd.DataFrame, pd.DataFrame]:
    """Interpretability figures of the open-set embeddings (the test split's without an open set): a 2-D map
    coloured by category, queries with their 5 nearest photos, the most confused category pairs and
    per-category precision@1 (figures, and the last two as tables)."""
    p = config.parse("model", params, config.TrainingParams)
    found = workflow.interpretability(model, embeddings, split_index, p)
    which = "Open-set" if found["split"] == "open" else "Test-split"
    method = {"tsne": "t-SNE", "pca": "PCA"}[p.embedding_map]
    return (plots.embedding_map_figure(found["xy"], found["labels"], f"{which} embeddings", method),
            plots.neighbour_gallery_figure(image_array, found["queries"], found["neighbours"], split_index["label"],
                                           f"{which} queries and their nearest photos"),
            plots.confused_pairs_figure(found["confused"], f"Most confused {which.lower()} categories"),
            plots.per_category_precision_figure(found["per_category"], f"{which} precision@1 per category"),
            found["confused"], found["per_category"])


def index_gallery(model: dict, embeddings: np.ndarray, split_index: pd.DataFrame,
                  index_params: dict[str, Any] | None) -> GalleryIndex:
    """The search index of the training source's catalogue: every photo's embedding with its part name, file
    path and content hash (the served model searches it; ``search_index`` builds one for any other source)."""
    keep = split_index["split"].isin(GALLERY_SPLITS).to_numpy()
    rows = split_index.loc[keep]
    return GalleryIndex(np.asarray(embeddings)[keep], rows["label"].astype(str).tolist(),
                        ids=rows["path"].astype(str).tolist(), distance=model.get("distance", "euclidean"),
                        config=IndexConfig.from_dict(index_params),
                        metadata=rows[["path", "sha256"]].reset_index(drop=True))
