"""Preprocessing nodes: decode once into aligned uint8 arrays, then split."""

import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from partmatch.config import ParameterError
from partmatch.datasets import ImageSourceDataset
from partmatch.imaging import preprocess_bytes
from partmatch.pipelines.ingestion.nodes import clean_manifest, scan_and_decode, scan_source
from partmatch.pipelines.preprocessing.nodes import (
    PreprocessingError,
    model_input_params,
    preprocess_for_model,
    preprocess_images,
    split_images,
)
from tests.conftest import make_photo, save_jpeg


def cleaned(path):
    source = ImageSourceDataset(path=str(path)).load()
    manifest, quarantine = scan_source(source, {})
    return source, clean_manifest(manifest, quarantine, {})[0]


def test_arrays_align_with_index_and_splits(photo_folder):
    source, clean = cleaned(photo_folder)
    images, index = preprocess_images(source, clean, {"image_size": 32})
    assert images.dtype == np.uint8 and images.shape == (len(clean), 1, 32, 32)
    assert list(index["path"]) == list(clean["path"])
    # row i of the array is the preprocessed photo of row i of the index
    first = np.asarray(Image.open(photo_folder / index["path"][0]).convert("L").resize((32, 24)))
    assert abs(float(images[0, 0, 4:28].mean()) - float(first.mean())) < 8
    split_index, summary, metrics = split_images(index, {"open_set_fraction": 0.0})
    assert set(split_index["split"]) <= {"train", "val", "test"}
    assert summary["splits"]["train"]["images"] + summary["splits"]["val"]["images"] + \
        summary["splits"]["test"]["images"] == len(index)
    assert "train_images" in metrics


def test_rgb_mode(photo_folder):
    source, clean = cleaned(photo_folder)
    images, _ = preprocess_images(source, clean, {"image_size": 24, "color_mode": "rgb"})
    assert images.shape[1:] == (3, 24, 24)


def test_file_changed_after_ingestion_is_skipped_not_fatal(tmp_path, caplog):
    for i in range(4):
        save_jpeg(make_photo(0, seed=i), tmp_path / "A" / f"{i}.jpg")
    source, clean = cleaned(tmp_path)
    (tmp_path / "A" / "1.jpg").write_bytes(b"garbage")
    save_jpeg(make_photo(2, seed=9), tmp_path / "A" / "2.jpg")          # another valid photo, same name
    with caplog.at_level("WARNING", logger="partmatch.pipelines.preprocessing.nodes"):
        images, index = preprocess_images(source, clean, {"image_size": 16})
    assert list(index["path"]) == ["A/0.jpg", "A/3.jpg"] and len(images) == 2
    assert list(index["sha256"]) == list(clean.set_index("path").loc[["A/0.jpg", "A/3.jpg"], "sha256"])
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("preprocessing skipped A/")]
    assert [m.split(":")[0] for m in skipped] == ["preprocessing skipped A/1.jpg", "preprocessing skipped A/2.jpg"]
    assert all("bytes changed since ingestion" in m for m in skipped)
    assert "preprocessing skipped 2 of 4 files (2 changed or missing since ingestion, 0 failed)." in caplog.messages


def two_sources(tmp_path, same_names=True):
    """Folders A and B with different photos; B's files have A's names (same_names) or other names."""
    for i in range(4):
        save_jpeg(make_photo(0, seed=i), tmp_path / "A" / "Disc" / f"{i}.jpg")
        save_jpeg(make_photo(1, seed=50 + i), tmp_path / "B" / "Disc" / (f"{i}.jpg" if same_names else f"b{i}.jpg"))
    source_a, clean = cleaned(tmp_path / "A")
    source_b = ImageSourceDataset(path=str(tmp_path / "B")).load()
    return source_a, source_b, clean


@pytest.mark.parametrize("same_names", [True, False])
def test_another_raw_source_than_ingestion_fails_naming_both(tmp_path, same_names):
    _, source_b, clean = two_sources(tmp_path, same_names)
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    clean = clean.assign(source_root=a)                  # what ingestion records of the source it scanned
    why = "bytes changed since ingestion" if same_names else r"missing from raw_source"
    with pytest.raises(PreprocessingError, match=(
            rf"^clean_manifest was made from {re.escape(a)}, but raw_source is now {re.escape(b)}: more than 50% "
            rf"of its 4 files are missing or have other bytes than ingestion hashed \(e\.g\. Disc/0\.jpg: {why}"
            rf".*Re-run ingestion on this source \(kedro run --pipeline ingestion --params=raw_source={re.escape(b)}\) "
            rf"or pass --params=raw_source={re.escape(a)}\.$")):
        preprocess_images(source_b, clean, {"image_size": 16})


