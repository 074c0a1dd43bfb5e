"""Ingestion nodes: scan the raw source into a manifest, quarantine bad files, apply the cleaning rules."""

from __future__ import annotations

import functools
import logging
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from partmatch import config
from partmatch.cleaning import find_duplicates, matched_family, unsafe_label_reason
from partmatch.datasets import ImageSource, printable
from partmatch.imaging import (
    IMAGE_EXTENSIONS,
    Decoded,
    ImageInfo,
    PreprocessSpec,
    decode_chunk,
)
from partmatch.tracking import as_mlflow_metrics

from .decoding import (
    allocate_images,
    chunked,
    effective_workers,
    pool_is_warm,
    resolve_workers,
    run_chunked,
    shutdown_pool,
)

logger = logging.getLogger(__name__)

# source_root: the raw_source the manifest was made from (preprocessing names it when the source changed)
MANIFEST_COLUMNS = ["path", "label", "split_hint", "sha256", "width", "height", "mode", "format",
                    "exif_orientation", "bytes", "source_root"]
# scan_and_decode only: where the file's preprocessed pixels are in the decoded images, their hash, the spec
# they were made with, and why preprocessing failed on a file that decoded (reported by preprocess_images)
DECODED_COLUMNS = ["decoded_row", "pixel_sha256", "decoded_as", "preprocess_error"]
DROP_COLUMNS = ["path", "label", "stage", "reason"]


class CleaningError(RuntimeError):
    """Raised when nothing usable is left after ingestion; the quarantine list says why."""


