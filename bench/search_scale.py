"""Gallery search at scale: exact vs approximate (HNSW, IVF) partmatch.ml.retrieval.GalleryIndex.

    python bench/search_scale.py                                  # 10k, 100k, 1M vectors of dim 1280
    python bench/search_scale.py --sizes 10000,100000 --only exact,hnsw --threads 2 --out bench/results/x.md

For each gallery size N: synthetic clustered float32 vectors (``--clusters`` part lines, Gaussian around random
centres, the model's embedding size ``--dim``; fresh query vectors from the same distribution), then for each
index kind (``--only``; exact = faiss brute force, the engine below ``exact_max``):

* build: seconds to construct the ``GalleryIndex`` (the approximate kinds build their faiss index);
* memory: the index's vectors (N x D x 4 bytes, held by every kind) + the resident-memory growth while
  building (the faiss graph / cells, a second copy of the vectors for HNSW / IVF);
* latency of ``GalleryIndex.search(k=10)``: one query at a time and batches of 64, p50 / p99 over the
  timed calls (each kind gets the same query vectors; timing stops after ``--budget`` seconds per
  measurement, at least 5 calls);
* recall@10 of the approximate kinds against the exact result of the same queries (``--recall-queries``);
* ratios against exact measured in the same run: build, single-query p50 and batch p50 speed-ups.

faiss runs ``--threads`` OpenMP threads (default 2) with ``OMP_WAIT_POLICY=PASSIVE``. Memory: 1M x 1280
float32 is 5.1 GB for the vectors, about twice that with an approximate index; the exact kind only times
the queries (there is nothing to build).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before faiss loads its OpenMP runtime

import argparse  # noqa: E402
import gc  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from benchlib import rss_bytes  # noqa: E402

from partmatch.ml.retrieval import GalleryIndex, IndexConfig  # noqa: E402

K = 10
BATCH = 64


def clustered(n: int, dim: int, centres: np.ndarray, basis: np.ndarray, seed: int, spread: float,
              noise: float) -> tuple[np.ndarray, np.ndarray]:
    """n vectors around the centres (uniform cluster choice): centre + spread * (intrinsic Gaussian mapped
    through ``basis``, r x dim) + noise * isotropic Gaussian. Generated in chunks to bound peak memory."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(centres), n)
    x = np.empty((n, dim), dtype=np.float32)
    step = 50_000
    for s in range(0, n, step):
        e = min(n, s + step)
        x[s:e] = rng.standard_normal((e - s, dim), dtype=np.float32)
        x[s:e] *= noise
        x[s:e] += spread * (rng.standard_normal((e - s, len(basis)), dtype=np.float32) @ basis)
        x[s:e] += centres[labels[s:e]]
    return x, labels


def timed(fn, calls: list, budget_s: float, min_calls: int) -> np.ndarray:
    """Seconds per call of fn(arg) for the args in ``calls``, stopping after ``budget_s`` (>= min_calls)."""
    out = []
    start = time.perf_counter()
    for i, arg in enumerate(calls):
        t0 = time.perf_counter()
        fn(arg)
        out.append(time.perf_counter() - t0)
        if i + 1 >= min_calls and time.perf_counter() - start > budget_s:
            break
    return np.asarray(out)


