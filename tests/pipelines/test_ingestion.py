"""Ingestion nodes on small generated photos with every kind of bad input."""

import os

import pandas as pd
import pytest

from partmatch import imaging
from partmatch.config import ParameterError
from partmatch.datasets import ImageSource, ImageSourceDataset
from partmatch.pipelines.ingestion.nodes import (
    CleaningError,
    clean_manifest,
    scan_source,
    summarise_cleaning,
)
from tests.conftest import make_photo, save_jpeg, write_csv_manifest

PARAMS = {"min_images_per_class": 2}


def run_all(source_path, params=PARAMS):
    source = ImageSourceDataset(path=str(source_path)).load()
    manifest, quarantine = scan_source(source, params)
    clean, dropped = clean_manifest(manifest, quarantine, params)
    report, counts, metrics = summarise_cleaning(manifest, dropped, clean, params)
    return manifest, quarantine, clean, dropped, report, counts, metrics


def test_folder_with_bad_files(photo_folder):
    manifest, quarantine, clean, dropped, report, counts, metrics = run_all(photo_folder)
    q = dict(zip(quarantine["path"], quarantine["reason"]))
    assert "unreadable image" in q["Spark Plug/truncated.jpg"]
    assert "not an image file" in q["Spark Plug/notes.txt"]
    assert "not an image" in q["Alarm Siren/fake.jpg"]
    assert q["Alarm Siren/empty.png"] == "empty file"
    assert "not in a category folder" in q["README.txt"]
    assert set(manifest.columns) >= {"path", "label", "sha256", "width", "height", "mode", "bytes"}
    assert (manifest[["width", "height"]] == [64, 48]).all().all()
    reasons = dict(zip(dropped["path"], dropped["reason"]))
    assert "conflict" in reasons["Spark Plug/dup_of_disc.jpg"] and "conflict" in reasons["Brake Disc/000.jpg"]
    assert "conflict" in reasons["Brake Disc/copy.jpg"]        # every copy of a conflicting photo goes
    assert "excluded keyword family 'Bearing'" in reasons["Wheel Bearing/000.jpg"]
    assert "1 photo(s) < 2" in reasons["Lonely Part/000.jpg"]
    assert sorted(clean["label"].unique()) == ["Alarm Siren", "Brake Disc", "Spark Plug"]
    assert not clean["sha256"].duplicated().any()
    assert counts["categories_before"] == 5 and counts["categories_after"] == 3
    assert counts["images_after"] == len(clean)
    assert metrics["images_after"] == {"value": float(len(clean)), "step": 0}
    assert "| Wheel Bearing | excluded_family |" in report and "Spark Plug/truncated.jpg" in report


def test_same_category_copy_is_dropped_once(tmp_path):
    img = save_jpeg(make_photo(0), tmp_path / "A" / "1.jpg")
    (tmp_path / "A" / "2.jpg").write_bytes(img.read_bytes())
    save_jpeg(make_photo(1), tmp_path / "A" / "3.jpg")
    _, _, clean, dropped, *_ = run_all(tmp_path)
    assert list(clean["path"]) == ["A/1.jpg", "A/3.jpg"]
    assert list(dropped["reason"]) == ["exact duplicate of A/1.jpg"]


def test_csv_with_unsafe_labels_and_missing_paths(tmp_path):
    for i in range(3):
        save_jpeg(make_photo(i, seed=i), tmp_path / "img" / f"{i}.jpg")
    csv = write_csv_manifest(tmp_path, [("img/0.jpg", "Rim", "train"), ("img/1.jpg", "Rim", "train"),
                                        ("img/2.jpg", "../../etc", "train"), ("img/9.jpg", "Rim", "test"),
                                        ("img/2.jpg", "A/B", "test")])
    _, quarantine, clean, *_ = run_all(csv)
    q = dict(zip(quarantine["path"], quarantine["reason"]))
    assert "unsafe category name" in q["img/2.jpg"]
    assert q["img/9.jpg"].startswith("file not found")
    assert list(clean["label"]) == ["Rim", "Rim"]


