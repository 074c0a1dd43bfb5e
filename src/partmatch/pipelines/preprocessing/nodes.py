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


# Above this share of the manifest's files missing or with other bytes than ingestion hashed, the source is taken
# to be another one (not a few edited files) and preprocessing stops instead of mislabelling the rest.
MAX_CHANGED_FRACTION = 0.5
# Where ingestion may record the source it scanned: a column of the manifest, else ``DataFrame.attrs``.
SOURCE_KEYS = ("source_root", "raw_source")


class PreprocessingError(RuntimeError):
    """Raised when the clean manifest and the raw source do not belong together, or nothing is left to train on."""


def _manifest_source(clean_manifest: pd.DataFrame) -> str | None:
    for key in SOURCE_KEYS:
        if key in clean_manifest.columns and clean_manifest[key].notna().any():
            return str(clean_manifest[key].dropna().iloc[0])
        if clean_manifest.attrs.get(key):
            return str(clean_manifest.attrs[key])
    return None


def _read_verified(raw_images: ImageSource, path: str, expected_sha: str) -> tuple[bytes | None, str | None]:
    """The file's bytes if they are those ingestion hashed, else (None, why)."""
    try:
        data = raw_images.read_bytes(path)
    except (KeyError, OSError) as exc:
        return None, f"missing from raw_source {raw_images.given} ({type(exc).__name__})"
    digest = sha256(data)
    if digest != expected_sha:
        return None, f"bytes changed since ingestion (sha256 {digest[:12]}... != manifest's {str(expected_sha)[:12]}...)"
    return data, None


def preprocess_images(raw_images: ImageSource, clean_manifest: pd.DataFrame,
                      params: dict[str, Any]) -> tuple[np.ndarray, pd.DataFrame]:
    """Decode, EXIF-transpose, flatten alpha, grayscale/RGB, pad to square and resize; rows align with the index.

    Every file's bytes are checked against the sha256 ingestion recorded: a file that changed (or is missing)
    is skipped with a warning, never processed under the manifest's label; when more than half of them differ
    the source is another one and the node fails naming both. Fails too when no image is left.
    """
    p = config.parse("preprocessing", params)
    channels = 1 if p.color_mode == "grayscale" else 3
    if clean_manifest.empty:
        raise PreprocessingError(
            "clean_manifest has 0 images: nothing to preprocess (an earlier ingestion run probably failed). "
            "Re-run ingestion: kedro run --pipeline ingestion --params=raw_source=PATH")
    images = np.empty((len(clean_manifest), channels, p.image_size, p.image_size), dtype=np.uint8)
    keep, pixel_hashes, changed, failures = [], [], [], []
    for row in tqdm(clean_manifest.itertuples(index=False), total=len(clean_manifest), unit="img",
                    desc=f"preprocessing: {p.color_mode} {p.image_size}px", mininterval=2):
        data, why = _read_verified(raw_images, row.path, row.sha256)
        if data is None:
            changed.append((row.path, why))
            if len(changed) > MAX_CHANGED_FRACTION * len(clean_manifest):
                break
            continue
        try:
            arr = preprocess_bytes(data, image_size=p.image_size, color_mode=p.color_mode, background=p.background)
        except Exception as exc:  # noqa: BLE001 - same bytes as ingestion verified; reported, not fatal
            failures.append((row.path, f"{type(exc).__name__}: {exc}"))
            continue
        images[len(keep)] = arr
        keep.append(row)
        pixel_hashes.append(sha256(arr.tobytes()))
    if len(changed) > MAX_CHANGED_FRACTION * len(clean_manifest):
        made_from = _manifest_source(clean_manifest)
        raise PreprocessingError(
            f"clean_manifest was made from {made_from or 'another source (its root is not recorded)'}, but "
            f"raw_source is now {raw_images.given}: more than {MAX_CHANGED_FRACTION:.0%} of its "
            f"{len(clean_manifest)} files are missing or have other bytes than ingestion hashed (e.g. "
            f"{changed[0][0]}: {changed[0][1]}). Re-run ingestion on this source (kedro run --pipeline ingestion "
            f"--params=raw_source={raw_images.given}) or pass --params=raw_source={made_from or '<the source ingestion used>'}.")
    for path, reason in changed:
        logger.warning("preprocessing skipped %s: %s; re-run ingestion if the source changed", path, reason)
    for path, reason in failures:
        logger.warning("preprocessing skipped %s: %s", path, reason)
    if changed or failures:
        logger.warning("preprocessing skipped %d of %d files (%d changed or missing since ingestion, %d failed).",
                       len(changed) + len(failures), len(clean_manifest), len(changed), len(failures))
    if not keep:
        raise PreprocessingError(
            f"0 of {len(clean_manifest)} images could be preprocessed from raw_source {raw_images.given}; "
            f"first failure: {failures[0][0]}: {failures[0][1]}. Re-run ingestion on this source.")
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
