"""Model-independent evaluation of embeddings: retrieval metrics, pair verification, open-set rejection, accuracy.

Every model of the study (Siamese, triplet, ArcFace, plain classifier, ...) is evaluated the same way on
its embeddings:

* **Retrieval** (:func:`retrieval_metrics`): pytorch-metric-learning's ``AccuracyCalculator`` with the
  exact :class:`~partmatch.ml.retrieval.GalleryIndex` search as its ``knn_func`` (the same search as the
  ``search`` pipelines) gives ``precision_at_1``, ``r_precision`` and ``map_at_r``; recall@k and
  the k-NN vote accuracy are computed here from the *same* kNN result (captured from PML's knn call, no
  second search).
* **Pair verification** (the original study's Siamese metric): balanced same/different pairs
  (:func:`sample_pairs`), their Euclidean (or cosine) distances (:func:`pair_distances`), an accuracy-maximising
  distance threshold chosen on validation pairs (:func:`choose_threshold`) and the metrics at a fixed
  threshold (:func:`pair_metrics`).
* **Open-set rejection** (:func:`open_set_rejection`): how often a query of a part absent from the index
  is wrongly given a known name (FMR) against how often a known part is rejected (FNMR), over thresholds,
  with FNMR@FMR=1 % and the operating point of the calibrated threshold.
* :func:`evaluate_embeddings` bundles both for the closed-set test split and the open-set (unseen
  classes) split.

* :func:`classification_accuracy` scores a classifier. Embeddings come from ``partmatch.ml.inference``
  (the one place where images are embedded).

Everything is deterministic for given inputs and seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from partmatch.ml.reranking import PairwiseReranker, RerankConfig
from partmatch.ml.retrieval import GalleryIndex, IndexConfig, check_distance, fit_pairwise_reranker

logger = logging.getLogger(__name__)

RETRIEVAL_K_VALUES: tuple[int, ...] = (1, 2, 4, 8)
KNN_VOTE_K = 5
PAIR_METRIC_KEYS: tuple[str, ...] = ("pair_accuracy", "pair_precision", "pair_recall", "pair_f1", "roc_auc")
OPEN_SET_PREFIX = "open_set_"

# PML metric name -> our key
_PML_METRICS = {
    "precision_at_1": "precision_at_1",
    "r_precision": "r_precision",
    "mean_average_precision_at_r": "map_at_r",
}


# ============================================================================================ retrieval


def _as_2d(name: str, emb: Any) -> np.ndarray:
    arr = emb.detach().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
    if arr.size == 0 or len(arr) == 0:
        raise ValueError(f"{name} is empty")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _as_labels(name: str, labels: Any, n: int) -> np.ndarray:
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    arr = arr.reshape(-1)
    if len(arr) == 0:
        raise ValueError(f"{name} is empty")
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} entries but the embeddings have {n} rows")
    return arr


class _RecordingKNN:
    """PML ``knn_func`` that searches through :class:`~partmatch.ml.retrieval.GalleryIndex` (always exact) and
    keeps the last result, so recall@k and the k-NN vote reuse the neighbours PML searched for -- and the
    metrics rank neighbours exactly as the search pipelines do.

    PML passes the (raw) embeddings; the index applies ``distance`` (cosine: L2-normalised vectors). With
    ``ref_includes_query`` (leave-one-out) each query's own row is excluded from its neighbours. With
    ``rerank`` the index's top-N candidates are re-ordered (``GalleryIndex.search(rerank=..., reranker=...)``).
    """

    def __init__(self, distance: str = "euclidean", rerank: RerankConfig | None = None,
                 reranker: PairwiseReranker | None = None) -> None:
        self.distance = distance
        self.rerank = rerank
        self.reranker = reranker
        self.distances: torch.Tensor | None = None
        self.indices: torch.Tensor | None = None

    def __call__(self, query, k, reference=None, ref_includes_query=False):
        q = query.detach().cpu().numpy().astype(np.float32, copy=False)
        ref = q if reference is None else reference.detach().cpu().numpy().astype(np.float32, copy=False)
        config = IndexConfig(exact_max=max(len(ref), IndexConfig().exact_max))  # metrics are always exact
        index = GalleryIndex(ref, np.zeros(len(ref), dtype=np.int64), distance=self.distance, config=config)
        exclude = np.arange(len(q)) if ref_includes_query else None
        result = index.search(q, int(k), exclude_positions=exclude, rerank=self.rerank, reranker=self.reranker)
        self.distances = torch.from_numpy(result.distances).to(query.device)
        self.indices = torch.from_numpy(result.positions).to(query.device)
        return self.distances, self.indices


def _same_label(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.eq`` under another name: PML counts each class's gallery items with a (classes x N) comparison
    matrix when given ``torch.eq`` itself (5 GB at 100k embeddings in classes of 20), one class at a time (O(N)
    memory, same counts) for any other function."""
    return torch.eq(a, b)


def _knn_vote(neighbour_labels: np.ndarray) -> np.ndarray:
    """Majority label of each row (neighbours ordered nearest first); ties go to the tied label that
    occurs nearest."""
    n, k = neighbour_labels.shape
    votes = (neighbour_labels[:, :, None] == neighbour_labels[:, None, :]).sum(axis=2)  # (n, k)
    # first maximum of the per-position vote count = the nearest neighbour among the most-voted labels
    best_pos = np.argmax(votes, axis=1)
    return neighbour_labels[np.arange(n), best_pos]


