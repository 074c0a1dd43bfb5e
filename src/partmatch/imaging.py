"""Image decoding, verification and the study's preprocessing (pure functions on bytes / PIL images)."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class ImageInfo:
    """What ingestion records of one file: decoded metadata, or why it was rejected."""

    sha256: str
    bytes: int
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    format: str | None = None
    exif_orientation: int | None = None
    error: str | None = None


def sha256(data: bytes) -> str:
    """Return the hex SHA-256 digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def inspect_image(data: bytes, *, max_bytes: int, max_pixels: int, min_side: int) -> ImageInfo:
    """Fully decode ``data`` to prove it is a usable image; never raises, returns the reason instead."""
    digest, size = sha256(data), len(data)
    if size == 0:
        return ImageInfo(digest, size, error="empty file")
    if size > max_bytes:
        return ImageInfo(digest, size, error=f"file too large: {size} bytes > {max_bytes} (ingestion.max_file_mb)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height, mode, fmt = img.width, img.height, img.mode, img.format
            if width * height > max_pixels:
                return ImageInfo(digest, size, width, height, mode, fmt,
                                 error=f"image too large: {width}x{height} pixels > {max_pixels} (ingestion.max_pixels)")
            if min(width, height) < min_side:
                return ImageInfo(digest, size, width, height, mode, fmt,
                                 error=f"image too small: {width}x{height} < {min_side} px (ingestion.min_side)")
            orientation = img.getexif().get(0x0112)
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.load()
    except Image.UnidentifiedImageError:
        return ImageInfo(digest, size, error="not an image: no decoder recognises the file's contents")
    except Exception as exc:  # noqa: BLE001 - any decoder failure quarantines the file
        return ImageInfo(digest, size, error=f"unreadable image: {type(exc).__name__}: {exc}")
    return ImageInfo(digest, size, width, height, mode, fmt, int(orientation) if orientation else None)


def to_canonical(img: Image.Image, color_mode: str, background: int = 255) -> Image.Image:
    """EXIF-transpose, composite any transparency on the background colour, convert to L or RGB."""
    img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (background, background, background, 255))
        img = Image.alpha_composite(canvas, rgba)
    target = "L" if color_mode == "grayscale" else "RGB"
    if img.mode == "CMYK" or img.mode.startswith("I") or img.mode == "F":
        img = img.convert("RGB")
    return img.convert(target)


def pad_and_resize(img: Image.Image, size: int, background: int = 255) -> Image.Image:
    """Resize keeping the aspect ratio so the longer side is ``size`` and pad with the background to a square."""
    fill = background if img.mode == "L" else (background,) * len(img.getbands())
    return ImageOps.pad(img, (size, size), method=Image.Resampling.BICUBIC, color=fill, centering=(0.5, 0.5))


def preprocess_bytes(data: bytes, *, image_size: int, color_mode: str, background: int = 255) -> np.ndarray:
    """Decode and preprocess one photo into a uint8 array of shape (C, image_size, image_size)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        out = pad_and_resize(to_canonical(img, color_mode, background), image_size, background)
    arr = np.asarray(out, dtype=np.uint8)
    return arr[None, :, :] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))
