"""In-memory image batches, GPU-friendly batch augmentation and seeded batch samplers.

Images stay uint8 (N, C, H, W) in memory; a batch is indexed, moved to the target device and converted to
float there exactly once (``/255`` then ``(x - mean) / std``). Samplers yield numpy index arrays and are fully
determined by the generator / seed they are given.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Rng = np.random.Generator | torch.Generator | int

# Whole uint8 datasets up to this size are copied to the accelerator once and indexed there.
DEVICE_CACHE_MAX_MB = 2048.0


def _as_tensor(x: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(dtype)


def _stats(values: Sequence[float] | float, channels: int, name: str) -> torch.Tensor:
    vals = [float(values)] if isinstance(values, int | float) else [float(v) for v in values]
    if len(vals) not in (1, channels):
        raise ValueError(f"{name} has {len(vals)} values but the images have {channels} channel(s)")
    if name == "std" and any(v <= 0 for v in vals):
        raise ValueError(f"std must be > 0, got {vals}")
    return torch.tensor(vals, dtype=torch.float32).view(1, -1, 1, 1)


class InMemoryImages:
    """A labelled uint8 image set held in memory.

    Args:
        images: uint8 array (N, C, H, W); (N, H, W) is read as grayscale and (N, H, W, C) with C in {1, 3}
            is transposed.
        labels: integer class ids (N,).
        mean, std: per-channel (or single) normalisation applied after scaling to [0, 1].
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ):
        imgs = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        if imgs.dtype != torch.uint8:
            raise TypeError(f"images must be uint8, got {imgs.dtype}")
        if imgs.ndim == 3:
            imgs = imgs.unsqueeze(1)
        elif imgs.ndim == 4 and imgs.shape[1] not in (1, 3) and imgs.shape[-1] in (1, 3):
            imgs = imgs.permute(0, 3, 1, 2)
        if imgs.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W) or (N, H, W), got shape {tuple(imgs.shape)}")
        labs = _as_tensor(labels, torch.int64).reshape(-1)
        if len(labs) != len(imgs):
            raise ValueError(f"{len(imgs)} images but {len(labs)} labels")
        self.images = imgs.contiguous()
        self.labels = labs.contiguous()
        self.labels_np = self.labels.numpy()
        self.mean = _stats(mean, self.in_channels, "mean")
        self.std = _stats(std, self.in_channels, "std")
        self._device_cache: dict[str, torch.Tensor] = {}
        self._stats_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def num_classes(self) -> int:
        return int(self.labels.max().item()) + 1 if len(self.labels) else 0

    def _source(self, device: torch.device) -> torch.Tensor:
        """Images on ``device`` when they fit (copied once), else the CPU tensor."""
        if device.type == "cpu":
            return self.images
        key = str(device)
        if key not in self._device_cache:
            mb = self.images.numel() / 2**20
            if mb > DEVICE_CACHE_MAX_MB:
                return self.images
            src = self.images.pin_memory() if device.type == "cuda" else self.images
            self._device_cache[key] = src.to(device, non_blocking=True)
        return self._device_cache[key]

    def batch(
        self,
        indices: np.ndarray | Sequence[int] | torch.Tensor,
        device: torch.device | str = "cpu",
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images (B, C, H, W) scaled to [0, 1], augmented (optional), normalised; and int64 labels."""
        device = torch.device(device)
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        src = self._source(device)
        if src.device.type == device.type and device.type != "cpu":
            u8 = src.index_select(0, idx.to(device, non_blocking=True))
        else:
            u8 = self.images.index_select(0, idx)
            if device.type == "cuda":
                u8 = u8.pin_memory()
            u8 = u8.to(device, non_blocking=True)
        labels = self.labels.index_select(0, idx).to(device, non_blocking=True)
        m, s = self._stats_on(device, mean, std)
        if augment is None:
            # one fused pass: (u8/255 - mean)/std == u8 * (1/(255 std)) - mean/std
            x = torch.addcmul(-(m / s), u8.float(), 1.0 / (255.0 * s))
        else:
            x = augment(u8.float().mul_(1.0 / 255.0))
            x = x.sub_(m).div_(s)
        return x, labels

    def _stats_on(
        self, device: torch.device, mean: Sequence[float] | None, std: Sequence[float] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), None if mean is None else tuple(mean), None if std is None else tuple(std))
        if key not in self._stats_cache:
            m = self.mean if mean is None else _stats(mean, self.in_channels, "mean")
            s = self.std if std is None else _stats(std, self.in_channels, "std")
            self._stats_cache[key] = (m.to(device), s.to(device))
        return self._stats_cache[key]

    def sequential_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Index arrays covering the set in order (for evaluation / embedding extraction)."""
        for start in range(0, len(self), batch_size):
            yield np.arange(start, min(start + batch_size, len(self)))


class BatchAugmentation(torch.nn.Module):
    """Per-sample random augmentation of a float batch in [0, 1], vectorised (one ``grid_sample`` per batch).

    Same ranges as the torchvision.transforms.v2 pipeline ``RandomResizedCrop(size, scale=(0.8, 1),
    ratio=(3/4, 4/3)) -> RandomHorizontalFlip() -> RandomRotation(10, fill=1) -> ColorJitter(0.2, 0.2)``, but
    with independent parameters for every image (v2 on a batch tensor draws ONE set of parameters for the
    whole batch, so every image — and both sides of every pair — would get the same crop/flip/rotation).
    Random numbers come from torch's global CPU generator, so runs are reproducible on every device.
    """

    def __init__(
        self,
        scale: tuple[float, float] = (0.8, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        degrees: float = 10.0,
        brightness: float = 0.2,
        contrast: float = 0.2,
        fill: float = 1.0,
    ):
        super().__init__()
        self.scale, self.ratio, self.flip_p, self.degrees = scale, ratio, flip_p, degrees
        self.brightness, self.contrast, self.fill = brightness, contrast, fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        r = torch.rand(b, 8).to(device=x.device, dtype=torch.float32)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * r[:, 0]
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * r[:, 1])
        w = torch.sqrt(area * aspect).clamp(max=1.0)  # crop half-sizes in normalised coords (full = 1)
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = (1.0 - w) * (2 * r[:, 2] - 1)
        cy = (1.0 - h) * (2 * r[:, 3] - 1)
        flip = torch.where(r[:, 4] < self.flip_p, -1.0, 1.0)
        angle = torch.deg2rad(self.degrees * (2 * r[:, 5] - 1))
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([cos * w * flip, -sin * h, cx], dim=1),
                torch.stack([sin * w * flip, cos * h, cy], dim=1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x - self.fill, grid.to(x.dtype), mode="bilinear", padding_mode="zeros",
                          align_corners=False) + self.fill
        view = (b, 1, 1, 1)
        bright = 1.0 + self.brightness * (2 * r[:, 6] - 1)
        x = (x * bright.view(view).to(x.dtype)).clamp_(0.0, 1.0)
        contr = (1.0 + self.contrast * (2 * r[:, 7] - 1)).view(view).to(x.dtype)
        gray = x.mean(dim=1, keepdim=True) if x.shape[1] == 1 else (
            0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        mean = gray.mean(dim=(2, 3), keepdim=True)
        return (contr * x + (1.0 - contr) * mean).clamp_(0.0, 1.0)


def make_augmentation(enabled: bool, **kwargs: float) -> BatchAugmentation | None:
    """The training augmentation (random resized crop 0.8-1, h-flip, ±10° rotation, brightness/contrast 0.2)
    or ``None`` when disabled."""
    return BatchAugmentation(**kwargs) if enabled else None


# ----------------------------------------------------------------------------------------------- samplers


def _seed_from(rng: Rng) -> int:
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, 2**32 - 1))
    if isinstance(rng, torch.Generator):
        return int(torch.randint(0, 2**32 - 1, (1,), generator=rng).item())
    return int(rng)


