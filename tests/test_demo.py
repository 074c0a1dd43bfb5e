"""The demo catalogue: deterministic, long-tailed, every special format and defect, atomic ensure."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from partmatch import demo
from partmatch.cleaning import matched_family, unsafe_label_reason
from partmatch.demo import DEMO_CATEGORIES, ensure_demo_catalogue, generate_demo_catalogue

FAMILIES = ["Seal", "Bearing", "Shaft", "Strap", "Hose", "Belt", "Link", "Arm", "Bushing", "Kit", "Set"]
EXCLUDED = ["Axle Seal", "Wheel Bearing", "Driveshaft", "Heater Hose", "Control Arm", "Brake Pad Set", "Timing Belt",
            "Sway Bar Link", "Strut Mount Bushing", "Gasket Kit", "Tie Strap"]
LOOK_ALIKES = ["Alarm Siren", "Armrest", "Sunset Visor", "Harmonic Balancer"]
SMALL = 0.1


def _files(root: Path) -> dict[str, str]:
    """Relative POSIX path -> sha256 of every file below root."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo_small") / "catalogue"
    return root, generate_demo_catalogue(root, seed=0, scale=SMALL)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo_full") / "catalogue"
    return root, generate_demo_catalogue(root, seed=0)


@pytest.fixture
def strict_truncation(monkeypatch):
    """Other code may let PIL load truncated images; the demo's defect must be seen as one."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


# ---------------------------------------------------------------------------------------------------------- spec
def test_spec_table_is_long_tailed_and_sized_for_a_quick_run():
    counts = [n for _, _, n in DEMO_CATEGORIES]
    assert 55 <= len(counts) <= 70
    assert 600 <= sum(counts) <= 700
    assert sum(n == 1 for n in counts) >= 3
    assert sum(2 <= n <= 5 for n in counts) >= 15
    assert 2 <= sum(n >= 40 for n in counts) <= 6
    assert len({name for name, _, _ in DEMO_CATEGORIES}) == len(counts), "category names must be unique"
    assert {kind for _, kind, _ in DEMO_CATEGORIES} <= set(demo.SHAPE_KINDS)


def test_excluded_families_and_look_alikes_are_named():
    names = {name for name, _, _ in DEMO_CATEGORIES}
    assert set(EXCLUDED) <= names
    assert set(LOOK_ALIKES) <= names
    assert {matched_family(n, FAMILIES) for n in EXCLUDED} == set(FAMILIES)  # every family represented
    assert all(matched_family(n, FAMILIES) is None for n in LOOK_ALIKES)
    normal = names - set(EXCLUDED)
    assert len(normal) >= 45
    assert [n for n in normal if matched_family(n, FAMILIES)] == []
    assert [n for n in names if unsafe_label_reason(n)] == []


def test_scale_shrinks_counts_but_keeps_every_category():
    plan = demo.catalogue_plan(0.01)
    assert list(plan) == [name for name, _, _ in DEMO_CATEGORIES]
    assert set(plan.values()) == {1}
    assert demo.catalogue_plan(1.0) == {name: n for name, _, n in DEMO_CATEGORIES}
    with pytest.raises(ValueError):
        demo.catalogue_plan(0)


# ---------------------------------------------------------------------------------------------------------- full
@pytest.mark.slow
def test_full_catalogue_on_disk_matches_the_spec(full):
    root, summary = full
    folders = sorted(p.name for p in root.iterdir())
    assert all(p.is_dir() for p in root.iterdir())
    assert folders == sorted(name for name, _, _ in DEMO_CATEGORIES)
    on_disk = {name: len(list((root / name).iterdir())) for name in folders}
    assert on_disk == {name: n for name, _, n in DEMO_CATEGORIES}
    assert summary["categories"] == len(DEMO_CATEGORIES)
    assert summary["images"] == sum(on_disk.values()) == sum(summary["formats"].values())
    assert summary["per_category"] == on_disk
    assert summary["formats"]["jpeg"] > summary["images"] / 2  # mostly RGB JPEG
    for fmt in ("png_rgba", "png_palette", "jpeg_cmyk", "jpeg_exif_rotated"):
        assert summary["formats"][fmt] >= 5, fmt
    assert summary["formats"]["jpeg_truncated"] == 1
    for p in root.rglob("*"):
        if p.is_file():
            assert p.suffix in {".jpg", ".png"} and len(p.stem) == 3 and p.stem.isdigit(), p


# ---------------------------------------------------------------------------------------------------------- small
def test_same_seed_gives_byte_identical_files(tmp_path, small):
    root, summary = small
    again = generate_demo_catalogue(tmp_path / "again", seed=0, scale=SMALL)
    assert _files(tmp_path / "again") == _files(root)
    assert again == summary


def test_another_seed_gives_other_photos(tmp_path, small):
    root, _ = small
    generate_demo_catalogue(tmp_path / "other", seed=1, scale=SMALL)
    first = {k.rsplit(".", 1)[0]: v for k, v in _files(root).items()}
    other = {k.rsplit(".", 1)[0]: v for k, v in _files(tmp_path / "other").items()}
    assert first.keys() == other.keys()  # same categories and counts; formats may differ
    assert sum(first[k] != other[k] for k in first) > len(first) * 0.9


def test_every_file_decodes_except_the_truncated_one(small, strict_truncation):
    root, summary = small
    failed = []
    for rel in _files(root):
        try:
            with Image.open(root / rel) as img:
                img.load()
                assert min(img.size) >= 16
        except OSError:
            failed.append(rel)
    assert failed == [summary["truncated"]]


def test_truncated_file_fails_on_load(small, strict_truncation):
    root, summary = small
    path = root / summary["truncated"]
    assert path.suffix == ".jpg"
    with Image.open(path) as img:  # the header is intact ...
        assert img.format == "JPEG"
        with pytest.raises(OSError):
            img.load()  # ... but the pixels are cut off


def test_duplicate_is_identical_bytes_in_two_categories(small):
    root, summary = small
    first, second = (root / p for p in summary["duplicate"])
    assert first.parent.name != second.parent.name
    assert first.read_bytes() == second.read_bytes()
    digests = list(_files(root).values())
    assert len(digests) - len(set(digests)) == 1, "exactly one duplicated photo"


def _inventory(root: Path) -> list[tuple[str, str, int | None, Image.Image]]:
    items = []
    for rel in _files(root):
        img = Image.open(root / rel)
        try:
            img.load()
        except OSError:
            continue
        items.append((img.format, img.mode, img.getexif().get(0x0112), img))
    return items


def test_special_formats_present(small, strict_truncation):
    root, summary = small
    items = _inventory(root)
    assert any(fmt == "JPEG" and mode == "CMYK" for fmt, mode, _, _ in items)
    assert any(fmt == "PNG" and mode == "P" for fmt, mode, _, _ in items)
    rgba = [img for fmt, mode, _, img in items if fmt == "PNG" and mode == "RGBA"]
    assert rgba and any(img.getchannel("A").getextrema()[0] < 255 for img in rgba)
    rotated = [img for fmt, _, orient, img in items if fmt == "JPEG" and orient in (6, 8)]
    assert rotated
    for img in rotated:  # stored rotated: exif_transpose swaps the sides back
        assert ImageOps.exif_transpose(img).size == (img.height, img.width)
    assert sum(fmt == "JPEG" and mode == "RGB" and orient is None for fmt, mode, orient, _ in items) > len(items) / 2
    counts = summary["formats"]
    assert all(counts.get(k, 0) >= 1 for k in ("jpeg", "jpeg_cmyk", "png_palette", "png_rgba", "jpeg_exif_rotated"))


def test_exif_rotated_photo_is_upright_after_transpose():
    """The stored rotation is the inverse of what exif_transpose applies for tags 6 and 8."""
    upright = Image.new("RGB", (160, 120), (255, 255, 255))
    upright.paste((255, 0, 0), (0, 0, 40, 30))  # a red block in the top-left corner
    seen = set()
    for seed in range(8):
        data = demo._encode(upright, upright.getchannel("R"), "jpeg_exif_rotated", np.random.default_rng(seed))
        img = Image.open(io.BytesIO(data))
        seen.add(img.getexif()[0x0112])
        assert img.size == (120, 160)
        fixed = ImageOps.exif_transpose(img)
        assert fixed.size == (160, 120)
        r, g, _ = fixed.getpixel((5, 5))
        assert r > 200 and g < 60
        assert fixed.getpixel((150, 110))[1] > 200
    assert seen == {6, 8}


def test_backgrounds_are_off_white_and_canvases_vary(small):
    root, _ = small
    sizes, corners = set(), []
    for rel in _files(root):
        if not rel.endswith(".jpg"):
            continue
        try:
            with Image.open(root / rel) as img:
                img = ImageOps.exif_transpose(img).convert("RGB")
        except OSError:
            continue
        sizes.add(img.size)
        corners.append(img.getpixel((1, 1)))
    assert any(w != h for w, h in sizes) and len(sizes) >= 3
    assert min(min(c) for c in corners) >= 215  # off-white, slight vignette and noise
    assert len(set(corners)) > 5


# ---------------------------------------------------------------------------------------------------------- ensure
def test_ensure_generates_into_a_missing_dir(tmp_path):
    out = tmp_path / "data" / "01_raw" / "demo"
    assert ensure_demo_catalogue(out, scale=0.02) == out
    assert sorted(p.name for p in out.iterdir()) == sorted(name for name, _, _ in DEMO_CATEGORIES)
    assert [p.name for p in out.parent.iterdir()] == ["demo"], "no temporary folder left behind"


def test_ensure_generates_into_an_empty_dir(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / ".gitkeep").write_text("")
    ensure_demo_catalogue(out, scale=0.02)
    assert len([p for p in out.iterdir() if p.is_dir()]) == len(DEMO_CATEGORIES)
    assert (out / ".gitkeep").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_ensure_leaves_an_existing_catalogue_alone(tmp_path):
    out = tmp_path / "demo"
    ensure_demo_catalogue(out, scale=0.02)
    old = 1_000_000_000
    for p in out.rglob("*"):
        os.utime(p, (old, old))
    before = {p: p.stat().st_mtime for p in out.rglob("*")}
    ensure_demo_catalogue(out, scale=0.02, seed=5)
    assert {p: p.stat().st_mtime for p in out.rglob("*")} == before


def test_ensure_never_touches_a_foreign_folder(tmp_path):
    out = tmp_path / "photos"
    (out / "Brake Disc").mkdir(parents=True)
    (out / "Brake Disc" / "mine.jpg").write_bytes(b"x")
    ensure_demo_catalogue(out, scale=0.02)
    assert [p.relative_to(out).as_posix() for p in out.rglob("*")] == ["Brake Disc", "Brake Disc/mine.jpg"]


def test_ensure_crash_leaves_no_half_catalogue(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = demo._encode

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 10:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(demo, "_encode", flaky)
    out = tmp_path / "demo"
    with pytest.raises(RuntimeError):
        ensure_demo_catalogue(out, scale=0.02)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert demo.main([str(out), "--seed", "3", "--scale", "0.02", "--size", "64"]) == 0
    assert f"{len(DEMO_CATEGORIES)} categories" in capsys.readouterr().out
    assert len(list(out.iterdir())) == len(DEMO_CATEGORIES)
    assert max(Image.open(next((out / "Gear").iterdir())).size) <= 80
    assert demo.main([str(out)]) == 1  # refuses to overwrite


# ---------------------------------------------------------------------------------------------------------- search demo
def test_demo_queries_are_deterministic_and_hold_every_case(tmp_path, strict_truncation):
    first = demo.generate_demo_queries(tmp_path / "a")
    demo.generate_demo_queries(tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    names = {name for name, _, _ in DEMO_CATEGORIES}
    truth = first["truth"]
    assert sum(1 for t in truth.values() if t in names) >= 4                     # known categories
    assert [t for t in truth.values() if t is not None and t not in names] == [demo.NEW_PART[0]]  # one absent part
    assert None in truth.values()                                                 # a photo without a known answer
    undecodable = []
    for rel in truth:
        try:
            with Image.open(tmp_path / "a" / rel) as img:
                img.load()
        except OSError:
            undecodable.append(rel)
    assert undecodable == ["unreadable.jpg"]


def test_demo_new_part_line_is_absent_from_the_catalogue(tmp_path, small):
    root, _ = small
    new = demo.generate_demo_new_parts(tmp_path / "new")
    assert new["label"] == demo.NEW_PART[0] and not (root / demo.NEW_PART[0]).exists()
    assert len(new["files"]) == demo.NEW_PART_PHOTOS
    query_hashes = set(_files(tmp_path / "new").values())
    demo.generate_demo_queries(tmp_path / "q")
    assert not query_hashes & set(_files(tmp_path / "q").values())  # the query photo is not one of the added ones
    assert demo.ensure_demo_queries(tmp_path / "q") == tmp_path / "q"  # present: left alone
    out = demo.ensure_demo_new_parts(tmp_path / "fresh" / "new_parts")
    assert [p.name for p in out.iterdir()] == [demo.NEW_PART[0]]
    assert [p.name for p in out.parent.iterdir()] == ["new_parts"], "no temporary folder left behind"
