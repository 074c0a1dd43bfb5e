"""In-memory image batches, per-image torchvision augmentation and seeded batch samplers.

Images stay uint8 (N, C, H, W) in memory; a batch is indexed, moved to the target device and converted to
float there exactly once (``/255`` then ``(x - mean) / std``). Samplers yield numpy index arrays and are fully
determined by the generator / seed they are given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

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


class PerSampleAugmentation(torch.nn.Module):
    """A torchvision.transforms.v2 pipeline applied to every image of a float batch in [0, 1] separately.

    v2 transforms given a whole batch tensor draw ONE set of random parameters for it, so every image — and both
    sides of every pair — would get the same crop / flip / rotation; here each image gets its own draw. v2 draws
    its parameters from torch's global CPU generator, which the engine seeds and checkpoints, so augmented
    training stays reproducible and resumable on every device. Measured cost (``bench/``-style timing, 1 thread):
    ~50 ms per 64 grey 100 px images, ~180 ms per 64 RGB 224 px images.
    """

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.transform = transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in x])


def training_transform(image_size: int, scale: tuple[float, float] = (0.8, 1.0), degrees: float = 10.0,
                       brightness: float = 0.2, contrast: float = 0.2) -> Callable[[torch.Tensor], torch.Tensor]:
    """Random resized crop, horizontal flip, small rotation (white fill) and brightness/contrast jitter (v2)."""
    from torchvision.transforms import v2  # noqa: PLC0415

    return v2.Compose([
        v2.RandomResizedCrop(int(image_size), scale=scale, ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(degrees, fill=1.0),   # the padding of our photos is white
        v2.ColorJitter(brightness=brightness, contrast=contrast),
    ])


def make_augmentation(enabled: bool, image_size: int, **kwargs: float) -> PerSampleAugmentation | None:
    """The training augmentation (random resized crop 0.8-1, h-flip, ±10° rotation, brightness/contrast 0.2)
    for ``image_size`` px images, or ``None`` when disabled."""
    return PerSampleAugmentation(training_transform(image_size, **kwargs)) if enabled else None


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


# ------------------------------------------------------------------------------ samplers by name
# (registered in partmatch.ml.losses.registry.SAMPLERS; an objective asks its sampler for each epoch's batches)


class ShuffledSampler:
    """Plain shuffled batches; a trailing batch of one image is dropped (it would break BatchNorm and gives no
    pair). ``oversample_to``: categories with fewer images are topped up to that many per epoch by drawing
    their images again (with replacement), so small categories weigh more; with ``augment`` each repeat is a
    different augmented view."""

    class_balanced = False

    def __init__(self, oversample_to: int | None = None):
        self.oversample_to = None if oversample_to is None else int(oversample_to)

    def indices(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The epoch's image indices before shuffling: each once, plus the small categories' repeats."""
        labels = np.asarray(labels).reshape(-1)
        idx = np.arange(len(labels))
        if not self.oversample_to:
            return idx
        extra = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            if len(members) < self.oversample_to:
                extra.append(rng.choice(members, self.oversample_to - len(members), replace=True))
        return np.concatenate([idx, *extra]) if extra else idx

    def batches(self, labels: np.ndarray, batch_size: int, epoch: int, seed: int) -> Iterator[np.ndarray]:
        rng = epoch_rng(seed, epoch)
        if not self.oversample_to:  # exactly the batches of the objectives before the sampler registry
            return (b for b in shuffled_batches(len(labels), batch_size, rng) if len(b) > 1)
        idx = self.indices(labels, rng)
        return (idx[b] for b in shuffled_batches(len(idx), batch_size, rng) if len(b) > 1)


class MPerClassSampler:
    """Class-balanced batches of ``m`` images per category (:func:`class_balanced_batches`)."""

    class_balanced = True

    def __init__(self, m: int = 4):
        self.m = int(m)

    def batches(self, labels: np.ndarray, batch_size: int, epoch: int, seed: int) -> Iterator[np.ndarray]:
        return class_balanced_batches(labels, batch_size, self.m, epoch_rng(seed, epoch))


def proxy_distances(proxies: torch.Tensor, distance: str = "cosine") -> np.ndarray:
    """(C, C) distances between proxies: cosine = ``1 - cos``, euclidean = L2, manhattan = L1."""
    p = proxies.detach().float().cpu()
    if distance == "cosine":
        p = torch.nn.functional.normalize(p, dim=1)
        return (1.0 - p @ p.T).numpy()
    return torch.cdist(p, p, p=1.0 if distance == "manhattan" else 2.0).numpy()


