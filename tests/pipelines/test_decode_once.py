"""Decode once, on every core, in memory linear in the photo count (issue 11).

Ingestion's verification decode also preprocesses every photo (``scan_and_decode``); preprocessing selects the
clean rows from it. The result must not depend on the number of workers, must equal the old two-decode result
byte for byte, and must never put one file's pixels under another file's label.
"""

import gc
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from partmatch import imaging
from partmatch.config import ParameterError
from partmatch.datasets import ImageSourceDataset, NpyDataset
from partmatch.pipelines.ingestion import decoding
from partmatch.pipelines.ingestion.nodes import (
    clean_manifest,
    scan_and_decode,
    scan_source,
)
from partmatch.pipelines.preprocessing.nodes import (
    PreprocessingError,
    preprocess_images,
)
from tests.conftest import make_photo, png_bytes, save_jpeg

INGESTION = {"min_images_per_class": 2, "max_pixels": 1_000_000}
PREPROCESSING = {"image_size": 32}

# file -> the start of the quarantine reason it must get
BAD_FILES = {
    "Gear/zero.jpg": "empty file",
    "Gear/random.jpg": "not an image",
    "Gear/page.png": "not an image",
    "Gear/strip.png": "image too elongated",
    "Gear/tiny.png": "image too small",
    "Gear/huge.png": "image too large",
}


