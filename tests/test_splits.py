"""Seeded, stratified, duplicate-aware splits with an open set."""

import pandas as pd
import pytest

from partmatch.splits import assign_splits, closed_set_counts, split_summary

KW = {"seed": 1, "val_fraction": 0.1, "test_fraction": 0.1, "open_set_min_images": 2}


def make_index(counts: dict[str, int]) -> pd.DataFrame:
    rows = [{"path": f"{lab}/{i}.jpg", "label": lab, "pixel_hash": f"{lab}-{i}"}
            for lab, n in counts.items() for i in range(n)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("n,expected", [(1, (1, 0, 0)), (2, (1, 0, 1)), (3, (1, 1, 1)), (4, (2, 1, 1)),
                                        (10, (8, 1, 1)), (40, (32, 4, 4)), (45, (37, 4, 4))])
def test_closed_set_counts(n, expected):
    assert closed_set_counts(n, 0.1, 0.1) == expected


def test_stratified_open_set_and_reproducible():
    counts = {f"c{i}": n for i, n in enumerate([40, 30, 20, 10, 5, 4, 3, 2, 2, 2])}
    idx = make_index(counts)
    a = assign_splits(idx, open_set_fraction=0.2, open_set_classes=[], **KW)
    b = assign_splits(idx, open_set_fraction=0.2, open_set_classes=[], **KW)
    pd.testing.assert_frame_equal(a, b)
    open_classes = set(a.loc[a["split"] == "open", "label"])
    assert len(open_classes) == 2
    for label, rows in a[~a["label"].isin(open_classes)].groupby("label"):
        # distinct pixels in every photo: each closed category splits exactly as closed_set_counts says
        got = tuple(int((rows["split"] == s).sum()) for s in ("train", "val", "test"))
        assert got == closed_set_counts(counts[label], 0.1, 0.1), label
    train_classes = set(a.loc[a["split"] == "train", "label"])
    assert not (open_classes & train_classes)
    c = assign_splits(idx, open_set_fraction=0.2, open_set_classes=[], **{**KW, "seed": 2})
    assert not a["split"].equals(c["split"])                  # the seed matters


def test_explicit_open_set_and_unknown_name():
    idx = make_index({"a": 5, "b": 5, "c": 5})
    out = assign_splits(idx, open_set_fraction=0.0, open_set_classes=["b"], **KW)
    assert set(out.loc[out["split"] == "open", "label"]) == {"b"}
    with pytest.raises(ValueError, match="open_set_classes.*'zzz'"):
        assign_splits(idx, open_set_fraction=0.0, open_set_classes=["zzz"], **KW)


def test_identical_pixels_never_straddle_splits():
    idx = make_index({"a": 12, "b": 6})
    idx.loc[idx.index[:6], "pixel_hash"] = "same-a"                  # six identical photos in 'a'
    idx.loc[idx["path"] == "b/0.jpg", "pixel_hash"] = "clash"
    idx.loc[idx["path"] == "a/11.jpg", "pixel_hash"] = "clash"       # same pixels in 'a' and 'b'
    out = assign_splits(idx, open_set_fraction=0.0, open_set_classes=[], **KW)
    assert out.loc[out["pixel_hash"] == "same-a", "split"].nunique() == 1
    assert (out.loc[out["pixel_hash"] == "clash", "split"] == "excluded").all()
    summary = split_summary(out)
    assert summary["splits"]["excluded"]["images"] == 2
    assert sum(v["images"] for v in summary["splits"].values()) == len(out)
