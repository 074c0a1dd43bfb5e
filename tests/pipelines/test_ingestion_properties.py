"""Property tests (issue 11, hostile input): generated folders and CSV manifests of good and bad files.

For every generated input (a file of a folder source, a distinct (file, label) row of a CSV), ingestion must put it
in exactly one place - the clean manifest or the dropped/quarantine/skipped list - never both, never neither, with
the stage an independent oracle predicts; and the counts of the cleaning report must add up exactly.
"""

from __future__ import annotations

import hashlib
import posixpath
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partmatch.datasets import ImageSourceDataset
from partmatch.pipelines.ingestion.nodes import (
    clean_manifest,
    scan_source,
    summarise_cleaning,
)
from tests.conftest import make_photo, png_bytes, save_jpeg, write_csv_manifest
from tests.pipelines.test_ingestion import assert_counts_add_up, outcome

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

SAFE_LABELS = ["Brake Disc", "Spark Plug", "Alarm Siren", "Rim", "Radio"]
EXCLUDED = "Wheel Bearing"            # in the default excluded keyword family 'Bearing'
ANCHOR = "Oil Pan"                    # 3 distinct photos never copied elsewhere: cleaning never ends empty
GOOD_STAGES = {"clean", "duplicate", "excluded_family", "rare_category"}

# --- strategies: plans (plain data, so hypothesis shrinks to a readable minimal example) ---------------------------