def test_folder_with_no_valid_image_is_a_clear_error(tmp_path):
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "x.jpg").write_text("not a jpeg")
    (tmp_path / "A" / "y.jpg").write_bytes(b"")
    source = ImageSourceDataset(path=str(tmp_path)).load()
    manifest, quarantine = scan_source(source, PARAMS)
    assert len(quarantine) == 2 and manifest.empty
    with pytest.raises(CleaningError, match="No usable image.*2 file\\(s\\) quarantined"):
        clean_manifest(manifest, quarantine, PARAMS)


def test_everything_dropped_is_a_clear_error(tmp_path):
    save_jpeg(make_photo(0), tmp_path / "Axle Seal" / "1.jpg")
    save_jpeg(make_photo(1), tmp_path / "Axle Seal" / "2.jpg")
    source = ImageSourceDataset(path=str(tmp_path)).load()
    manifest, quarantine = scan_source(source, PARAMS)
    with pytest.raises(CleaningError, match="Every category was dropped"):
        clean_manifest(manifest, quarantine, PARAMS)


@pytest.mark.parametrize("bad,key", [({"min_images_per_class": 0}, "ingestion.min_images_per_class"),
                                     ({"min_images_per_class": "two"}, "ingestion.min_images_per_class"),
                                     ({"max_file_mb": -1}, "ingestion.max_file_mb"),
                                     ({"exclude_familes": []}, "ingestion.exclude_familes")])
def test_invalid_parameters_name_the_key(bad, key, photo_folder):
    source = ImageSourceDataset(path=str(photo_folder)).load()
    with pytest.raises(ParameterError, match=key.replace(".", r"\.")):
        scan_source(source, bad)


def test_real_carparts_cleaning_rule(carparts):
    """On the real photos the five excluded-family categories go and the other 35 stay."""
    source = ImageSourceDataset(path=str(carparts / "car parts.csv")).load()
    records = source.records
    labels = pd.Series(records["label"].unique())
    from partmatch.cleaning import matched_family
    from partmatch.config import IngestionParams

    fam = IngestionParams().excluded_families
    dropped = sorted(lab for lab in labels if matched_family(lab, fam))
    assert dropped == ["CAMSHAFT", "CRANKSHAFT", "IDLER ARM", "LOWER CONTROL ARM", "RADIATOR HOSE"]
    assert len(labels) - len(dropped) == 35


# --- hostile input (issue 11): every input ends in the clean set or the dropped list, never both, never neither ---

def outcome(clean, dropped):
    """{(path, label): stage} of every entry, 'clean' for the clean set; fails on an entry reported twice."""
    rows = [(r.path, r.label, "clean") for r in clean.itertuples()]
    rows += [(r.path, None if pd.isna(r.label) else r.label, r.stage) for r in dropped.itertuples()]
    keys = [(p, lab) for p, lab, _ in rows]
    assert len(keys) == len(set(keys)), "an entry is both kept and dropped, or dropped twice"
    return {(p, lab): stage for p, lab, stage in rows}


def assert_counts_add_up(counts):
    assert counts["files_before"] == counts["images_before"] + counts["quarantined"] + counts["skipped"]
    assert counts["images_before"] == (counts["images_after"] + counts["duplicates_dropped"]
                                       + counts["excluded_family_images"] + counts["rare_category_images"])


def write_manifests(tmp_path, manifest, quarantine, clean, dropped):
    """The catalog's formats (Parquet for manifests, CSV for the lists) accept what ingestion produced."""
    out = tmp_path / "written"
    out.mkdir()
    for name, df in [("raw_manifest", manifest), ("clean_manifest", clean)]:
        df.to_parquet(out / f"{name}.parquet")
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{name}.parquet"), df, check_dtype=False)
    for name, df in [("quarantine", quarantine), ("dropped_files", dropped)]:
        df.to_csv(out / f"{name}.csv", index=False)
        assert list(pd.read_csv(out / f"{name}.csv", keep_default_na=False)["path"]) == list(df["path"])


