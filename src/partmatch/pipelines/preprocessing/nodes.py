"""Preprocessing nodes: decode every clean photo once into a uint8 tensor, then split it."""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import pandas as pd

from partmatch import config
from partmatch.datasets import ImageSource
from partmatch.imaging import PreprocessSpec, sha256, verify_chunk
from partmatch.pipelines.ingestion.decoding import (
    allocate_images,
    chunked,
    effective_workers,
    keep_rows,
    pool_is_warm,
    resolve_workers,
    run_chunked,
    shutdown_pool,
)
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


def preprocess_images(raw_images: ImageSource, clean_manifest: pd.DataFrame, params: dict[str, Any],
                      decoded_images: np.ndarray | None = None,
                      ingestion: dict[str, Any] | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Decode, EXIF-transpose, flatten alpha, grayscale/RGB, pad to square and resize; rows align with the index.

    With ``decoded_images`` (what ``scan_and_decode`` made in ingestion) nothing is decoded again: a clean row
    takes its preprocessed pixels from there when they were made with these ``preprocessing`` parameters and
    still hash to the manifest's ``pixel_sha256``; any other row is decoded here, on ``ingestion.workers``
    processes. Every file's bytes are checked against the sha256 ingestion recorded: a file that changed (or is
    missing) is skipped with a warning, never processed under the manifest's label; when more than half of them
    differ the source is another one and the node fails naming both. Fails too when no image is left.
    """
    p = config.parse("preprocessing", params)
    workers = resolve_workers(config.parse("ingestion", ingestion or {}).workers)
    spec = PreprocessSpec(p.image_size, p.color_mode, p.background)
    if clean_manifest.empty:
        raise PreprocessingError(
            "clean_manifest has 0 images: nothing to preprocess (an earlier ingestion run probably failed). "
            "Re-run ingestion: kedro run --pipeline ingestion --params=raw_source=PATH")
    rows = list(clean_manifest.itertuples(index=False))
    reusable = _reusable_rows(clean_manifest, decoded_images, spec)
    images = allocate_images((len(rows), spec.channels, p.image_size, p.image_size),
                             memory_budget_mb=p.memory_budget_mb, memmap_dir=p.memmap_dir)
    pixel_hashes: list[str | None] = [None] * len(rows)
    changed, failures = [], {}
    taken, mismatched, n_decoded = [], [], 0
    done: set[int] = set()
    too_many = MAX_CHANGED_FRACTION * len(rows)
    fn = functools.partial(verify_chunk, spec=spec, given=raw_images.given)

    def work(decode_all: bool):
        """(row, path or bytes, sha256, decode?) of every row still to do; stops once the source is another one."""
        for i, row in enumerate(rows):
            if len(changed) > too_many:
                return
            if i in done:
                continue
            decode = decode_all or not reusable[i]
            path = raw_images.files.get(row.path)
            if path is not None:
                yield i, path, row.sha256, decode
                continue
            data, why = _read_verified(raw_images, row.path, row.sha256)
            if data is None:
                changed.append((i, row.path, why))
                done.add(i)
                continue
            yield i, data, row.sha256, decode

    def run(decode_all: bool, todo: int, desc: str) -> None:
        nonlocal n_decoded
        # Checking hashes alone is faster here than starting a pool (car parts: 6,382 files in 0.26 s here, 0.40 s
        # with a new pool of 2), but ingestion's pool is usually still up: then the checks run there, in parallel.
        n_decode = todo if decode_all else int((~reusable).sum())
        if n_decode:
            pool = effective_workers(workers, n_decode)
        else:
            pool = workers if pool_is_warm(workers) else 1
        for results in run_chunked(fn, chunked(work(decode_all)), workers=pool, total=todo, desc=desc):
            for i, why, arr, digest, failure in results:
                row = rows[i]
                done.add(i)
                if why is not None:
                    changed.append((i, row.path, why))
                elif failure is not None:
                    n_decoded += 1
                    failures[i] = (row.path, failure)
                elif arr is not None:
                    n_decoded += 1
                    images[i] = arr
                    pixel_hashes[i] = digest
                elif isinstance(row.preprocess_error, str):      # ingestion's decode could not preprocess it
                    failures[i] = (row.path, row.preprocess_error)
                else:                                            # verified: ingestion's pixels, hash-checked
                    pixels = decoded_images[row.decoded_row]
                    digest = sha256(pixels.tobytes())
                    if digest == row.pixel_sha256:
                        images[i] = pixels
                        pixel_hashes[i] = digest
                        taken.append(i)
                    else:
                        mismatched.append(i)
                        done.discard(i)

    try:
        run(False, len(rows), f"preprocessing: {p.color_mode} {p.image_size}px")
        if mismatched and len(changed) <= too_many:  # rows of decoded_images that are not this manifest's: decode
            run(True, len(mismatched), "preprocessing: decoding")
    finally:
        shutdown_pool()  # the last user of ingestion's pool in a run: no idle workers during training
    changed.sort()
    if len(changed) > too_many:
        made_from = _manifest_source(clean_manifest)
        raise PreprocessingError(
            f"clean_manifest was made from {made_from or 'another source (its root is not recorded)'}, but "
            f"raw_source is now {raw_images.given}: more than {MAX_CHANGED_FRACTION:.0%} of its "
            f"{len(clean_manifest)} files are missing or have other bytes than ingestion hashed (e.g. "
            f"{changed[0][1]}: {changed[0][2]}). Re-run ingestion on this source (kedro run --pipeline ingestion "
            f"--params=raw_source={raw_images.given}) or pass --params=raw_source={made_from or '<the source ingestion used>'}.")
    for _, path, reason in changed:
        logger.warning("preprocessing skipped %s: %s; re-run ingestion if the source changed", path, reason)
    for i in sorted(failures):
        logger.warning("preprocessing skipped %s: %s", *failures[i])
    if changed or failures:
        logger.warning("preprocessing skipped %d of %d files (%d changed or missing since ingestion, %d failed).",
                       len(changed) + len(failures), len(clean_manifest), len(changed), len(failures))
    if mismatched:
        logger.warning("preprocessing decoded %d photo(s) again whose row in decoded_images is not the one ingestion "
                       "made for them (e.g. %s): decoded_images and clean_manifest come from different runs.",
                       len(mismatched), rows[mismatched[0]].path)
    logger.info("preprocessing: %d of %d photos taken from ingestion's decode, %d decoded here.", len(taken),
                len(rows), n_decoded)
    keep = [i for i, digest in enumerate(pixel_hashes) if digest is not None]
    if not keep:
        first = failures[min(failures)]
        raise PreprocessingError(
            f"0 of {len(clean_manifest)} images could be preprocessed from raw_source {raw_images.given}; "
            f"first failure: {first[0]}: {first[1]}. Re-run ingestion on this source.")
    index = pd.DataFrame([rows[i] for i in keep], columns=clean_manifest.columns)[["path", "label", "sha256",
                                                                                   "split_hint"]]
    index["pixel_hash"] = [pixel_hashes[i] for i in keep]
    return keep_rows(images, keep, memory_budget_mb=p.memory_budget_mb, memmap_dir=p.memmap_dir), index


def _reusable_rows(clean_manifest: pd.DataFrame, decoded_images: np.ndarray | None,
                   spec: PreprocessSpec) -> np.ndarray:
    """Which clean rows ingestion already preprocessed with ``spec`` (their pixels are hash-checked on use)."""
    n = len(clean_manifest)
    if decoded_images is None:
        return np.zeros(n, dtype=bool)
    missing = [c for c in ("decoded_row", "pixel_sha256", "decoded_as") if c not in clean_manifest.columns]
    shape = (spec.channels, spec.image_size, spec.image_size)
    if missing or decoded_images.ndim != 4 or decoded_images.shape[1:] != shape or decoded_images.dtype != np.uint8:
        logger.info("preprocessing decodes every photo: ingestion's decoded images (%s) do not fit %s (%s).",
                    getattr(decoded_images, "shape", None), spec.describe(),
                    f"manifest lacks {missing}" if missing else f"need (N, {', '.join(map(str, shape))}) uint8")
        return np.zeros(n, dtype=bool)
    row = pd.to_numeric(clean_manifest["decoded_row"], errors="coerce")
    ok = ((clean_manifest["decoded_as"] == spec.describe()) & row.notna() & (row >= 0)
          & (row < len(decoded_images))).to_numpy(dtype=bool)
    if not ok.all():
        logger.info("preprocessing decodes %d of %d photos again: ingestion decoded them as %s, not %s.",
                    int((~ok).sum()), n, sorted(set(clean_manifest["decoded_as"].dropna()))[:3], spec.describe())
    return ok


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


def model_input_params(preprocessing: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """``preprocessing`` with a model's own ``image_size`` / ``color_mode`` (TrainingParams; null = keep)."""
    p = config.parse("preprocessing", preprocessing).model_dump()
    own = config.parse("model", model, config.TrainingParams)
    p.update({key: getattr(own, key) for key in ("image_size", "color_mode") if getattr(own, key) is not None})
    return p


