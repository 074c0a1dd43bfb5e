"""Decoding, verification and preprocessing of single photos."""

import io

import numpy as np
import pytest
from PIL import Image

from partmatch.imaging import inspect_image, preprocess_bytes
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
