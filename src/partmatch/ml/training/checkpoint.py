"""Checkpoints of a training: what ``last.pt`` holds to resume bit-exactly, atomic writes, and the checks that refuse
to resume another model's or another dataset's checkpoint. Every file loads with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from partmatch.config import ParameterError
from partmatch.ml.training.config import TrainConfig
from partmatch.tempfiles import parse_temp_name, temp_host, temp_name

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


def rng_state() -> dict[str, Any]:
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


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def atomic_save(obj: Any, path: Path) -> None:
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


def remove_dead_temp_files(folder: Path) -> None:
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


def spec_or_none(model: nn.Module) -> dict | None:
    from partmatch.ml.models import model_spec  # noqa: PLC0415

    try:
        return model_spec(model)
    except ValueError:
        return None


_RESUME_SAFE = {"epochs", "patience", "checkpoint_dir", "resume", "progress", "device"}


def warn_config_changes(saved: dict[str, Any], config: TrainConfig) -> None:
    now = config.plain()
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


def upgrade_objective_keys(saved: dict[str, torch.Tensor] | None,
                           now: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """An objective state written before losses were built as parts (``criterion.proxies`` of a lone Proxy-Anchor,
    ``inner.criterion.proxies`` under the similarity penalty) under today's names (``parts.0.criterion.proxies``);
    keys that exist today, or have no such counterpart, are kept as they are."""
    if not saved:
        return saved
    upgraded = {}
    for key, value in saved.items():
        head, sep, tail = key.partition("criterion.")
        candidate = f"{head}parts.0.criterion.{tail}" if sep else key
        upgraded[candidate if key not in now and candidate in now else key] = value
    return upgraded


def check_resumable(path: Path, ckpt: dict[str, Any], model: nn.Module, objective: Any,
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
    saved_spec, spec_now = ckpt.get("spec"), spec_or_none(model)
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


def data_digest(train: Any) -> str:
    """SHA-256 of the training set (pixels or cached features, and labels) a checkpoint was trained on."""
    import hashlib

    h = hashlib.sha256()
    for tensor in (getattr(train, "images", None), getattr(train, "features", None), train.labels):
        if isinstance(tensor, torch.Tensor):
            h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def check_same_data(path: Path, saved: dict[str, Any] | None, digest: str | None, n_images: int) -> None:
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


