"""Decoding, verification and preprocessing of single photos."""

import io

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile, features

from partmatch.imaging import (
    ImageRejected,
    inspect_image,
    preprocess_bytes,
    to_canonical,
)
from tests.conftest import make_photo, png_bytes

LIMITS = {"max_bytes": 10_000_000, "max_pixels": 10_000_000, "min_side": 8}


def jpeg_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def test_inspect_good_and_bad_files():
    good = jpeg_bytes(make_photo(0))
    info = inspect_image(good, **LIMITS)
    assert info.error is None and (info.width, info.height, info.format) == (64, 48, "JPEG")
    assert "unreadable" in inspect_image(good[: len(good) // 2], **LIMITS).error
    assert "not an image" in inspect_image(b"hello world", **LIMITS).error
    assert inspect_image(b"", **LIMITS).error == "empty file"
    assert "too large" in inspect_image(good, max_bytes=10, max_pixels=10**7, min_side=8).error
    assert "too large" in inspect_image(good, max_bytes=10**7, max_pixels=100, min_side=8).error
    assert "too small" in inspect_image(jpeg_bytes(make_photo(0, size=(5, 40))), **LIMITS).error


def test_padding_is_white_and_aspect_is_kept():
    img = Image.new("RGB", (200, 100), (0, 0, 0))  # black, 2:1
    arr = preprocess_bytes(png_bytes(img), image_size=100, color_mode="grayscale")
    assert arr.shape == (1, 100, 100) and arr.dtype == np.uint8
    assert (arr[0, :24] == 255).all() and (arr[0, -24:] == 255).all()   # white bands top & bottom
    assert (arr[0, 27:73] == 0).all()                                      # the 2:1 content, 50 rows high
    rgb = preprocess_bytes(png_bytes(img), image_size=64, color_mode="rgb")
    assert rgb.shape == (3, 64, 64) and (rgb[:, :15] == 255).all()


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (50, 50), (0, 0, 0, 0))          # fully transparent black
    img.paste((0, 0, 0, 255), (20, 20, 30, 30))               # opaque black square
    arr = preprocess_bytes(png_bytes(img), image_size=50, color_mode="grayscale")[0]
    assert arr[0, 0] == 255 and arr[25, 25] == 0


def test_palette_with_transparency_and_cmyk():
    pal = Image.new("P", (40, 40), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (10, 10, 30, 30))
    arr = preprocess_bytes(png_bytes(pal, transparency=0), image_size=40, color_mode="rgb")
    assert tuple(arr[:, 0, 0]) == (255, 255, 255) and arr[0, 20, 20] > 200 and arr[1, 20, 20] < 60
    cmyk = make_photo(1).convert("CMYK")
    out = preprocess_bytes(jpeg_bytes(cmyk), image_size=32, color_mode="grayscale")
    assert out.shape == (1, 32, 32) and out[0, 0, 0] > 200   # background stays light, not inverted


def test_exif_orientation_is_applied():
    img = Image.new("L", (60, 30), 255)
    img.paste(0, (0, 0, 10, 30))                 # black stripe at the left edge
    exif = Image.Exif()
    exif[0x0112] = 6                             # "rotate 90 CW to display"
    arr = preprocess_bytes(jpeg_bytes(img.convert("RGB"), exif=exif.tobytes()), image_size=60,
                           color_mode="grayscale")[0]
    # displayed upright the image is 30 wide x 60 high with the stripe along the top
    assert arr[2, 30] < 60 and arr[58, 30] > 200
    assert (arr[:, :10] > 240).all()             # white padding left


@pytest.mark.parametrize("size", [28, 100, 224])
def test_sizes(size):
    assert preprocess_bytes(jpeg_bytes(make_photo(2)), image_size=size, color_mode="grayscale").shape == (1, size, size)


# --- hostile and unusual formats (issue 11: "Hostile input", item 5) ---------------------------------------

def encoded(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def canonical_values(data, color_mode="grayscale"):
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(to_canonical(img, color_mode))


def test_16bit_png_is_scaled_not_clipped():
    data = encoded(Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16)), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert canonical_values(data).tolist() == [[0, 1, 128, 255]]
    mid = encoded(Image.fromarray(np.full((40, 40), 32768, dtype=np.uint16)), "PNG")
    arr = preprocess_bytes(mid, image_size=40, color_mode="grayscale")
    assert arr.shape == (1, 40, 40) and (arr == 128).all()           # was all 255 (clipped) before
    assert (preprocess_bytes(mid, image_size=40, color_mode="rgb") == 128).all()


@pytest.mark.parametrize(("values", "dtype", "expected"), [
    ([0, 32768, 65535], np.int32, [0, 128, 255]),          # 16-bit data in a 32-bit image: 0..65535
    ([0, 100, 255], np.int32, [0, 100, 255]),              # 8-bit data: kept as is
    ([-1000, 0, 1000], np.int32, [0, 128, 255]),           # outside every conventional range: its min..max
    ([0.0, 0.5, 1.0], np.float32, [0, 128, 255]),          # float 0..1
    ([0.0, 25.5, 255.0], np.float32, [0, 26, 255]),        # float 0..255
    ([0.0, np.nan, 1.0], np.float32, [0, 0, 255]),         # non-finite -> the low end
])
def test_32bit_int_and_float_tiffs_are_scaled_by_their_range(values, dtype, expected):
    img = Image.fromarray(np.array([values], dtype=dtype))
    assert img.mode == ("I" if dtype == np.int32 else "F")
    data = encoded(img, "TIFF")
    assert canonical_values(data).tolist() == [expected]


def test_elongated_image_is_quarantined_not_blanked():
    strip = png_bytes(Image.new("L", (1600, 8), 0))                   # 200:1; 0.5 px high at 100 px
    assert inspect_image(strip, **LIMITS).error == (
        "image too elongated: 1600x8 is 200:1 > 100:1 (ingestion.max_aspect_ratio); it would shrink to a line once "
        "padded to a square")
    assert inspect_image(png_bytes(Image.new("L", (8, 1600), 0)), **LIMITS).error.startswith(
        "image too elongated: 8x1600 is 200:1 > 100:1")
    assert inspect_image(strip, **LIMITS, max_aspect_ratio=200).error is None
    ok = png_bytes(Image.new("L", (800, 8), 0))                       # 100:1 is still accepted: 1 px high
    assert inspect_image(ok, **LIMITS).error is None
    assert (preprocess_bytes(ok, image_size=100, color_mode="grayscale")[0, 50] < 128).all()


@pytest.fixture(scope="module")
def bomb_png():
    """A real 30000x30000 PNG (900 Mpx; 1-bit, so ~170 kB on disk)."""
    return encoded(Image.new("1", (30000, 30000), 1), "PNG")


@pytest.fixture
def no_decoding(monkeypatch):
    def fail(self):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)


