"""Training on several processes with PyTorch's own engine: ``torch.distributed`` launched like ``torchrun``.

A model pipeline's training node calls :func:`launch` with a module-level function and a picklable job; PyTorch's
elastic launcher (the engine behind ``torchrun``) starts ``nproc_per_node`` processes on this machine (and joins the
other machines' through the rendezvous endpoint), each runs the function, and the launcher hands back every local
process's return value. A process that fails stops the others and :func:`launch` raises
:class:`DistributedTrainingError` naming the rank and its error; collectives time out after ``timeout_s``.

Inside a process, every rank builds the same seeded *global* batch and trains on its slice
(:meth:`Shard.local`); the embeddings of all slices are gathered in global order (:func:`gather_batch`) so losses,
miners and random pair/triplet sampling see exactly the batch a single process would. The gather keeps the gradient
path of the rank's own slice and multiplies its gradient by the world size, which DistributedDataParallel's gradient
*average* divides back: the model's gradients equal the single-process ones, and the objective's own parameters
(proxies, inside the DDP module with the model) get the single-process gradient too. (pytorch-metric-learning's
``DistributedLossWrapper(efficient=False)`` does the same gather but puts the own rank first, which changes random
sampling per rank, and multiplies the loss by the world size, which multiplies the proxies' gradients.)
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")


class DistributedTrainingError(RuntimeError):
    """A process of a distributed training failed (or could not start); the message names the rank and its error."""


@dataclass(frozen=True)
class DistributedConfig:
    """``<model>.distributed``: how many processes train, and where they meet (torchrun's options)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = "127.0.0.1:29400"  # host:port of node 0, reachable from every node (nnodes > 1)
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    timeout_s: float = 300.0  # a collective waiting longer (a rank hung or gone) fails the run

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError(f"nproc_per_node and nnodes must be >= 1, got {self.nproc_per_node}, {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes), got {self.node_rank} with nnodes={self.nnodes}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> DistributedConfig:
        return cls(**dict(values or {}))


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: nccl for CUDA devices, gloo otherwise; nccl without CUDA is refused."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("backend 'nccl' needs CUDA devices; use backend: gloo (or auto) to train on the CPU")
    return backend


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Rank 0 (or no distributed run): the one process that writes checkpoints, logs and datasets."""
    return rank() == 0


# -------------------------------------------------------------------------------------- one batch, N slices


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


class Shard:
    """This rank's slice of one global batch, and the gather of per-slice outputs back into the global batch."""

    def __init__(self, batch_size: int, rank_: int, world: int):
        self.sizes = [len(part) for part in np.array_split(np.arange(batch_size), world)]
        self.rank, self.world = rank_, world
        self.start = sum(self.sizes[:rank_])

    def local(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(indices)[self.start : self.start + self.sizes[self.rank]]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """All ranks' slices in global order; only this rank's slice carries a gradient, scaled by the world
        size (DDP averages gradients over ranks: the result is the gradient of the global batch's loss)."""
        longest = max(self.sizes)
        padded = local.detach()
        if len(padded) < longest:
            padded = torch.cat([padded, padded.new_zeros((longest - len(padded), *padded.shape[1:]))])
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        parts = [p[:n] for p, n in zip(parts, self.sizes, strict=True)]
        parts[self.rank] = _ScaleGrad.apply(local, float(self.world)) if local.requires_grad else local
        return torch.cat(parts)


_ACTIVE_SHARD: Shard | None = None


@contextlib.contextmanager
def sharded(shard: Shard | None) -> Iterator[None]:
    """Within this context :func:`gather_batch` gathers along ``shard`` (a training step of a distributed run)."""
    global _ACTIVE_SHARD
    previous, _ACTIVE_SHARD = _ACTIVE_SHARD, shard
    try:
        yield
    finally:
        _ACTIVE_SHARD = previous


def gather_batch(local: torch.Tensor) -> torch.Tensor:
    """The global batch's rows of a per-sample tensor (embeddings, reference features) in a distributed step; the
    tensor itself otherwise. Objectives call it on what the model computed from this rank's images."""
    return local if _ACTIVE_SHARD is None else _ACTIVE_SHARD.gather(local)


def gather_rows(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """``fn(rows) -> (len(rows), ...)`` computed on a share of ``rows`` per rank and gathered (validation
    embeddings): every rank gets the whole result, so validation scores agree on every rank."""
    if not is_active():
        return fn

    def sharded_fn(rows: np.ndarray) -> np.ndarray:
        if len(rows) < world_size():  # not a row for every rank: each computes them all
            return fn(rows)
        shard = Shard(len(rows), rank(), world_size())
        local = torch.from_numpy(np.ascontiguousarray(fn(shard.local(rows))))
        backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        return shard.gather(local.to(backend_device)).cpu().numpy()

    return sharded_fn


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the checkpoint a resumed run starts from)."""
    if not is_active():
        return obj
    holder = [obj if is_main() else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# ------------------------------------------------------------------------------------------------ launching


@record  # a failing process writes its error for the launcher (DistributedTrainingError names it)
def _entrypoint(target: Callable[[Any], Any], job: Any, backend: str, timeout_s: float, threads: int,
                on_cuda: bool) -> Any:
    """What every process runs: join the process group, run ``target(job)``, leave the group."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_cuda:
        torch.cuda.set_device(local_rank)  # one GPU per process, whatever the backend
    if threads > 0:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format=f"[rank {os.environ.get('RANK', '0')}] %(levelname)s %(name)s: %(message)s")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        return target(job)
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def launch(target: Callable[[Any], Any], job: Any, config: DistributedConfig, device: torch.device) -> dict[int, Any]:
    """Run ``target(job)`` in ``config.nproc_per_node`` processes of this machine (of ``config.world_size`` in all)
    under PyTorch's elastic launcher (``torchrun``'s engine); return ``{global rank: return value}`` of this
    machine's processes. ``target`` must be a module-level function and ``job`` picklable (processes are spawned).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    backend = resolve_backend(config.backend, device)
    on_cuda = device.type == "cuda"
    if on_cuda and torch.cuda.device_count() < config.nproc_per_node:
        raise DistributedTrainingError(f"nproc_per_node={config.nproc_per_node} processes need as many GPUs; "
                                       f"this machine has {torch.cuda.device_count()}")
    threads = max(1, (os.cpu_count() or 1) // config.nproc_per_node)
    if config.nnodes == 1:  # one machine: a private rendezvous on a port the OS picks (torchrun --standalone)
        rdzv = dict(rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", rdzv_configs={})
    else:  # static ranks: node_rank 0 holds global rank 0 (the one that writes)
        rdzv = dict(rdzv_backend="static", rdzv_endpoint=config.rdzv_endpoint,
                    rdzv_configs={"rank": config.node_rank, "timeout": int(config.timeout_s)})
    launch_config = LaunchConfig(
        min_nodes=config.nnodes, max_nodes=config.nnodes, nproc_per_node=config.nproc_per_node,
        run_id=f"partmatch-{uuid.uuid4().hex[:8]}" if config.nnodes == 1 else "partmatch", max_restarts=0,
        monitor_interval=0.1, start_method="spawn", **rdzv)
    logger.info("Training on %d process(es) (%d per node x %d node(s), this is node %d), backend %s.",
                config.world_size, config.nproc_per_node, config.nnodes, config.node_rank, backend)
    handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS}  # the launcher installs its own; give them back
    try:
        results = elastic_launch(launch_config, _entrypoint)(target, job, backend, config.timeout_s, threads, on_cuda)
    except ChildFailedError as exc:
        raise DistributedTrainingError(_failure_message(exc)) from None
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    return {int(k): v for k, v in results.items()}  # keyed by global rank


_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name))
_COMMUNICATION_ERRORS = ("DistBackendError", "Connection closed by peer", "Connection reset", "timed out", "Timeout")


def _failure_message(exc: Any) -> str:
    """The first failed rank and its error (message and the last lines of its traceback)."""
    failures = getattr(exc, "failures", {}) or {}
    if not failures:
        return f"Distributed training failed: {exc}"
    def text(failure: Any) -> str:
        return str((failure.message or {}).get("message", "")) if isinstance(failure.message, dict) else ""

    # the rank that failed first, a real error before the others' "connection closed" (timestamps are whole seconds)
    failed_rank, first = min(failures.items(), key=lambda item: (
        any(word in text(item[1]) for word in _COMMUNICATION_ERRORS), item[1].timestamp, item[0]))
    data = first.message if isinstance(first.message, dict) else {}
    message = data.get("message") or f"exit code {first.exitcode} (no Python error: killed or os._exit)"
    stack = (data.get("extraInfo") or {}).get("py_callstack", "")
    tail = "\n".join(stack.strip().splitlines()[-6:]) if stack else ""
    return (f"Distributed training failed on rank {failed_rank} (local rank {first.local_rank}, pid {first.pid}, "
            f"exit code {first.exitcode}): {message}; the other processes were stopped."
            + (f"\nRank {failed_rank}'s traceback ends:\n{tail}" if tail else ""))