seeds = st.integers(0, 4)             # few seeds: identical (kind, seed) JPEGs are accidental exact duplicates
kinds = st.integers(0, 3)
good = st.tuples(st.sampled_from(["good_jpg", "good_png"]), kinds, seeds)
bad = st.one_of(
    st.just(("empty",)),
    st.tuples(st.just("random_jpg"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("text_png"), st.sampled_from(["<html><body>not a png</body></html>", "hello"])),
    st.tuples(st.just("truncated"), kinds, seeds, st.floats(0.05, 0.9)),
)
dup = st.tuples(st.just("dup"), st.integers(0, 50))   # a copy of an earlier good file (any category)
entry = st.one_of(good, good, dup, bad)
hidden = st.sampled_from([("hidden_file",), ("hidden_dir",)])


@st.composite
def folder_plans(draw):
    labels = draw(st.lists(st.sampled_from(SAFE_LABELS), min_size=1, max_size=4, unique=True))
    if draw(st.booleans()):
        labels.append(EXCLUDED)
    categories = {lab: draw(st.lists(st.one_of(entry, entry, entry, hidden), min_size=1, max_size=6))
                  for lab in labels}
    if draw(st.booleans()):
        categories["Lonely"] = [("good_jpg", 3, 900)]                          # a 1-photo category
    top = draw(st.lists(st.sampled_from(["README.txt", "top.jpg", ".hidden.jpg", ".cache"]), max_size=3, unique=True))
    return {"min_images": draw(st.integers(1, 3)), "categories": categories, "top": top}


@st.composite
def csv_plans(draw):
    files = draw(st.lists(st.one_of(good, good, dup, bad), min_size=1, max_size=8))
    labels = SAFE_LABELS[:3] + [EXCLUDED]
    # each row: (file index, label, spelling); a file may appear under several labels and several times
    rows = draw(st.lists(st.tuples(st.integers(0, len(files) - 1), st.sampled_from(labels),
                                   st.sampled_from(["plain", "dot", "double_slash"])), min_size=1, max_size=14))
    extras = draw(st.lists(st.sampled_from(["parent", "absolute", "missing"]), max_size=3))
    extra_rows = [(kind, draw(st.sampled_from(labels))) for kind in extras]
    return {"min_images": draw(st.integers(1, 3)), "files": files, "rows": rows, "extras": extra_rows}


# --- materialising a plan ------------------------------------------------------------------------------------------

def photo_bytes(kind: int, seed: int, fmt: str, tmp: Path) -> bytes:
    img = make_photo(kind, seed=seed)
    if fmt == "png":
        return png_bytes(img)
    return save_jpeg(img, tmp / "_scratch" / f"{kind}_{seed}.jpg").read_bytes()


BAD_BYTES = ("unreadable image: ", "not an image: ")
REASONS = {"empty": ("empty file",), "random_jpg": BAD_BYTES, "text_png": BAD_BYTES, "truncated": BAD_BYTES}


def write_entry(spec: tuple, path: Path, goods: list[bytes], scratch: Path) -> bool:
    """Write one planned file at ``path``; return True when it is a decodable photo (its bytes appended to goods)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    what = spec[0]
    if what == "dup" and not goods:
        spec, what = ("good_jpg", 0, spec[1]), "good_jpg"
    if what in ("good_jpg", "good_png"):
        data = photo_bytes(spec[1], spec[2], what[-3:], scratch)
    elif what == "dup":
        data = goods[spec[1] % len(goods)]
    elif what == "empty":
        data = b""
    elif what == "random_jpg":
        data = spec[1]
    elif what == "text_png":
        data = spec[1].encode()
    elif what == "truncated":
        full = photo_bytes(spec[1], spec[2], "jpg", scratch)
        data = full[: max(1, int(len(full) * spec[3]))]
    else:
        raise AssertionError(spec)
    path.write_bytes(data)
    if what in ("good_jpg", "good_png", "dup"):
        goods.append(data)
        return True
    return False


def suffix(spec: tuple) -> str:
    return {"good_png": ".png", "text_png": ".png", "empty": ".png"}.get(spec[0], ".jpg")


def predict(good_entries: list[tuple[str, str, bytes]], min_images: int) -> dict[tuple[str, str], str]:
    """The cleaning rules applied independently: exact duplicates (same bytes; in one category the first path is
    kept, across categories every copy goes), the excluded family, then categories below min_images."""
    by_hash: dict[str, list[tuple[str, str]]] = {}
    for path, label, data in good_entries:
        by_hash.setdefault(hashlib.sha256(data).hexdigest(), []).append((path, label))
    stage: dict[tuple[str, str], str | None] = {}
    for group in by_hash.values():
        group = sorted(group)
        conflict = len({lab for _, lab in group}) > 1
        for i, key in enumerate(group):
            stage[key] = "duplicate" if conflict or i > 0 else None
    stage = {key: "excluded_family" if s is None and key[1] == EXCLUDED else s for key, s in stage.items()}
    sizes = Counter(key[1] for key, s in stage.items() if s is None)
    stage = {key: s or ("rare_category" if sizes[key[1]] < min_images else "clean") for key, s in stage.items()}
    return stage


def run_and_check(source_path: Path, expected: dict, reasons: dict, params: dict) -> None:
    """Run scan -> clean -> summarise; every input in ``expected`` ({(path, label): stage}) ends in that stage
    and nowhere else, dropped ones with a reason starting with one of ``reasons[key]``; the counts add up."""
    source = ImageSourceDataset(path=str(source_path)).load()
    manifest, quarantine = scan_source(source, params)
    clean, dropped = clean_manifest(manifest, quarantine, params)
    _, counts, _ = summarise_cleaning(manifest, dropped, clean, params)
    got = outcome(clean, dropped)           # fails when an entry is both kept and dropped, or dropped twice
    assert set(got) == set(expected), (f"never reported: {sorted(set(expected) - set(got))}; "
                                       f"reported but not an input: {sorted(set(got) - set(expected))}")
    assert got == expected
    reason_of = {(r.path, None if r.label != r.label else r.label): r.reason for r in dropped.itertuples()}
    for key, prefixes in reasons.items():
        assert reason_of[key].startswith(prefixes), (key, reason_of[key])
    stages = Counter(got.values())
    assert_counts_add_up(counts)
    assert counts["files_before"] == len(expected)
    assert counts["images_before"] == len(manifest) == sum(stages[s] for s in GOOD_STAGES)
    assert counts["images_after"] == len(clean) == stages["clean"]
    assert counts["quarantined"] == stages["quarantine"] == len(quarantine[quarantine["stage"] == "quarantine"])
    assert counts["skipped"] == stages["scan"]
    assert counts["duplicates_dropped"] == stages["duplicate"]
    assert counts["excluded_family_images"] == stages["excluded_family"]
    assert counts["rare_category_images"] == stages["rare_category"]
    assert counts["categories_after"] == len({lab for (_, lab), s in got.items() if s == "clean"})


# --- the properties ------------------------------------------------------------------------------------------------

@SETTINGS
@given(plan=folder_plans())
def test_folder_every_file_ends_in_exactly_one_place(plan):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root, scratch = tmp / "src", tmp / "scratch"
        expected: dict[tuple[str, str | None], str] = {}
        reasons: dict[tuple[str, str | None], tuple[str, ...]] = {}
        goods: list[bytes] = []
        good_entries: list[tuple[str, str, bytes]] = []
        for i in range(3):
            key = f"{ANCHOR}/{i}.jpg"
            write_entry(("good_jpg", i, 1000 + i), root / key, [], scratch)
            good_entries.append((key, ANCHOR, (root / key).read_bytes()))
        for label, entries in plan["categories"].items():
            for i, spec in enumerate(entries):
                if spec == ("hidden_file",):
                    (root / label).mkdir(parents=True, exist_ok=True)
                    (root / label / f".hidden{i}").write_bytes(b"\0\0\0\1Bud1")
                    expected[(f"{label}/.hidden{i}", None)] = "scan"
                    reasons[(f"{label}/.hidden{i}", None)] = ("hidden file: ",)
                elif spec == ("hidden_dir",):                  # one report entry per hidden folder
                    write_entry(("good_jpg", 0, i), root / label / ".thumbs" / f"{i}.jpg", [], scratch)
                    expected[(f"{label}/.thumbs", None)] = "scan"
                    reasons[(f"{label}/.thumbs", None)] = ("hidden folder (",)
                else:
                    key = f"{label}/{i:03d}{suffix(spec)}"
                    if write_entry(spec, root / key, goods, scratch):
                        good_entries.append((key, label, goods[-1]))
                    else:
                        expected[(key, label)] = "quarantine"
                        reasons[(key, label)] = REASONS[spec[0]]
        for name in plan["top"]:
            if name == ".cache":
                write_entry(("good_jpg", 1, 0), root / ".cache" / "0.jpg", [], scratch)
            else:
                write_entry(("good_jpg", 2, 0), root / name, [], scratch)
            expected[(name, None)] = "scan"
            reasons[(name, None)] = ("hidden file: ", "hidden folder (") if name.startswith(".") else ("file directly in the source folder",)
        expected.update(predict(good_entries, plan["min_images"]))
        run_and_check(root, expected, reasons, {"min_images_per_class": plan["min_images"]})


@SETTINGS
@given(plan=csv_plans())
def test_csv_every_row_ends_in_exactly_one_place(plan):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, scratch = tmp / "a" / "b", tmp / "scratch"
        goods: list[bytes] = []
        files = []                                            # (relative path, bytes if decodable else None)
        reason_of_file = {}
        for i, spec in enumerate(plan["files"]):
            rel = f"img/{i:02d}{suffix(spec)}"
            files.append((rel, goods[-1] if write_entry(spec, base / rel, goods, scratch) else None))
            reason_of_file[rel] = REASONS.get(spec[0])
        rows = [(f"{ANCHOR}/{i}.jpg", ANCHOR, "train") for i in range(3)]
        for i in range(3):
            write_entry(("good_jpg", i, 1000 + i), base / ANCHOR / f"{i}.jpg", [], scratch)
        spell = {"plain": lambda r: r, "dot": lambda r: f"./{r}", "double_slash": lambda r: r.replace("/", "//")}
        rows += [(spell[how](files[idx][0]), label, "train") for idx, label, how in plan["rows"]]
        outside = tmp / "outside.jpg"
        write_entry(("good_jpg", 3, 0), outside, [], scratch)
        extra = {"parent": "../../outside.jpg", "absolute": str(outside), "missing": "img/missing.jpg"}
        rows += [(extra[kind], label, "test") for kind, label in plan["extras"]]
        reason_of_file.update({extra["parent"]: ("outside the source folder: ",), extra["absolute"]:
                               ("outside the source folder: ",), extra["missing"]: ("file not found under ",)})
        csv = write_csv_manifest(base, rows)

        expected, reasons = {}, {}
        good_entries = []
        data_of = {rel: data for rel, data in files}
        data_of.update({f"{ANCHOR}/{i}.jpg": (base / ANCHOR / f"{i}.jpg").read_bytes() for i in range(3)})
        for rel, label in dict.fromkeys((posixpath.normpath(p), lab) for p, lab, _ in rows):  # read once per pair
            data = data_of.get(rel)
            if data is None:                              # bad bytes, outside the folder, or missing
                expected[(rel, label)] = "quarantine"
                reasons[(rel, label)] = reason_of_file[rel]
            else:
                good_entries.append((rel, label, data))
        expected.update(predict(good_entries, plan["min_images"]))
        run_and_check(csv, expected, reasons, {"min_images_per_class": plan["min_images"]})
