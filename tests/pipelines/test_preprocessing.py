"""Preprocessing nodes: decode once into aligned uint8 arrays, then split."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from partmatch.config import ParameterError
from partmatch.datasets import ImageSourceDataset
from partmatch.pipelines.ingestion.nodes import clean_manifest, scan_source
from partmatch.pipelines.preprocessing.nodes import preprocess_images, split_images
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


def test_file_changed_after_ingestion_is_skipped_not_fatal(tmp_path):
    for i in range(3):
        save_jpeg(make_photo(0, seed=i), tmp_path / "A" / f"{i}.jpg")
    source, clean = cleaned(tmp_path)
    (tmp_path / "A" / "1.jpg").write_bytes(b"garbage")
    images, index = preprocess_images(source, clean, {"image_size": 16})
    assert len(images) == len(index) == 2 and "A/1.jpg" not in set(index["path"])


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
    split_index, summary, _ = split_images(index, {"open_set_fraction": 0.2})
    assert len(summary["open_set_classes"]) == 7
    assert summary["splits"]["train"]["categories"] == 28