def test_non_utf8_file_name_is_quarantined_not_fatal(tmp_path):
    root = tmp_path / "src"
    for i in range(2):
        save_jpeg(make_photo(0, seed=i), root / "Rim" / f"{i}.jpg")
    bad = os.fsencode(root / "Rim") + b"/caf\xe9.jpg"                     # Latin-1 name: not valid UTF-8
    with open(bad, "wb") as f:
        f.write((root / "Rim" / "0.jpg").read_bytes()[:-1] + b"\xd9")    # a valid photo: refused for its name only
    os.makedirs(os.fsencode(root) + b"/R\xffdio")
    with open(os.fsencode(root) + b"/R\xffdio/0.jpg", "wb") as f:       # a category folder with a bad name
        f.write((root / "Rim" / "1.jpg").read_bytes())
    manifest, quarantine, clean, dropped, report, counts, _ = run_all(root)
    assert list(clean["path"]) == ["Rim/0.jpg", "Rim/1.jpg"]
    expected = {"Rim/caf\\xe9.jpg": "Rim", "R\\xffdio/0.jpg": "R\\xffdio"}
    assert dict(zip(quarantine["path"], quarantine["label"])) == expected
    for path in expected:
        assert set(quarantine.loc[quarantine["path"] == path, "reason"]) == {
            f"file or folder name is not valid UTF-8 (undecodable bytes shown as \\x..): '{path}'"}
    assert set(quarantine["stage"]) == {"quarantine"}
    assert counts["files_before"] == 4 and counts["quarantined"] == 2 and counts["images_after"] == 2
    assert "Rim/caf\\xe9.jpg" in report
    write_manifests(tmp_path, manifest, quarantine, clean, dropped)


def make_outside_sources(tmp_path):
    """A CSV in tmp/a/b/ listing two good photos, '../../x.jpg' and the absolute path of the same outside photo."""
    save_jpeg(make_photo(2, seed=9), tmp_path / "x.jpg")
    base = tmp_path / "a" / "b"
    for i in range(2):
        save_jpeg(make_photo(0, seed=i), base / "img" / f"{i}.jpg")
    return write_csv_manifest(base, [("img/0.jpg", "Rim", "train"), ("img/1.jpg", "Rim", "train"),
                                     ("../../x.jpg", "Rim", "train"), (str(tmp_path / "x.jpg"), "Rim", "test")])


def test_csv_paths_outside_the_source_are_never_read(tmp_path, monkeypatch):
    csv = make_outside_sources(tmp_path)
    read = []
    real_read, real_read_file = ImageSource.read_bytes, imaging.read_file
    monkeypatch.setattr(ImageSource, "read_bytes", lambda self, key: read.append(key) or real_read(self, key))
    # the decoding workers (in this process for 2 files) open files by their path on disk
    monkeypatch.setattr(imaging, "read_file", lambda path: read.append(
        os.path.relpath(path, csv.parent)) or real_read_file(path))
    _, quarantine, clean, *_ = run_all(csv)
    assert sorted(read) == ["img/0.jpg", "img/1.jpg"]                    # the outside photo is never opened
    assert list(clean["path"]) == ["img/0.jpg", "img/1.jpg"]
    outside = str((tmp_path / "x.jpg").resolve())
    assert dict(zip(quarantine["path"], quarantine["reason"])) == {
        p: f"outside the source folder: resolves to {outside}, not below {tmp_path / 'a' / 'b'} "
           "(ingestion.allow_outside_root is false)" for p in ["../../x.jpg", str(tmp_path / "x.jpg")]}


def test_allow_outside_root_reads_them(tmp_path):
    csv = make_outside_sources(tmp_path)
    _, quarantine, clean, dropped, *_ = run_all(csv, {**PARAMS, "allow_outside_root": True})
    assert quarantine.empty
    # the two spellings of the outside photo are the same bytes under one label: one is kept
    assert list(clean["path"]) == ["../../x.jpg", "img/0.jpg", "img/1.jpg"]
    assert list(dropped["reason"]) == ["exact duplicate of ../../x.jpg"]