def test_another_source_without_recorded_root_still_fails(tmp_path):
    source_a, source_b, clean = two_sources(tmp_path)
    clean = clean.drop(columns=["source_root"], errors="ignore")             # a manifest from before the column
    with pytest.raises(PreprocessingError, match=r"^clean_manifest was made from another source \(its root is not "
                                                  rf"recorded\), but raw_source is now {re.escape(source_b.root)}"):
        preprocess_images(source_b, clean, {"image_size": 16})
    images, index = preprocess_images(source_a, clean, {"image_size": 16})      # the right source still works
    assert list(index["path"]) == [f"Disc/{i}.jpg" for i in range(4)] and images.shape == (4, 1, 16, 16)


def test_three_of_four_changed_is_another_source_two_is_not(tmp_path):
    source_a, _, clean = two_sources(tmp_path)
    for i in (1, 2):
        save_jpeg(make_photo(3, seed=70 + i), tmp_path / "A" / "Disc" / f"{i}.jpg")
    _, index = preprocess_images(source_a, clean, {"image_size": 16})            # 2/4 = 50 %: skipped
    assert list(index["path"]) == ["Disc/0.jpg", "Disc/3.jpg"]
    save_jpeg(make_photo(3, seed=73), tmp_path / "A" / "Disc" / "3.jpg")
    with pytest.raises(PreprocessingError, match=r"more than 50% of its 4 files"):
        preprocess_images(source_a, clean, {"image_size": 16})


def test_empty_manifest_fails_instead_of_writing_an_empty_array(tmp_path):
    source_a, _, clean = two_sources(tmp_path)
    with pytest.raises(PreprocessingError, match=r"^clean_manifest has 0 images: nothing to preprocess"):
        preprocess_images(source_a, clean.iloc[:0], {"image_size": 16})


def test_bad_color_mode_fails_before_work(photo_folder):
    source, clean = cleaned(photo_folder)
    with pytest.raises(ParameterError, match=r"preprocessing\.color_mode"):
        preprocess_images(source, clean, {"color_mode": "sepia"})
    with pytest.raises(ParameterError, match=r"split.*must be 1"):
        split_images(pd.DataFrame(), {"train_fraction": 0.9})


def test_real_photos_padding_white_and_aspect_kept(carparts, tmp_path):
    """Real car-part photos cropped to a wide and a tall shape: padding is pure white, aspect is kept."""
    src = Image.open(carparts / "train" / "RADIO" / "001.jpg")
    assert src.size == (224, 224)
    wide, tall = src.crop((0, 50, 224, 162)), src.crop((56, 0, 168, 224))   # 2:1 and 1:2
    wide.save(tmp_path / "wide.png")
    tall.save(tmp_path / "tall.png")
    from partmatch.imaging import preprocess_bytes

    w = preprocess_bytes((tmp_path / "wide.png").read_bytes(), image_size=100, color_mode="grayscale")[0]
    t = preprocess_bytes((tmp_path / "tall.png").read_bytes(), image_size=100, color_mode="grayscale")[0]
    assert (w[:24] == 255).all() and (w[-24:] == 255).all()          # 100x50 content, white bands
    assert (t[:, :24] == 255).all() and (t[:, -24:] == 255).all()
    expected = np.asarray(wide.convert("L").resize((100, 50), Image.Resampling.BICUBIC), dtype=float)
    assert np.abs(w[25:75].astype(float) - expected).mean() < 3       # content is the photo, not stretched