def test_decompression_bomb_refused_before_decoding(bomb_png, no_decoding):
    assert inspect_image(bomb_png, max_bytes=10**7, max_pixels=40_000_000, min_side=8).error == (
        "image too large: 900000000 pixels > 40000000 (ingestion.max_pixels); decompression bomb refused before "
        "decoding")
    with pytest.raises(ImageRejected, match=r"^image too large: 900000000 pixels > 40000000 \(ingestion"):
        preprocess_bytes(bomb_png, image_size=100, color_mode="grayscale", max_pixels=40_000_000)
    # under Pillow's own bomb limit but over ours: refused from the header too
    big = encoded(Image.new("1", (10000, 5000), 1), "PNG")
    assert inspect_image(big, max_bytes=10**7, max_pixels=40_000_000, min_side=8).error == (
        "image too large: 10000x5000 = 50000000 pixels > 40000000 (ingestion.max_pixels); refused before decoding")
    with pytest.raises(ImageRejected, match=r"^image too large: 10000x5000 = 50000000 pixels > 40000000"):
        preprocess_bytes(big, image_size=100, color_mode="grayscale", max_pixels=40_000_000)


def test_cmyk_tiff_converts_to_known_colours():
    red = encoded(Image.new("CMYK", (30, 30), (0, 255, 255, 0)), "TIFF")
    assert inspect_image(red, **LIMITS).mode == "CMYK"
    rgb = preprocess_bytes(red, image_size=30, color_mode="rgb")
    assert (rgb[0] == 255).all() and (rgb[1] == 0).all() and (rgb[2] == 0).all()
    grey = encoded(Image.new("CMYK", (30, 30), (0, 0, 0, 128)), "TIFF")
    assert (preprocess_bytes(grey, image_size=30, color_mode="grayscale") == 127).all()