def retrieval_metrics(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    gallery_emb: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
    *,
    prefix: str = "",
    k_values: Sequence[int] = RETRIEVAL_K_VALUES,
    distance: str = "euclidean",
    rerank: RerankConfig | dict | None = None,
    reranker: PairwiseReranker | None = None,
) -> dict[str, float]:
    """Retrieval metrics of ``query_emb`` against ``gallery_emb`` (or leave-one-out within the queries).

    Keys (each with ``prefix`` prepended): ``precision_at_1``, ``r_precision``, ``map_at_r`` (from
    pytorch-metric-learning's ``AccuracyCalculator``, kNN by the exact ``GalleryIndex``), ``recall_at_{k}``
    for each ``k`` in ``k_values`` (fraction of queries with at least one same-class item among their k
    nearest gallery items) and ``knn_accuracy`` (majority vote of the 5 nearest gallery items, ties broken in favour of the
    tied class that occurs nearest).

    Args:
        query_emb, query_labels: (Nq, D) embeddings and (Nq,) labels (any hashable dtype).
        gallery_emb, gallery_labels: (Ng, D) / (Ng,). When ``gallery_emb`` is None, each query is
            retrieved against all *other* queries (leave-one-out, PML's ``ref_includes_query=True``);
            the query itself is never counted as its own neighbour.
        distance: ``"euclidean"`` (L2, default), ``"cosine"`` (embeddings L2-normalised first, which
            gives the same ranking as cosine similarity) or ``"manhattan"`` (L1).
        rerank, reranker: optional re-ranking of each query's top-N neighbours
            (:class:`~partmatch.ml.reranking.RerankConfig`; ``reranker`` the trained pairwise head of mode
            ``pairwise``): every metric is computed on the re-ranked order.

    Neighbours are searched by :class:`partmatch.ml.retrieval.GalleryIndex` (exact), handed to PML as its
    ``knn_func``: the metrics rank neighbours exactly as the search pipelines do.

    Which queries count: a query whose class has no other item in the gallery cannot be retrieved and is
    **excluded from every metric** (as PML does) -- in leave-one-out that is every class with a single
    sample; in closed-set retrieval every query class absent from the gallery. A warning is logged with
    the number excluded; if no query is left, all values are NaN.

    Small galleries: neighbours are searched up to ``min(needed, gallery size)`` (gallery size minus one in
    leave-one-out); a ``k`` in ``k_values`` larger than that uses the whole gallery, so recall@k is then
    the recall over all available neighbours, and the k-NN vote uses the available ones if fewer than 5.

    Raises:
        ValueError: empty / mismatched inputs (the message names the argument), non-finite embeddings,
            only one of ``gallery_emb`` / ``gallery_labels`` given, unknown ``distance``, ``k_values``
            not positive.
    """
    check_distance(distance)
    k_values = tuple(int(k) for k in k_values)
    if not k_values or any(k < 1 for k in k_values):
        raise ValueError(f"k_values must be positive integers, got {k_values}")
    if (gallery_emb is None) != (gallery_labels is None):
        raise ValueError("gallery_emb and gallery_labels must both be given or both be None")

    q = _as_2d("query_emb", query_emb)
    ql_raw = _as_labels("query_labels", query_labels, len(q))
    loo = gallery_emb is None
    if loo:
        g, gl_raw = q, ql_raw
    else:
        g = _as_2d("gallery_emb", gallery_emb)
        gl_raw = _as_labels("gallery_labels", gallery_labels, len(g))
        if g.shape[1] != q.shape[1]:
            raise ValueError(f"gallery_emb has dimension {g.shape[1]} but query_emb has {q.shape[1]}")
    # integer class codes (PML casts labels to float32 tensors, so arbitrary labels must be encoded)
    _, codes = np.unique(np.concatenate([ql_raw, gl_raw]), return_inverse=True)
    ql, gl = codes[: len(ql_raw)].astype(np.int64), codes[len(ql_raw) :].astype(np.int64)

    keys = ["precision_at_1", "r_precision", "map_at_r", *(f"recall_at_{k}" for k in k_values), "knn_accuracy"]
    self_count = int(loo)
    gallery_count = np.bincount(gl, minlength=int(codes.max()) + 1)
    matches_per_query = gallery_count[ql] - self_count  # same-class items a query can retrieve
    retrievable = matches_per_query > 0
    n_excluded = int((~retrievable).sum())
    max_k = len(g) - self_count
    if n_excluded:
        logger.warning(
            "%sretrieval: %d of %d queries excluded from the metrics: %s", prefix, n_excluded, len(q),
            "single-sample classes cannot be retrieved leave-one-out" if loo else "their class is not in the gallery",
        )
    if not retrievable.any() or max_k < 1:
        logger.warning("%sretrieval: no query can be evaluated; all metrics are NaN", prefix)
        return {f"{prefix}{key}": float("nan") for key in keys}

    # enough neighbours for R-precision / MAP@R (R = largest class), recall@max(k) and the 5-NN vote
    needed = max(int(matches_per_query.max()), max(k_values), KNN_VOTE_K)
    num_k = min(needed, max_k)
    # PML checks k against the largest class count *including* the query itself even in leave-one-out and
    # then warns that R-precision / MAP@R are wrong although k = R suffices; its "max_bin_count" gives the
    # same k (count - 1) without the spurious warning.
    k_arg: int | str = "max_bin_count" if loo and num_k == int(matches_per_query.max()) else num_k
    cfg = None if rerank is None else RerankConfig.from_dict(rerank)
    knn = _RecordingKNN(distance, cfg, reranker) if cfg is not None and cfg.active else _RecordingKNN(distance)
    calculator = AccuracyCalculator(
        include=tuple(_PML_METRICS),
        k=k_arg,
        device=torch.device("cpu"),  # must be a torch.device: PML reads device.type in __init__
        knn_func=knn,
        label_comparison_fn=_same_label,  # no (classes x N) matrix: memory linear in N
    )
    if loo:
        pml = calculator.get_accuracy(q, ql)
    else:
        pml = calculator.get_accuracy(q, ql, g, gl, ref_includes_query=False)
    out = {f"{prefix}{ours}": float(pml[theirs]) for theirs, ours in _PML_METRICS.items()}

    indices = knn.indices.cpu().numpy()
    if indices.shape != (len(q), num_k) or (indices < 0).any():  # the index pads with -1 past the gallery
        raise RuntimeError(f"unexpected kNN result of shape {indices.shape} (expected {(len(q), num_k)})")
    neighbour_labels = gl[indices][retrievable]
    hits = neighbour_labels == ql[retrievable, None]
    for k in k_values:
        out[f"{prefix}recall_at_{k}"] = float(hits[:, : min(k, num_k)].any(axis=1).mean())
    voted = _knn_vote(neighbour_labels[:, : min(KNN_VOTE_K, num_k)])
    out[f"{prefix}knn_accuracy"] = float((voted == ql[retrievable]).mean())
    return {f"{prefix}{key}": out[f"{prefix}{key}"] for key in keys}


