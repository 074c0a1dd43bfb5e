"""The training loop shared by every model: seeded, resumable, early-stopping, mixed precision on CUDA, and the same
on N processes (``torch.distributed``: every rank trains on its slice of the same seeded global batch).

``fit(model, objective, train, val_score, config)`` trains ``model`` in place with Adam over the model's parameters
plus ``objective.extra_parameters()`` and leaves the best weights (by ``val_score``, higher is better) in ``model``.
With ``checkpoint_dir`` it writes ``last.pt`` (everything needed to resume bit-exactly) and ``best.pt``
(``{"spec", "state_dict", "epoch", "score"}``) after each epoch, atomically (rank 0 only). All checkpoint files
load with ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from partmatch.ml.data import InMemoryImages, make_augmentation
from partmatch.ml.training import checkpoint, distributed
from partmatch.ml.training.config import NonFiniteLossError, TrainConfig, TrainResult
from partmatch.ml.training.device import cpu_heap_reuse, resolve_device, seed_everything
from partmatch.ml.training.hooks import Checkpoint, EarlyStopping, EpochCallback, Hook, Progress
from partmatch.ml.training.step import TrainStep

logger = logging.getLogger(__name__)


@dataclass
class LoopState:
    """What the loop carries from epoch to epoch (and ``last.pt`` stores)."""

    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_score: float = float("-inf")
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_objective_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    resumed_from_epoch: int | None = None
    epochs_this_call: int = 0


def _all_finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def _non_finite(epoch: int, batch: int, value: float, lr: float) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"Loss became {value} at epoch {epoch}, batch {batch}; training stopped before any checkpoint of "
        f"these weights was written. Hint: lower the learning rate (lr={lr:g}), check the inputs for "
        f"NaN/inf, or disable amp."
    )


def _device_for_rank(config: TrainConfig) -> torch.device:
    device = resolve_device(config.device)
    if device.type == "cuda" and distributed.is_active() and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())  # one GPU per process (set by the launcher)
    return device


class Trainer:
    """One call of :func:`fit`: set-up, resume, the epochs, and the hooks after each epoch."""

    def __init__(self, model: nn.Module, objective: nn.Module, train: Any, val_score: Callable | None,
                 config: TrainConfig, param_groups: list[dict] | None = None,
                 hooks: list[Hook] | None = None) -> None:
        model_task = getattr(model, "task", None)
        if model_task is not None and getattr(objective, "task", model_task) != model_task:
            raise ValueError(f"objective task {objective.task!r} does not match the model's task {model_task!r}")
        self.model, self.objective, self.train, self.val_score, self.config = model, objective, train, val_score, config
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.device = device = _device_for_rank(config)
        seed_everything(config.seed)
        model.to(device)
        self.channels_last = config.channels_last and device.type in ("cpu", "cuda")
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        objective.to(device)
        if self.channels_last:  # a reference network inside the objective sees the same NHWC batches (2x slower if NCHW)
            objective.to(memory_format=torch.channels_last)
        self.step = TrainStep(model, objective)
        self.forward = self.step
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(self.step, device_ids=[device.index] if device.type == "cuda"
                                                   else None)

        if param_groups is None:
            param_groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "model"}]
        groups: list[dict] = []
        for group in [*param_groups, *objective.extra_parameters()]:
            group = dict(group)
            multiplier = float(group.pop("lr_multiplier", 1.0))
            group.setdefault("lr", config.lr * multiplier)
            groups.append(group)
        self.optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)

        self.use_amp = (config.amp and device.type == "cuda") or (config.cpu_bf16 and device.type == "cpu")
        self.amp_dtype = (torch.bfloat16 if device.type == "cpu" or (self.use_amp and torch.cuda.is_bf16_supported())
                          else torch.float16)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        # images: torchvision transforms; cached backbone features (frozen mode): a random view (image / mirror)
        self.augment = (make_augmentation(config.augment, train.image_size) if isinstance(train, InMemoryImages)
                        else config.augment)
        self.gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        if device.type == "cuda":  # batches come from pinned host memory or a copy on the GPU (data.InMemoryImages)
            torch.cuda.reset_peak_memory_stats(device)

        self.state = LoopState()
        self.ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
        self.data_digest = None
        if self.ckpt_dir is not None:
            if distributed.is_main():
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                checkpoint.remove_dead_temp_files(self.ckpt_dir)
            self.data_digest = checkpoint.data_digest(train)
        if self.world > 1:  # every rank must train on the same pixels (machines preprocess their own copies)
            self.data_digest = self.data_digest or checkpoint.data_digest(train)
            expected = distributed.broadcast_object(self.data_digest)
            if expected != self.data_digest:
                raise ValueError(f"rank {self.rank} holds other training data than rank 0 ({len(train)} images, digest "
                                 f"{self.data_digest[:12]} vs {expected[:12]}): every machine must preprocess the same "
                                 f"photos with the same parameters (compare their split_index and image_array)")
        self.hooks: list[Hook] = [EarlyStopping(config.patience)]
        if self.ckpt_dir is not None:
            self.hooks.append(Checkpoint(self.ckpt_dir))
        self.hooks += [Progress(), *(hooks or [])]
        self._started = time.perf_counter()

    # ------------------------------------------------------------------------------------------- resume

    def resume_state(self) -> dict[str, Any]:
        """``last.pt``'s content."""
        s = self.state
        return {
            "version": checkpoint.CHECKPOINT_VERSION,
            "epoch": s.epoch,
            "spec": checkpoint.spec_or_none(self.model),  # the architecture, so a resume can name what changed
            "data": {"digest": self.data_digest, "images": len(self.train)},  # what it trains on: resume refuses other
            "model": checkpoint.cpu_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "objective": checkpoint.cpu_state(self.objective),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "history": s.history,
            "best_state": s.best_state,
            "best_objective_state": s.best_objective_state,
            "best_score": s.best_score,
            "best_epoch": s.best_epoch,
            "bad_epochs": s.bad_epochs,
            "stopped_early": s.stopped_early,
            "rng": checkpoint.rng_state(),
            "config": self.config.plain(),
            "world_size": self.world,
        }

    def maybe_resume(self) -> None:
        config, folder = self.config, self.ckpt_dir
        if not config.resume or folder is None:
            return
        path = folder / "last.pt"
        # rank 0 reads it (other machines may not see the folder) and hands it to every rank
        ckpt = distributed.broadcast_object(
            checkpoint.load_checkpoint(path) if distributed.is_main() and path.exists() else None)
        if ckpt is None:
            logger.info("resume=True but no %s yet: starting from scratch", path)
            return
        if ckpt.get("version") != checkpoint.CHECKPOINT_VERSION:
            raise ValueError(f"{path} has checkpoint version {ckpt.get('version')}, expected "
                             f"{checkpoint.CHECKPOINT_VERSION}")
        checkpoint.warn_config_changes(ckpt.get("config", {}), config)
        now = self.objective.state_dict()
        for key in ("objective", "best_objective_state"):  # proxies saved before losses were built as parts
            ckpt[key] = checkpoint.upgrade_objective_keys(ckpt.get(key), now)
        checkpoint.check_resumable(path, ckpt, self.model, self.objective, self.optimizer)
        checkpoint.check_same_data(path, ckpt.get("data"), self.data_digest, len(self.train))
        self.model.load_state_dict(ckpt["model"])
        if ckpt.get("objective") is not None:
            self.objective.load_state_dict(ckpt["objective"])
        configured = [(g["lr"], g["weight_decay"]) for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for g, (lr, wd) in zip(self.optimizer.param_groups, configured, strict=True):  # the current config wins
            g["lr"], g["weight_decay"] = lr, wd
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        s = self.state
        s.history = list(ckpt["history"])
        s.best_epoch, s.best_score = int(ckpt["best_epoch"]), float(ckpt["best_score"])
        s.stopped_early = bool(ckpt["stopped_early"])
        s.best_state, s.best_objective_state = ckpt["best_state"], ckpt.get("best_objective_state")
        s.bad_epochs = int(ckpt["bad_epochs"])
        s.epoch = s.resumed_from_epoch = int(ckpt["epoch"])
        checkpoint.set_rng_state(ckpt["rng"])
        if distributed.is_main():
            logger.info("Resuming from %s: epoch %d done, best score %.4f at epoch %d", path, s.epoch, s.best_score,
                        s.best_epoch)

    # -------------------------------------------------------------------------------------------- epochs

    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def _batches(self, epoch: int) -> list[np.ndarray]:
        config = self.config
        batches = list(self.objective.batches(self.train.labels_np, config.batch_size, epoch, config.seed))
        if config.max_batches_per_epoch is not None:
            batches = batches[: config.max_batches_per_epoch]
        if not batches:
            raise ValueError(f"objective produced no batches for {len(self.train)} images with batch_size "
                             f"{config.batch_size}")
        if self.world > 1 and min(len(b) for b in batches) < self.world:
            raise ValueError(f"a batch of {min(len(b) for b in batches)} images cannot be split over {self.world} "
                             f"processes: raise batch_size or use fewer processes")
        return batches

    def train_epoch(self, epoch: int) -> tuple[float, dict[str, float], int, float]:
        """One pass; returns (mean loss, mean of each named loss term, images seen by all ranks, seconds)."""
        config, device, train = self.config, self.device, self.train
        batches = self._batches(epoch)
        self.step.train()
        t0 = time.perf_counter()
        n_images, loss_sum, pending = 0, 0.0, []
        term_sums: dict[str, torch.Tensor | float] = {}
        sync_every = 1 if device.type == "cpu" else 10
        bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", unit="batch", leave=False,
                   disable=not config.progress or not distributed.is_main(), dynamic_ncols=True)
        for b, idx in enumerate(bar, start=1):
            shard = distributed.Shard(len(idx), self.rank, self.world) if self.world > 1 else None
            if shard is None or not self.augment:
                images, _ = train.batch(idx if shard is None else shard.local(idx), device, augment=self.augment,
                                        mean=config.mean, std=config.std)
            else:  # each rank augments its slice from its own seeded stream: the shared generator (random pairs /
                # triplets of the global batch) must stay identical on every rank, whatever the slice sizes
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(hash((config.seed, epoch, b, self.rank)) % 2**63)
                    images, _ = train.batch(shard.local(idx), device, augment=self.augment, mean=config.mean,
                                            std=config.std)
            labels = train.labels.index_select(0, torch.as_tensor(np.asarray(idx), dtype=torch.int64)).to(
                device, non_blocking=True)
            if self.channels_last and images.ndim == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            with distributed.sharded(shard), torch.autocast(device_type=device.type, dtype=self.amp_dtype,
                                                             enabled=self.use_amp):
                loss = self.forward(images, labels)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            n_images += len(idx)
            pending.append(loss.detach())
            for name, value in (getattr(self.objective, "last_terms", None) or {}).items():
                term_sums[name] = term_sums.get(name, 0.0) + value.detach().float()
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
        terms = {name: float(total) / len(batches) for name, total in term_sums.items()}
        return loss_sum / len(batches), terms, n_images, time.perf_counter() - t0

    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm running statistics) on every rank: DDP copies them only at the start of a
        forward pass, so after an epoch each rank's still include its own slice's last batch."""
        if self.world > 1:
            for buffer in self.step.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def validate(self, train_loss: float) -> float:
        self.sync_buffers()  # every rank embeds its share of the validation rows with the same model
        if self.val_score is None:
            return -train_loss
        self.model.eval()
        with torch.no_grad():
            score = float(self.val_score(self.model))
        self.model.train()
        return score

    def run(self) -> TrainResult:
        config, s = self.config, self.state
        self.maybe_resume()
        for hook in self.hooks:
            hook.on_fit_start(self)
        for epoch in range(s.epoch + 1, config.epochs + 1):
            if s.stopped_early:
                break
            s.epoch = epoch
            t0 = time.perf_counter()
            train_loss, terms, n_images, train_seconds = self.train_epoch(epoch)
            if not _all_finite(self.model) or not _all_finite(self.objective):
                raise NonFiniteLossError(
                    f"Weights became NaN/inf during epoch {epoch} (last loss {train_loss:.4g}); no checkpoint "
                    f"written. Hint: lower the learning rate (lr={config.lr:g}) or disable amp."
                )
            score = self.validate(train_loss)
            improved = math.isfinite(score) and score > s.best_score
            if not math.isfinite(score):
                logger.warning("epoch %d: validation score is %s; counted as no improvement", epoch, score)
            if improved:
                s.best_score, s.best_epoch = score, epoch
                s.best_state = checkpoint.cpu_state(self.model)
                s.best_objective_state = checkpoint.cpu_state(self.objective)
            record = {"epoch": epoch, "train_loss": train_loss, "val_score": score,
                      "images_per_second": n_images / max(train_seconds, 1e-9),
                      "seconds": time.perf_counter() - t0, "lr": float(self.optimizer.param_groups[0]["lr"]),
                      **{f"train_loss_{name}": value for name, value in terms.items()}}
            s.history.append(record)
            s.epochs_this_call += 1
            for hook in self.hooks:
                hook.on_epoch_end(self, record, improved)
            if s.stopped_early:
                break
        return self.finish()

    def finish(self) -> TrainResult:
        self.sync_buffers()
        s = self.state
        if s.best_state is not None:
            self.model.load_state_dict(s.best_state)
            if s.best_objective_state is not None:
                self.objective.load_state_dict(s.best_objective_state)
        speeds = [h["images_per_second"] for h in s.history]
        return TrainResult(
            history=s.history, best_epoch=s.best_epoch, best_score=s.best_score, epochs_run=len(s.history),
            device=str(self.device), images_per_second=float(np.mean(speeds)) if speeds else 0.0,
            gpu_name=self.gpu_name,
            gpu_peak_memory_mb=(torch.cuda.max_memory_allocated(self.device) / 2**20
                                if self.device.type == "cuda" else None),
            stopped_early=s.stopped_early, resumed_from_epoch=s.resumed_from_epoch, world_size=self.world)


def _cpu_heap_while(fn: Callable) -> Callable:
    """Run ``fit`` inside :func:`cpu_heap_reuse` when its ``config`` trains on the CPU."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("config", args[4] if len(args) > 4 else None)
        on_cpu = config is not None and resolve_device(config.device).type == "cpu"
        with cpu_heap_reuse(on_cpu):
            return fn(*args, **kwargs)

    return wrapper


