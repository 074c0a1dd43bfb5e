"""Ingestion nodes on small generated photos with every kind of bad input."""

import pandas as pd
import pytest

from partmatch.config import ParameterError
from partmatch.datasets import ImageSourceDataset
from partmatch.pipelines.ingestion.nodes import CleaningError, clean_manifest, scan_source, summarise_cleaning
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
