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


def test_csv_with_bom_and_semicolons_repeats_read_once(tmp_path):
    save_jpeg(make_photo(0), tmp_path / "imgs" / "a.jpg")
    rows = ["filepaths;labels;data set", "imgs/a.jpg;Rim;Train", "./imgs/a.jpg;Rim;train", "imgs/a.jpg;Radio;test",
            "imgs/b.jpg;NA;"]
    (tmp_path / "m.csv").write_bytes("\ufeff".encode() + "\n".join(rows).encode() + b"\n")
    src = ImageSourceDataset(path=str(tmp_path / "m.csv")).load()
    assert src.records[["path", "label"]].values.tolist() == [["imgs/a.jpg", "Rim"], ["imgs/a.jpg", "Radio"],
                                                              ["imgs/b.jpg", "NA"]]
    assert src.records["split_hint"].fillna("-").tolist() == ["train", "test", "-"]
    assert src.files == {"imgs/a.jpg": str(tmp_path / "imgs" / "a.jpg"), "imgs/b.jpg": str(tmp_path / "imgs" / "b.jpg")}


def test_outside_root_resolves_links_and_dotdot(tmp_path):
    save_jpeg(make_photo(0), tmp_path / "out.jpg")
    save_jpeg(make_photo(1), tmp_path / "src" / "A" / "in.jpg")
    (tmp_path / "src" / "A" / "in_link.jpg").symlink_to(tmp_path / "src" / "A" / "in.jpg")
    (tmp_path / "src" / "A" / "out_link.jpg").symlink_to(tmp_path / "out.jpg")
    src = ImageSourceDataset(path=str(tmp_path / "src")).load()
    assert src.outside_root("A/in.jpg") is None and src.outside_root("A/in_link.jpg") is None
    assert src.outside_root("A/out_link.jpg") == str((tmp_path / "out.jpg").resolve())
    csv = write_csv_manifest(tmp_path / "src", [("A/in.jpg", "A", "train"), ("A/../../out.jpg", "A", "train"),
                                                (str(tmp_path / "out.jpg"), "A", "train")])
    src = ImageSourceDataset(path=str(csv)).load()
    assert list(src.records["path"]) == ["A/in.jpg", "../out.jpg", str(tmp_path / "out.jpg")]
    assert [src.outside_root(k) for k in src.records["path"]] == [None] + [str((tmp_path / "out.jpg").resolve())] * 2


def test_non_utf8_and_hidden_names_are_reported_not_listed(tmp_path):
    import os

    save_jpeg(make_photo(0), tmp_path / "A" / "ok.jpg")
    with open(os.fsencode(tmp_path / "A") + b"/\xff.jpg", "wb") as f:
        f.write(b"x")
    (tmp_path / "A" / ".hidden.jpg").write_bytes(b"x")
    src = ImageSourceDataset(path=str(tmp_path)).load()
    assert list(src.records["path"]) == ["A/ok.jpg"]
    assert src.skipped == [
        {"path": "A/\\xff.jpg", "label": "A", "stage": "quarantine",
         "reason": "file or folder name is not valid UTF-8 (undecodable bytes shown as \\x..): 'A/\\xff.jpg'"},
        {"path": "A/.hidden.jpg", "reason": "hidden file: name starts with '.', not read"}]


def test_optional_npy_dataset_is_none_until_a_version_exists(tmp_path):
    import numpy as np
    from kedro.io import Version

    from partmatch.datasets import OptionalNpyDataset

    path = str(tmp_path / "decoded_images.npy")
    assert OptionalNpyDataset(filepath=path, version=Version(None, None)).load() is None
    arr = np.arange(24, dtype=np.uint8).reshape(2, 1, 3, 4)
    OptionalNpyDataset(filepath=path, version=Version(None, "2026-01-01T00.00.00.000Z")).save(arr)
    loaded = OptionalNpyDataset(filepath=path, version=Version(None, None), load_args={"mmap_mode": "r"}).load()
    assert loaded.tobytes() == arr.tobytes() and loaded.shape == (2, 1, 3, 4)
