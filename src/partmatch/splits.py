"""Seeded, stratified, duplicate-aware splits with a class-disjoint open set of unseen categories.

Rules (``split`` parameters):

* Identical preprocessed images (same pixel hash) form one group and always land in the same split; the
  same pixels under two different categories are a conflict and both are marked ``excluded``.
* Open set: ``open_set_classes`` if given, else ``round(open_set_fraction * #categories)`` categories drawn
  (seeded) among those with at least ``open_set_min_images`` photos. They are never used in training.
* Closed set, per category with G groups: ``test = floor(G*test_fraction)``, ``val = floor(G*val_fraction)``;
  a category with 2+ groups always gets one test photo and with 3+ one validation photo, and always keeps at
  least one training photo. So a 2-photo category is 1 train + 1 test; a 3-photo one is 1/1/1; a single-photo
  category (only possible with ``min_images_per_class: 1``) is train-only.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test", "open", "excluded")


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def closed_set_counts(groups: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Return (train, val, test) group counts for a category with ``groups`` distinct images."""
    n_test = math.floor(groups * test_fraction)
    n_val = math.floor(groups * val_fraction)
    if groups >= 2 and n_test == 0 and test_fraction > 0:
        n_test = 1
    if groups >= 3 and n_val == 0 and val_fraction > 0:
        n_val = 1
    while groups - n_test - n_val < 1 and (n_val or n_test):
        if n_val:
            n_val -= 1
        else:
            n_test -= 1
    return groups - n_val - n_test, n_val, n_test


def choose_open_set(counts: pd.Series, fraction: float, explicit: list[str], min_images: int, seed: int) -> list[str]:
    """Pick the unseen categories: the explicit list (validated) or a seeded fraction of eligible categories."""
    if explicit:
        unknown = sorted(set(explicit) - set(counts.index))
        if unknown:
            raise ValueError(
                f"split.open_set_classes names categories that are not in the cleaned data: {unknown}. "
                f"Known categories include {sorted(counts.index)[:10]}."
            )
        return sorted(explicit)
    n_open = int(round(fraction * len(counts)))
    eligible = sorted(counts[counts >= min_images].index)
    n_open = min(n_open, len(eligible), max(len(counts) - 2, 0))
    if n_open <= 0:
        return []
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(eligible, size=n_open, replace=False).tolist())


def assign_splits(index: pd.DataFrame, *, seed: int, val_fraction: float, test_fraction: float,
                  open_set_fraction: float, open_set_classes: list[str], open_set_min_images: int) -> pd.DataFrame:
    """Return ``index`` with ``split``, ``label_id`` and ``split_reason`` columns (see module docstring)."""
    out = index.copy()
    out["split"] = "unassigned"
    out["split_reason"] = ""
    labels_per_hash = out.groupby("pixel_hash")["label"].nunique()
    conflict = out["pixel_hash"].map(labels_per_hash) > 1
    out.loc[conflict, "split"] = "excluded"
    out.loc[conflict, "split_reason"] = "identical pixels under two categories"
    usable = out[~conflict]
    counts = usable.groupby("label")["pixel_hash"].nunique()
    open_classes = choose_open_set(counts, open_set_fraction, open_set_classes, open_set_min_images, seed)
    is_open = ~conflict & out["label"].isin(open_classes)
    out.loc[is_open, "split"] = "open"
    for label, rows in usable[~usable["label"].isin(open_classes)].groupby("label"):
        hashes = sorted(rows["pixel_hash"].unique())
        order = _rng(seed, str(label)).permutation(len(hashes))
        n_train, n_val, _ = closed_set_counts(len(hashes), val_fraction, test_fraction)
        split_of = {}
        for rank, h in enumerate(np.asarray(hashes)[order]):
            split_of[h] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
        out.loc[rows.index, "split"] = rows["pixel_hash"].map(split_of)
    classes = sorted(out["label"].unique())
    out["label_id"] = out["label"].map({c: i for i, c in enumerate(classes)}).astype("int64")
    return out


def split_summary(index: pd.DataFrame) -> dict:
    """Counts of images and categories per split, and the open-set category list."""
    per_split = {s: {"images": int((index["split"] == s).sum()),
                     "categories": int(index.loc[index["split"] == s, "label"].nunique())} for s in SPLITS}
    return {"splits": per_split,
            "open_set_classes": sorted(index.loc[index["split"] == "open", "label"].unique().tolist()),
            "closed_set_classes": int(index.loc[index["split"].isin(["train", "val", "test"]), "label"].nunique())}