@_cpu_heap_while
def fit(
    model: nn.Module,
    objective: nn.Module,
    train: Any,
    val_score: Callable[[nn.Module], float] | None,
    config: TrainConfig,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    param_groups: list[dict] | None = None,
    hooks: list[Hook] | None = None,
) -> TrainResult:
    """Train ``model`` with ``objective`` on ``train``; return the history and leave the best weights in it.

    ``val_score(model)`` (higher is better) is called after each epoch with the model in eval mode under
    ``torch.no_grad()``; without it the score is ``-train_loss``. ``on_epoch_end(epoch, record)`` receives the
    epoch's history record (e.g. to log to MLflow). ``param_groups`` (optional) replaces the single group of all
    trainable model parameters, e.g. a pretrained backbone at a lower rate: each group may carry
    ``lr_multiplier`` (relative to ``config.lr``). ``hooks`` run after the built-in ones each epoch.

    Called inside a ``torch.distributed`` process group of N > 1 processes (see
    :func:`partmatch.ml.training.distributed.launch`), every process runs this with the same arguments: each takes
    its slice of every seeded global batch of ``config.batch_size``, the model and objective train under
    DistributedDataParallel, and only rank 0 writes checkpoints and logs.
    """
    extra = [EpochCallback(on_epoch_end)] if on_epoch_end is not None else []
    return Trainer(model, objective, train, val_score, config, param_groups, [*extra, *(hooks or [])]).run()