class NearestProxySampler:
    """Class-balanced batches whose categories are each other's nearest proxies: hard negatives in every batch.

    Each batch takes a random anchor category, then the ``k - 1`` categories whose proxies are nearest to the
    anchor's proxy (``k = batch_size // m``), ``m`` images of each (drawn without replacement when the category
    has enough). ``explore`` of the ``k - 1`` are random categories instead. The proxies are read when an epoch
    starts (``bind`` gives the sampler a function returning them), so the neighbourhoods follow training.
    ``len(labels) // (k m)`` batches per epoch; seeded by ``(seed, epoch)`` and the proxies alone.
    """

    class_balanced = True

    def __init__(self, m: int = 4, explore: float = 0.0, distance: str = "cosine"):
        self.m = int(m)
        self.explore = float(explore)
        self.distance = distance
        self._proxies: Callable[[], torch.Tensor] | None = None

    def bind(self, proxies: Callable[[], torch.Tensor]) -> NearestProxySampler:
        self._proxies = proxies
        return self

    def classes_per_batch(self, anchors: Sequence[int], proxies: torch.Tensor, k: int,
                          rng: np.random.Generator) -> list[np.ndarray]:
        """For each anchor category, itself and its nearest ``k - 1`` categories (some random with explore)."""
        dist = proxy_distances(proxies, self.distance)
        np.fill_diagonal(dist, -np.inf)  # the anchor first
        order = np.argsort(dist, axis=1, kind="stable")
        n_random = int(round(self.explore * (k - 1)))
        out = []
        for a in anchors:
            chosen = order[a, : k - n_random]
            if n_random:
                rest = np.setdiff1d(np.arange(len(dist)), chosen)
                chosen = np.concatenate([chosen, rng.choice(rest, n_random, replace=False)])
            out.append(chosen)
        return out

    def batches(self, labels: np.ndarray, batch_size: int, epoch: int, seed: int) -> Iterator[np.ndarray]:
        if self._proxies is None:
            raise ValueError("nearest_proxy sampler has no proxies: it needs a proxy loss part (proxy_anchor)")
        labels = np.asarray(labels).reshape(-1)
        proxies = self._proxies()
        present = np.unique(labels)
        members = {int(c): np.flatnonzero(labels == c) for c in present}
        k = max(2, min(int(batch_size) // self.m, len(present)))
        if len(present) < 2:
            raise ValueError("nearest_proxy batches need at least 2 categories")
        rng = epoch_rng(seed, epoch)
        n_batches = max(1, len(labels) // (k * self.m))
        anchors = rng.choice(present, n_batches, replace=True)
        # proxies of categories absent from this training set are never chosen
        sub = proxies[torch.as_tensor(present)]
        where = {int(c): i for i, c in enumerate(present)}
        for chosen in self.classes_per_batch([where[int(a)] for a in anchors], sub, k, rng):
            yield np.concatenate([rng.choice(members[int(present[c])], self.m, replace=len(members[int(present[c])]) < self.m)
                                  for c in chosen])


class InMemoryFeatures:
    """Precomputed float features with labels, batched like :class:`InMemoryImages`.

    Used when a frozen backbone's features are cached once and only the head trains. ``features`` is
    ``(N, D)``, or ``(N, V, D)`` with V views of each image (view 0 the image itself, view 1 its horizontal
    mirror, see ``workflow.backbone_features``). A batch holds view 0, or with ``augment`` a view drawn per
    sample from torch's global generator (seeded and checkpointed by the engine): flip augmentation on cached
    features. ``mean`` and ``std`` are accepted for interface compatibility and ignored.
    """

    def __init__(self, features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor):
        feats = _as_tensor(features, torch.float32)
        if feats.ndim not in (2, 3):
            raise ValueError(f"features must be (N, D) or (N, views, D), got shape {tuple(feats.shape)}")
        labs = _as_tensor(labels, torch.int64).reshape(-1)
        if len(labs) != len(feats):
            raise ValueError(f"{len(feats)} feature rows but {len(labs)} labels")
        self.features = (feats if feats.ndim == 3 else feats[:, None]).contiguous()
        self.labels = labs.contiguous()
        self.labels_np = self.labels.numpy()

    @property
    def views(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def batch(self, indices, device: torch.device | str = "cpu", augment=None, mean=None,
              std=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (one view per sample) and labels of ``indices`` on ``device``."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        view = (torch.randint(self.views, (len(idx),)) if augment and self.views > 1
                else torch.zeros(len(idx), dtype=torch.int64))
        device = torch.device(device)
        return (self.features[idx, view].to(device, non_blocking=True),
                self.labels.index_select(0, idx).to(device, non_blocking=True))