def test_lab_tiff_goes_through_a_colour_transform():
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab_red = ImageCms.applyTransform(Image.new("RGB", (30, 30), (255, 0, 0)), to_lab)
    data = encoded(lab_red, "TIFF")
    assert inspect_image(data, **LIMITS).mode == "LAB"
    assert Image.open(io.BytesIO(data)).getpixel((0, 0)) == (138, 209, 198)   # raw L, a, b bytes
    rgb = preprocess_bytes(data, image_size=30, color_mode="rgb")
    r, g, b = (int(v) for v in rgb[:, 15, 15])
    assert (rgb == rgb[:, :1, :1]).all()
    assert abs(r - 255) <= 6 and g <= 6 and b <= 6, (r, g, b)            # red again, not (138, 209, 198)
    grey = preprocess_bytes(data, image_size=30, color_mode="grayscale")
    assert (grey == Image.new("RGB", (1, 1), (r, g, b)).convert("L").getpixel((0, 0))).all()
    lab_grey = ImageCms.applyTransform(Image.new("RGB", (30, 30), (119, 119, 119)), to_lab)  # L* ~ 50
    out = preprocess_bytes(encoded(lab_grey, "TIFF"), image_size=30, color_mode="grayscale")
    assert abs(int(out[0, 0, 0]) - 119) <= 2 and (out == out[0, 0, 0]).all()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_use_the_first_frame(fmt):
    frames = [Image.new("RGB", (40, 40), (0, 0, 0)), Image.new("RGB", (40, 40), (255, 255, 255))]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    with Image.open(io.BytesIO(data)) as img:
        assert img.n_frames == 2
    info = inspect_image(data, **LIMITS)
    assert info.error is None and info.format == fmt
    assert (preprocess_bytes(data, image_size=40, color_mode="grayscale") == 0).all()


def test_webp_still_image():
    img = Image.new("RGB", (40, 20), (200, 30, 60))
    data = encoded(img, "WEBP", lossless=True)
    info = inspect_image(data, **LIMITS)
    assert (info.error, info.format, info.width, info.height) == (None, "WEBP", 40, 20)
    arr = preprocess_bytes(data, image_size=40, color_mode="rgb")
    assert tuple(arr[:, 20, 20]) == (200, 30, 60) and tuple(arr[:, 2, 20]) == (255, 255, 255)


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF codec")
def test_avif_is_read():
    data = encoded(Image.new("RGB", (32, 32), (255, 0, 0)), "AVIF", quality=100)
    assert data[4:12] == b"ftypavif"
    info = inspect_image(data, **LIMITS)
    assert (info.error, info.format) == (None, "AVIF")
    rgb = preprocess_bytes(data, image_size=32, color_mode="rgb")
    assert abs(int(rgb[0, 16, 16]) - 255) <= 3 and int(rgb[1, 16, 16]) <= 3 and int(rgb[2, 16, 16]) <= 3


@pytest.mark.parametrize("brands", [b"heic\x00\x00\x00\x00mif1heic", b"mif1\x00\x00\x00\x00mif1heic"])
def test_heic_is_quarantined_as_unsupported(brands):
    """No HEIF encoder or decoder exists here (no pillow-heif, libheif or ffmpeg), so these are the opening
    bytes of an iPhone HEIC file (its ISO-BMFF 'ftyp' box followed by a 'meta' box header), not a whole photo;
    without the check Pillow calls them "not an image" (major brand heic) or hands them to libavif (mif1)."""
    ftyp = (8 + len(brands)).to_bytes(4, "big") + b"ftyp" + brands
    data = ftyp + b"\x00\x00\x00\x22meta" + bytes(30)
    reason = inspect_image(data, **LIMITS).error
    assert reason == (f"unsupported image format: HEIC/HEIF (brand '{brands[:4].decode()}'); this Pillow has no "
                      "HEIF decoder - convert the photo to JPEG or PNG")
    with pytest.raises(ImageRejected, match="unsupported image format: HEIC/HEIF"):
        preprocess_bytes(data, image_size=32, color_mode="grayscale")