def test_symlinks_out_of_the_folder_are_quarantined(tmp_path):
    outside = tmp_path / "elsewhere"
    save_jpeg(make_photo(1, seed=5), outside / "secret.jpg")
    save_jpeg(make_photo(1, seed=6), outside / "Dir" / "s.jpg")
    root = tmp_path / "src"
    for i in range(2):
        save_jpeg(make_photo(0, seed=i), root / "Rim" / f"{i}.jpg")
    (root / "Rim" / "inside_link.jpg").symlink_to(root / "Rim" / "0.jpg")  # inside: fine (then a duplicate)
    (root / "Rim" / "link.jpg").symlink_to(outside / "secret.jpg")
    (root / "Rim" / "folder").symlink_to(outside / "Dir", target_is_directory=True)
    (root / "Linked").symlink_to(outside / "Dir", target_is_directory=True)
    _, quarantine, clean, dropped, _, counts, _ = run_all(root)
    assert list(clean["path"]) == ["Rim/0.jpg", "Rim/1.jpg"]
    q = dict(zip(quarantine["path"], quarantine["reason"]))
    assert q == {
        "Linked": f"symbolic link directly in the source folder (to {(outside / 'Dir').resolve()}), not followed",
        "Rim/folder": f"outside the source folder: resolves to {(outside / 'Dir').resolve()}, not below {root} "
                      "(ingestion.allow_outside_root is false)",
        "Rim/link.jpg": f"outside the source folder: resolves to {(outside / 'secret.jpg').resolve()}, not below "
                        f"{root} (ingestion.allow_outside_root is false)"}
    assert dict(zip(dropped["path"], dropped["reason"]))["Rim/inside_link.jpg"] == "exact duplicate of Rim/0.jpg"
    assert counts["files_before"] == 6 and counts["skipped"] == 1 and counts["quarantined"] == 2
    assert_counts_add_up(counts)


def test_csv_same_file_under_two_labels_is_a_conflict(tmp_path):
    for i in range(3):
        save_jpeg(make_photo(i, seed=i), tmp_path / "img" / f"{i}.jpg")
    for i in range(2):
        save_jpeg(make_photo(0, seed=10 + i), tmp_path / "img" / f"r{i}.jpg")
    csv = write_csv_manifest(tmp_path, [("img/0.jpg", "Rim", "train"), ("img/1.jpg", "Rim", "train"),
                                        ("img/2.jpg", "Rim", "train"), ("img/2.jpg", "Radio", "test"),
                                        ("img/r0.jpg", "Radio", "train"), ("img/r1.jpg", "Radio", "train"),
                                        ("img/r1.jpg", "Radio", "test"), ("./img/r1.jpg", "Radio", "test")])
    source = ImageSourceDataset(path=str(csv)).load()
    assert len(source.records) == 6                                     # r1 three times under Radio: one photo
    _, _, clean, dropped, _, counts, _ = run_all(csv)
    assert list(zip(clean["path"], clean["label"])) == [("img/r0.jpg", "Radio"), ("img/r1.jpg", "Radio"),
                                                        ("img/0.jpg", "Rim"), ("img/1.jpg", "Rim")]
    conflict = "duplicate conflict: the manifest lists this file under ['Radio', 'Rim']"
    assert list(zip(dropped["path"], dropped["label"], dropped["reason"])) == [
        ("img/2.jpg", "Rim", conflict), ("img/2.jpg", "Radio", conflict)]
    assert counts["duplicates_dropped"] == 2 and counts["files_before"] == 6
    assert_counts_add_up(counts)


def write_hostile_csv(tmp_path, repeats=100_000):
    """A ';'-separated CSV with a UTF-8 BOM in tmp/a/b/: good rows, a file repeated ``repeats`` times, a file under
    two labels, '../../x.jpg', an absolute path, labels '..' and 'Bad\\nName', a path that is not valid UTF-8."""
    base = tmp_path / "a" / "b"
    save_jpeg(make_photo(2, seed=9), tmp_path / "x.jpg")
    for i in range(3):
        save_jpeg(make_photo(0, seed=i), base / "img" / f"a{i}.jpg")
        save_jpeg(make_photo(1, seed=i), base / "img" / f"b{i}.jpg")
    for name, seed in [("c", 20), ("d", 21), ("e", 22)]:
        save_jpeg(make_photo(2, seed=seed), base / "img" / f"{name}.jpg")
    with open(os.fsencode(base / "img") + b"/f\xff.jpg", "wb") as f:
        f.write((base / "img" / "c.jpg").read_bytes())
    lines = [b"class index;filepaths;labels;data set"]
    lines += [f"0;img/a{i}.jpg;Rim;train".encode() for i in range(3)]
    lines += [f"1;img/b{i}.jpg;Radio;train".encode() for i in range(3)]
    lines += [b"0;img/a0.jpg;Rim;train"] * repeats
    lines += [b"0;img/c.jpg;Rim;test", b"1;img/c.jpg;Radio;test", b"2;../../x.jpg;Rim;test",
              f"2;{tmp_path / 'x.jpg'};Rim;test".encode(), b"3;img/d.jpg;..;test", b'4;img/e.jpg;"Bad\nName";test',
              b"0;img/f\xff.jpg;Rim;test"]
    csv = base / "parts.csv"
    csv.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    return csv


