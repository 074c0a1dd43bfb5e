"""Decoding many photos on every core, and uint8 image arrays whose memory stays linear in the photo count.

``run_chunked`` runs a pure function over chunks of work in a process pool (``ingestion.workers``), reading
nothing itself: the caller's generator reads the files in this process (so read errors and source checks stay
where they were) and the workers only decode. Results come back in input order, so the output does not depend
on the number of workers. ``allocate_images`` preallocates the (N, C, S, S) array, as a file-backed
``numpy.memmap`` when it is larger than ``preprocessing.memory_budget_mb``.
"""

from __future__ import annotations

import atexit
import logging
import mmap
import multiprocessing
import os
import sys
import tempfile
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: Files per task sent to a worker: large enough that the pool's overhead is negligible, small enough that the
#: progress bar moves and that few files are held in memory at once (at most ``IN_FLIGHT * workers`` chunks).
CHUNK_SIZE = 32
#: Chunks queued per worker: enough that the workers keep decoding while this process waits for a core (on a busy
#: machine it is descheduled now and then), few enough that memory stays flat.
IN_FLIGHT = 6

T = TypeVar("T")
R = TypeVar("R")


def cpu_count() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells, else ``os.cpu_count()``)."""
    if hasattr(os, "process_cpu_count"):
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def resolve_workers(workers: int | str) -> int:
    """``ingestion.workers``: ``"auto"`` -> every core, else the number given (1 = in this process, no pool)."""
    return cpu_count() if workers == "auto" else int(workers)


def run_chunked(fn: Callable[[list[T]], list[R]], chunks: Iterable[list[T]], *, workers: int, total: int,
                desc: str) -> Iterator[list[R]]:
    """Yield ``fn(chunk)`` for every chunk, in order, computed in a pool of ``workers`` processes (or here for 1).

    ``chunks`` is consumed lazily (at most ``IN_FLIGHT * workers`` chunks are in flight), so a generator that reads
    files keeps only those in memory. ``fn`` must be picklable (a module-level function or a
    ``functools.partial`` of one). ``total`` items (the sum of the chunk lengths) drive the progress bar.
    """
    bar = tqdm(total=total, desc=desc, unit="img", mininterval=2)
    try:
        if workers <= 1:
            for chunk in chunks:
                result = fn(chunk)
                bar.update(len(chunk))
                yield result
            return
        pool = _pool(workers)
        pending: deque[tuple[Future, int]] = deque()
        try:
            iterator = iter(chunks)
            exhausted = False
            while True:
                while not exhausted and len(pending) < IN_FLIGHT * workers:
                    chunk = next(iterator, None)
                    if chunk is None:
                        exhausted = True
                        break
                    pending.append((pool.submit(fn, chunk), len(chunk)))
                if not pending:
                    return
                future, n = pending.popleft()
                result = future.result()
                bar.update(n)
                yield result
        except BaseException:
            for future, _ in pending:      # stopped early (an error, the caller gave up): drop what is queued
                future.cancel()
            if isinstance(pool, ProcessPoolExecutor) and getattr(pool, "_broken", False):
                shutdown_pool()
            raise
    finally:
        bar.close()


# One pool at a time, kept between calls: ingestion starts it, preprocessing (the next node of the same run) reuses
# it for its hash checks and shuts it down, so a run forks its workers once and no idle process outlives the data
# pipelines (atexit shuts down one that is left, e.g. after `--pipeline ingestion`).
_POOL: dict[str, Any] = {}


_LOCK = threading.Lock()


def _pool(workers: int) -> ProcessPoolExecutor:
    """The pool of ``workers`` processes, started if needed (another size, a broken pool or a forked copy of this
    process: a new one).

    fork where the OS has it: a worker starts in milliseconds with everything imported (spawn / forkserver
    re-import the caller's __main__, a second or more under kedro). The work units take no lock a thread of this
    process could hold (they only read files, decode with Pillow and hash), so forking a threaded process is safe.
    """
    with _LOCK:
        return _pool_locked(workers)


def _pool_locked(workers: int) -> ProcessPoolExecutor:
    if _POOL and (_POOL["workers"] != workers or _POOL["pid"] != os.getpid()
                  or getattr(_POOL["pool"], "_broken", False)):
        _shutdown_locked()
    if not _POOL:
        # fork on Linux only: macOS system libraries start threads that a forked child can deadlock on (CPython
        # itself defaults to spawn there)
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))
        _POOL.update(workers=workers, pid=os.getpid(), pool=pool)
    return _POOL["pool"]


def pool_is_warm(workers: int) -> bool:
    """Whether a pool of ``workers`` processes is running (so more work costs no start-up)."""
    return bool(_POOL) and _POOL["workers"] == workers and _POOL["pid"] == os.getpid()


def shutdown_pool() -> None:
    """Stop the decoding pool's processes (if any)."""
    with _LOCK:
        _shutdown_locked()


def _shutdown_locked() -> None:
    if _POOL:
        pool, pid = _POOL["pool"], _POOL["pid"]
        _POOL.clear()
        if pid == os.getpid():
            pool.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown_pool)


