"""The study's cleaning rules: excluded keyword families, unsafe category names, duplicates, rare categories."""

from __future__ import annotations

import re
from collections.abc import Iterable

import pandas as pd

_WORD = re.compile(r"[a-z0-9]+")


def _plural_forms(keyword: str) -> set[str]:
    return {keyword, keyword + "s", keyword + "es"}


def matched_family(name: str, families: Iterable[str], compound_min_length: int = 5,
                   always_keep: Iterable[str] = ()) -> str | None:
    """Return the excluded family a category name belongs to, or None.

    Rule (case-insensitive): the name is split into words at every character that is not a letter or a
    digit. A word belongs to a family when it *is* the family keyword or its plural ("Arm", "Arms",
    "Bushings"), or - only for keywords of at least ``compound_min_length`` letters (Shaft, Strap,
    Bearing, Bushing) - when it *ends with* the keyword ("Driveshaft", "Camshaft"). Short keywords
    match whole words only, so look-alikes such as "Alarm", "Armrest", "Sunset Visor" or "Kitchen"
    are kept. Names listed in ``always_keep`` are never excluded.
    """
    if name.strip().lower() in {k.strip().lower() for k in always_keep}:
        return None
    words = _WORD.findall(name.lower())
    for family in families:
        key = family.strip().lower()
        forms = _plural_forms(key)
        for word in words:
            if word in forms:
                return family
            if len(key) >= compound_min_length and any(word.endswith(f) and len(word) > len(f) for f in forms):
                return family
    return None


def unsafe_label_reason(label: str) -> str | None:
    """Return why a category name cannot be used as a folder/label (path separators, '..', empty), or None."""
    text = str(label)
    if not text.strip():
        return "empty category name"
    if "/" in text or "\\" in text:
        return f"unsafe category name {text!r}: contains a path separator"
    if ".." in text or text.strip().startswith("."):
        return f"unsafe category name {text!r}: contains '..' or starts with '.'"
    if any(ord(ch) < 32 for ch in text):
        return f"unsafe category name {text!r}: contains control characters"
    return None


def find_duplicates(manifest: pd.DataFrame) -> tuple[pd.Series, list[dict]]:
    """Flag exact byte duplicates; return (drop reasons aligned to manifest, list of cross-category conflicts).

    Same bytes within one category: the first file (by path) is kept, the others dropped.
    Same bytes in two or more categories: a labelling conflict, every copy is dropped - including one file that
    a CSV manifest lists under two labels (same path twice), which is never silently kept under one of them.
    """
    reasons = pd.Series([None] * len(manifest), index=manifest.index, dtype=object)
    conflicts: list[dict] = []
    for digest, group in manifest.sort_values("path").groupby("sha256", sort=False):
        if len(group) < 2:
            continue
        labels = sorted(group["label"].unique())
        if len(labels) > 1:
            paths = sorted(group["path"])
            conflicts.append({"sha256": digest, "labels": labels, "paths": paths})
            if len(set(paths)) == 1:
                reason = f"duplicate conflict: the manifest lists this file under {labels}"
            else:
                reason = f"duplicate conflict: identical bytes filed under {labels}"
            for idx in group.index:
                reasons[idx] = reason
        else:
            first = group["path"].iloc[0]
            for idx in group.index[1:]:
                reasons[idx] = f"exact duplicate of {first}"
    return reasons, conflicts