def preprocess_for_model(raw_images: ImageSource, clean_manifest: pd.DataFrame, split_index: pd.DataFrame,
                         preprocessing: dict[str, Any], model: dict[str, Any],
                         decoded_images: np.ndarray | None = None,
                         ingestion: dict[str, Any] | None = None) -> np.ndarray:
    """A model's own input: the photos of ``split_index``, in its rows (so every split is the study's), preprocessed
    at the model's ``image_size`` / ``color_mode`` (:func:`model_input_params`) by :func:`preprocess_images`, which
    takes ingestion's decoded pixels where they were made with the same parameters. Fails naming the photo when
    one of them cannot be preprocessed at this size (the rows would no longer line up with the splits)."""
    params = model_input_params(preprocessing, model)
    manifest = clean_manifest.drop_duplicates("path").set_index("path", drop=False)
    missing = split_index.loc[~split_index["path"].isin(manifest.index), "path"]
    if len(missing):
        raise PreprocessingError(
            f"{len(missing)} photo(s) of split_index are not in clean_manifest (e.g. {missing.iloc[0]}): they come "
            "from different runs; re-run ingestion and preprocessing (kedro run --pipeline data)")
    rows = manifest.loc[split_index["path"]].reset_index(drop=True)
    images, index = preprocess_images(raw_images, rows, params, decoded_images, ingestion)
    if len(index) != len(split_index) or not (index["path"].to_numpy() == split_index["path"].to_numpy()).all():
        lost = sorted(set(split_index["path"]) - set(index["path"]))
        raise PreprocessingError(
            f"{len(lost)} photo(s) of split_index could not be preprocessed at {params['image_size']} px "
            f"{params['color_mode']} (e.g. {lost[:1]}): the model's input would not line up with the splits")
    logger.info("model input: %d photos at %d px %s, in split_index's rows.", len(images), params["image_size"],
                params["color_mode"])
    return images