def test_real_carparts_preprocess_sample(carparts):
    csv = carparts / "car parts.csv"
    source = ImageSourceDataset(path=str(csv)).load()
    sample = source.records.groupby("label").head(2).reset_index(drop=True)
    source.records = sample
    manifest, quarantine = scan_source(source, {})
    clean = clean_manifest(manifest, quarantine, {})[0]
    assert clean["label"].nunique() == 35
    images, index = preprocess_images(source, clean, {"image_size": 64})
    assert images.shape == (70, 1, 64, 64)
    _, summary, _ = split_images(index, {"open_set_fraction": 0.2})
    assert len(summary["open_set_classes"]) == 7
    assert summary["splits"]["train"]["categories"] == 28


def test_nothing_decodable_fails_with_the_first_reason(tmp_path, monkeypatch):
    source_a, _, clean = two_sources(tmp_path)

    def undecodable(data, **kw):
        raise OSError("decoder broke")
    monkeypatch.setattr("partmatch.imaging.preprocess_bytes", undecodable)
    with pytest.raises(PreprocessingError, match=rf"^0 of 4 images could be preprocessed from raw_source "
                                                  rf"{re.escape(source_a.root)}; first failure: Disc/0\.jpg: "
                                                  r"OSError: decoder broke\."):
        preprocess_images(source_a, clean, {"image_size": 16})


# ----------------------------------------------------------------------------- a model's own input


def test_model_input_params_override_only_what_the_model_sets():
    base = {"image_size": 100, "color_mode": "grayscale", "background": 200}
    assert model_input_params(base, {})["image_size"] == 100
    own = model_input_params(base, {"image_size": 224, "color_mode": "rgb"})
    assert (own["image_size"], own["color_mode"], own["background"]) == (224, "rgb", 200)
    assert model_input_params(base, {"color_mode": "rgb"})["image_size"] == 100
    with pytest.raises(ParameterError, match="model.color_mode"):
        model_input_params(base, {"color_mode": "cmyk"})


def test_model_input_is_the_split_index_rows_at_the_models_size(photo_folder):
    source, clean = cleaned(photo_folder)
    _, index = preprocess_images(source, clean, {"image_size": 32})
    split_index, _, _ = split_images(index, {"open_set_fraction": 0.0})
    shuffled = split_index.iloc[::-1].iloc[1:].reset_index(drop=True)  # other order, one photo fewer
    images = preprocess_for_model(source, clean, shuffled, {"image_size": 32}, {"image_size": 40, "color_mode": "rgb"})
    assert images.shape == (len(shuffled), 3, 40, 40) and images.dtype == np.uint8
    # row i is photo i of split_index, preprocessed at the model's size and colour (known answer: the file itself)
    for i in (0, len(shuffled) // 2, len(shuffled) - 1):
        expected = preprocess_bytes((photo_folder / shuffled["path"][i]).read_bytes(), image_size=40, color_mode="rgb")
        np.testing.assert_array_equal(images[i], expected)


def test_model_input_reuses_ingestions_pixels_when_the_parameters_match(photo_folder, caplog):
    source = ImageSourceDataset(path=str(photo_folder)).load()
    raw, quarantine, decoded = scan_and_decode(source, {}, {"image_size": 32})
    clean = clean_manifest(raw, quarantine, {})[0]
    study, index = preprocess_images(source, clean, {"image_size": 32}, decoded)
    split_index, _, _ = split_images(index, {"open_set_fraction": 0.0})
    with caplog.at_level("INFO"):
        same = preprocess_for_model(source, clean, split_index, {"image_size": 32}, {}, decoded)
    np.testing.assert_array_equal(same, study)
    n = len(split_index)
    assert f"{n} of {n} photos taken from ingestion's decode, 0 decoded here" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        other = preprocess_for_model(source, clean, split_index, {"image_size": 32}, {"image_size": 48}, decoded)
    assert other.shape == (n, 1, 48, 48)
    assert f"0 of {n} photos taken from ingestion's decode, {n} decoded here" in caplog.text


def test_model_input_refuses_a_split_index_of_another_run(photo_folder):
    source, clean = cleaned(photo_folder)
    _, index = preprocess_images(source, clean, {"image_size": 32})
    split_index, _, _ = split_images(index, {"open_set_fraction": 0.0})
    foreign = split_index.copy()
    foreign.loc[0, "path"] = "Elsewhere/ghost.jpg"
    with pytest.raises(PreprocessingError, match="Elsewhere/ghost.jpg.*re-run ingestion"):
        preprocess_for_model(source, clean, foreign, {"image_size": 32}, {"image_size": 40})
