"""The raw image source (folder / CSV), the versioned array and model datasets, and their errors."""

import numpy as np
import pytest
from kedro.io.core import DatasetError, Version

from partmatch.datasets import ImageSourceDataset, NpyDataset, TorchModelDataset
from tests.conftest import make_photo, save_jpeg, write_csv_manifest


def test_folder_source_labels_from_parent_and_split_hints(tmp_path):
    for split, label in [("train", "Brake Disc"), ("test", "Brake Disc"), ("valid", "Spark Plug")]:
        save_jpeg(make_photo(0), tmp_path / "src dir" / split / label / "001.jpg")
    (tmp_path / "src dir" / "index.csv").write_text("stray file")
    src = ImageSourceDataset(path=str(tmp_path / "src dir")).load()
    assert src.kind == "folder"
    assert sorted(src.records["label"]) == ["Brake Disc", "Brake Disc", "Spark Plug"]
    assert set(src.records["split_hint"]) == {"train", "test", "valid"}
    assert [s["path"] for s in src.skipped] == ["index.csv"]
    assert src.read_bytes(src.records["path"][0])[:2] == b"\xff\xd8"


def test_csv_source(tmp_path):
    save_jpeg(make_photo(0), tmp_path / "imgs" / "a.jpg")
    save_jpeg(make_photo(1), tmp_path / "imgs" / "b.jpg")
    csv = write_csv_manifest(tmp_path, [("imgs/a.jpg", "Rim", "train"), ("imgs/b.jpg", "Radio", "test"),
                                        ("imgs/missing.jpg", "Radio", "test")])
    src = ImageSourceDataset(path=str(csv)).load()
    assert src.kind == "csv" and list(src.records["label"]) == ["Rim", "Radio", "Radio"]
    assert src.read_bytes("imgs/a.jpg")[:2] == b"\xff\xd8"
    with pytest.raises(FileNotFoundError):
        src.read_bytes("imgs/missing.jpg")


def test_csv_missing_columns_names_file_and_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nx.jpg,a\n")
    with pytest.raises(DatasetError, match=r"bad\.csv.*'filepaths'.*'labels'"):
        ImageSourceDataset(path=str(bad)).load()


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="contains no image files in category folders"):
        ImageSourceDataset(path=str(tmp_path / "empty")).load()
    with pytest.raises(DatasetError, match="does not exist.*--params=raw_source"):
        ImageSourceDataset(path=str(tmp_path / "nope")).load()
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DatasetError, match="not a .csv manifest"):
        ImageSourceDataset(path=str(tmp_path / "x.txt")).load()


def test_npy_dataset_versions_and_no_pickle(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 1, 3, 4)
    ds = NpyDataset(filepath=str(tmp_path / "a.npy"), version=Version(None, "2026-01-01T00.00.00.000Z"))
    ds.save(arr)
    assert (tmp_path / "a.npy" / "2026-01-01T00.00.00.000Z" / "a.npy").exists()
    np.testing.assert_array_equal(NpyDataset(filepath=str(tmp_path / "a.npy"), version=Version(None, None)).load(), arr)
    with pytest.raises(DatasetError):
        NpyDataset(filepath=str(tmp_path / "o.npy"), version=Version(None, "v1")).save(np.array([object()]))
    assert not (tmp_path / "o.npy" / "v1" / "o.npy").exists()   # a failed encode leaves no half file


def test_torch_model_dataset_round_trip(tmp_path):
    import torch

    ckpt = {"spec": {"task": "embedding", "dim": 8}, "state_dict": {"w": torch.ones(2, 3)}, "threshold": 0.5}
    ds = TorchModelDataset(filepath=str(tmp_path / "m.pt"), version=Version(None, "v1"))
    ds.save(ckpt)
    back = TorchModelDataset(filepath=str(tmp_path / "m.pt"), version=Version("v1", None)).load()
    assert back["spec"] == ckpt["spec"] and torch.equal(back["state_dict"]["w"], ckpt["state_dict"]["w"])