def effective_workers(workers: int, n_items: int, chunk_size: int | None = None) -> int:
    """No more processes than chunks of work: a handful of files is decoded here, without starting a pool."""
    chunks = -(-n_items // (chunk_size or CHUNK_SIZE))
    return max(1, min(workers, chunks))


def chunked(items: Iterable[T], size: int | None = None) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (default ``CHUNK_SIZE``), lazily."""
    size = size or CHUNK_SIZE
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def allocate_images(shape: tuple[int, ...], *, memory_budget_mb: float, memmap_dir: str | None = None) -> np.ndarray:
    """A zero-filled uint8 array of ``shape``: in memory up to ``memory_budget_mb``, above it a ``numpy.memmap``
    over a temporary ``.npy`` file in ``memmap_dir`` (default: the system's temporary folder).

    The file is a complete ``.npy`` (``np.lib.format.open_memmap``), so ``NpyDataset`` saves it by copying the
    file, never holding it in memory, and it is deleted once the array is no longer used.
    """
    nbytes = int(np.prod(shape, dtype=np.int64))
    if nbytes <= memory_budget_mb * 1024 * 1024:
        return _zeros(shape, nbytes)
    fd, path = tempfile.mkstemp(prefix="partmatch-images-", suffix=".npy", dir=memmap_dir)
    os.close(fd)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=tuple(shape))
    weakref.finalize(array, _remove, path)
    logger.info("Image array %s = %.0f MB > preprocessing.memory_budget_mb %g: memory-mapped at %s.", shape,
                nbytes / 2**20, memory_budget_mb, path)
    return array


# Arrays from this size on are backed by transparent huge pages where the kernel offers them (madvise mode):
# first-touch page faults on 4 kB pages cost ~50 us each on these VMs, i.e. 0.8 s to fill the car parts' 64 MB
# array row by row, against 0.05 s on 2 MB pages.
HUGEPAGE_MIN_BYTES = 8 << 20


def _zeros(shape: tuple[int, ...], nbytes: int) -> np.ndarray:
    """A zero-filled uint8 array; a large one in anonymous memory advised to use huge pages (same values)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or nbytes < HUGEPAGE_MIN_BYTES:
        return np.zeros(shape, dtype=np.uint8)
    buffer = mmap.mmap(-1, nbytes)  # anonymous: zero-filled, unmapped when the array is freed
    try:
        buffer.madvise(advice)
    except OSError:  # huge pages disabled ("never"): ordinary pages
        pass
    return np.frombuffer(buffer, dtype=np.uint8, count=nbytes).reshape(shape)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def keep_rows(array: np.ndarray, keep: list[int], *, memory_budget_mb: float,
              memmap_dir: str | None = None) -> np.ndarray:
    """Rows ``keep`` (ascending) of ``array``, in order, without a second full copy in memory.

    All rows kept: ``array`` itself. In memory: the rows are moved down in place and a view of the first
    ``len(keep)`` is returned. A memmap: the rows are copied, a block at a time, into a new file of the exact size.
    """
    if len(keep) == len(array) and keep == list(range(len(array))):
        return array
    if not isinstance(array, np.memmap):
        for j, i in enumerate(keep):
            if i != j:
                array[j] = array[i]
        return array[: len(keep)]
    out = allocate_images((len(keep), *array.shape[1:]), memory_budget_mb=memory_budget_mb, memmap_dir=memmap_dir)
    block = 1024
    for start in range(0, len(keep), block):
        rows = keep[start:start + block]
        out[start:start + len(rows)] = array[rows]
    if isinstance(out, np.memmap):
        out.flush()
    return out