def measure(kind: str, x: np.ndarray, labels: np.ndarray, queries: np.ndarray, recall_q: np.ndarray,
            args: argparse.Namespace, truth: np.ndarray | None) -> tuple[dict, np.ndarray]:
    n = len(x)
    config = IndexConfig(exact_max=n) if kind == "exact" else IndexConfig.from_dict(
        {"exact_max": 0, "approximate": kind, **args.index_overrides})
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    index = GalleryIndex(x, labels, ids=np.arange(n), config=config)
    build = time.perf_counter() - t0
    grown = max(0, rss_bytes() - rss0)
    assert index.kind == kind, index.kind
    index.search(queries[:BATCH], K)  # warm-up
    single = timed(lambda i: index.search(queries[i : i + 1], K), list(range(args.single_queries)), args.budget,
                   args.min_calls)
    batches = [i * BATCH for i in range(len(queries) // BATCH)]
    batch = timed(lambda s: index.search(queries[s : s + BATCH], K), batches, args.budget, args.min_calls)
    found = np.concatenate([index.search(recall_q[s : s + 256], K).positions for s in range(0, len(recall_q), 256)])
    recall = 1.0 if truth is None else float(np.mean([
        len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(found, truth, strict=True)]))
    row = {
        "n": n, "kind": kind, "build_s": build,
        "memory_mb": (x.nbytes + grown) / 1e6,
        "single_p50_ms": 1e3 * np.percentile(single, 50), "single_p99_ms": 1e3 * np.percentile(single, 99),
        "n_single": len(single),
        "batch_p50_ms": 1e3 * np.percentile(batch, 50), "batch_p99_ms": 1e3 * np.percentile(batch, 99),
        "n_batch": len(batch), "recall_at_10": recall,
        "detail": (f"M={index.config.hnsw_m}, efC={index.config.ef_construction}, efS={index.config.ef_search}"
                   if kind == "hnsw" else
                   f"nlist={index._faiss.nlist}, nprobe={index._faiss.nprobe}" if kind == "ivf" else "brute force"),
    }
    del index
    gc.collect()
    return row, found


def table(rows: list[dict]) -> str:
    head = ("| N | index | build s | memory MB | 1 query p50 / p99 ms | batch 64 p50 / p99 ms | recall@10 vs exact "
            "| speed-up vs exact: 1 query / batch 64 | settings |")
    lines = [head, "|" + "---|" * 9]
    exact = {r["n"]: r for r in rows if r["kind"] == "exact"}
    for r in rows:
        e = exact.get(r["n"])
        if e is not None and r["kind"] != "exact":
            ratio = f"{e['single_p50_ms'] / r['single_p50_ms']:.1f}x / {e['batch_p50_ms'] / r['batch_p50_ms']:.1f}x"
        else:
            ratio = "1.0x / 1.0x" if r["kind"] == "exact" else "n/a (no exact run)"
        recall = f"{r['recall_at_10']:.4f}" if r["kind"] != "exact" else "1 (reference)"
        lines.append(
            f"| {r['n']:,} | {r['kind']} | {r['build_s']:.2f} | {r['memory_mb']:,.0f} | "
            f"{r['single_p50_ms']:.2f} / {r['single_p99_ms']:.2f} (n={r['n_single']}) | "
            f"{r['batch_p50_ms']:.1f} / {r['batch_p99_ms']:.1f} (n={r['n_batch']}) | {recall} | {ratio} | "
            f"{r['detail']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated gallery sizes")
    p.add_argument("--dim", type=int, default=1280, help="embedding size (EfficientNet-B0 features: 1280)")
    p.add_argument("--only", default="exact,hnsw,ivf", help="comma-separated index kinds to measure")
    p.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads")
    p.add_argument("--clusters", type=int, default=1000, help="synthetic part lines")
    p.add_argument("--spread", type=float, default=0.5,
                   help="within-cluster std per dimension along the intrinsic directions (centres: std 1)")
    p.add_argument("--intrinsic-dim", type=int, default=32,
                   help="within-cluster variation lives in this many random directions (real embeddings are "
                        "far from isotropic); 0 = isotropic only")
    p.add_argument("--noise", type=float, default=0.05, help="isotropic noise std per dimension")
    p.add_argument("--single-queries", type=int, default=300)
    p.add_argument("--batch-queries", type=int, default=64 * 20, help="query vectors for the batch timing")
    p.add_argument("--recall-queries", type=int, default=500)
    p.add_argument("--budget", type=float, default=20.0, help="seconds per latency measurement (>= 5 calls)")
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default: the IndexConfig default)")
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--ef-search", type=int, default=None)
    p.add_argument("--min-calls", type=int, default=5, help="timed calls per measurement at least")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    args.index_overrides = {key: val for key, val in
                            (("nlist", args.nlist), ("nprobe", args.nprobe), ("ef_search", args.ef_search))
                            if val is not None}
    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    bad = set(kinds) - {"exact", "hnsw", "ivf"}
    if bad:
        p.error(f"--only: unknown kind(s) {sorted(bad)}; choose from exact, hnsw, ivf")
    faiss.omp_set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    r = max(args.intrinsic_dim, 0)
    basis = (rng.standard_normal((r, args.dim), dtype=np.float32) / np.sqrt(max(r, 1))
             if r else np.zeros((0, args.dim), np.float32))  # each output dim gets variance spread^2
    gen = dict(dim=args.dim, centres=centres, basis=basis, spread=args.spread, noise=args.noise)
    queries, _ = clustered(max(args.batch_queries, args.single_queries, BATCH), seed=args.seed + 1, **gen)
    recall_q = queries[: args.recall_queries]
    rows: list[dict] = []
    print(f"# search_scale: dim={args.dim}, threads={args.threads}, k={K}, clusters={args.clusters}, "
          f"faiss {faiss.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs", flush=True)
    for n in sizes:
        t0 = time.perf_counter()
        x, labels = clustered(n, seed=args.seed + 2 + n, **gen)
        print(f"## N={n:,}: data generated in {time.perf_counter() - t0:.1f} s", flush=True)
        truth = None
        for kind in (["exact"] if "exact" in kinds else []) + [k for k in kinds if k != "exact"]:
            if kind != "exact" and truth is None:  # recall reference without timing the exact kind
                exact = GalleryIndex(x, labels, config=IndexConfig(exact_max=n))
                truth = np.concatenate([exact.search(recall_q[s : s + 256], K).positions
                                        for s in range(0, len(recall_q), 256)])
                del exact
            row, found = measure(kind, x, labels, queries, recall_q, args, truth)
            if kind == "exact":
                truth = found
            rows.append(row)
            print(table([r for r in rows if r["n"] == n]).splitlines()[-1], flush=True)
            if args.out:  # after every row: a run stopped early keeps what it measured
                write(args.out, args, rows)
        del x, labels
        gc.collect()
    print("\n" + write(args.out, args, rows), flush=True)
    return 0


def write(path: Path | None, args: argparse.Namespace, rows: list[dict]) -> str:
    text = (f"dim {args.dim}, k {K}, {args.clusters} synthetic clusters (spread {args.spread} along "
            f"{args.intrinsic_dim} directions + {args.noise} isotropic), faiss {faiss.__version__}, "
            f"{args.threads} threads, {os.cpu_count()} CPUs ({platform.machine()})\n\n" + table(rows))
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
