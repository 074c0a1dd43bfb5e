"""Trained model -> embedding: the one place where a photo is embedded.

Training (validation scoring), threshold calibration, evaluation, the search index, the ``search``
pipeline and the served MLflow model all embed through this module, so they cannot disagree:

* :func:`embed_images` / :func:`predict_log_probs` run any model over uint8 image arrays ``(N, C, H, W)``
  with a per-channel normalisation, in batches, in eval / inference mode;
* :class:`Embedder` wraps a *saved* model (the bundle a model pipeline writes as ``model.pt``, see
  ``partmatch.ml.workflow``) and owns everything a photo needs on its way to a vector: decoding and the
  study's preprocessing with the model's stored settings (:meth:`Embedder.preprocess`, the same
  ``partmatch.imaging`` code as training), the model's input normalisation and flip averaging
  (:meth:`Embedder.embed`), and the frozen-backbone shortcut (:meth:`Embedder.embed_features`) that turns
  cached backbone features into the same embeddings without running the backbone again.

No Kedro here: ``Embedder.from_file("data/06_models/siamese_pretrained/<version>/model.pt")`` works in a
notebook or a served model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from partmatch.imaging import inspect_image, preprocess_bytes
from partmatch.ml.training import cpu_heap_reuse
from partmatch.ml.models import combine_views, model_from_spec

logger = logging.getLogger(__name__)

# Limits of a query photo: the ingestion defaults (partmatch.config.IngestionParams), so a query is
# accepted or refused exactly like a catalogue photo.
MAX_QUERY_BYTES = 50 * 1024 * 1024
MAX_QUERY_PIXELS = 40_000_000
MIN_QUERY_SIDE = 8

BUNDLE_KEYS = ("spec", "state_dict", "normalization")


class ImageDecodeError(ValueError):
    """A photo that cannot be used; ``str(err)`` is the human-readable reason (e.g. ``empty file``)."""


# ======================================================================================== batched forward


def _channel_stats(values: Sequence[float] | float, channels: int, name: str) -> torch.Tensor:
    vals = [float(values)] if isinstance(values, int | float) else [float(v) for v in values]
    if len(vals) not in (1, channels):
        raise ValueError(f"{name} has {len(vals)} values but the images have {channels} channel(s)")
    if name == "std" and any(not v > 0 for v in vals):
        raise ValueError(f"std must be > 0, got {vals}")
    return torch.tensor(vals, dtype=torch.float32).view(1, -1, 1, 1)


def _run_batches(
    model: nn.Module,
    images_uint8: np.ndarray,
    forward: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    device: str | torch.device,
    mean: Sequence[float],
    std: Sequence[float],
    rows: np.ndarray | Sequence[int] | None,
    precision: str = "fp32",
    mirror: bool = False,
    channels_last: bool = True,
) -> np.ndarray:
    """``forward`` over normalised float batches of ``images_uint8[rows]`` in eval / inference mode.

    ``precision="bf16"`` runs ``forward`` under bfloat16 autocast (outputs back in float32); ``mirror`` flips
    every image horizontally first; ``channels_last`` (CPU / CUDA) puts the model's 4-D weights and the batches
    in NHWC, oneDNN's fast layout (the same values as NCHW up to float rounding, ~1e-6)."""
    images = images_uint8.numpy() if isinstance(images_uint8, torch.Tensor) else np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise TypeError(f"images_uint8 must have dtype uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ValueError(f"images_uint8 must be (N, C, H, W) or (N, H, W), got shape {images.shape}")
    if len(images) == 0:
        raise ValueError("images_uint8 is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16' (resolve 'auto' with backbones.resolve_precision), "
                         f"got {precision!r}")
    index = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    device = torch.device(device)
    nhwc = channels_last and device.type in ("cpu", "cuda")
    channels = images.shape[1]
    m = _channel_stats(mean, channels, "mean").to(device)
    s = _channel_stats(std, channels, "std").to(device)

    was_training = model.training
    model.to(device)
    if nhwc:
        model.to(memory_format=torch.channels_last)
    model.eval()
    out = []
    try:
        with torch.inference_mode(), cpu_heap_reuse(device.type == "cpu"):
            # an empty selection still runs one image, so the result has the right width: (0, D)
            chunks = [index[i : i + batch_size] for i in range(0, len(index), batch_size)] or [np.arange(1)]
            for idx in chunks:
                batch = torch.from_numpy(np.ascontiguousarray(images[idx]))
                x = batch.to(device).float().div_(255.0).sub_(m).div_(s)
                if mirror:
                    x = torch.flip(x, dims=[-1])
                if nhwc:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    y = forward(x)
                out.append(y.reshape(y.shape[0], -1).float().cpu())
    finally:
        model.train(was_training)
    result = torch.cat(out).numpy().astype(np.float32, copy=False)
    return result[:0] if len(index) == 0 else result


def embed_images(
    model: nn.Module,
    images_uint8: np.ndarray,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
    rows: np.ndarray | Sequence[int] | None = None,
    precision: str = "fp32",
    mirror: bool = False,
) -> np.ndarray:
    """Embeddings (N, D) float32 of uint8 images (N, C, H, W) ((N, H, W) is read as grayscale).

    Pixels are scaled to [0, 1] and normalised per channel with ``mean`` / ``std`` (one value, or one per
    channel), exactly like training batches. The model is moved to ``device`` and run in eval mode under
    ``torch.inference_mode()``; ``model.embed(x)`` is used when the model has it (flip averaging, a
    classifier's pre-logit features), else ``model(x)``. The model's train/eval mode is restored afterwards.

    ``rows`` selects (and orders) the images to embed without copying the whole array; the result then has
    ``len(rows)`` rows ((0, D) for an empty selection).

    ``precision="bf16"`` runs the model under bfloat16 autocast (fast on CPUs with AMX / AVX512-BF16; see
    ``backbones.resolve_precision`` for when it is safe); ``mirror=True`` embeds the horizontally mirrored images.
    Batches and 4-D weights are channels_last on CPU / CUDA (the model's weights are converted in place; the
    values are unchanged).
    """
    forward = model.embed if hasattr(model, "embed") else model
    return _run_batches(model, images_uint8, forward, batch_size, device, mean, std, rows, precision=precision,
                        mirror=mirror)


def predict_log_probs(
    model: nn.Module,
    images_uint8: np.ndarray,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
    rows: np.ndarray | Sequence[int] | None = None,
) -> np.ndarray:
    """Class log-probabilities (N, C) float32 of a classifier: ``log_softmax(model(x))`` (a no-op when the
    model already returns log-probabilities). Preprocessing, modes and ``rows`` as in :func:`embed_images`."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(x).float(), dim=1)

    return _run_batches(model, images_uint8, forward, batch_size, device, mean, std, rows)


@torch.inference_mode()
def apply_head(model: nn.Module, features: np.ndarray, rows: np.ndarray | None = None, device: str = "cpu",
               batch_size: int = 4096) -> np.ndarray:
    """Embeddings of a model whose backbone is frozen, from its cached backbone features ``(N, F)`` or
    ``(N, 2, F)`` (view 1 = the mirrored image): the model's head, with flip averaging over the two views when
    the model embeds with it -- equal to ``embed_images`` on the images, at a fraction of the cost.

    ``model.backbone`` is bypassed (never run), whatever it is.
    """
    feats = np.asarray(features)
    index = np.arange(len(feats)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    flip = bool(getattr(model, "flip_tta", False))
    views = 1 if feats.ndim == 2 else int(feats.shape[1])
    if feats.ndim not in (2, 3):
        raise ValueError(f"cached features must be (N, F) or (N, views, F), got shape {feats.shape}")
    if flip and views < 2:
        raise ValueError("this model embeds with flip averaging (flip_tta): its cached features need the mirror "
                         "view too, shape (N, 2, F) from workflow.backbone_features")
    if not hasattr(model, "head"):
        raise TypeError(f"{type(model).__name__} has no head to apply to cached features")
    was = model.training
    model.eval()
    out = []
    try:
        for start in range(0, max(len(index), 1), batch_size):
            idx = index[start : start + batch_size]
            x = torch.as_tensor(feats[idx], device=device, dtype=torch.float32)
            if x.ndim == 2:
                x = x[:, None]
            z = _head_forward(model, x[:, 0])
            if flip:
                z = combine_views(z, _head_forward(model, x[:, 1]), model.normalize)
            out.append(z.float().cpu())
    finally:
        model.train(was)
    result = torch.cat(out).numpy().astype(np.float32, copy=False)
    return result[: len(index)]


def _head_forward(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The model's forward pass after its backbone (``EmbeddingNet``: head then optional L2 normalisation)."""
    backbone, model.backbone = model.backbone, nn.Identity()
    try:
        return model(features)
    finally:
        model.backbone = backbone


class _Precision(nn.Module):
    """``inner`` under bfloat16 autocast (``precision="bf16"``), its output back in float32; else ``inner``."""

    def __init__(self, inner: nn.Module, precision: str):
        super().__init__()
        self.inner = inner
        self.precision = precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            y = self.inner(x)
        return y.float()


# ============================================================================================== Embedder


class Embedder:
    """A saved model ready to turn photos into vectors: ``preprocess(bytes) -> uint8``, ``embed(uint8) -> (N, D)``.

    Built from the bundle a model pipeline saves (``model.pt``: ``spec``, ``state_dict``, ``classes``,
    ``preprocessing``, ``normalization``, ``distance``, ``threshold``), or with :meth:`for_model` around a
    model being trained.
    """

    def __init__(self, bundle: dict[str, Any], device: str = "cpu", batch_size: int = 256,
                 precision: str | None = None):
        """``precision``: what the backbone runs in when embedding images, ``fp32`` / ``bf16`` / ``auto``
        (``backbones.resolve_precision``); default: the bundle's ``backbone_precision`` (what its catalogue
        features were computed in), else fp32."""
        missing = [k for k in BUNDLE_KEYS if k not in bundle]
        if missing:
            raise ValueError(f"not a partmatch model bundle: keys {missing} are missing (have {sorted(bundle)}); "
                             "pass the model.pt written by a model pipeline (data/06_models/<model>/...)")
        model = model_from_spec(bundle["spec"], bundle["state_dict"])
        self._init(model, bundle, device, batch_size)
        self.precision = self._resolve_precision(precision or bundle.get("backbone_precision") or "fp32")
        self._static = True  # the weights never change: a folded inference copy may be cached

    def _resolve_precision(self, precision: str) -> str:
        from partmatch.ml.backbones import resolve_precision

        spec = self.bundle.get("spec") or {}
        geometry = "cosine" if (spec.get("normalize") or self.distance == "cosine") else "euclidean"
        return resolve_precision(precision, self.device, spec.get("backbone"), self.image_size, geometry)

    def _init(self, model: nn.Module, bundle: dict[str, Any], device: str, batch_size: int) -> None:
        self.bundle = bundle
        self.device = str(device)
        self.batch_size = int(batch_size)
        self.precision = "fp32"
        self._static = False
        self._fast: nn.Module | None = None
        self.model = model.to(self.device).eval()
        self.mean = tuple(float(v) for v in bundle["normalization"]["mean"])
        self.std = tuple(float(v) for v in bundle["normalization"]["std"])
        spec = bundle.get("spec") or getattr(model, "_partmatch_spec", {})
        self.in_channels = int(spec.get("in_channels", len(self.mean)))
        self.image_size = int(spec.get("image_size", 0)) or None
        stored = dict(bundle.get("preprocessing") or {})
        self.preprocessing = {
            "image_size": int(stored.get("image_size", self.image_size or 100)),
            "color_mode": stored.get("color_mode", "grayscale" if self.in_channels == 1 else "rgb"),
            "background": int(stored.get("background", 255)),
        }
        self.classes: list[str] = list(bundle.get("classes") or [])
        self.distance: str = bundle.get("distance") or "euclidean"
        threshold = bundle.get("threshold")
        self.threshold: float | None = None if threshold is None else float(threshold)
        unknown = bundle.get("unknown_threshold")
        unknown = threshold if unknown is None else unknown
        # nearest catalogue photo farther than this -> "unknown part" (calibrated by workflow.unknown_part_threshold;
        # bundles from before it fall back to the pair threshold)
        self.unknown_threshold: float | None = None if unknown is None else float(unknown)
        self.task: str = getattr(model, "task", spec.get("task", "embedding"))

    @classmethod
    def from_file(cls, path: str | Path, device: str = "cpu", batch_size: int = 256,
                  precision: str | None = None) -> Embedder:
        """Load a ``model.pt`` written by a model pipeline (``torch.load(weights_only=True)``: no pickled code)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} does not exist: train a model first "
                                    "(kedro run --pipeline=siamese_pretrained) or pass data/06_models/<model>/...")
        bundle = torch.load(path, map_location="cpu", weights_only=True)
        return cls(bundle, device=device, batch_size=batch_size, precision=precision)

    @classmethod
    def for_model(cls, model: nn.Module, mean: Sequence[float], std: Sequence[float], device: str = "cpu",
                  batch_size: int = 256, preprocessing: dict | None = None) -> Embedder:
        """An embedder around a live model (e.g. during training's validation): no copy of the weights."""
        self = cls.__new__(cls)
        was = model.training
        self._init(model, {"normalization": {"mean": list(mean), "std": list(std)},
                           "preprocessing": preprocessing or {}}, device, batch_size)
        model.train(was)  # _init put it in eval mode; the caller's mode is its own business
        return self

    # ------------------------------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """Embedding size D (a classifier embeds with its pre-logit features)."""
        spec = self.bundle.get("spec") or {}
        if self.task == "embedding":
            return int(getattr(self.model, "embedding_dim", spec.get("embedding_dim", 0)))
        return int(getattr(self.model, "feature_dim", 0))

    # ----------------------------------------------------------------------------------------- photos -> uint8
    def preprocess(self, data: bytes) -> np.ndarray:
        """Decode one photo and preprocess it as the model was trained: (C, S, S) uint8.

        The same checks as ingestion (size, pixel count, full decode) and the same preprocessing as training
        (``imaging.preprocess_bytes``: EXIF transpose, alpha on white, grey or RGB, pad to a square, resize).

        Raises:
            ImageDecodeError: with the reason (empty file, not an image, truncated, too large, ...).
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ImageDecodeError(f"expected the photo's bytes, got {type(data).__name__}")
        data = bytes(data)
        info = inspect_image(data, max_bytes=MAX_QUERY_BYTES, max_pixels=MAX_QUERY_PIXELS, min_side=MIN_QUERY_SIDE)
        if info.error is not None:
            raise ImageDecodeError(info.error)
        try:
            arr = preprocess_bytes(data, image_size=self.preprocessing["image_size"],
                                   color_mode=self.preprocessing["color_mode"],
                                   background=self.preprocessing["background"])
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the photo's, reported not raised further
            raise ImageDecodeError(f"unreadable image: {type(exc).__name__}: {exc}") from exc
        if arr.shape[0] != self.in_channels:
            raise ImageDecodeError(f"preprocessed to {arr.shape[0]} channel(s) but the model takes {self.in_channels}")
        return arr

    def preprocess_many(self, blobs: Sequence[bytes]) -> tuple[np.ndarray, list[str | None]]:
        """Preprocess many photos, never failing on one: (images of the decodable ones, in order), and for
        every input its error reason or None."""
        size = self.preprocessing["image_size"]
        arrays, errors = [], []
        for data in blobs:
            try:
                arrays.append(self.preprocess(data))
                errors.append(None)
            except ImageDecodeError as err:
                errors.append(str(err))
        images = np.stack(arrays) if arrays else np.zeros((0, self.in_channels, size, size), dtype=np.uint8)
        return images, errors

    # ------------------------------------------------------------------------------------------ uint8 -> vectors
    def _check_images(self, images: np.ndarray) -> np.ndarray:
        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[:, None]
        if arr.ndim != 4 or arr.shape[1] != self.in_channels:
            raise ValueError(f"images must be (N, {self.in_channels}, S, S) uint8 for this model, got shape {arr.shape}; "
                             f"preprocess photos with Embedder.preprocess (preprocessing {self.preprocessing})")
        return arr

    def embed(self, images: np.ndarray, rows: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """Embeddings (N, D) float32 of preprocessed uint8 images (N, C, S, S): the model's normalisation,
        its ``embed`` (flip averaging when the model uses it); an empty input gives (0, D)."""
        arr = self._check_images(images)
        if len(arr) == 0 or (rows is not None and len(rows) == 0):
            return np.zeros((0, self.dim), dtype=np.float32)
        return embed_images(self._inference_model(), arr, batch_size=self.batch_size, device=self.device,
                            mean=self.mean, std=self.std, rows=rows)

    def _inference_model(self) -> nn.Module:
        """The model :meth:`embed` runs. A saved model (fixed weights): a copy whose backbone is the folded
        inference copy (``backbones.inference_copy``: BatchNorm folded, channels_last), run in
        ``self.precision``, the head in float32 -- the same embeddings up to rounding (bf16: see
        ``backbones.BF16_VERIFIED``). A live model (:meth:`for_model`) runs as it is."""
        if not self._static or not isinstance(getattr(self.model, "backbone", None), nn.Module):
            return self.model
        if self._fast is None:
            import copy

            from partmatch.ml.backbones import inference_copy

            backbone, self.model.backbone = self.model.backbone, nn.Identity()
            try:
                fast = copy.deepcopy(self.model)
            finally:
                self.model.backbone = backbone
            fast.backbone = _Precision(inference_copy(backbone), self.precision)
            self._fast = fast.to(self.device).eval()
        return self._fast

    def embed_bytes(self, blobs: Sequence[bytes]) -> tuple[np.ndarray, list[str | None]]:
        """Photos' bytes -> (embeddings of the decodable ones, in order; per-input error reason or None)."""
        images, errors = self.preprocess_many(blobs)
        return self.embed(images), errors

    def embed_features(self, features: np.ndarray, rows: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """Embeddings from cached frozen-backbone features ``(N, F)`` / ``(N, 2, F)`` (the head only, flip
        averaging over the cached mirror view): equal to :meth:`embed` on the images."""
        if self.task != "embedding":
            raise ValueError("embed_features is for embedding models on a frozen pretrained backbone")
        return apply_head(self.model, features, None if rows is None else np.asarray(rows), self.device)

    def log_probs(self, images: np.ndarray, rows: np.ndarray | Sequence[int] | None = None) -> np.ndarray:
        """Class log-probabilities (N, C) of a classifier bundle."""
        if self.task != "classifier":
            raise ValueError("log_probs is for classifier models (task: classifier)")
        return predict_log_probs(self.model, self._check_images(images), batch_size=self.batch_size,
                                 device=self.device, mean=self.mean, std=self.std, rows=rows)

    @torch.inference_mode()
    def log_probs_from_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        """A classifier's log-probabilities from its pre-logit features (what :meth:`embed` returns for it):
        the head and log-softmax only, no second pass over the images."""
        if self.task != "classifier":
            raise ValueError("log_probs_from_embeddings is for classifier models (task: classifier)")
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32), device=self.device)
        return torch.log_softmax(self.model.head(x), dim=1).float().cpu().numpy()
