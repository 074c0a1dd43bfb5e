"""The training loop shared by every model: seeded, resumable, early-stopping, mixed precision on CUDA.

``fit(model, objective, train, val_score, config)`` trains ``model`` in place with Adam over the model's
parameters plus ``objective.extra_parameters()`` and leaves the best weights (by ``val_score``, higher is
better) in ``model``. With ``checkpoint_dir`` it writes ``last.pt`` (everything needed to resume bit-exactly)
and ``best.pt`` (``{"spec", "state_dict", "epoch", "score"}``) after each epoch, atomically. All checkpoint
files load with ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from partmatch.config import ParameterError
from partmatch.ml.data import InMemoryImages, make_augmentation
from partmatch.tempfiles import parse_temp_name, temp_host, temp_name

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


class NonFiniteLossError(FloatingPointError):
    """The loss (or the weights) became NaN/inf; nothing from that point on is checkpointed."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.0
    patience: int | None = 3  # epochs without improvement of the validation score; None disables
    device: str = "auto"  # auto: cuda, then mps, then cpu
    seed: int = 42
    amp: bool = True  # CUDA only: bf16 autocast where supported, else fp16 autocast + GradScaler
    cpu_bf16: bool = False  # CPU: bf16 autocast of the training step (opt-in: results change slightly)
    augment: bool = False
    checkpoint_dir: str | None = None
    resume: bool = False
    max_batches_per_epoch: int | None = None  # quick smoke runs
    progress: bool = True
    mean: tuple = (0.5,)
    std: tuple = (0.5,)
    channels_last: bool = True  # NHWC weights/inputs on CPU and CUDA (~1.4x faster study CNN on CPU)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        if self.max_batches_per_epoch is not None and self.max_batches_per_epoch < 1:
            raise ValueError(f"max_batches_per_epoch must be >= 1 or None, got {self.max_batches_per_epoch}")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume=True needs a checkpoint_dir")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = float("-inf")
    epochs_run: int = 0
    device: str = "cpu"
    images_per_second: float = 0.0
    gpu_name: str | None = None
    gpu_peak_memory_mb: float | None = None
    stopped_early: bool = False
    resumed_from_epoch: int | None = None


# --------------------------------------------------------------------------------------------- helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit but unavailable accelerator raises."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {name!r} requested but MPS is not available; use device: auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Call it before building a model to fix its init."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_heap_depth = 0


def _glibc() -> Any:
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def cpu_heap_reuse(enabled: bool = True) -> Iterator[None]:
    """Keep freed memory in the process heap for reuse while CPU training / inference runs (glibc only).

    glibc serves every allocation over 32 MB (e.g. a batch of 64 conv activations at 100 px: 82 MB) with a fresh
    ``mmap`` and returns it on ``free``, so each training step page-faults hundreds of MB of new zero pages
    (``bench/train_throughput.py``, study CNN step: 1.04x more images/s with this context on a quiet machine,
    1.2-1.45x while other processes load it; bitwise the same values). Inside this context large blocks come from the heap and freed ones are
    reused; on exit the defaults are restored and the spare heap is returned to the system (``malloc_trim``).
    Nested uses act once (the outermost). No-op elsewhere or when ``enabled`` is false.
    """
    global _heap_depth
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    _heap_depth += 1
    if _heap_depth == 1:
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        _heap_depth -= 1
        if _heap_depth == 0:
            libc.mallopt(_M_MMAP_MAX, 65536)  # glibc's defaults
            libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
            libc.malloc_trim(0)


def _cpu_heap_while(fn: Callable) -> Callable:
    """Run ``fit`` inside :func:`cpu_heap_reuse` when its ``config`` trains on the CPU."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("config", args[4] if len(args) > 4 else None)
        on_cpu = config is not None and resolve_device(config.device).type == "cpu"
        with cpu_heap_reuse(on_cpu):
            return fn(*args, **kwargs)

    return wrapper


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` under a temporary name, then one rename: a save cut short (killed, full disk) leaves the
    previous ``path`` intact and no partial file under its name."""
    tmp = path.with_name(temp_name(path.name))
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(exc.errno, f"Cannot write checkpoint {path}: {exc.strerror or exc} (the previous checkpoint "
                                 f"is unchanged; free disk space or make {path.parent} writable, or set "
                                 f"checkpoint_dir to null)") from exc


