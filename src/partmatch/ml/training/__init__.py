"""Training: the run configuration (``config``), one step's module (``step``), the loop and its hooks (``loop``,
``hooks``), checkpoints (``checkpoint``), devices (``device``) and N-process training (``distributed``).
Importable without Kedro."""

from partmatch.ml.training.checkpoint import CheckpointMismatchError, load_checkpoint
from partmatch.ml.training.config import NonFiniteLossError, TrainConfig, TrainResult
from partmatch.ml.training.device import cpu_heap_reuse, resolve_device, seed_everything
from partmatch.ml.training.distributed import DistributedConfig, DistributedTrainingError
from partmatch.ml.training.hooks import Hook
from partmatch.ml.training.loop import fit
from partmatch.ml.training.step import TrainStep

__all__ = [
    "CheckpointMismatchError",
    "DistributedConfig",
    "DistributedTrainingError",
    "Hook",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "TrainStep",
    "cpu_heap_reuse",
    "fit",
    "load_checkpoint",
    "resolve_device",
    "seed_everything",
]
