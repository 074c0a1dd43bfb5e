"""Image decoding, verification and the study's preprocessing (pure functions on bytes / PIL images)."""

from __future__ import annotations

import functools
import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageOps

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


class ImageRejected(ValueError):
    """A file refused before or while decoding; ``str(exc)`` is the reason recorded in the quarantine list."""


# ISO-BMFF brands of HEIC/HEIF photos (iPhone default). Pillow here has no HEIF decoder (AVIF, which shares the
# container, is read by Pillow's own AVIF plugin); such files are quarantined as unsupported, not "not an image".
HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}
AVIF_BRANDS = {b"avif", b"avis"}


def unsupported_format_reason(data: bytes) -> str | None:
    """The reason a file of a known but unsupported format (HEIC/HEIF) is refused, or None."""
    if data[4:8] != b"ftyp":
        return None
    box = int.from_bytes(data[:4], "big")
    brands = {data[8:12]} | {data[i:i + 4] for i in range(16, min(max(box, 16), 64, len(data)) - 3, 4)}
    if brands & HEIF_BRANDS and not brands & AVIF_BRANDS:
        brand = data[8:12].decode("latin-1", "replace")
        return (f"unsupported image format: HEIC/HEIF (brand '{brand}'); this Pillow has no HEIF decoder - "
                "convert the photo to JPEG or PNG")
    return None


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    """Open ``data`` lazily (header only, no pixels decoded); refuse unsupported formats and bombs by size."""
    reason = unsupported_format_reason(data)
    if reason:
        raise ImageRejected(reason)
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # Pillow refuses > 2x its own limit while reading the header
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = found.group(1) if found else "more than " + str(2 * (Image.MAX_IMAGE_PIXELS or 0))
        raise ImageRejected(f"image too large: {pixels} pixels > {limit} (ingestion.max_pixels); decompression "
                            "bomb refused before decoding") from None
    except Image.UnidentifiedImageError:
        raise ImageRejected("not an image: no decoder recognises the file's contents") from None
    if limit is not None and img.width * img.height > limit:
        img.close()
        raise ImageRejected(f"image too large: {img.width}x{img.height} = {img.width * img.height} pixels > {limit} "
                            "(ingestion.max_pixels); refused before decoding")
    return img


def inspect_image(data: bytes, *, max_bytes: int, max_pixels: int, min_side: int,
                  max_aspect_ratio: float = 100.0) -> ImageInfo:
    """Fully decode ``data`` to prove it is a usable image; never raises, returns the reason instead.

    Everything that can be judged from the header (format, pixel count, side, aspect ratio) is checked before
    any pixel is decoded, so a decompression bomb costs only its header. ``max_aspect_ratio`` (longer side /
    shorter side) refuses strips that would shrink to under a pixel or two once padded to a square.
    Animated GIF/WebP/APNG files are accepted; like preprocessing they use the first frame.
    """
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels, min_side=min_side,
                        max_aspect_ratio=max_aspect_ratio).info


@dataclass(frozen=True)
class PreprocessSpec:
    """How a verified photo is turned into the training array (``preprocessing`` parameters)."""

    image_size: int
    color_mode: str
    background: int = 255

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "grayscale" else 3

    def describe(self) -> str:
        """One string naming the spec, stored with every decoded row so a later run can tell if it still fits."""
        return f"{self.color_mode} {self.image_size}px background {self.background}"