@pytest.fixture
def hostile_demo(tiny_catalogue, tmp_path):
    """The tiny demo catalogue (JPEG, PNG with alpha, palette PNG, CMYK, EXIF-rotated, a duplicate under two
    categories, a truncated JPEG) plus bad files of every kind and a 16-bit PNG that must be scaled, not clipped."""
    root = tmp_path / "demo"
    shutil.copytree(tiny_catalogue, root)
    gear = root / "Gear"
    (gear / "zero.jpg").write_bytes(b"")
    (gear / "random.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (gear / "page.png").write_text("<html><body>not a photo</body></html>")
    (gear / "strip.png").write_bytes(png_bytes(Image.new("L", (1200, 8), 0)))
    (gear / "tiny.png").write_bytes(png_bytes(Image.new("L", (4, 4), 0)))
    (gear / "huge.png").write_bytes(png_bytes(Image.new("L", (1200, 1000), 0)))      # > max_pixels 1e6
    (gear / "sixteen.png").write_bytes(png_bytes(Image.fromarray(np.full((48, 48), 32768, dtype=np.uint16))))
    return root


def data_pipelines(root, workers, preprocessing=PREPROCESSING):
    source = ImageSourceDataset(path=str(root)).load()
    ingestion = {**INGESTION, "workers": workers}
    raw, quarantine, decoded = scan_and_decode(source, ingestion, preprocessing)
    clean, dropped = clean_manifest(raw, quarantine, ingestion)
    images, index = preprocess_images(source, clean, preprocessing, decoded, ingestion)
    return {"raw_manifest": raw, "quarantine": quarantine, "decoded_images": np.asarray(decoded),
            "clean_manifest": clean, "dropped_files": dropped, "image_array": np.asarray(images),
            "image_index": index}


@pytest.fixture
def pools(monkeypatch):
    """Chunks of 4 files, so a folder of a few hundred photos really runs in a pool; records each pool's size."""
    class Sizes(list):
        submitted: list[str]

    sizes = Sizes()
    real = decoding.ProcessPoolExecutor

    class Recording(real):
        def __init__(self, max_workers=None, **kwargs):
            sizes.append(max_workers)
            super().__init__(max_workers=max_workers, **kwargs)

        def submit(self, fn, *args, **kwargs):
            submitted.append(getattr(fn, "func", fn).__name__)
            return super().submit(fn, *args, **kwargs)

    submitted = sizes.submitted = []

    decoding.shutdown_pool()                             # a pool left by another test is not this test's
    monkeypatch.setattr(decoding, "CHUNK_SIZE", 4)
    monkeypatch.setattr(decoding, "ProcessPoolExecutor", Recording)
    yield sizes
    decoding.shutdown_pool()


def test_two_workers_give_byte_identical_outputs_to_one(hostile_demo, pools):
    one = data_pipelines(hostile_demo, 1)
    assert pools == []                                   # workers=1: in this process, no pool
    two = data_pipelines(hostile_demo, 2)
    # one pool of 2 for the run: ingestion's decode, then preprocessing's hash checks in the same (warm) pool,
    # shut down when preprocessing ends
    assert pools == [2] and not decoding.pool_is_warm(2)
    n_files, n_clean = len(one["raw_manifest"]) + len(one["quarantine"]), len(one["clean_manifest"])
    assert (n_files, n_clean) == (239, 165)
    assert pools.submitted == ["decode_chunk"] * 60 + ["verify_chunk"] * 42     # 239 and 165 files in chunks of 4
    for name, a in one.items():
        b = two[name]
        if isinstance(a, np.ndarray):
            assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape and a.tobytes() == b.tobytes(), name
        else:
            pd.testing.assert_frame_equal(a, b, obj=name)
    reasons = dict(zip(one["quarantine"]["path"], one["quarantine"]["reason"]))
    for path, start in BAD_FILES.items():
        assert reasons[path].startswith(start), (path, reasons[path])
    n_files = sum(1 for p in hostile_demo.rglob("*") if p.is_file())
    # every file is in the manifest or quarantined; the demo's truncated JPEG is the 7th quarantined file
    assert len(one["raw_manifest"]) + len(one["quarantine"]) == n_files
    assert len(one["quarantine"]) == len(BAD_FILES) + 1
    # the 16-bit PNG (all 32768) is scaled onto 0..255 (all 128), not clipped (all 255)
    row = one["raw_manifest"].set_index("path").loc["Gear/sixteen.png", "decoded_row"]
    assert (one["decoded_images"][row] == 128).all()


def test_decode_once_equals_the_old_two_decodes_and_decodes_each_photo_once(hostile_demo, monkeypatch):
    source = ImageSourceDataset(path=str(hostile_demo)).load()
    ingestion = {**INGESTION, "workers": 1}
    old_raw, old_quarantine = scan_source(source, ingestion)
    old_clean, old_dropped = clean_manifest(old_raw, old_quarantine, ingestion)
    old_images, old_index = preprocess_images(source, old_clean, PREPROCESSING, None, ingestion)

    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    raw, quarantine, decoded = scan_and_decode(source, ingestion, PREPROCESSING)
    n_ingestion = len(opened)
    clean, dropped = clean_manifest(raw, quarantine, ingestion)
    images, index = preprocess_images(source, clean, PREPROCESSING, decoded, ingestion)
    # one decoder per distinct image file in ingestion (the zero-byte one never reaches a decoder), none after
    n_distinct = len({p for p in source.records["path"]}) - 1
    assert n_ingestion == n_distinct and len(opened) == n_distinct
    pd.testing.assert_frame_equal(raw[old_raw.columns], old_raw)
    pd.testing.assert_frame_equal(quarantine, old_quarantine)
    pd.testing.assert_frame_equal(dropped, old_dropped)
    pd.testing.assert_frame_equal(index, old_index)
    assert images.shape == old_images.shape and images.tobytes() == old_images.tobytes()
    # each decoded row is what preprocess_bytes makes of the file, and its hash is recorded
    for r in raw.sample(10, random_state=0).itertuples():
        expected = imaging.preprocess_bytes((hostile_demo / r.path).read_bytes(), image_size=32,
                                            color_mode="grayscale")
        assert decoded[r.decoded_row].tobytes() == expected.tobytes()
        assert r.pixel_sha256 == imaging.sha256(expected.tobytes())
        assert r.decoded_as == "grayscale 32px background 255"


def test_other_preprocessing_parameters_decode_again_with_them(hostile_demo, pools):
    source = ImageSourceDataset(path=str(hostile_demo)).load()
    ingestion = {**INGESTION, "workers": 1}
    raw, quarantine, decoded = scan_and_decode(source, ingestion, PREPROCESSING)        # 32 px grayscale
    clean, _ = clean_manifest(raw, quarantine, ingestion)
    rgb = {"image_size": 24, "color_mode": "rgb"}
    images, index = preprocess_images(source, clean, rgb, decoded, {**ingestion, "workers": 2})
    assert pools == [2]                                  # every clean photo decoded again, on 2 processes
    reference, reference_index = preprocess_images(source, clean.drop(columns=["decoded_row"]), rgb, None, ingestion)
    pd.testing.assert_frame_equal(index, reference_index)
    assert images.shape == (len(clean), 3, 24, 24) and images.tobytes() == reference.tobytes()


def test_decoded_rows_of_another_run_are_never_used(hostile_demo, caplog):
    """decoded_images from another run (rows in another order): every row fails its pixel hash and is decoded
    again, so no photo ends up with another file's pixels under its label."""
    source = ImageSourceDataset(path=str(hostile_demo)).load()
    ingestion = {**INGESTION, "workers": 1}
    raw, quarantine, decoded = scan_and_decode(source, ingestion, PREPROCESSING)
    clean, _ = clean_manifest(raw, quarantine, ingestion)
    right, right_index = preprocess_images(source, clean, PREPROCESSING, decoded, ingestion)
    shuffled = decoded[np.random.default_rng(0).permutation(len(decoded))]
    with caplog.at_level("WARNING", logger="partmatch.pipelines.preprocessing.nodes"):
        images, index = preprocess_images(source, clean, PREPROCESSING, shuffled, ingestion)
    assert images.tobytes() == right.tobytes()
    pd.testing.assert_frame_equal(index, right_index)
    moved = sum(shuffled[r].tobytes() != decoded[r].tobytes() for r in clean["decoded_row"])
    assert moved == 164                                  # one of the 165 rows kept its place in the permutation
    assert any(f"decoded {moved} photo(s) again whose row in decoded_images is not the one" in m
               and "come from different runs" in m for m in caplog.messages)


def test_a_file_changed_after_ingestion_is_still_caught(hostile_demo, caplog):
    """Preprocessing no longer decodes, but it still checks every file's bytes against the manifest."""
    source = ImageSourceDataset(path=str(hostile_demo)).load()
    ingestion = {**INGESTION, "workers": 1}
    raw, quarantine, decoded = scan_and_decode(source, ingestion, PREPROCESSING)
    clean, _ = clean_manifest(raw, quarantine, ingestion)
    victim = clean["path"].iloc[3]
    save_jpeg(make_photo(2, seed=99), hostile_demo / victim)
    with caplog.at_level("WARNING", logger="partmatch.pipelines.preprocessing.nodes"):
        images, index = preprocess_images(source, clean, PREPROCESSING, decoded, ingestion)
    assert victim not in set(index["path"]) and len(index) == len(clean) - 1 == len(images)
    assert any(m.startswith(f"preprocessing skipped {victim}: bytes changed since ingestion") for m in caplog.messages)


def test_above_the_memory_budget_the_arrays_are_memory_mapped(hostile_demo, tmp_path):
    in_memory = data_pipelines(hostile_demo, 1)
    source = ImageSourceDataset(path=str(hostile_demo)).load()
    ingestion = {**INGESTION, "workers": 1}
    mapped_dir = tmp_path / "maps"
    mapped_dir.mkdir()
    small = {**PREPROCESSING, "memory_budget_mb": 0.01, "memmap_dir": str(mapped_dir)}   # 10 kB: 10 photos
    raw, quarantine, decoded = scan_and_decode(source, ingestion, small)
    clean, _ = clean_manifest(raw, quarantine, ingestion)
    images, index = preprocess_images(source, clean, small, decoded, ingestion)
    assert isinstance(decoded, np.memmap) and isinstance(images, np.memmap)
    pd.testing.assert_frame_equal(index, in_memory["image_index"])
    assert decoded.tobytes() == in_memory["decoded_images"].tobytes()
    assert images.shape == in_memory["image_array"].shape and images.tobytes() == in_memory["image_array"].tobytes()
    # NpyDataset writes the mapped file as it is: a plain .npy that loads to the same array
    ds = NpyDataset(filepath=str(tmp_path / "out" / "image_array.npy"))
    ds.save(images)
    assert np.load(tmp_path / "out" / "image_array.npy").tobytes() == in_memory["image_array"].tobytes()
    mapped = NpyDataset(filepath=str(tmp_path / "out" / "image_array.npy"), load_args={"mmap_mode": "r"}).load()
    assert isinstance(mapped, np.memmap) and mapped.tobytes() == in_memory["image_array"].tobytes()
    # the temporary files go when the arrays do
    assert len(os.listdir(mapped_dir)) == 2
    del images, decoded, mapped
    gc.collect()
    assert os.listdir(mapped_dir) == []


def test_keep_rows_in_memory_and_mapped():
    base = np.arange(6 * 2 * 2, dtype=np.uint8).reshape(6, 1, 2, 2)
    kept = decoding.keep_rows(base.copy(), [0, 2, 5], memory_budget_mb=1)
    assert kept.tolist() == base[[0, 2, 5]].tolist()
    mapped = decoding.allocate_images(base.shape, memory_budget_mb=0)
    mapped[:] = base
    out = decoding.keep_rows(mapped, [1, 4], memory_budget_mb=0)
    assert isinstance(out, np.memmap) and out.shape == (2, 1, 2, 2) and out.tolist() == base[[1, 4]].tolist()
    assert decoding.keep_rows(base, list(range(6)), memory_budget_mb=0) is base


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), (1, 1), ("2", 2), (3, 3)])
def test_workers_parameter(value, expected):
    from partmatch import config

    assert config.parse("ingestion", {"workers": value}).workers == expected
    assert decoding.resolve_workers(expected) == (decoding.cpu_count() if expected == "auto" else expected)