def scan_source(raw_images: ImageSource, params: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read and fully decode every file once; return the manifest of good images and the quarantine list.

    Every record ends in exactly one of the two. Refused before any byte is read: names that are not valid
    UTF-8, files that resolve outside the source folder (unless ``ingestion.allow_outside_root``), unsafe
    category names and non-image extensions. A file listed under several labels is read and decoded once.
    Decoding runs on ``ingestion.workers`` processes; the result does not depend on their number.
    """
    warm = pool_is_warm(resolve_workers(config.parse("ingestion", params).workers))
    try:
        manifest, quarantine, _ = _scan(raw_images, config.parse("ingestion", params), None, None)
    finally:
        if not warm:  # a pool this node started (one already up belongs to scan_and_decode's preprocessing)
            shutdown_pool()
    return manifest, quarantine


def scan_and_decode(raw_images: ImageSource, params: dict[str, Any],
                    preprocessing: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """``scan_source`` whose verification decode also preprocesses each photo (``preprocessing`` parameters).

    Returns (manifest, quarantine, decoded images): row ``decoded_row`` of the (N, C, S, S) uint8 array is the
    preprocessed photo of every manifest row naming that file, ``pixel_sha256`` its hash and ``decoded_as`` the
    preprocessing it had, so ``preprocess_images`` selects the clean rows instead of decoding every photo again
    (and can prove each row is the one ingestion made from the bytes the manifest hashed). Above
    ``preprocessing.memory_budget_mb`` the array is memory-mapped. Rows of quarantined files stay zero.
    """
    p = config.parse("ingestion", params)
    pp = config.parse("preprocessing", preprocessing)
    spec = PreprocessSpec(pp.image_size, pp.color_mode, pp.background)
    try:
        manifest, quarantine, images = _scan(raw_images, p, spec, pp)
    except BaseException:
        shutdown_pool()
        raise
    return manifest, quarantine, images  # the pool stays up for preprocess_images, which shuts it down


def _scan(raw_images: ImageSource, p: config.IngestionParams, spec: PreprocessSpec | None,
          pp: config.PreprocessingParams | None) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray | None]:
    max_bytes = int(p.max_file_mb * 1024 * 1024)
    bad = [{"path": printable(s["path"]), "label": None if s.get("label") is None else printable(s["label"]),
            "stage": s.get("stage", "scan"), "reason": printable(s["reason"])} for s in raw_images.skipped]
    records = list(raw_images.records.itertuples(index=False))
    # 1. what can be refused without reading a byte; every other distinct file is decoded once (in record order)
    refused: list[str | None] = []
    rows: dict[str, int] = {}
    for rec in records:
        reason = None
        if not p.allow_outside_root:
            target = raw_images.outside_root(rec.path)
            if target is not None:
                reason = (f"outside the source folder: resolves to {printable(target)}, not below "
                          f"{printable(raw_images.root)} (ingestion.allow_outside_root is false)")
        if reason is None:
            reason = unsafe_label_reason(rec.label)
        if reason is None and PurePosixPath(rec.path).suffix.lower() not in IMAGE_EXTENSIONS:
            reason = f"not an image file (extension '{PurePosixPath(rec.path).suffix}')"
        if reason is None:
            rows.setdefault(rec.path, len(rows))
        refused.append(reason)
    keys = list(rows)
    # 2. decode them on every core
    decoded: list[Decoded | None] = [None] * len(keys)
    images = None
    if spec is not None:
        images = allocate_images((len(keys), spec.channels, spec.image_size, spec.image_size),
                                 memory_budget_mb=pp.memory_budget_mb, memmap_dir=pp.memmap_dir)

    def work():
        """(row, path) for the workers to read, or (row, bytes) for a source without paths on disk."""
        for i, key in enumerate(keys):
            path = raw_images.files.get(key)
            if path is not None:
                yield i, path
                continue
            try:
                yield i, raw_images.read_bytes(key)
            except FileNotFoundError:
                decoded[i] = Decoded(ImageInfo("", 0, error=f"file not found under {printable(raw_images.root)}"))
            except OSError as exc:
                decoded[i] = Decoded(ImageInfo("", 0, error=f"cannot read file: {type(exc).__name__}: {exc}"))

    limits = {"max_bytes": max_bytes, "max_pixels": p.max_pixels, "min_side": p.min_side,
              "max_aspect_ratio": p.max_aspect_ratio}
    workers = effective_workers(resolve_workers(p.workers), len(keys))
    fn = functools.partial(decode_chunk, limits=limits, spec=spec, root=printable(raw_images.root))
    for results in run_chunked(fn, chunked(work()), workers=workers, total=len(keys),
                               desc=f"ingestion: verifying images ({workers} process{'es' if workers > 1 else ''})"):
        for i, result, array in results:
            if array is not None:
                images[i] = array
            decoded[i] = result
    # 3. the manifest and the quarantine list, in record order
    good = []
    for rec, reason in zip(records, refused, strict=True):
        path, label = printable(rec.path), printable(rec.label)  # records hold valid UTF-8 (see ImageSource)
        if reason is None:
            result = decoded[rows[rec.path]]
            info, reason = result.info, result.info.error
            reason = None if reason is None else printable(reason)
            if reason is None:
                row = {"path": rec.path, "label": rec.label, "split_hint": rec.split_hint, "sha256": info.sha256,
                       "width": info.width, "height": info.height, "mode": info.mode, "format": info.format,
                       "exif_orientation": info.exif_orientation, "bytes": info.bytes,
                       "source_root": raw_images.given}
                if spec is not None:
                    row.update(decoded_row=rows[rec.path], decoded_as=spec.describe(),
                               pixel_sha256=result.pixel_sha256, preprocess_error=result.preprocess_error)
                good.append(row)
                continue
        bad.append({"path": path, "label": label, "stage": "quarantine", "reason": reason})
    columns = MANIFEST_COLUMNS + (DECODED_COLUMNS if spec is not None else [])
    manifest = pd.DataFrame(good, columns=columns).astype({"exif_orientation": "Int64"})
    if spec is not None:
        manifest = manifest.astype({"decoded_row": "int64"})
    quarantine = pd.DataFrame(bad, columns=DROP_COLUMNS)
    logger.info("Scanned %d files: %d usable, %d quarantined, %d skipped.", len(records), len(manifest),
                int((quarantine["stage"] == "quarantine").sum()), int((quarantine["stage"] == "scan").sum()))
    if images is not None and isinstance(images, np.memmap):
        images.flush()
    return manifest, quarantine, images


def clean_manifest(manifest: pd.DataFrame, quarantine: pd.DataFrame,
                   params: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Drop duplicates, excluded keyword families and rare categories; return (clean manifest, dropped files)."""
    p = config.parse("ingestion", params)
    if manifest.empty:
        reasons = quarantine["reason"].value_counts().head(5).to_dict() if not quarantine.empty else {}
        raise CleaningError(
            f"No usable image in raw_source: {len(quarantine)} file(s) quarantined, 0 left. Most common reasons: "
            f"{reasons}. See the quarantine list (catalog entry 'quarantine', data/02_intermediate/quarantine.csv) "
            "and point --params=raw_source=PATH at a folder of photos in category sub-folders or a CSV manifest."
        )
    dropped = []
    # only files whose bytes occur more than once can be duplicates: the rest skips find_duplicates' group-by
    repeated = manifest["sha256"].duplicated(keep=False)
    dup_reasons = pd.Series([None] * len(manifest), index=manifest.index, dtype=object)
    found, conflicts = find_duplicates(manifest.loc[repeated])
    dup_reasons.loc[found.index] = found
    for conflict in conflicts:
        logger.warning("Duplicate conflict: identical photo filed under %s: %s", conflict["labels"], conflict["paths"])
    is_dup = dup_reasons.notna()
    dropped.append(manifest.loc[is_dup, ["path", "label"]].assign(stage="duplicate", reason=dup_reasons[is_dup]))
    kept = manifest.loc[~is_dup]

    families = {label: matched_family(label, p.excluded_families, p.compound_min_length, p.always_keep)
                for label in kept["label"].unique()}
    in_family = kept["label"].map(families).notna()
    dropped.append(kept.loc[in_family, ["path", "label"]].assign(
        stage="excluded_family",
        reason=kept.loc[in_family, "label"].map(lambda lab: f"category in excluded keyword family '{families[lab]}'")))
    kept = kept.loc[~in_family]

    counts = kept["label"].value_counts()
    rare = kept["label"].map(counts) < p.min_images_per_class
    dropped.append(kept.loc[rare, ["path", "label"]].assign(
        stage="rare_category",
        reason=kept.loc[rare, "label"].map(
            lambda lab: f"category has {counts[lab]} photo(s) < {p.min_images_per_class} (ingestion.min_images_per_class)")))
    kept = kept.loc[~rare].sort_values(["label", "path"]).reset_index(drop=True)
    if kept.empty:
        raise CleaningError(
            f"Every category was dropped by cleaning ({manifest['label'].nunique()} categories in). Lower "
            "ingestion.min_images_per_class or edit ingestion.excluded_families in conf/base/parameters_ingestion.yml."
        )
    dropped_df = pd.concat([quarantine[DROP_COLUMNS]] + [d[DROP_COLUMNS] for d in dropped], ignore_index=True)
    return kept, dropped_df


def summarise_cleaning(raw_manifest: pd.DataFrame, dropped: pd.DataFrame, clean: pd.DataFrame,
                       params: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, dict]]:
    """Write the human-readable cleaning report; return (markdown, counts as JSON, counts as MLflow metrics)."""
    p = config.parse("ingestion", params)
    n_quarantined = int((dropped["stage"] == "quarantine").sum())
    n_skipped = int((dropped["stage"] == "scan").sum())
    # Every entry of the source (a file, or a (file, label) row of a CSV) is in exactly one of: the clean
    # manifest, or the dropped list under one stage. So files_before = images_before + quarantined + skipped and
    # images_before = images_after + duplicates_dropped + excluded_family_images + rare_category_images.
    files_before = len(raw_manifest) + n_quarantined + n_skipped
    labels_before = set(raw_manifest["label"]) | set(dropped.loc[dropped["stage"] == "quarantine", "label"].dropna())
    by_stage = dropped.groupby("stage").size().to_dict()
    counts = {
        "files_before": files_before,
        "images_before": len(raw_manifest),
        "categories_before": len(labels_before),
        "images_after": len(clean),
        "categories_after": int(clean["label"].nunique()),
        "quarantined": n_quarantined,
        "skipped": n_skipped,
        "duplicates_dropped": int(by_stage.get("duplicate", 0)),
        "excluded_family_images": int(by_stage.get("excluded_family", 0)),
        "rare_category_images": int(by_stage.get("rare_category", 0)),
    }
    cat_drops = (dropped[dropped["stage"].isin(["excluded_family", "rare_category"])]
                 .groupby(["label", "stage", "reason"]).size().reset_index(name="photos"))
    counts["excluded_family_categories"] = int((cat_drops["stage"] == "excluded_family").sum())
    counts["rare_categories"] = int((cat_drops["stage"] == "rare_category").sum())
    lines = [
        "# Cleaning report", "",
        "| | images | categories |", "|---|---:|---:|",
        f"| before (decodable) | {counts['images_before']} | {counts['categories_before']} |",
        f"| after | {counts['images_after']} | {counts['categories_after']} |", "",
        (f"Files scanned: {files_before}. Quarantined: {n_quarantined}. Skipped (hidden, or not in a category "
         f"folder): {n_skipped}. Exact duplicates dropped: "
         f"{counts['duplicates_dropped']}. Photos in excluded keyword families: {counts['excluded_family_images']} "
         f"({counts['excluded_family_categories']} categories). Photos in categories with fewer than "
         f"{p.min_images_per_class} photos: {counts['rare_category_images']} ({counts['rare_categories']} "
         "categories)."),
        "", f"Excluded families: {', '.join(p.excluded_families)} (rule: see conf/base/parameters_ingestion.yml).",
        "", "## Dropped categories", "", "| category | stage | reason | photos |", "|---|---|---|---:|",
        *[f"| {_cell(r.label)} | {r.stage} | {_cell(r.reason)} | {r.photos} |" for r in cat_drops.itertuples()],
        "", "## Every dropped or quarantined file", "", "| file | category | stage | reason |", "|---|---|---|---|",
        *[f"| {_cell(r.path)} | {'-' if pd.isna(r.label) else _cell(r.label)} | {r.stage} | {_cell(r.reason)} |"
          for r in dropped.itertuples()], "",
    ]
    logger.info("Cleaning: %d images / %d categories -> %d images / %d categories.", counts["images_before"],
                counts["categories_before"], counts["images_after"], counts["categories_after"])
    metrics = as_mlflow_metrics(counts)
    return "\n".join(lines), counts, metrics


def _cell(text: Any) -> str:
    """One Markdown table cell: a newline or '|' in a file or category name cannot break the table."""
    return printable(text).replace("|", "\\|").replace("\r", "\\r").replace("\n", "\\n")