@dataclass(frozen=True)
class Decoded:
    """One file verified (``info``) and, when a spec was given and the file is usable, preprocessed with it:
    ``array`` (C, S, S) uint8 and its ``pixel_sha256``, or ``preprocess_error`` when only that step failed."""

    info: ImageInfo
    array: np.ndarray | None = None
    pixel_sha256: str | None = None
    preprocess_error: str | None = None


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, min_side: int, max_aspect_ratio: float = 100.0,
                 spec: PreprocessSpec | None = None) -> Decoded:
    """Verify ``data`` with one full decode and, given ``spec``, preprocess those decoded pixels too.

    The checks and reasons are those of :func:`inspect_image`; the array is byte-identical to
    :func:`preprocess_bytes` with the same spec (same decoder, same first frame, same transforms), so a photo is
    decoded once for both. Never raises.
    """
    digest, size = sha256(data), len(data)
    if size == 0:
        return Decoded(ImageInfo(digest, size, error="empty file"))
    if size > max_bytes:
        return Decoded(ImageInfo(digest, size,
                                 error=f"file too large: {size} bytes > {max_bytes} (ingestion.max_file_mb)"))
    try:
        with _open(data, max_pixels) as img:
            width, height, mode, fmt = img.width, img.height, img.mode, img.format
            if min(width, height) < min_side:
                return Decoded(ImageInfo(digest, size, width, height, mode, fmt,
                                         error=f"image too small: {width}x{height} < {min_side} px (ingestion.min_side)"))
            if max(width, height) > max_aspect_ratio * min(width, height):
                ratio = max(width, height) / min(width, height)
                return Decoded(ImageInfo(
                    digest, size, width, height, mode, fmt,
                    error=f"image too elongated: {width}x{height} is {ratio:.0f}:1 > {max_aspect_ratio:g}:1 "
                          "(ingestion.max_aspect_ratio); it would shrink to a line once padded to a square"))
            orientation = img.getexif().get(0x0112)
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img.seek(0)
                img.load()
            info = ImageInfo(digest, size, width, height, mode, fmt, int(orientation) if orientation else None)
            if spec is None:
                return Decoded(info)
            try:
                arr = _to_array(pad_and_resize(to_canonical(img, spec.color_mode, spec.background), spec.image_size,
                                               spec.background))
            except Exception as exc:  # noqa: BLE001 - verified but not preprocessable: reported by preprocessing
                return Decoded(info, preprocess_error=f"{type(exc).__name__}: {exc}")
            return Decoded(info, arr, sha256(arr.tobytes()))
    except ImageRejected as exc:
        return Decoded(ImageInfo(digest, size, error=str(exc)))
    except Exception as exc:  # noqa: BLE001 - any decoder failure quarantines the file
        return Decoded(ImageInfo(digest, size, error=f"unreadable image: {type(exc).__name__}: {exc}"))


def _to_array(img: Image.Image) -> np.ndarray:
    """(C, H, W) uint8, C-contiguous."""
    arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr[None, :, :]) if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


@functools.lru_cache(maxsize=1)
def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float single-channel image linearly onto 0..255 ("L").

    ``I;16*``: 0..65535 (65535 -> 255, 32768 -> 128). ``I`` and ``F`` carry no declared range, so the smallest
    conventional range that holds the data is used: 0..1 (``F`` only), 0..255, 0..65535, else the data's own
    min..max. Non-finite floats become the low end.
    """
    arr = np.asarray(img).astype(np.float64)
    finite = arr[np.isfinite(arr)]
    lo_data, hi_data = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    else:
        ranges = ([(0.0, 1.0)] if img.mode == "F" else []) + [(0.0, 255.0), (0.0, 65535.0)]
        lo, hi = next(((a, b) for a, b in ranges if lo_data >= a and hi_data <= b), (lo_data, hi_data))
    arr = np.where(np.isfinite(arr), arr, lo)
    scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8), "L")


def to_canonical(img: Image.Image, color_mode: str, background: int = 255) -> Image.Image:
    """EXIF-transpose, composite any transparency on the background colour, convert to L or RGB.

    16/32-bit and float images are scaled (not clipped) to 8 bits, CIELAB goes through a colour-managed
    LAB -> sRGB transform, CMYK through Pillow's CMYK -> RGB.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (background, background, background, 255))
        img = Image.alpha_composite(canvas, rgba)
    target = "L" if color_mode == "grayscale" else "RGB"
    if img.mode.startswith("I") or img.mode == "F":
        img = _scale_to_8bit(img)
    elif img.mode == "LAB":
        img = ImageCms.applyTransform(img, _lab_to_srgb())
    elif img.mode == "CMYK":
        img = img.convert("RGB")
    return img.convert(target)


