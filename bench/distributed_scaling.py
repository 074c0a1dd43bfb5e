"""Training images/s on 1 and 2 processes (torch.distributed, gloo, this machine's CPU cores), and the share of a
step spent communicating (issue 12).

    python bench/distributed_scaling.py                  # 3 repeats of an epoch of 12 steps, batch 64, 100 px grey
    python bench/distributed_scaling.py --steps 6 --repeats 2 --batch 128

Workload: the study trunk with a 64-d embedding head and the ``siamese_triplet`` objective (semi-hard triplets of
class-balanced batches, 16 classes x 4), as ``kedro run --pipeline=siamese_triplet`` trains it, on 100x100 grey
uint8 images (pixel values do not change the speed of a step; 2,048 images of 40 classes). Each configuration
trains one epoch of ``--steps`` global batches through ``partmatch.ml.training.fit`` (the same loop the pipelines
use; under ``distributed.launch`` for N > 1); images/s is the loop's own figure, all processes together.

Rows: 1 process with all cores (what a plain ``kedro run`` does), 1 process with 1 thread, 2 processes with 1 thread
each (``nproc_per_node: 2``). The communication share is measured inside the 2-process run: the median time of
the step's two collectives alone — the all-gather of the batch's embeddings and DDP's all-reduce of the gradients
(one flat tensor of all trainable parameters) — over the median step time. Process start-up (spawning, imports,
rendezvous) is reported separately: it is paid once per training, not per step.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import statistics
import time

import numpy as np
import torch

N_IMAGES, N_CLASSES, SIZE = 2048, 40, 100


def _data(seed: int = 0):
    from partmatch.ml.data import InMemoryImages

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(N_IMAGES, 1, SIZE, SIZE), dtype=np.uint8)
    return InMemoryImages(images, np.arange(N_IMAGES) % N_CLASSES)


def _fit_once(job: dict) -> dict:
    """One epoch of ``job['steps']`` steps; in a process group also times the step's collectives alone."""
    import torch.distributed as dist

    from partmatch.ml.models import build_model
    from partmatch.ml.objectives import build_objective
    from partmatch.ml.training import TrainConfig, distributed, fit, seed_everything

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    seed_everything(0)
    model = build_model("embedding", num_classes=N_CLASSES, embedding_dim=64, in_channels=1, image_size=SIZE,
                        normalize=True)
    objective = build_objective("triplet", {"sampling": "semihard", "margin": 0.2, "m_per_class": 4}, N_CLASSES, 64)
    config = TrainConfig(epochs=1, batch_size=job["batch"], max_batches_per_epoch=job["steps"], device="cpu",
                         progress=False, patience=None)
    result = fit(model, objective, _data(), None, config)
    out = {"images_per_second": result.history[0]["images_per_second"],
           "step_seconds": result.history[0]["seconds"] / job["steps"]}
    if distributed.is_active():
        grads = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad))
        local = torch.zeros(job["batch"] // distributed.world_size(), 64)
        timings = {"all_reduce": [], "all_gather": []}
        for _ in range(10):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(grads)
            timings["all_reduce"].append(time.perf_counter() - t0)
            dist.barrier()
            t0 = time.perf_counter()
            distributed.Shard(job["batch"], distributed.rank(), distributed.world_size()).gather(local)
            timings["all_gather"].append(time.perf_counter() - t0)
        out.update({k: statistics.median(v) for k, v in timings.items()})
        out["gradient_mb"] = grads.numel() * 4 / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from partmatch.ml.training import distributed

    cores = os.cpu_count() or 1
    rows: dict[str, list[dict]] = {f"1 process, {cores} threads": [], "1 process, 1 thread": [],
                                   "2 processes, 1 thread each": []}
    startup = []
    job = {"steps": args.steps, "batch": args.batch}
    for r in range(args.repeats):  # interleaved: load on the shared machine hits every row alike
        rows[f"1 process, {cores} threads"].append(_fit_once({**job, "threads": cores}))
        rows["1 process, 1 thread"].append(_fit_once({**job, "threads": 1}))
        torch.set_num_threads(cores)
        t0 = time.perf_counter()
        results = distributed.launch(_fit_once, job, distributed.DistributedConfig(nproc_per_node=2, timeout_s=120),
                                     torch.device("cpu"))
        total = time.perf_counter() - t0
        rows["2 processes, 1 thread each"].append(results[0])
        startup.append(total - results[0]["step_seconds"] * args.steps)
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)

    base = statistics.median(x["images_per_second"] for x in rows[f"1 process, {cores} threads"])
    print(f"\nTraining images/s, study trunk + siamese_triplet objective, global batch {args.batch}, {SIZE} px grey, "
          f"{args.steps} steps/epoch, medians of {args.repeats} ({cores} cores)\n")
    print(f"{'configuration':<30} {'images/s':>9} {'x 1 process':>12} {'s/step':>8}")
    for name, values in rows.items():
        ips = statistics.median(x["images_per_second"] for x in values)
        step = statistics.median(x["step_seconds"] for x in values)
        print(f"{name:<30} {ips:>9.0f} {ips / base:>11.2f}x {step:>8.3f}")
    two = rows["2 processes, 1 thread each"]
    step = statistics.median(x["step_seconds"] for x in two)
    reduce_s = statistics.median(x["all_reduce"] for x in two)
    gather_s = statistics.median(x["all_gather"] for x in two)
    print(f"\n2 processes: all-reduce of the gradients ({two[0]['gradient_mb']:.2f} MB) {reduce_s * 1e3:.2f} ms, "
          f"all-gather of the embeddings {gather_s * 1e3:.2f} ms: communication {100 * (reduce_s + gather_s) / step:.1f} "
          f"% of a {step * 1e3:.0f} ms step")
    print(f"start-up of the 2 processes (spawn, imports, rendezvous; once per training): "
          f"{statistics.median(startup):.1f} s")


if __name__ == "__main__":
    main()
