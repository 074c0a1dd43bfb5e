"""Small hooks of the training loop, called after every epoch in this order: early stopping, checkpoint, progress,
metrics. Each sees the :class:`~partmatch.ml.training.loop.Trainer` (its ``state``, ``config``, ``optimizer``...)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from partmatch.ml.training import checkpoint, distributed

if TYPE_CHECKING:
    from partmatch.ml.training.loop import Trainer

logger = logging.getLogger(__name__)


class Hook:
    """Override what you need; ``on_epoch_end`` gets the epoch's history record and whether the score improved."""

    def on_fit_start(self, trainer: Trainer) -> None:  # after a resume, before the first epoch of this call
        pass

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any], improved: bool) -> None:
        pass


class EarlyStopping(Hook):
    """Stop after ``patience`` epochs without improvement of the validation score (never after the last epoch)."""

    def __init__(self, patience: int | None):
        self.patience = patience

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any], improved: bool) -> None:
        state = trainer.state
        state.bad_epochs = 0 if improved else state.bad_epochs + 1
        if self.patience is not None and state.bad_epochs >= self.patience and state.epoch < trainer.config.epochs:
            state.stopped_early = True


class Checkpoint(Hook):
    """``last.pt`` (everything to resume bit-exactly) after every epoch and ``best.pt`` when the score improved,
    written atomically by rank 0 only."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any], improved: bool) -> None:
        if not distributed.is_main():
            return
        checkpoint.atomic_save(trainer.resume_state(), self.folder / "last.pt")
        if improved:
            state = trainer.state
            checkpoint.atomic_save({"spec": checkpoint.spec_or_none(trainer.model), "state_dict": state.best_state,
                                    "epoch": state.epoch, "score": state.best_score}, self.folder / "best.pt")


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress(Hook):
    """One log line per epoch (rank 0): loss, score (``*`` when it improved), images/s, seconds, ETA."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any], improved: bool) -> None:
        if not distributed.is_main():
            return
        state, config = trainer.state, trainer.config
        remaining = config.epochs - state.epoch
        eta = trainer.elapsed() / max(state.epochs_this_call, 1) * remaining
        logger.info(
            "epoch %d/%d  train_loss=%.4f  %s=%.4f%s  %.0f img/s  %.1fs  ETA %s",
            state.epoch, config.epochs, record["train_loss"],
            "val_score" if trainer.val_score is not None else "-train_loss", record["val_score"],
            " *" if improved else "", record["images_per_second"], record["seconds"],
            _fmt_seconds(eta) if remaining and not state.stopped_early else "-",
        )
        if state.stopped_early:
            logger.info("early stopping after epoch %d: no improvement for %d epoch(s); best epoch %d (%.4f)",
                        state.epoch, state.bad_epochs, state.best_epoch, state.best_score)


class EpochCallback(Hook):
    """``fn(epoch, record)`` after every epoch (e.g. to log metrics to MLflow), on rank 0 only."""

    def __init__(self, fn: Callable[[int, dict], None]):
        self.fn = fn

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any], improved: bool) -> None:
        if distributed.is_main():
            self.fn(trainer.state.epoch, dict(record))