def test_hostile_csv_every_row_accounted_for_and_read_once(tmp_path, monkeypatch):
    csv = write_hostile_csv(tmp_path)

    decoded = []
    real = imaging.decode_image
    monkeypatch.setattr(imaging, "decode_image", lambda data, **kw: decoded.append(1) or real(data, **kw))
    source = ImageSourceDataset(path=str(csv)).load()
    assert source.kind == "csv" and len(source.records) == 12 and len(source.skipped) == 1  # BOM, ';' understood
    manifest, quarantine, clean, dropped, report, counts, _ = run_all(csv)
    assert len(decoded) == 7                         # a0-a2, b0-b2, c once: not 100,000 decodes of a0
    got = outcome(clean, dropped)
    outside = "outside the source folder"
    expected = {**{(f"img/a{i}.jpg", "Rim"): "clean" for i in range(3)},
                **{(f"img/b{i}.jpg", "Radio"): "clean" for i in range(3)},
                ("img/c.jpg", "Rim"): "duplicate", ("img/c.jpg", "Radio"): "duplicate",
                ("../../x.jpg", "Rim"): "quarantine", (str(tmp_path / "x.jpg"), "Rim"): "quarantine",
                ("img/d.jpg", ".."): "quarantine", ("img/e.jpg", "Bad\nName"): "quarantine",
                ("img/f\\xff.jpg", "Rim"): "quarantine"}
    assert got == expected
    reasons = {(r.path, r.label): r.reason for r in dropped.itertuples()}
    assert reasons[("../../x.jpg", "Rim")].startswith(outside)
    assert reasons[(str(tmp_path / "x.jpg"), "Rim")].startswith(outside)
    assert reasons[("img/d.jpg", "..")] == "unsafe category name '..': contains '..' or starts with '.'"
    assert reasons[("img/e.jpg", "Bad\nName")] == "unsafe category name 'Bad\\nName': contains control characters"
    assert counts == {**counts, "files_before": 13, "images_before": 8, "images_after": 6, "quarantined": 5,
                      "skipped": 0, "duplicates_dropped": 2, "categories_after": 2}
    assert_counts_add_up(counts)
    assert "| img/e.jpg | Bad\\nName | quarantine |" in report          # a newline cannot break the table
    write_manifests(tmp_path, manifest, quarantine, clean, dropped)


