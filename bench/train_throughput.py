"""One training step of the study CNN on the CPU: a naive JPEG-decoding loop against the project's engine, and
the engine's achieved GFLOP/s against the machine's fp32 matmul peak (issue 11).

    python bench/train_throughput.py             # 2 threads, batch 64, 100x100 grey, 5 repeats of 8 steps
    python bench/train_throughput.py --quick     # 3 repeats of 5 steps, fewer variants (~2 min)
    python bench/train_throughput.py --threads 2 --batch 64 --steps 8 --repeats 5 --source PATH

Model: the study's trunk (``StudyCNN``: conv3x3(32)-pool-ReLU-conv3x3(64)-pool-ReLU) with the classifier head of
the ``cnn`` pipeline (``build_model("classifier", ...)``, 40 car-part categories), cross-entropy, Adam (lr 5e-4).

(a) naive: a ``torch.utils.data.DataLoader`` (``num_workers=0``, shuffled) over the shared car-part JPEGs whose
    ``__getitem__`` decodes the file with PIL every time (grey, resized to 100x100, scaled to [-1, 1]); the model in
    PyTorch's default layout (NCHW), ``loss.backward(); optimizer.step()``.
(b) the engine: ``partmatch.ml.training.fit`` as the pipelines call it (``TrainConfig`` defaults: channels_last,
    no augmentation, ``amp`` = CUDA only) on the preprocessed uint8 array, the same objective
    (``objectives.build_objective("cross_entropy")``); images/s is the engine's own per-epoch figure (the step
    loop only: batch assembly from the uint8 array, forward, backward, Adam), each repeat one epoch of ``--steps``
    steps.

Also printed: the step's FLOPs (forward + backward, ``torch.utils.flop_counter.FlopCounterMode``), (b)'s achieved
GFLOP/s and its fraction of the fp32 matmul peak (``torch.mm`` ``--mm``^3 on the same threads, best of 5), and a
table of variants of (b) tried to find what limits it (threads, layout, batch size, oneDNN off, bf16 autocast,
``torch.compile``, the engine without ``cpu_heap_reuse``); only what helps and changes no result is in the
engine.

Medians of ``--repeats``; variants are interleaved per repeat so that load on the (shared) machine hits all of
them alike. Numbers on a busy machine are noisy: read the ratios, re-run in a quiet window.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchlib import matmul_peak

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "datasets" / "carparts"
SIZE = 100


class JpegFolder(torch.utils.data.Dataset):
    """The naive way: decode, grey, resize, normalise with PIL in ``__getitem__``, every time."""

    def __init__(self, files: list[Path], labels: np.ndarray):
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            arr = np.asarray(img.convert("L").resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
        return torch.from_numpy(arr / 127.5 - 1.0)[None], int(self.labels[i])


def build(num_classes: int, seed: int = 0):
    from partmatch.ml.models import build_model

    torch.manual_seed(seed)
    return build_model("classifier", num_classes=num_classes, embedding_dim=64, in_channels=1, image_size=SIZE)


def naive_images_per_second(files, labels, num_classes, batch, steps, workers=0) -> tuple[float, float]:
    model = build(num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    loader = torch.utils.data.DataLoader(JpegFolder(files, labels), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True)
    it = iter(loader)
    x, y = next(it)  # warm-up step, not timed
    F.nll_loss(model(x), y).backward()
    optimizer.step()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        x, y = next(it)
        optimizer.zero_grad()
        F.nll_loss(model(x), y).backward()
        optimizer.step()
    return _rates(batch * steps, start, cpu, cpu_counts=workers == 0)


def engine_images_per_second(images, labels, num_classes, batch, steps, channels_last=True,
                             heap_reuse=True, cpu_bf16=False) -> tuple[float, float]:
    from partmatch.ml.data import InMemoryImages
    from partmatch.ml.training import TrainConfig, fit
    from partmatch.ml.objectives import build_objective

    model = build(num_classes)
    objective = build_objective("cross_entropy", {}, num_classes=num_classes, embedding_dim=num_classes)
    config = TrainConfig(epochs=1, batch_size=batch, lr=5e-4, patience=None, device="cpu", progress=False,
                         max_batches_per_epoch=steps + 1, channels_last=channels_last, cpu_bf16=cpu_bf16)
    data = InMemoryImages(images, labels)
    cpu = time.process_time()
    result = (fit if heap_reuse else fit.__wrapped__)(model, objective, data, None, config)
    cpu_ips = batch * (steps + 1) / (time.process_time() - cpu) * torch.get_num_threads()
    return result.history[0]["images_per_second"], cpu_ips


def manual_step_images_per_second(images, labels, num_classes, batch, steps, bf16=False,
                                  compiled=False) -> tuple[float, float]:
    """The engine's step (same batch assembly, channels_last, Adam) written out, with what the engine does not
    do: bf16 autocast on the CPU, ``torch.compile``."""
    from partmatch.ml.data import InMemoryImages

    data = InMemoryImages(images, labels)
    model = build(num_classes).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    forward = torch.compile(model) if compiled else model
    rng = np.random.default_rng(0)

    def step():
        x, y = data.batch(rng.integers(0, len(data), batch))
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.nll_loss(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    from partmatch.ml.training import cpu_heap_reuse

    with cpu_heap_reuse():  # as fit does
        step()
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        return _rates(batch * steps, start, cpu)


def _rates(images: int, start: float, cpu: float, cpu_counts: bool = True) -> tuple[float, float]:
    """(wall images/s, cpu-based images/s = images per CPU-second of this process x threads)."""
    wall = images / (time.perf_counter() - start)
    cpu_ips = images / (time.process_time() - cpu) * torch.get_num_threads() if cpu_counts else float("nan")
    return wall, cpu_ips


def step_flops(num_classes: int, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = build(num_classes)
    x, y = torch.randn(batch, 1, SIZE, SIZE), torch.randint(0, num_classes, (batch,))
    with FlopCounterMode(display=False) as counter:
        F.nll_loss(model(x), y).backward()
    return counter.get_total_flops() / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mm", type=int, default=2048)
    ap.add_argument("--compile", action="store_true", help="also try torch.compile (slow first step)")
    ap.add_argument("--quick", action="store_true", help="3 repeats of 5 steps, the main variants only")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats = 5, 3
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from partmatch.imaging import preprocess_bytes

    files = sorted(args.source.glob("*/*/*.jpg"))
    if not files:
        raise SystemExit(f"no photos under {args.source}/<split>/<category>/*.jpg: pass --source")
    names = [f.parent.name for f in files]
    classes = sorted(set(names))
    labels = np.array([classes.index(n) for n in names])
    # the preprocessed uint8 array the engine trains from (the preprocessing pipeline's own function)
    n_engine = min(len(files), 2048)
    pick = np.linspace(0, len(files) - 1, n_engine).astype(int)
    images = np.stack([preprocess_bytes(files[i].read_bytes(), image_size=SIZE, color_mode="grayscale")
                       for i in pick])
    engine_labels = labels[pick]
    k = len(classes)
    b, s = args.batch, args.steps

    variants: dict[str, callable] = {
        "(a) naive: PIL decode in DataLoader (0 workers), NCHW": lambda: naive_images_per_second(files, labels, k, b,
                                                                                                  s),
        "(b) engine fit (channels_last, fp32)": lambda: engine_images_per_second(images, engine_labels, k, b, s),
        "    engine fit, channels_last=False (NCHW)": lambda: engine_images_per_second(images, engine_labels, k, b, s,
                                                                                     channels_last=False),
        "    engine fit without cpu_heap_reuse (a fresh mmap per big tensor)": lambda: engine_images_per_second(
            images, engine_labels, k, b, s, heap_reuse=False),
        "(b') engine fit, cpu_bf16=true (opt-in parameter)": lambda: engine_images_per_second(
            images, engine_labels, k, b, s, cpu_bf16=True),
    }
    if not args.quick:
        variants.update({
            "(a) naive, DataLoader with 2 workers": lambda: naive_images_per_second(files, labels, k, b, s, workers=2),
            "    engine fit, 1 thread": lambda: _threads(1, engine_images_per_second, images, engine_labels, k, b, s),
            "    engine fit, batch 32": lambda: engine_images_per_second(images, engine_labels, k, 32, 2 * s),
            "    engine fit, batch 128": lambda: engine_images_per_second(images, engine_labels, k, 128, max(s // 2, 2)),
            "    engine fit, oneDNN (mkldnn) off": lambda: _no_mkldnn(engine_images_per_second, images, engine_labels,
                                                                        k, b, s),
        })
    if args.compile:
        variants["    engine step + torch.compile (not in the engine)"] = lambda: manual_step_images_per_second(
            images, engine_labels, k, b, s, compiled=True)

    peak, peak_cpu = matmul_peak(args.mm)
    flops = step_flops(k, b)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            results[name].append(fn())
    med = {name: statistics.median(w for w, _ in v) for name, v in results.items()}
    med_cpu = {name: statistics.median(c for _, c in v) for name, v in results.items()}
    naive, engine = med["(a) naive: PIL decode in DataLoader (0 workers), NCHW"], med[
        "(b) engine fit (channels_last, fp32)"]

    print(f"torch {torch.__version__}, {args.threads} threads, batch {b}, {SIZE}x{SIZE} grey, {k} classes, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"fp32 matmul peak ({args.mm}^3 torch.mm, best of 5): {peak:.0f} GFLOP/s ({peak_cpu:.0f} cpu-based); "
          f"one training step = "
          f"{flops / 1e6:.1f} MFLOP per image (forward + backward)")
    print("cpu-based = images per CPU-second of this process x threads (what the threads reach with the cores to "
          "themselves; robust to other load; n/a with DataLoader worker processes)")
    print(f"\n{'variant':56s} {'img/s':>7} {'GFLOP/s':>8} {'of peak':>8} {'vs (a)':>7} {'cpu-based':>9} {'vs (a)':>7}"
          "   repeats (wall)")
    naive_cpu = med_cpu["(a) naive: PIL decode in DataLoader (0 workers), NCHW"]
    for name, v in med.items():
        gf = v * flops / 1e9
        c = med_cpu[name]
        print(f"{name:56s} {v:7.0f} {gf:8.1f} {gf / peak:8.1%} {v / naive:6.2f}x {c:9.0f} {c / naive_cpu:6.2f}x   "
              + " ".join(f"{w:.0f}" for w, _ in results[name]))
    engine_cpu = med_cpu["(b) engine fit (channels_last, fp32)"]
    print(f"\n(b) / (a) = {engine / naive:.2f}x wall, {engine_cpu / naive_cpu:.2f}x cpu-based (target >= 3x); (b) "
          f"achieves {engine * flops / 1e9:.0f} GFLOP/s = {engine * flops / 1e9 / peak:.0%} of the fp32 matmul peak "
          f"({engine_cpu * flops / 1e9:.0f} GFLOP/s = {engine_cpu * flops / 1e9 / peak_cpu:.0%} of {peak_cpu:.0f} cpu-based)")
    bf16_name = "(b') engine fit, cpu_bf16=true (opt-in parameter)"
    if bf16_name in med:
        print(f"(b') / (a) = {med[bf16_name] / naive:.2f}x wall with <model>.cpu_bf16=true (off by default: bf16 "
              "moves the numbers a little; see the README)")


def _threads(n, fn, *a):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn(*a)
    finally:
        torch.set_num_threads(old)


def _no_mkldnn(fn, *a):
    with torch.backends.mkldnn.flags(enabled=False):
        return fn(*a)


if __name__ == "__main__":
    main()