def _remove_dead_temp_files(folder: Path) -> None:
    """Delete the temporary ``last.pt`` / ``best.pt`` files (``partmatch.tempfiles`` names) of a process of this
    host killed while it saved (pid gone); another host's (a shared checkpoint folder) are left alone."""
    from partmatch.tracking import process_alive

    for tmp in folder.glob(".*.pt.tmp-*"):
        parsed = parse_temp_name(tmp.name)
        if parsed is None:
            continue
        _, host, pid = parsed
        if host == temp_host() and pid != os.getpid() and not process_alive(pid):
            tmp.unlink(missing_ok=True)


def _spec_or_none(model: nn.Module) -> dict | None:
    from partmatch.ml.models import model_spec  # noqa: PLC0415

    try:
        return model_spec(model)
    except ValueError:
        return None


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def _non_finite(epoch: int, batch: int, value: float, lr: float) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"Loss became {value} at epoch {epoch}, batch {batch}; training stopped before any checkpoint of "
        f"these weights was written. Hint: lower the learning rate (lr={lr:g}), check the inputs for "
        f"NaN/inf, or disable amp."
    )


# ---------------------------------------------------------------------------------------------- fit


@_cpu_heap_while
def fit(
    model: nn.Module,
    objective: Any,
    train: InMemoryImages,
    val_score: Callable[[nn.Module], float] | None,
    config: TrainConfig,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    param_groups: list[dict] | None = None,
) -> TrainResult:
    """Train ``model`` with ``objective`` on ``train``; return the history and leave the best weights in it.

    ``val_score(model)`` (higher is better) is called after each epoch with the model in eval mode under
    ``torch.no_grad()``; without it the score is ``-train_loss``. ``on_epoch_end(epoch, record)`` receives the
    epoch's history record (e.g. to log to MLflow). ``param_groups`` (optional) replaces the single group of all
    trainable model parameters, e.g. a pretrained backbone at a lower rate: each group may carry
    ``lr_multiplier`` (relative to ``config.lr``).
    """
    model_task = getattr(model, "task", None)
    if model_task is not None and getattr(objective, "task", model_task) != model_task:
        raise ValueError(f"objective task {objective.task!r} does not match the model's task {model_task!r}")

    device = resolve_device(config.device)
    seed_everything(config.seed)
    model.to(device)
    channels_last = config.channels_last and device.type in ("cpu", "cuda")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if isinstance(objective, nn.Module):
        objective.to(device)
        if channels_last:  # a reference network inside the objective sees the same NHWC batches (2x slower if NCHW)
            objective.to(memory_format=torch.channels_last)

    if param_groups is None:
        param_groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "model"}]
    groups: list[dict] = []
    for group in [*param_groups, *objective.extra_parameters()]:
        group = dict(group)
        multiplier = float(group.pop("lr_multiplier", 1.0))
        group.setdefault("lr", config.lr * multiplier)
        groups.append(group)
    optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)

    use_amp = (config.amp and device.type == "cuda") or (config.cpu_bf16 and device.type == "cpu")
    amp_dtype = (torch.bfloat16 if device.type == "cpu" or (use_amp and torch.cuda.is_bf16_supported())
                 else torch.float16)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    # images: torchvision transforms; cached backbone features (frozen mode): a random view (image / mirror)
    augment = (make_augmentation(config.augment, train.image_size) if isinstance(train, InMemoryImages)
               else config.augment)
    gpu_name = None
    if device.type == "cuda":
        gpu_name = torch.cuda.get_device_name(device)
        torch.cuda.reset_peak_memory_stats(device)

    result = TrainResult(device=str(device), gpu_name=gpu_name)
    best_state: dict[str, torch.Tensor] | None = None
    best_objective_state: dict[str, torch.Tensor] | None = None
    bad_epochs = 0
    start_epoch = 1
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    data_digest = None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _remove_dead_temp_files(ckpt_dir)
        data_digest = _data_digest(train)

    if config.resume and ckpt_dir is not None and (ckpt_dir / "last.pt").exists():
        ckpt = torch.load(ckpt_dir / "last.pt", map_location="cpu", weights_only=True)
        if ckpt.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{ckpt_dir / 'last.pt'} has checkpoint version {ckpt.get('version')}, "
                             f"expected {CHECKPOINT_VERSION}")
        _warn_config_changes(ckpt.get("config", {}), config)
        _check_resumable(ckpt_dir / "last.pt", ckpt, model, objective, optimizer)
        _check_same_data(ckpt_dir / "last.pt", ckpt.get("data"), data_digest, len(train))
        model.load_state_dict(ckpt["model"])
        if isinstance(objective, nn.Module) and ckpt.get("objective") is not None:
            objective.load_state_dict(ckpt["objective"])
        configured = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for g, (lr, wd) in zip(optimizer.param_groups, configured, strict=True):  # the current config wins
            g["lr"], g["weight_decay"] = lr, wd
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        result.history = list(ckpt["history"])
        result.best_epoch, result.best_score = int(ckpt["best_epoch"]), float(ckpt["best_score"])
        result.stopped_early = bool(ckpt["stopped_early"])
        best_state, best_objective_state = ckpt["best_state"], ckpt.get("best_objective_state")
        bad_epochs = int(ckpt["bad_epochs"])
        start_epoch = int(ckpt["epoch"]) + 1
        result.resumed_from_epoch = int(ckpt["epoch"])
        _set_rng_state(ckpt["rng"])
        logger.info("Resuming from %s: epoch %d done, best score %.4f at epoch %d",
                    ckpt_dir / "last.pt", ckpt["epoch"], result.best_score, result.best_epoch)
    elif config.resume:
        logger.info("resume=True but no %s yet: starting from scratch", ckpt_dir / "last.pt")

    n_train = len(train)
    labels_np = train.labels_np
    run_start = time.perf_counter()
    epochs_this_call = 0
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs + 1):
        if result.stopped_early:
            break
        batches = list(objective.batches(labels_np, config.batch_size, epoch, config.seed))
        if config.max_batches_per_epoch is not None:
            batches = batches[: config.max_batches_per_epoch]
        if not batches:
            raise ValueError(f"objective produced no batches for {n_train} images with batch_size "
                             f"{config.batch_size}")
        model.train()
        t0 = time.perf_counter()
        n_images, loss_sum, pending = 0, 0.0, []
        sync_every = 1 if device.type == "cpu" else 10
        bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", unit="batch", leave=False,
                   disable=not config.progress, dynamic_ncols=True)
        for b, idx in enumerate(bar, start=1):
            images, labels = train.batch(idx, device, augment=augment, mean=config.mean, std=config.std)
            if channels_last and images.ndim == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                loss = objective.loss(model, images, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            n_images += len(idx)
            pending.append(loss.detach())
            if b % sync_every == 0 or b == len(batches):
                values = torch.stack(pending).float().cpu().tolist()
                for k, v in enumerate(values):
                    if not math.isfinite(v):
                        raise _non_finite(epoch, b - len(values) + k + 1, v, config.lr)
                loss_sum += sum(values)
                pending = []
                bar.set_postfix(loss=f"{values[-1]:.4f}",
                                img_s=f"{n_images / max(time.perf_counter() - t0, 1e-9):.0f}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - t0
        train_loss = loss_sum / len(batches)
        if not _all_finite(model) or (isinstance(objective, nn.Module) and not _all_finite(objective)):
            raise NonFiniteLossError(
                f"Weights became NaN/inf during epoch {epoch} (last loss {train_loss:.4g}); no checkpoint "
                f"written. Hint: lower the learning rate (lr={config.lr:g}) or disable amp."
            )

        if val_score is not None:
            model.eval()
            with torch.no_grad():
                score = float(val_score(model))
            model.train()
        else:
            score = -train_loss
        improved = math.isfinite(score) and score > result.best_score
        if not math.isfinite(score):
            logger.warning("epoch %d: validation score is %s; counted as no improvement", epoch, score)
        if improved:
            result.best_score, result.best_epoch, bad_epochs = score, epoch, 0
            best_state = _cpu_state(model)
            best_objective_state = _cpu_state(objective) if isinstance(objective, nn.Module) else None
        else:
            bad_epochs += 1
        seconds = time.perf_counter() - t0
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_score": score,
            "images_per_second": n_images / max(train_seconds, 1e-9),
            "seconds": seconds,
            "lr": float(optimizer.param_groups[0]["lr"]),
        }
        result.history.append(record)
        epochs_this_call += 1
        if config.patience is not None and bad_epochs >= config.patience and epoch < config.epochs:
            result.stopped_early = True

        if ckpt_dir is not None:
            _atomic_save(
                {
                    "version": CHECKPOINT_VERSION,
                    "epoch": epoch,
                    "spec": _spec_or_none(model),  # the architecture, so a resume can name what changed
                    "data": {"digest": data_digest, "images": n_train},  # what it trains on: resume refuses other
                    "model": _cpu_state(model),
                    "optimizer": optimizer.state_dict(),
                    "objective": _cpu_state(objective) if isinstance(objective, nn.Module) else None,
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "history": result.history,
                    "best_state": best_state,
                    "best_objective_state": best_objective_state,
                    "best_score": result.best_score,
                    "best_epoch": result.best_epoch,
                    "bad_epochs": bad_epochs,
                    "stopped_early": result.stopped_early,
                    "rng": _rng_state(),
                    "config": _plain_config(config),
                },
                ckpt_dir / "last.pt",
            )
            if improved:
                _atomic_save(
                    {"spec": _spec_or_none(model), "state_dict": best_state, "epoch": epoch,
                     "score": result.best_score},
                    ckpt_dir / "best.pt",
                )

        elapsed = time.perf_counter() - run_start
        remaining = config.epochs - epoch
        eta = elapsed / epochs_this_call * remaining
        logger.info(
            "epoch %d/%d  train_loss=%.4f  %s=%.4f%s  %.0f img/s  %.1fs  ETA %s",
            epoch, config.epochs, train_loss, "val_score" if val_score is not None else "-train_loss", score,
            " *" if improved else "", record["images_per_second"], seconds,
            _fmt_seconds(eta) if remaining and not result.stopped_early else "-",
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, dict(record))
        if result.stopped_early:
            logger.info("early stopping after epoch %d: no improvement for %d epoch(s); best epoch %d (%.4f)",
                        epoch, bad_epochs, result.best_epoch, result.best_score)
            break

    if best_state is not None:
        model.load_state_dict(best_state)
        if best_objective_state is not None and isinstance(objective, nn.Module):
            objective.load_state_dict(best_objective_state)
    result.epochs_run = len(result.history)
    speeds = [h["images_per_second"] for h in result.history]
    result.images_per_second = float(np.mean(speeds)) if speeds else 0.0
    if device.type == "cuda":
        result.gpu_peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def _plain_config(config: TrainConfig) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


_RESUME_SAFE = {"epochs", "patience", "checkpoint_dir", "resume", "progress", "device"}


def _warn_config_changes(saved: dict[str, Any], config: TrainConfig) -> None:
    now = _plain_config(config)
    changed = {k: (saved[k], now[k]) for k in saved if k in now and k not in _RESUME_SAFE and saved[k] != now[k]}
    if changed:
        logger.warning("Resuming with changed settings %s (saved -> now): the result will differ from an "
                       "uninterrupted run", changed)


class CheckpointMismatchError(ParameterError):
    """``resume`` found a checkpoint of another architecture (or objective) than the model being trained (a
    :class:`~partmatch.config.ParameterError`: ``kedro run`` prints the message alone)."""


def _shape_changes(saved: dict[str, torch.Tensor], now: dict[str, torch.Tensor]) -> list[str]:
    changes = [f"{k} {list(saved[k].shape)} -> {list(now[k].shape)}" for k in saved
               if k in now and tuple(saved[k].shape) != tuple(now[k].shape)]
    changes += [f"{k} only in the checkpoint" for k in saved if k not in now]
    changes += [f"{k} not in the checkpoint" for k in now if k not in saved]
    return changes


def _check_resumable(path: Path, ckpt: dict[str, Any], model: nn.Module, objective: Any,
                     optimizer: torch.optim.Optimizer) -> None:
    """Refuse (naming the file, what changed and the fix) a checkpoint whose weights cannot be those of
    ``model`` / ``objective``: PyTorch would stop with a bare "size mismatch" in ``load_state_dict``."""
    weights = _shape_changes(ckpt["model"], model.state_dict())
    if isinstance(objective, nn.Module) and ckpt.get("objective") is not None:
        weights += [f"objective {c}" for c in _shape_changes(ckpt["objective"], objective.state_dict())]
    saved_groups = [len(g["params"]) for g in ckpt["optimizer"].get("param_groups", [])]
    groups_now = [len(g["params"]) for g in optimizer.param_groups]
    if not weights and saved_groups != groups_now:
        weights.append(f"optimizer parameter groups {saved_groups} -> {groups_now} tensors")
    if not weights:
        return
    settings = []
    saved_spec, spec_now = ckpt.get("spec"), _spec_or_none(model)
    if isinstance(saved_spec, dict) and isinstance(spec_now, dict):
        settings = [f"{k}: {saved_spec.get(k)!r} -> {spec_now.get(k)!r}"
                    for k in sorted(set(saved_spec) | set(spec_now)) if saved_spec.get(k) != spec_now.get(k)]
    shown = weights[:6] + ([f"... {len(weights) - 6} more"] if len(weights) > 6 else [])
    raise CheckpointMismatchError(
        f"Cannot resume from {path}: it was written for another model than the one configured now"
        + (f" (changed: {'; '.join(settings)})" if settings else "")
        + f". Weights that differ: {'; '.join(shown)}. Either restore the settings it was trained with, or start "
        f"afresh: set resume: false for this model (e.g. --params=<model>.resume=false; the checkpoint is then "
        f"overwritten) or delete {path.parent}."
    )


def _data_digest(train: Any) -> str:
    """SHA-256 of the training set (pixels or cached features, and labels) a checkpoint was trained on."""
    import hashlib

    h = hashlib.sha256()
    for tensor in (getattr(train, "images", None), getattr(train, "features", None), train.labels):
        if isinstance(tensor, torch.Tensor):
            h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _check_same_data(path: Path, saved: dict[str, Any] | None, digest: str | None, n_images: int) -> None:
    """Refuse to continue a checkpoint on another training set (another source, split seed or preprocessing, or
    another run's checkpoint in the shared folder): the result would be neither run's model."""
    if not saved or not saved.get("digest") or saved["digest"] == digest:
        return  # checkpoints written before the digest existed are resumed as before
    raise CheckpointMismatchError(
        f"Cannot resume from {path}: it was trained on other data ({saved.get('images')} training images, "
        f"digest {saved['digest'][:12]}) than this run's ({n_images} images, digest {str(digest)[:12]}): another "
        f"source, split or preprocessing, or another run wrote it. Start afresh: set resume: false for this model "
        f"(e.g. --params=<model>.resume=false) or delete {path.parent}; or resume on the data it was trained on."
    )


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a ``last.pt`` / ``best.pt`` written by :func:`fit` (safe ``weights_only`` load)."""
    return torch.load(path, map_location=map_location, weights_only=True)


__all__ = [
    "CheckpointMismatchError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "cpu_heap_reuse",
    "fit",
    "load_checkpoint",
    "resolve_device",
    "seed_everything",
]