@pytest.mark.parametrize("value", [0, -1, True, "many", 2.5])
def test_bad_workers_fail_naming_the_key(value):
    from partmatch import config

    with pytest.raises(ParameterError, match=r"'ingestion\.workers': must be 'auto' \(every core\) or a whole "
                                             r"number of processes >= 1 \(1 = no pool\)"):
        config.parse("ingestion", {"workers": value})
    with pytest.raises(ParameterError, match=r"'preprocessing\.memory_budget_mb'"):
        config.parse("preprocessing", {"memory_budget_mb": -1})


def test_a_few_files_never_start_a_pool(tmp_path, pools):
    for i in range(3):
        save_jpeg(make_photo(0, seed=i), tmp_path / "A" / f"{i}.jpg")
    source = ImageSourceDataset(path=str(tmp_path)).load()
    raw, _, _ = scan_and_decode(source, {"workers": 8}, PREPROCESSING)   # 3 files = 1 chunk of 4: no pool
    assert pools == [] and len(raw) == 3


@pytest.mark.slow
def test_kedro_run_decodes_once_through_the_catalog(tmp_path, tiny_catalogue):
    """`kedro run --pipelines=data` as a user runs it: 2 workers, arrays over a tiny memory budget (memory-mapped,
    saved from the mapping), decoded_images loaded memory-mapped; image_array equals the in-process result."""
    from tests.conftest import kedro_cli, latest, new_kedro_project

    project = tmp_path / "project"
    new_kedro_project(project)
    result = kedro_cli(project, "run", "--pipelines=data",
                       f"--params=raw_source={tiny_catalogue},ingestion.workers=2,"
                       "preprocessing.memory_budget_mb=0.05", env={"COLUMNS": "400"}, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    expected = data_pipelines(tiny_catalogue, 1, {})                       # the default 100 px grayscale
    image_array = np.load(latest(project, "04_feature/image_array.npy"))
    decoded = np.load(latest(project, "02_intermediate/decoded_images.npy"))
    assert image_array.shape == expected["image_array"].shape
    assert image_array.tobytes() == expected["image_array"].tobytes()
    assert decoded.tobytes() == expected["decoded_images"].tobytes()
    index = pd.read_parquet(latest(project, "04_feature/image_index.parquet"))
    pd.testing.assert_frame_equal(index, expected["image_index"])
    n = len(expected["image_index"])
    assert "ingestion: verifying images (2 processes): 100%" in result.stderr
    assert f"preprocessing: {n} of {n} photos taken from ingestion's decode, 0 decoded here." in result.stdout
    assert result.stdout.count("> preprocessing.memory_budget_mb 0.05: memory-mapped at") == 2


def test_another_source_still_fails_naming_both_with_ingestions_pixels_at_hand(tmp_path):
    """Issue 11 item 1 with decode-once: ingestion on A, preprocessing told raw_source=B while A's decoded pixels
    are available: B's bytes do not match A's hashes, so nothing is taken under A's labels and the run fails."""
    for i in range(4):
        save_jpeg(make_photo(0, seed=i), tmp_path / "A" / "Disc" / f"{i}.jpg")
        save_jpeg(make_photo(1, seed=50 + i), tmp_path / "B" / "Disc" / f"{i}.jpg")
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    source_a = ImageSourceDataset(path=a).load()
    raw, quarantine, decoded = scan_and_decode(source_a, {"workers": 1}, PREPROCESSING)
    clean, _ = clean_manifest(raw, quarantine, {})
    source_b = ImageSourceDataset(path=b).load()
    with pytest.raises(PreprocessingError, match=rf"^clean_manifest was made from {a}, but raw_source is now {b}: more "
                                        r"than 50% of its 4 files are missing or have other bytes than ingestion "
                                        r"hashed \(e\.g\. Disc/0\.jpg: bytes changed since ingestion"):
        preprocess_images(source_b, clean, PREPROCESSING, decoded, {"workers": 1})
    images, index = preprocess_images(source_a, clean, PREPROCESSING, decoded, {"workers": 1})
    assert list(index["path"]) == [f"Disc/{i}.jpg" for i in range(4)] and images.shape == (4, 1, 32, 32)


def test_large_image_arrays_are_zero_filled_writable_and_picklable():
    import pickle

    big = decoding.allocate_images((9, 1, 1024, 1024), memory_budget_mb=64)      # 9 MB: the huge-page path
    small = decoding.allocate_images((2, 1, 8, 8), memory_budget_mb=64)
    assert not isinstance(big, np.memmap) and big.shape == (9, 1, 1024, 1024) and big.dtype == np.uint8
    assert not big.any() and not small.any()
    big[3, 0, 5, 7] = 200
    assert int(big.sum()) == 200
    assert pickle.loads(pickle.dumps(big)).tobytes() == big.tobytes()
