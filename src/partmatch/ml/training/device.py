"""Where a training runs: device choice, seeding and the CPU heap setting of a training or inference loop."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


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
