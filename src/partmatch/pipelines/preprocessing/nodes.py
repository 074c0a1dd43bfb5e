"""Preprocessing nodes: decode every clean photo once into a uint8 tensor, then split it."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from partmatch import config
from partmatch.datasets import ImageSource
from partmatch.imaging import preprocess_bytes, sha256
from partmatch.splits import assign_splits, split_summary
from partmatch.tracking import as_mlflow_metrics

logger = logging.getLogger(__name__)


def preprocess_images(raw_images: ImageSource, clean_manifest: pd.DataFrame,
                      params: dict[str, Any]) -> tuple[np.ndarray, pd.DataFrame]:
    """Decode, EXIF-transpose, flatten alpha, grayscale/RGB, pad to square and resize; rows align with the index."""
    p = config.parse("preprocessing", params)
    channels = 1 if p.color_mode == "grayscale" else 3
    images = np.empty((len(clean_manifest), channels, p.image_size, p.image_size), dtype=np.uint8)
    keep, pixel_hashes, failures = [], [], []
    for row in tqdm(clean_manifest.itertuples(index=False), total=len(clean_manifest), unit="img",
                    desc=f"preprocessing: {p.color_mode} {p.image_size}px", mininterval=2):
        try:
            arr = preprocess_bytes(raw_images.read_bytes(row.path), image_size=p.image_size,
                                   color_mode=p.color_mode, background=p.background)
        except Exception as exc:  # noqa: BLE001 - a file that changed since ingestion is reported, not fatal
            failures.append((row.path, f"{type(exc).__name__}: {exc}"))
            continue
        images[len(keep)] = arr
        keep.append(row)
        pixel_hashes.append(sha256(arr.tobytes()))
    for path, reason in failures:
        logger.warning("preprocessing skipped %s: %s (re-run ingestion if the source changed)", path, reason)
    index = pd.DataFrame(keep, columns=clean_manifest.columns)[["path", "label", "sha256", "split_hint"]]
    index["pixel_hash"] = pixel_hashes
    return images[: len(keep)], index


def split_images(image_index: pd.DataFrame, params: dict[str, Any]) -> tuple[pd.DataFrame, dict, dict]:
    """Assign train/val/test/open splits (seeded, stratified, duplicate-aware); return index, summary, metrics."""
    p = config.parse("split", params)
    index = assign_splits(image_index, seed=p.seed, val_fraction=p.val_fraction, test_fraction=p.test_fraction,
                          open_set_fraction=p.open_set_fraction, open_set_classes=list(p.open_set_classes),
                          open_set_min_images=p.open_set_min_images)
    summary = split_summary(index)
    logger.info("Splits: %s; open set: %s", {k: v["images"] for k, v in summary["splits"].items()},
                summary["open_set_classes"])
    metrics = {f"{s}_images": v["images"] for s, v in summary["splits"].items()}
    metrics.update({f"{s}_categories": v["categories"] for s, v in summary["splits"].items()})
    return index, summary, as_mlflow_metrics(metrics)