def pad_and_resize(img: Image.Image, size: int, background: int = 255) -> Image.Image:
    """Resize keeping the aspect ratio so the longer side is ``size`` and pad with the background to a square."""
    fill = background if img.mode == "L" else (background,) * len(img.getbands())
    return ImageOps.pad(img, (size, size), method=Image.Resampling.BICUBIC, color=fill, centering=(0.5, 0.5))


def preprocess_bytes(data: bytes, *, image_size: int, color_mode: str, background: int = 255,
                     max_pixels: int | None = None) -> np.ndarray:
    """Decode and preprocess one photo into a uint8 array of shape (C, image_size, image_size).

    Raises ``ImageRejected`` (a ``ValueError``) with the reason for an unsupported format or an image over
    ``max_pixels`` (default: Pillow's decompression-bomb limit) before any pixel is decoded. Animated images
    use their first frame.
    """
    with _open(data, max_pixels) as img:
        img.seek(0)
        img.load()
        out = pad_and_resize(to_canonical(img, color_mode, background), image_size, background)
    return _to_array(out)


# Work units of the decoding pool (partmatch.pipelines.ingestion.decoding.run_chunked): module-level, so they
# pickle by name, and light (Pillow, NumPy). An item's source is the file's path on disk, read by the worker, or
# its bytes, read by the caller (a source without paths).

def read_file(path: str) -> bytes:
    """The bytes of one raw file (what ``ImageSource.read_bytes`` returns for a key whose file is ``path``)."""
    with open(path, "rb") as f:
        return f.read()


def decode_chunk(items: list[tuple[int, str | bytes]], *, limits: dict, spec: PreprocessSpec | None,
                 root: str) -> list[tuple[int, Decoded, np.ndarray | None]]:
    """:func:`decode_image` of every ``(row, path or bytes)`` as ``(row, result without its array, array)``;
    ``limits`` are its keyword limits. A file that cannot be read gets the reason ("file not found under
    ``root``", "cannot read file: ...")."""
    out: list[tuple[int, Decoded, np.ndarray | None]] = []
    for row, source in items:
        if isinstance(source, str):
            try:
                source = read_file(source)
            except FileNotFoundError:
                out.append((row, Decoded(ImageInfo("", 0, error=f"file not found under {root}")), None))
                continue
            except OSError as exc:
                error = f"cannot read file: {type(exc).__name__}: {exc}"
                out.append((row, Decoded(ImageInfo("", 0, error=error)), None))
                continue
        result = decode_image(source, spec=spec, **limits)
        out.append((row, Decoded(result.info, None, result.pixel_sha256, result.preprocess_error), result.array))
    return out


def verify_chunk(items: list[tuple[int, str | bytes, str, bool]], *, spec: PreprocessSpec,
                 given: str) -> list[tuple[int, str | None, np.ndarray | None, str | None, str | None]]:
    """Check every ``(row, path or bytes, expected sha256, decode)`` against the hash and, when ``decode``,
    preprocess it: ``(row, changed, array, pixel_sha256, failure)``; ``changed`` says why the file is not the
    one hashed (missing, other bytes), ``failure`` why :func:`preprocess_bytes` refused it."""
    out: list[tuple[int, str | None, np.ndarray | None, str | None, str | None]] = []
    for row, source, expected, decode in items:
        if isinstance(source, str):
            try:
                source = read_file(source)
            except OSError as exc:
                out.append((row, f"missing from raw_source {given} ({type(exc).__name__})", None, None, None))
                continue
        digest = sha256(source)
        if digest != expected:
            why = f"bytes changed since ingestion (sha256 {digest[:12]}... != manifest's {str(expected)[:12]}...)"
            out.append((row, why, None, None, None))
            continue
        if not decode:
            out.append((row, None, None, None, None))
            continue
        try:
            arr = preprocess_bytes(source, image_size=spec.image_size, color_mode=spec.color_mode,
                                   background=spec.background)
        except Exception as exc:  # noqa: BLE001 - reported by the caller, not fatal
            out.append((row, None, None, None, f"{type(exc).__name__}: {exc}"))
            continue
        out.append((row, None, arr, sha256(arr.tobytes()), None))
    return out
