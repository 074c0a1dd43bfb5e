"""How time and peak memory grow with the data: ingestion + preprocessing, and the retrieval metrics (issue 11).

    python bench/growth.py                 # data at 1x, 4x, 16x the demo catalogue; metrics at 1k, 10k, 100k
    python bench/growth.py --quick         # data at 1x, 4x; metrics at 1k, 10k (~1 minute)
    python bench/growth.py --workers 2     # the data pipelines on 2 processes (default 1: one core's growth)

Data: the demo catalogue (``partmatch.demo``, seed 0, 128 px: JPEG, PNG with alpha, palette PNG, CMYK, EXIF-rotated,
a duplicate under two categories, a truncated file) is rendered once and replicated m times into a temporary
catalogue: copy r of every photo is written into the same category as ``r<r>_<name>`` with ``r`` appended after
the image data (ignored by the decoders), so every copy is a distinct file with distinct bytes and the cleaning
rules treat each replica exactly as the original (the duplicate pair stays a pair per replica, the truncated file
stays truncated). Timed: ``scan_and_decode`` -> ``clean_manifest`` -> ``preprocess_images`` as the pipelines call
them (listing the source and saving are not timed).

Metrics: ``partmatch.ml.evaluation.retrieval_metrics`` leave-one-out (N queries against the other N - 1, as the
open-set evaluation calls it; the closed-set call, test against train, is smaller) on N random 64-d embeddings in
N / 20 classes of 20 (so R-precision / MAP@R look 19 deep at every size). It searches neighbours with the exact
``GalleryIndex`` (faiss, blocked) and keeps (N, k) arrays only: no dense N x N matrix.

Each measurement runs in a fresh child process: time is the wall time of the work, memory the growth of the
child's peak resident set (``ru_maxrss``) over its resident set just before the work (imports, the listed
source or the embeddings already in memory). The growth exponent is the slope of log(time) or log(memory)
against log(size) (1 = linear). The machine is shared: times are noisy; re-run in a quiet window.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib import rss_bytes


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


# ------------------------------------------------------------------------------------------------- children
def child_data(catalogue: str, workers: int) -> dict:
    from partmatch.datasets import ImageSourceDataset
    from partmatch.pipelines.ingestion.nodes import clean_manifest, scan_and_decode
    from partmatch.pipelines.preprocessing.nodes import preprocess_images

    source = ImageSourceDataset(path=catalogue).load()
    ingestion = {"workers": workers}
    records = source.records
    source.records = records.iloc[:40]       # warm-up: lazy imports and decoder set-up are not growth
    raw, quarantine, decoded = scan_and_decode(source, ingestion, {})
    preprocess_images(source, clean_manifest(raw, quarantine, {"min_images_per_class": 1})[0], {}, decoded, ingestion)
    source.records = records
    del raw, quarantine, decoded
    before = rss_bytes()
    t0 = time.perf_counter()
    raw, quarantine, decoded = scan_and_decode(source, ingestion, {})
    clean, _ = clean_manifest(raw, quarantine, ingestion)
    images, _ = preprocess_images(source, clean, {}, decoded, ingestion)
    seconds = time.perf_counter() - t0
    return {"files": len(source.records), "images": len(images), "array_mb": images.nbytes / 2**20,
            "decoded_mb": decoded.nbytes / 2**20, "seconds": seconds, "peak_growth": peak_bytes() - before}


def child_metrics(n: int) -> dict:
    from partmatch.ml.evaluation import retrieval_metrics

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n, 64)).astype(np.float32)
    labels = np.arange(n) // 20
    retrieval_metrics(emb[:200], labels[:200])   # warm-up: lazy imports, thread pools
    before = rss_bytes()
    t0 = time.perf_counter()
    metrics = retrieval_metrics(emb, labels)
    seconds = time.perf_counter() - t0
    return {"n": n, "seconds": seconds, "peak_growth": peak_bytes() - before,
            "dense_nxn_mb": n * n * 4 / 2**20, "precision_at_1": metrics["precision_at_1"]}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------- catalogues
def replicate(demo: Path, out: Path, copies: int) -> int:
    """``copies`` distinct-bytes replicas of every demo photo, in the same categories; returns the file count."""
    n = 0
    for file in sorted(p for p in demo.rglob("*") if p.is_file()):
        data = file.read_bytes()
        folder = out / file.parent.relative_to(demo)
        folder.mkdir(parents=True, exist_ok=True)
        for r in range(copies):
            (folder / f"r{r}_{file.name}").write_bytes(data + (b"" if r == 0 else f"replica {r}".encode()))
            n += 1
    return n


def exponent(sizes: list[float], values: list[float]) -> str:
    """The fitted slope of log(value) on log(size), and the slope between the two largest sizes."""
    x, y = np.log(np.asarray(sizes, float)), np.log(np.maximum(np.asarray(values, float), 1e-9))
    fit = float(np.polyfit(x, y, 1)[0])
    last = float((y[-1] - y[-2]) / (x[-1] - x[-2]))
    return f"{fit:.2f} (largest two sizes: {last:.2f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="data at 1x and 4x, metrics at 1k and 10k")
    ap.add_argument("--scales", default="1,4,16", help="demo catalogue multiples (default 1,4,16)")
    ap.add_argument("--sizes", default="1000,10000,100000", help="embeddings for the metrics")
    ap.add_argument("--workers", type=int, default=1, help="ingestion.workers of the data runs (default 1)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        result = child_data(rest[0], int(rest[1])) if kind == "data" else child_metrics(int(rest[0]))
        print(json.dumps(result))
        return 0
    scales = [1, 4] if args.quick else [int(s) for s in args.scales.split(",")]
    sizes = [1000, 10000] if args.quick else [int(s) for s in args.sizes.split(",")]
    print(f"cores: {os.cpu_count()}, load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"data workers: {args.workers}")

    from partmatch.demo import generate_demo_catalogue

    tmp = Path(tempfile.mkdtemp(prefix="partmatch-growth-"))
    try:
        demo = tmp / "demo"
        generate_demo_catalogue(demo, seed=0)
        rows = []
        for m in scales:
            catalogue = tmp / f"x{m}"
            files = replicate(demo, catalogue, m)
            r = run_child("data", str(catalogue), str(args.workers))
            rows.append((m, files, r))
            shutil.rmtree(catalogue)
        print("\ningestion + preprocessing (scan_and_decode -> clean_manifest -> preprocess_images)")
        print(f"{'scale':>5} {'files':>7} {'images':>7} {'seconds':>8} {'files/s':>8} {'peak MB':>8} "
              f"{'arrays MB':>9}")
        for m, files, r in rows:
            print(f"{m:>4}x {files:>7} {r['images']:>7} {r['seconds']:>8.2f} {files / r['seconds']:>8.0f} "
                  f"{r['peak_growth'] / 2**20:>8.1f} {r['array_mb'] + r['decoded_mb']:>9.1f}")
        if len(rows) > 1:
            n = [f for _, f, _ in rows]
            print(f"growth exponents (1 = linear): time {exponent(n, [r['seconds'] for *_, r in rows])}, "
                  f"peak memory {exponent(n, [r['peak_growth'] for *_, r in rows])}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    metric_rows = [run_child("metrics", str(n)) for n in sizes]
    print("\nretrieval_metrics, leave-one-out, 64-d random embeddings, classes of 20")
    print(f"{'N':>7} {'seconds':>8} {'peak MB':>8} {'dense NxN float32 would be MB':>30}")
    for r in metric_rows:
        print(f"{r['n']:>7} {r['seconds']:>8.2f} {r['peak_growth'] / 2**20:>8.1f} {r['dense_nxn_mb']:>30.0f}")
    if len(metric_rows) > 1:
        n = [r["n"] for r in metric_rows]
        print(f"growth exponents: time {exponent(n, [r['seconds'] for r in metric_rows])} (exact kNN is N^2 "
              f"work), peak memory {exponent(n, [r['peak_growth'] for r in metric_rows])} (1 = linear, 2 = a "
              "dense N x N matrix)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