# ========================================================================= clustering and classification


class _SeededKMeans:
    """PML ``kmeans_func``: sklearn's k-means (k-means++ seeding, best of ``n_init`` runs, ``seed``), so the
    clusters, and NMI / AMI with them, are reproducible and not left in a poor local optimum by one random start."""

    def __init__(self, seed: int = 0, n_init: int = 10) -> None:
        self.seed, self.n_init = int(seed), int(n_init)

    def __call__(self, query: torch.Tensor, num_clusters: int) -> np.ndarray:
        from sklearn.cluster import KMeans

        x = query.detach().cpu().numpy().astype(np.float32)
        x = span_coordinates(x - x.mean(axis=0))[0]  # same distances, at most N dimensions (a CNN's 40000 -> N)
        return KMeans(n_clusters=int(num_clusters), n_init=self.n_init, random_state=self.seed).fit_predict(x)


def span_coordinates(x: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """Coordinates of the rows of ``x`` (and of ``others``) in an orthonormal basis of the span of ``x``'s rows
    (SVD, rank-revealing): inner products and distances among ``x``'s rows are unchanged, and so is any linear
    model of them whose weights lie in that span (k-means centroids, an L2-regularised linear SVM's weights), in
    at most ``len(x)`` dimensions. Returned unchanged when they are already no wider than ``len(x)``."""
    if x.shape[1] <= len(x):
        return (x, *others)
    # through the N x N Gram matrix (LAPACK's SVD of a wide matrix is ~50x slower): x x^T = U L U^T, and the
    # basis x^T U L^-1/2 gives x's rows the coordinates U L^1/2
    xd = np.asarray(x, dtype=np.float64)
    eig, u = np.linalg.eigh(xd @ xd.T)
    keep = eig > eig.max(initial=0.0) * len(x) * np.finfo(np.float32).eps
    projection = u[:, keep] / np.sqrt(eig[keep])
    return tuple(((np.asarray(m, dtype=np.float64) @ xd.T) @ projection).astype(x.dtype) for m in (x, *others))


def _geometry(emb: np.ndarray, distance: str) -> np.ndarray:
    """Embeddings as the distance sees them: L2-normalised for ``cosine``, unchanged otherwise."""
    if distance == "cosine":
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb


def clustering_metrics(emb: np.ndarray, labels: np.ndarray, *, prefix: str = "", seed: int = 0,
                       distance: str = "euclidean") -> dict[str, float]:
    """Clustering quality of the embeddings: ``nmi`` and ``ami`` (each with ``prefix``), pytorch-metric-learning
    ``AccuracyCalculator``'s ``NMI`` / ``AMI``: k-means with k = the number of categories (sklearn, seeded,
    :class:`_SeededKMeans`; on L2-normalised vectors for ``cosine``) against the categories. 1.0 when the
    clusters are the categories; about 0 (AMI) for clusters that owe nothing to them. NaN for fewer than two
    categories."""
    check_distance(distance)
    x = _geometry(_as_2d("emb", emb), distance)
    raw = _as_labels("labels", labels, len(x))
    _, codes = np.unique(raw, return_inverse=True)
    if codes.max(initial=0) < 1:
        return {f"{prefix}nmi": float("nan"), f"{prefix}ami": float("nan")}
    calculator = AccuracyCalculator(include=("NMI", "AMI"), device=torch.device("cpu"),
                                    kmeans_func=_SeededKMeans(seed))
    out = calculator.get_accuracy(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                                  torch.from_numpy(codes.astype(np.int64)))
    return {f"{prefix}nmi": float(out["NMI"]), f"{prefix}ami": float(out["AMI"])}


#: embeddings wider than this, with more training rows than this, are reduced by a PCA before the linear SVM
SVM_MAX_DIM = 2048
SVM_REDUCED_DIM = 256


def linear_svm_accuracy(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray,
                        test_labels: np.ndarray, *, seed: int = 0, distance: str = "euclidean") -> float:
    """Test accuracy of a linear SVM (sklearn ``LinearSVC``, one-vs-rest, C=1) trained on the training embeddings:
    how linearly separable the categories are (the DML workflow's classification probe). Features are
    standardised on the training embeddings (L2-normalised first for ``cosine``); embeddings wider than the
    number of training embeddings are put in coordinates of the span of the standardised training embeddings
    (:func:`span_coordinates`) and standardised again there — a whitening of that span, so not the same SVM as on
    the raw standardised features, but one liblinear fits in under a second instead of ~20 s for 500 x 1280
    embeddings; the probe is comparable between models of the same width only — or, with more than :data:`SVM_MAX_DIM` of both, reduced to
    :data:`SVM_REDUCED_DIM` principal axes of the training embeddings (a classifier's 40000 trunk features on
    thousands of photos). The k-NN probe is ``knn_accuracy`` of :func:`retrieval_metrics`.
    NaN when there is no test embedding or fewer than two training categories."""
    import warnings

    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    check_distance(distance)
    xtr, xte = _geometry(_as_2d("train_emb", train_emb), distance), _as_2d("test_emb", test_emb)
    ytr = _as_labels("train_labels", train_labels, len(xtr))
    yte = _as_labels("test_labels", test_labels, len(xte))
    if len(np.unique(ytr)) < 2 or len(xte) == 0:
        return float("nan")
    xte = _geometry(xte, distance)
    steps = []
    if xtr.shape[1] > SVM_MAX_DIM and len(xtr) > SVM_MAX_DIM:
        steps.append(PCA(n_components=min(SVM_REDUCED_DIM, *xtr.shape), random_state=seed))
    elif xtr.shape[1] > len(xtr):
        scaler = StandardScaler().fit(xtr)
        xtr, xte = span_coordinates(scaler.transform(xtr).astype(np.float32), scaler.transform(xte))
    model = make_pipeline(*steps, StandardScaler(), LinearSVC(C=1.0, random_state=seed, max_iter=2000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the probe's accuracy is what counts, logged anyway
        model.fit(xtr, ytr)
    return float((model.predict(xte) == yte).mean())


# ====================================================================================== pair verification


def _pair_candidates(
    rng: np.random.Generator, size: int, codes: np.ndarray, order: np.ndarray, starts: np.ndarray,
    counts: np.ndarray, rank: np.ndarray, anchors_pool: np.ndarray, positive: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``size`` random (anchor, partner) pairs: anchor uniform over ``anchors_pool``; partner uniform over
    the anchor's other class members (positive) or over all items of other classes (negative)."""
    a = anchors_pool[rng.integers(0, len(anchors_pool), size)]
    c = codes[a]
    if positive:
        offset = rng.integers(0, counts[c] - 1)  # among the c-1 other members
        b = order[starts[c] + (rank[a] + 1 + offset) % counts[c]]
    else:
        r = rng.integers(0, len(codes) - counts[c])  # among the items outside the anchor's class
        r = np.where(r >= starts[c], r + counts[c], r)
        b = order[r]
    return a, b


def _draw_pairs(
    rng: np.random.Generator, n: int, total_unique: int, draw: Callable[[int], tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pairs from ``draw``; distinct (unordered) pairs while the pool allows, then repeats."""
    want = min(n, total_unique)
    seen: set[tuple[int, int]] = set()
    a_out: list[int] = []
    b_out: list[int] = []
    for _ in range(100):
        if len(a_out) >= want:
            break
        a, b = draw(max(2 * (want - len(a_out)), 16))
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            key = (x, y) if x < y else (y, x)
            if key not in seen:
                seen.add(key)
                a_out.append(x)
                b_out.append(y)
                if len(a_out) >= want:
                    break
    if len(a_out) < n:  # pool exhausted (or unlucky): top up with repeated pairs
        a, b = draw(n - len(a_out))
        a_out.extend(a.tolist())
        b_out.extend(b.tolist())
    return np.asarray(a_out, dtype=np.int64), np.asarray(b_out, dtype=np.int64)


def sample_pairs(labels: np.ndarray, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced, seeded same/different-class index pairs for verification.

    ``n_pairs // 2`` positive pairs (same class, two different items) and ``n_pairs - n_pairs // 2``
    negative pairs (different classes), shuffled together. The first item of a pair is drawn uniformly
    from the eligible items (for positives: items whose class has at least two members), the second
    uniformly from its class mates (positive) or from all items of other classes (negative). Pairs are
    drawn without repetition (as unordered pairs) while the set offers enough distinct ones; when it has
    fewer (e.g. 1000 positives wanted from 20 classes of 10 images = 900 positive pairs), the remainder
    is topped up with repeated pairs (also when 100 rounds of rejection sampling could not find enough).

    Returns:
        ``(idx_a, idx_b, same)``: int64 index arrays and a bool array, each of length ``n_pairs``.

    Raises:
        ValueError: ``n_pairs < 2``; no class with two items (no positive pair) or fewer than two classes
            (no negative pair).
    """
    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    labels = labels.reshape(-1)
    n_pairs = int(n_pairs)
    if n_pairs < 2:
        raise ValueError(f"n_pairs must be >= 2 (one positive and one negative pair), got {n_pairs}")
    if len(labels) == 0:
        raise ValueError("labels is empty")
    _, codes = np.unique(labels, return_inverse=True)
    counts = np.bincount(codes)
    if len(counts) < 2:
        raise ValueError("labels has a single class: no negative (different-class) pair can be formed")
    if counts.max() < 2:
        raise ValueError("labels has no class with two items: no positive (same-class) pair can be formed")
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(codes), dtype=np.int64)  # position of each item within its class block
    rank[order] = np.arange(len(codes)) - starts[codes[order]]

    rng = np.random.default_rng(seed)
    n_pos = n_pairs // 2
    n_neg = n_pairs - n_pos
    eligible = np.flatnonzero(counts[codes] >= 2)
    all_items = np.arange(len(codes))
    total_pos = int((counts * (counts - 1) // 2).sum())
    total_neg = int((len(codes) ** 2 - (counts**2).sum()) // 2)

    def draw_pos(size: int) -> tuple[np.ndarray, np.ndarray]:
        return _pair_candidates(rng, size, codes, order, starts, counts, rank, eligible, positive=True)

    def draw_neg(size: int) -> tuple[np.ndarray, np.ndarray]:
        return _pair_candidates(rng, size, codes, order, starts, counts, rank, all_items, positive=False)

    pa, pb = _draw_pairs(rng, n_pos, total_pos, draw_pos)
    na, nb = _draw_pairs(rng, n_neg, total_neg, draw_neg)
    idx_a = np.concatenate([pa, na])
    idx_b = np.concatenate([pb, nb])
    same = np.concatenate([np.ones(n_pos, dtype=bool), np.zeros(n_neg, dtype=bool)])
    perm = rng.permutation(n_pairs)
    return idx_a[perm], idx_b[perm], same[perm]


def pair_distances(
    emb: np.ndarray, idx_a: np.ndarray, idx_b: np.ndarray, distance: str = "euclidean"
) -> np.ndarray:
    """Distances (float64) between ``emb[idx_a[i]]`` and ``emb[idx_b[i]]``.

    ``distance="euclidean"`` (default): plain L2. ``"cosine"``: L2 between the L2-normalised embeddings,
    ``sqrt(2 - 2 cos)`` -- monotone in the cosine distance and the same geometry as
    ``retrieval_metrics(..., distance="cosine")``. ``"manhattan"``: L1. These are the units of
    :class:`partmatch.ml.retrieval.GalleryIndex` search distances.
    """
    check_distance(distance)
    e = emb.detach().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
    if e.ndim != 2:
        raise ValueError(f"emb must be 2-D (N, D), got shape {e.shape}")
    a, b = np.asarray(idx_a, dtype=np.int64), np.asarray(idx_b, dtype=np.int64)
    if a.shape != b.shape:
        raise ValueError(f"idx_a and idx_b differ in shape: {a.shape} vs {b.shape}")
    out = np.empty(len(a), dtype=np.float64)
    # in chunks of ~32 MB: wide embeddings (the study CNN's 40,000-d features) would otherwise need GBs of copies
    step = max(1, (4 << 20) // max(1, e.shape[1]))
    for start in range(0, len(a), step):
        ea, eb = e[a[start:start + step]].astype(np.float64), e[b[start:start + step]].astype(np.float64)
        if distance == "cosine":
            ea = ea / np.maximum(np.linalg.norm(ea, axis=1, keepdims=True), 1e-12)
            eb = eb / np.maximum(np.linalg.norm(eb, axis=1, keepdims=True), 1e-12)
        diff = ea - eb
        if distance == "manhattan":
            out[start:start + step] = np.abs(diff).sum(axis=1)
        else:
            out[start:start + step] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def _check_pairs(distances: Any, same: Any) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    s = np.asarray(same).reshape(-1).astype(bool)
    if len(d) == 0:
        raise ValueError("distances is empty")
    if len(d) != len(s):
        raise ValueError(f"distances has {len(d)} entries but same has {len(s)}")
    if not np.isfinite(d).all():
        raise ValueError("distances contains NaN or infinite values")
    return d, s


def choose_threshold(distances: np.ndarray, same: np.ndarray) -> tuple[float, pd.DataFrame]:
    """Accuracy-maximising distance threshold; a pair is predicted "same" when ``distance <= threshold``.

    Every distinct distance value is a candidate (plus one just below the smallest, predicting no pair
    "same"). The curve lists, per candidate, the accuracy, precision, recall and F1 of the "same" class
    (precision is 0 where nothing is predicted "same"). Among the best-accuracy candidates the smallest is
    taken and the returned threshold is moved half-way to the next distance value, which predicts the
    same pairs but sits in the gap between the groups (e.g. between the largest positive and the smallest
    negative distance on separable data).

    Returns:
        ``(threshold, curve)`` with ``curve`` columns ``threshold, accuracy, precision, recall, f1``,
        sorted by threshold.
    """
    d, s = _check_pairs(distances, same)
    order = np.argsort(d, kind="stable")
    d_sorted, s_sorted = d[order], s[order]
    values = np.unique(d_sorted)
    last = np.searchsorted(d_sorted, values, side="right") - 1
    cum_pos = np.cumsum(s_sorted)
    cum_neg = np.cumsum(~s_sorted)
    n_pos, n_neg = int(s.sum()), int((~s).sum())
    below = np.nextafter(values[0], -np.inf)
    thresholds = np.concatenate([[below], values])
    tp = np.concatenate([[0], cum_pos[last]]).astype(np.float64)
    fp = np.concatenate([[0], cum_neg[last]]).astype(np.float64)
    tn = n_neg - fp
    with np.errstate(divide="ignore", invalid="ignore"):
        accuracy = (tp + tn) / len(d)
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = tp / n_pos if n_pos else np.zeros_like(tp)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    curve = pd.DataFrame(
        {"threshold": thresholds, "accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1}
    )
    best = int(np.argmax(accuracy))
    if 0 < best < len(thresholds) - 1:
        threshold = float((thresholds[best] + thresholds[best + 1]) / 2)
    else:
        threshold = float(thresholds[best])
    return threshold, curve


def pair_metrics(distances: np.ndarray, same: np.ndarray, threshold: float, prefix: str = "") -> dict[str, float]:
    """Verification metrics at a fixed threshold ("same" when ``distance <= threshold``).

    Keys (with ``prefix``): ``pair_accuracy``, ``pair_precision``, ``pair_recall``, ``pair_f1`` (of the
    "same" class; 0 where undefined) and ``roc_auc`` (threshold-free, sklearn on ``-distance``; NaN if only
    one kind of pair is present).
    """
    d, s = _check_pairs(distances, same)
    if threshold is None or not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    pred = d <= float(threshold)
    out = {
        "pair_accuracy": float(accuracy_score(s, pred)),
        "pair_precision": float(precision_score(s, pred, zero_division=0)),
        "pair_recall": float(recall_score(s, pred, zero_division=0)),
        "pair_f1": float(f1_score(s, pred, zero_division=0)),
        "roc_auc": float(roc_auc_score(s, -d)) if 0 < s.sum() < len(s) else float("nan"),
    }
    return {f"{prefix}{k}": v for k, v in out.items()}


# ======================================================================================= open-set rejection

OPEN_SET_FMR_TARGET = 0.01  # FNMR is reported at this FMR (1 %), as open-metric-learning's FNMR@FMR


def _check_distances(name: str, values: Any) -> np.ndarray:
    d = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(d) == 0:
        raise ValueError(f"{name} is empty: open-set rejection needs queries of known and of unknown parts")
    if np.isnan(d).any():
        raise ValueError(f"{name} contains NaN distances")
    return d


def leave_one_out_nearest(emb: np.ndarray, labels: np.ndarray, distance: str = "euclidean",
                          k: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """For every item of a labelled set, the distance to its nearest *other* item of the same label ("known
    part": its part is in the index) and to its nearest item of another label ("unknown part": what it would
    be matched to if its part line were absent from the index), searched among the ``k`` nearest (inf
    when none is found there, e.g. a single-photo part)."""
    e = _as_2d("emb", emb)
    lab = np.asarray(labels).reshape(-1)
    if len(lab) != len(e):
        raise ValueError(f"labels has {len(lab)} entries but emb has {len(e)} rows")
    if len(e) < 2:
        raise ValueError("leave-one-out needs at least 2 items")
    ids = [str(i) for i in range(len(e))]
    gallery = GalleryIndex(e, lab.astype(str), ids=ids, distance=distance,
                           config=IndexConfig(exact_max=max(len(e), 1)))
    found = gallery.search(e, k=min(int(k), len(e) - 1), exclude_ids=ids)
    same = found.labels == lab.astype(str)[:, None]
    valid = found.positions >= 0
    known = np.where(same & valid, found.distances, np.inf).min(axis=1)
    unknown = np.where(~same & valid, found.distances, np.inf).min(axis=1)
    return known.astype(np.float64), unknown.astype(np.float64)


def balanced_rejection_threshold(known_nearest: np.ndarray, unknown_nearest: np.ndarray) -> float:
    """The "unknown part" threshold on the nearest distance that maximises balanced accuracy,
    ``((1 - FNMR) + (1 - FMR)) / 2``: accept a query (give it a part name) when its nearest distance is
    ``<= threshold``. Among the best candidates the smallest is taken and moved half-way to the next distance
    (it accepts the same queries but sits in the gap), as :func:`choose_threshold` does."""
    kd = _check_distances("known_nearest", known_nearest)
    ud = _check_distances("unknown_nearest", unknown_nearest)
    values = np.unique(np.concatenate([kd, ud]))
    values = values[np.isfinite(values)]
    if len(values) == 0:
        raise ValueError("no finite distance: cannot choose a rejection threshold")
    # integer counts scaled to a common denominator: exact ties, so "the smallest best" is well defined
    accept_known = np.searchsorted(np.sort(kd), values, side="right").astype(np.int64) * len(ud)
    reject_unknown = (len(ud) - np.searchsorted(np.sort(ud), values, side="right")).astype(np.int64) * len(kd)
    best = int(np.argmax(accept_known + reject_unknown))
    return float((values[best] + values[best + 1]) / 2) if best + 1 < len(values) else float(values[best])


def open_set_rejection(
    known_nearest: np.ndarray,
    known_correct: np.ndarray,
    unknown_nearest: np.ndarray,
    threshold: float | None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Open-set rejection: does a threshold on the nearest distance tell unknown parts from known ones?

    A query is **accepted** (given a known part name) when its nearest gallery distance is ``<= t``, else
    rejected ("unknown part").

    * FMR(t) (false match rate): share of *unknown-part* queries (their part is absent from the index)
      accepted -- each gets a wrong name;
    * FNMR(t) (false non-match rate): share of *known-part* queries rejected (``nearest > t``);
    * ``known_identified``: share of known-part queries accepted *and* correctly named (``known_correct``,
      e.g. the vote's name equals the truth) -- the share of known queries that get the right answer;
    * ``known_misnamed``: share of known-part queries accepted with a wrong name.

    Args:
        known_nearest: (Nk,) nearest-neighbour distance of each known-part query (+inf allowed: never
            accepted).
        known_correct: (Nk,) bool, whether that query's predicted name is right.
        unknown_nearest: (Nu,) nearest-neighbour distance of each unknown-part query.
        threshold: the model's calibrated threshold (None: operating-point values are NaN).

    Returns:
        ``(curve, summary)``. ``curve`` columns ``threshold, fmr, fnmr, known_identified, known_misnamed``,
        one row per distinct finite distance plus one just below the smallest (nothing accepted), sorted by
        threshold. ``summary`` (floats): ``threshold``, ``fmr``, ``fnmr``, ``unknown_rejected`` (= 1 - fmr),
        ``known_identified``, ``known_misnamed`` at ``threshold``; ``fnmr_at_fmr_1pct`` exactly as
        open-metric-learning's ``calc_fnmr_at_fmr`` (t = the 1 % quantile of the unknown distances, linear
        interpolation; FNMR = share of known distances ``>= t``); ``eer`` (equal error rate: mean of FMR and
        FNMR on the curve row where they are closest); ``n_known``, ``n_unknown``.
    """
    kd = _check_distances("known_nearest", known_nearest)
    ud = _check_distances("unknown_nearest", unknown_nearest)
    kc = np.asarray(known_correct).reshape(-1).astype(bool)
    if len(kc) != len(kd):
        raise ValueError(f"known_correct has {len(kc)} entries but known_nearest has {len(kd)}")
    if threshold is not None and not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite number or None, got {threshold!r}")

    def at(t: np.ndarray) -> dict[str, np.ndarray]:
        t = np.asarray(t, dtype=np.float64)
        k_acc = kd[None, :] <= t[:, None]
        return {
            "fmr": (ud[None, :] <= t[:, None]).mean(axis=1),
            "fnmr": 1.0 - k_acc.mean(axis=1),
            "known_identified": (k_acc & kc[None, :]).mean(axis=1),
            "known_misnamed": (k_acc & ~kc[None, :]).mean(axis=1),
        }

    values = np.unique(np.concatenate([kd, ud]))
    values = values[np.isfinite(values)]
    start = np.nextafter(values[0], -np.inf) if len(values) else 0.0
    thresholds = np.concatenate([[start], values])
    # sorted counts instead of an (n_thresholds, n) matrix: the curve scales to many queries
    ks, us = np.sort(kd), np.sort(ud)
    k_acc = np.searchsorted(ks, thresholds, side="right")
    order = np.argsort(kd, kind="stable")
    correct_cum = np.concatenate([[0], np.cumsum(kc[order])])[k_acc]
    curve = pd.DataFrame({
        "threshold": thresholds,
        "fmr": np.searchsorted(us, thresholds, side="right") / len(ud),
        "fnmr": 1.0 - k_acc / len(kd),
        "known_identified": correct_cum / len(kd),
        "known_misnamed": (k_acc - correct_cum) / len(kd),
    })
    t_oml = float(np.quantile(ud[np.isfinite(ud)], OPEN_SET_FMR_TARGET)) if np.isfinite(ud).any() else np.inf
    gap = np.abs(curve["fmr"].to_numpy() - curve["fnmr"].to_numpy())
    row = int(np.argmin(gap))
    summary: dict[str, float] = {"threshold": float("nan") if threshold is None else float(threshold)}
    point = at(np.array([summary["threshold"]])) if threshold is not None else None
    for key in ("fmr", "fnmr", "known_identified", "known_misnamed"):
        summary[key] = float(point[key][0]) if point is not None else float("nan")
    summary["unknown_rejected"] = 1.0 - summary["fmr"]
    summary["fnmr_at_fmr_1pct"] = float(np.mean(kd >= t_oml))
    summary["eer"] = float((curve["fmr"].iloc[row] + curve["fnmr"].iloc[row]) / 2)
    summary["n_known"] = float(len(kd))
    summary["n_unknown"] = float(len(ud))
    return curve, summary


# ======================================================================================== classification


def classification_accuracy(log_probs_or_pred: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Top-1 accuracy from (N, C) scores / log-probabilities (argmax over C) or (N,) predicted labels."""
    scores = (
        log_probs_or_pred.detach().cpu().numpy()
        if isinstance(log_probs_or_pred, torch.Tensor)
        else np.asarray(log_probs_or_pred)
    )
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    y = y.reshape(-1)
    if scores.size == 0 or len(scores) == 0:
        raise ValueError("log_probs_or_pred is empty")
    if scores.ndim == 2:
        pred = scores.argmax(axis=1)
    elif scores.ndim == 1:
        pred = scores
    else:
        raise ValueError(f"log_probs_or_pred must be (N, C) or (N,), got shape {scores.shape}")
    if len(pred) != len(y):
        raise ValueError(f"log_probs_or_pred has {len(pred)} rows but labels has {len(y)}")
    return float(np.mean(pred == y))


# ============================================================================================= bundle


def _is_empty(x: Any) -> bool:
    return x is None or len(x) == 0


def _pair_metrics_or_nan(emb, labels, n_pairs: int, seed: int, threshold: float, distance: str,
                         prefix: str) -> dict[str, float]:
    """Pair metrics on seeded balanced pairs of one set; NaN (with a warning) when no pair can be formed."""
    try:
        a, b, same = sample_pairs(labels, n_pairs, seed)
    except ValueError as err:
        logger.warning("%spair metrics skipped: %s", prefix or "closed-set ", err)
        return {f"{prefix}{k}": float("nan") for k in PAIR_METRIC_KEYS}
    return pair_metrics(pair_distances(emb, a, b, distance), same, threshold, prefix=prefix)


def evaluate_embeddings(
    train_emb: np.ndarray,
    train_labels: np.ndarray,
    test_emb: np.ndarray,
    test_labels: np.ndarray,
    open_emb: np.ndarray | None,
    open_labels: np.ndarray | None,
    threshold: float,
    seed: int,
    n_pairs: int = 2000,
    distance: str = "euclidean",
    rerank: RerankConfig | dict | None = None,
) -> dict[str, float]:
    """All embedding metrics of one model.

    * closed-set retrieval, queries = test, gallery = train: ``precision_at_1``, ``r_precision``,
      ``map_at_r``, ``recall_at_{1,2,4,8}``, ``knn_accuracy``;
    * pair verification on ``n_pairs`` balanced test pairs (seeded by ``seed``) at ``threshold``:
      ``pair_accuracy``, ``pair_precision``, ``pair_recall``, ``pair_f1``, ``roc_auc``;
    * open set (classes unseen in training), leave-one-out retrieval and pairs (same seed), the same keys
      prefixed ``open_set_``. Skipped (keys absent) when ``open_emb`` is None or empty; if pairs cannot be
      formed in a set (no class with two images, or a single class) its pair keys are NaN.

    ``distance`` ("euclidean", "cosine" or "manhattan") is used for retrieval and pair distances alike;
    ``threshold`` must have been chosen with the same distance. Deterministic for a given ``seed``.

    With ``rerank`` (a :class:`~partmatch.ml.reranking.RerankConfig` whose mode is not ``none``) the retrieval
    metrics are computed again on the re-ranked neighbours, keys ``rerank_<mode>_<key>`` (closed set) and
    ``open_set_rerank_<mode>_<key>`` (open set); the plain keys keep their values. The ``pairwise`` re-ranker is
    trained on the gallery (``train_emb``: the training categories) and applied to both sets.
    """
    out = retrieval_metrics(test_emb, test_labels, train_emb, train_labels, distance=distance)
    out |= _pair_metrics_or_nan(test_emb, test_labels, n_pairs, seed, threshold, distance, prefix="")
    cfg = None if rerank is None else RerankConfig.from_dict(rerank)
    reranker = None
    if cfg is not None and cfg.active:
        if cfg.mode == "pairwise":
            reranker = fit_pairwise_reranker(train_emb, train_labels, distance, cfg)
        out |= retrieval_metrics(test_emb, test_labels, train_emb, train_labels, distance=distance,
                                 prefix=rerank_prefix(cfg.mode), rerank=cfg, reranker=reranker)
    if _is_empty(open_emb) or _is_empty(open_labels):
        return out
    out |= retrieval_metrics(open_emb, open_labels, prefix=OPEN_SET_PREFIX, distance=distance)
    out |= _pair_metrics_or_nan(open_emb, open_labels, n_pairs, seed, threshold, distance, prefix=OPEN_SET_PREFIX)
    if cfg is not None and cfg.active:
        out |= retrieval_metrics(open_emb, open_labels, prefix=OPEN_SET_PREFIX + rerank_prefix(cfg.mode),
                                 distance=distance, rerank=cfg, reranker=reranker)
    return out


def rerank_prefix(mode: str) -> str:
    """Key prefix of the retrieval metrics after re-ranking with ``mode`` (``rerank_qe_`` ...)."""
    return f"rerank_{mode}_"
