"""Re-ranking benchmark: does re-ordering the top-N neighbours help on the car parts, and what does it cost?

    OMP_WAIT_POLICY=PASSIVE nice -n 5 python bench/reranking.py [--source ../shared/datasets/carparts] [--no-trained]

Cleans, preprocesses (100 px grayscale, as the study) and splits the photos with the project's own node
functions (split defaults: seed 42, 20 % of the categories held out as the open set), computes the frozen
EfficientNet-Lite0 features once (``workflow.backbone_features``) and scores two embeddings:

* **frozen features, no training**: the pooled ImageNet features, L2-normalised (cosine distance);
* **recommended head**: ``siamese_pretrained`` exactly as conf/base/parameters_siamese_pretrained.yml sets it,
  trained on the train split's cached features (skip with ``--no-trained``).

For every ``rerank`` mode (``none`` | ``qe`` | ``k_reciprocal`` | ``pairwise``, default arguments of
``partmatch.ml.reranking.RerankConfig``) it reports closed-set (test queries vs the train gallery) and open-set
(leave-one-out over the unseen categories) P@1 and MAP@R through ``evaluation.retrieval_metrics(rerank=...)``
-- the evaluation contract's numbers --, the search time per query (top-10 of the closed-set queries against
the train gallery, best of 3) and the time added by re-ranking, and for ``pairwise`` the one-off training time
of the head (trained on the train split's top-N lists only; the open set is never seen).
Writes the table to bench/results/reranking.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrained_backbone import PROXY, features, index_codes, load, off_the_shelf, recommended  # noqa: E402

from partmatch import config  # noqa: E402
from partmatch.ml import evaluation, workflow  # noqa: E402
from partmatch.ml.reranking import MODES, RerankConfig  # noqa: E402
from partmatch.ml.retrieval import GalleryIndex, IndexConfig, fit_pairwise_reranker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "datasets" / "carparts" / "car parts.csv"
SEARCH_K = 10
REPEATS = 3


def timed_search(index: GalleryIndex, q: np.ndarray, cfg: RerankConfig, reranker) -> float:
    """Best-of-3 wall seconds of one search of every query (top-10, re-ranked with ``cfg``)."""
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        index.search(q, SEARCH_K, rerank=cfg, reranker=reranker)
        best = min(best, time.perf_counter() - t0)
    return best


def score(name: str, emb: np.ndarray, split_index, distance: str) -> list[dict]:
    """Every re-ranking mode on one embedding: metrics and cost."""
    rows = {s: workflow.split_rows(split_index, s) for s in ("train", "test", "open")}
    codes = np.asarray(index_codes(split_index))
    tr, te, op = emb[rows["train"]], emb[rows["test"]], emb[rows["open"]]
    ytr, yte, yop = codes[rows["train"]], codes[rows["test"]], codes[rows["open"]]
    gallery = GalleryIndex(tr, ytr, distance=distance, config=IndexConfig(exact_max=len(tr)))
    out = []
    base_seconds = None
    for mode in MODES:
        cfg = RerankConfig(mode=mode)
        fit_seconds = 0.0
        reranker = None
        if mode == "pairwise":
            t0 = time.perf_counter()
            reranker = fit_pairwise_reranker(tr, ytr, distance, cfg)
            fit_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        closed = evaluation.retrieval_metrics(te, yte, tr, ytr, distance=distance, rerank=cfg, reranker=reranker)
        opened = evaluation.retrieval_metrics(op, yop, prefix="open_set_", distance=distance, rerank=cfg,
                                              reranker=reranker)
        metric_seconds = time.perf_counter() - t0
        seconds = timed_search(gallery, te, cfg, reranker)
        if base_seconds is None:
            base_seconds = seconds
        row = {"embedding": name, "mode": mode, **closed, **opened, "ms_per_query": 1000 * seconds / len(te),
               "added_ms_per_query": 1000 * (seconds - base_seconds) / len(te), "fit_seconds": fit_seconds,
               "metric_seconds": metric_seconds}
        print(f"{name:<28} {mode:<13} closed P@1 {row['precision_at_1']:.4f} MAP@R {row['map_at_r']:.4f} | open "
              f"P@1 {row['open_set_precision_at_1']:.4f} MAP@R {row['open_set_map_at_r']:.4f} | "
              f"{row['ms_per_query']:.2f} ms/query (+{row['added_ms_per_query']:.2f}), fit {fit_seconds:.1f} s, "
              f"metrics {metric_seconds:.1f} s", flush=True)
        if reranker is not None:
            print(f"   pairwise head: {reranker.info}", flush=True)
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| embedding | rerank | closed P@1 | closed MAP@R | open P@1 | open MAP@R | search ms/query | added "
             "ms/query | one-off fit s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['embedding']} | {r['mode']} | {r['precision_at_1']:.4f} | {r['map_at_r']:.4f} | "
                     f"{r['open_set_precision_at_1']:.4f} | {r['open_set_map_at_r']:.4f} | {r['ms_per_query']:.2f} | "
                     f"{r['added_ms_per_query']:+.2f} | {r['fit_seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(DEFAULT_SOURCE))
    ap.add_argument("--no-trained", action="store_true", help="only the frozen features (no head training)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    np.random.seed(0)
    t_start = time.perf_counter()
    images, split_index, summary, _ = load(args.source, 100)
    print("open set:", len(summary["open_set_classes"]), "categories;",
          {k: v["images"] for k, v in summary["splits"].items()}, flush=True)
    t0 = time.perf_counter()
    frozen = config.TrainingParams(**{**PROXY, "train_mode": "frozen", "flip_tta": True})
    feats = features(images, frozen)
    print(f"frozen features of {len(images)} photos: {time.perf_counter() - t0:.1f} s", flush=True)
    rows = score("frozen Lite0, no training", off_the_shelf(feats, flip=False), split_index, "cosine")
    if not args.no_trained:
        p = config.TrainingParams(**recommended())
        t0 = time.perf_counter()
        cached = features(images, p)
        bundle, _, run = workflow.train(images, split_index, p, None, {"image_size": 100}, features=cached)
        emb = workflow.embed_cached_features(bundle, cached)
        print(f"recommended head: {run['epochs_run']} epochs, {time.perf_counter() - t0:.1f} s", flush=True)
        rows += score("recommended head", emb, split_index, p.distance)
    report = table(rows)
    print(report)
    cfg = RerankConfig()
    n = split_index["split"].value_counts().to_dict()
    header = (f"car parts, 100 px grayscale, split seed 42 ({n.get('train', 0)} train / {n.get('test', 0)} test "
              f"photos, {len(summary['open_set_classes'])} unseen categories, {n.get('open', 0)} photos); re-ranking defaults: top_n {cfg.top_n}, "
              f"qe n {cfg.qe_n} alpha {cfg.qe_alpha}, k1 {cfg.k1} k2 {cfg.k2} lambda {cfg.lambda_value}, pairwise "
              f"{cfg.pairwise_neighbours} neighbours x {cfg.pairwise_max_anchors} anchors, hidden "
              f"{cfg.pairwise_hidden}, {cfg.pairwise_epochs} epochs; search time = top-{SEARCH_K} of the test "
              f"queries against the train gallery (exact), best of {REPEATS}; total {time.perf_counter() - t_start:.0f} s")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "reranking.md").write_text(header + "\n\n" + report + "\n")


if __name__ == "__main__":
    main()