def test_hostile_folder_every_file_accounted_for(tmp_path):
    root, outside = tmp_path / "src", tmp_path / "elsewhere"
    save_jpeg(make_photo(3, seed=1), outside / "secret.jpg")
    save_jpeg(make_photo(3, seed=2), outside / "Dir" / "s.jpg")
    for i in range(3):
        save_jpeg(make_photo(0, seed=i), root / "Brake Disc" / f"{i:03d}.jpg")
        save_jpeg(make_photo(1, seed=i), root / "Spark Plug" / f"{i:03d}.jpg")
    for i in range(2):
        save_jpeg(make_photo(2, seed=30 + i), root / "Bad\nName" / f"{i}.jpg")       # newline in a category
        save_jpeg(make_photo(2, seed=40 + i), root / "Wheel Bearing" / f"{i}.jpg")
        save_jpeg(make_photo(2, seed=50 + i), root / ".cache" / f"{i}.jpg")
    save_jpeg(make_photo(2, seed=60), root / "Lonely" / "0.jpg")
    (root / "Spark Plug" / "dup.jpg").write_bytes((root / "Spark Plug" / "000.jpg").read_bytes())
    with open(os.fsencode(root / "Spark Plug") + b"/bad\xff.jpg", "wb") as f:
        f.write((root / "Lonely" / "0.jpg").read_bytes())
    (root / "Brake Disc" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "Brake Disc" / "link.jpg").symlink_to(outside / "secret.jpg")
    (root / "Spark Plug" / "more").symlink_to(outside / "Dir", target_is_directory=True)
    (root / "Linked").symlink_to(outside / "Dir", target_is_directory=True)
    (root / "README.txt").write_text("top-level file")
    manifest, quarantine, clean, dropped, report, counts, _ = run_all(root)
    assert "| Bad\\nName/0.jpg | Bad\\nName | quarantine |" in report and "\nName/0.jpg" not in report
    expected = {**{(f"{lab}/{i:03d}.jpg", lab): "clean" for lab in ["Brake Disc", "Spark Plug"] for i in range(3)},
                ("Spark Plug/dup.jpg", "Spark Plug"): "duplicate",
                ("Spark Plug/bad\\xff.jpg", "Spark Plug"): "quarantine",
                ("Bad\nName/0.jpg", "Bad\nName"): "quarantine", ("Bad\nName/1.jpg", "Bad\nName"): "quarantine",
                ("Brake Disc/link.jpg", "Brake Disc"): "quarantine", ("Spark Plug/more", "Spark Plug"): "quarantine",
                ("Wheel Bearing/0.jpg", "Wheel Bearing"): "excluded_family",
                ("Wheel Bearing/1.jpg", "Wheel Bearing"): "excluded_family",
                ("Lonely/0.jpg", "Lonely"): "rare_category",
                (".cache", None): "scan", ("Brake Disc/.DS_Store", None): "scan", ("Linked", None): "scan",
                ("README.txt", None): "scan"}
    assert outcome(clean, dropped) == expected
    reasons = dict(zip(dropped["path"], dropped["reason"]))
    assert reasons[".cache"] == "hidden folder (2 file(s)): name starts with '.', not read"
    assert reasons["Brake Disc/.DS_Store"] == "hidden file: name starts with '.', not read"
    assert reasons["Bad\nName/0.jpg"] == "unsafe category name 'Bad\\nName': contains control characters"
    assert counts == {**counts, "files_before": 19, "images_before": 10, "images_after": 6, "quarantined": 5,
                      "skipped": 4, "duplicates_dropped": 1, "excluded_family_images": 2, "rare_category_images": 1}
    assert_counts_add_up(counts)
    write_manifests(tmp_path, manifest, quarantine, clean, dropped)


def test_manifest_records_the_source_it_was_made_from(tmp_path):
    """The raw_source as the user gave it (the CSV file for a manifest), so preprocessing can name it."""
    for i in range(2):
        save_jpeg(make_photo(0, seed=i), tmp_path / "photos" / "Disc" / f"{i}.jpg")
    csv = write_csv_manifest(tmp_path / "photos", [(f"Disc/{i}.jpg", "Disc", "train") for i in range(2)])
    for given in (str(tmp_path / "photos"), str(csv)):
        manifest, _ = scan_source(ImageSourceDataset(path=given).load(), {})
        assert list(manifest["source_root"]) == [given, given]


def test_max_aspect_ratio_is_an_ingestion_parameter(tmp_path):
    from PIL import Image

    for i in range(2):
        save_jpeg(make_photo(0, seed=i), tmp_path / "photos" / "Disc" / f"{i}.jpg")
    Image.new("L", (400, 10), 0).save(tmp_path / "photos" / "Disc" / "strip.png")   # 40:1
    source = ImageSourceDataset(path=str(tmp_path / "photos")).load()
    manifest, quarantine = scan_source(source, {"max_aspect_ratio": 20})
    assert list(quarantine["path"]) == ["Disc/strip.png"]
    assert quarantine["reason"].iloc[0].startswith("image too elongated: 400x10 is 40:1 > 20:1")
    manifest, quarantine = scan_source(source, {})                                   # default 100:1 keeps it
    assert "Disc/strip.png" in set(manifest["path"]) and quarantine.empty