def shuffled_batches(n: int, batch_size: int, rng: Rng, drop_last: bool = False) -> Iterator[np.ndarray]:
    """A random permutation of ``range(n)`` cut into batches (the last one may be short unless drop_last)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(rng, torch.Generator):
        order = torch.randperm(n, generator=rng).numpy()
    else:
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        order = gen.permutation(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def class_balanced_batches(
    labels: np.ndarray | Sequence[int], batch_size: int, m_per_class: int, rng: Rng
) -> Iterator[np.ndarray]:
    """Batches of ``batch_size // m_per_class`` classes with ``m_per_class`` images each (PML MPerClassSampler).

    One pass yields ``len(labels) // batch_size`` batches (``length_before_new_iter = len(labels)``). The
    batch size is reduced (with a warning) to a multiple of ``m_per_class`` that the number of classes allows.
    PML draws from a module-level numpy RNG; it is replaced by a RandomState seeded from ``rng`` for the
    duration of the draw, so the batches depend only on ``rng``.
    """
    from pytorch_metric_learning.samplers import MPerClassSampler  # noqa: PLC0415
    from pytorch_metric_learning.utils import common_functions as c_f  # noqa: PLC0415

    labels = np.asarray(labels).reshape(-1)
    m = int(m_per_class)
    if m < 1:
        raise ValueError(f"m_per_class must be >= 1, got {m_per_class}")
    num_classes = len(np.unique(labels))
    usable = min(int(batch_size), m * num_classes)
    usable -= usable % m
    if usable < m or num_classes < 2:
        raise ValueError(
            f"class-balanced batches need at least 2 classes and batch_size >= m_per_class "
            f"(got {num_classes} classes, batch_size={batch_size}, m_per_class={m})"
        )
    if usable != batch_size:
        logger.warning(
            "class_balanced_batches: batch_size %d -> %d (%d classes, m_per_class=%d)",
            batch_size, usable, num_classes, m,
        )
    length = max(len(labels), usable)
    sampler = MPerClassSampler(labels, m=m, batch_size=usable, length_before_new_iter=length)
    saved = c_f.NUMPY_RANDOM
    c_f.NUMPY_RANDOM = np.random.RandomState(_seed_from(rng) % 2**32)
    try:
        flat = np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))
    finally:
        c_f.NUMPY_RANDOM = saved
    yield from flat.reshape(-1, usable)


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator for the batches of ``epoch`` of a run seeded with ``seed`` (independent of history)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)])


class InMemoryFeatures:
    """Precomputed float features (N, D) with labels, batched like :class:`InMemoryImages`.

    Used when a frozen backbone's features are cached once and only the head trains; ``augment``, ``mean``
    and ``std`` are accepted for interface compatibility and ignored (features are already normalised inputs).
    """

    def __init__(self, features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor):
        feats = _as_tensor(features, torch.float32)
        if feats.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {tuple(feats.shape)}")
        labs = _as_tensor(labels, torch.int64).reshape(-1)
        if len(labs) != len(feats):
            raise ValueError(f"{len(feats)} feature rows but {len(labs)} labels")
        self.features = feats.contiguous()
        self.labels = labs.contiguous()
        self.labels_np = self.labels.numpy()

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def batch(self, indices, device: torch.device | str = "cpu", augment=None, mean=None,
              std=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of ``indices`` on ``device``."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        device = torch.device(device)
        return (self.features.index_select(0, idx).to(device, non_blocking=True),
                self.labels.index_select(0, idx).to(device, non_blocking=True))
