"""The run configuration of a training (picklable: it travels to every process of a distributed run) and its
result."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class NonFiniteLossError(FloatingPointError):
    """The loss (or the weights) became NaN/inf; nothing from that point on is checkpointed."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # the global batch: N processes each take batch_size / N of every batch
    lr: float = 5e-4
    weight_decay: float = 0.0
    patience: int | None = 3  # epochs without improvement of the validation score; None disables
    device: str = "auto"  # auto: cuda, then mps, then cpu (distributed on CUDA: cuda:<local rank>)
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

    def plain(self) -> dict[str, Any]:
        """The configuration as plain types (stored in checkpoints)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = float("-inf")
    epochs_run: int = 0
    device: str = "cpu"
    images_per_second: float = 0.0  # all processes together
    gpu_name: str | None = None
    gpu_peak_memory_mb: float | None = None
    stopped_early: bool = False
    resumed_from_epoch: int | None = None
    world_size: int = 1  # processes that trained (torch.distributed)
