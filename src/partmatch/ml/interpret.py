"""What an embedding has learnt, in numbers a figure can show (the DML survey's interpretability tools).

Everything here works on one set of embeddings with their categories, searched leave-one-out (each photo is a
query against all the others, never itself) through :class:`partmatch.ml.retrieval.GalleryIndex`, the search
the metrics and the ``search`` pipelines use:

* :func:`leave_one_out_neighbours`: each photo's k nearest other photos;
* :func:`per_category_precision`: precision@1 of each category's photos (which unseen parts are found, which not);
* :func:`confused_pairs`: (query category, category of its nearest photo) pairs, most frequent mistakes first;
* :func:`project_2d`: a seeded 2-D map of the embeddings (PCA, or t-SNE) for a scatter plot;
* :func:`gallery_queries`: a seeded choice of query photos, one per category, for a neighbour gallery.

No Kedro, no figures (``partmatch.ml.plots`` draws them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from partmatch.ml.retrieval import GalleryIndex, IndexConfig, check_distance

MAP_METHODS = ("tsne", "pca")


def leave_one_out_neighbours(emb: np.ndarray, k: int, distance: str = "euclidean") -> np.ndarray:
    """``(N, min(k, N - 1))`` rows of each photo's nearest other photos, nearest first (exact search)."""
    check_distance(distance)
    x = np.ascontiguousarray(emb, dtype=np.float32)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"leave-one-out search needs at least 2 embeddings (N, D), got shape {x.shape}")
    kk = min(int(k), len(x) - 1)
    index = GalleryIndex(x, np.zeros(len(x), dtype=np.int64), distance=distance,
                         config=IndexConfig(exact_max=max(len(x), IndexConfig().exact_max)))
    return index.search(x, kk, exclude_positions=np.arange(len(x))).positions


def per_category_precision(labels: np.ndarray, neighbours: np.ndarray) -> pd.DataFrame:
    """Per category: ``queries`` (its photos that have another photo of it to find) and ``precision_at_1``
    (share of them whose nearest photo is of the same category); worst first, then by name. Single-photo
    categories cannot be retrieved leave-one-out and are left out (as in the retrieval metrics)."""
    labels = np.asarray(labels)
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    retrievable = counts[codes] > 1
    hit = labels[neighbours[:, 0]] == labels
    frame = pd.DataFrame({"category": labels[retrievable], "hit": hit[retrievable]})
    table = frame.groupby("category", sort=True)["hit"].agg(queries="size", precision_at_1="mean").reset_index()
    table["precision_at_1"] = table["precision_at_1"].astype(float)
    return table.sort_values(["precision_at_1", "category"], kind="stable").reset_index(drop=True)


def confused_pairs(labels: np.ndarray, neighbours: np.ndarray, top: int = 10) -> pd.DataFrame:
    """The ``top`` most frequent mistakes: ``query_category``, ``retrieved_category`` (the category of the
    query's nearest photo, when it is another one), ``count`` and ``share`` (of the query category's photos);
    most frequent first, ties by share then names. Single-photo categories are left out: their photos have
    nothing of their own to find, so their "mistakes" say nothing."""
    labels = np.asarray(labels)
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    nearest = labels[neighbours[:, 0]]
    wrong = (nearest != labels) & (counts[codes] > 1)
    sizes = pd.Series(labels).value_counts()
    frame = pd.DataFrame({"query_category": labels[wrong], "retrieved_category": nearest[wrong]})
    if frame.empty:
        return pd.DataFrame(columns=["query_category", "retrieved_category", "count", "share"])
    table = frame.groupby(["query_category", "retrieved_category"]).size().rename("count").reset_index()
    table["share"] = table["count"] / table["query_category"].map(sizes).astype(float)
    table = table.sort_values(["count", "share", "query_category", "retrieved_category"],
                              ascending=[False, False, True, True], kind="stable")
    return table.head(int(top)).reset_index(drop=True)


def project_2d(emb: np.ndarray, method: str = "tsne", seed: int = 0, distance: str = "euclidean") -> np.ndarray:
    """``(N, 2)`` coordinates of a 2-D map of the embeddings: ``pca`` (the two principal axes) or ``tsne``
    (sklearn's t-SNE, PCA-initialised, on at most 50 principal axes, perplexity capped for small sets), seeded.
    Cosine embeddings are L2-normalised first."""
    from sklearn.decomposition import PCA

    if method not in MAP_METHODS:
        raise ValueError(f"unknown embedding map method {method!r}; valid: {list(MAP_METHODS)}")
    check_distance(distance)
    x = np.asarray(emb, dtype=np.float64)
    if distance == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if len(x) < 3:
        return np.zeros((len(x), 2)) if len(x) < 2 else np.array([[-1.0, 0.0], [1.0, 0.0]])
    if x.shape[1] > len(x):  # same distances in at most N dimensions (a classifier's 40000 features -> N)
        from partmatch.ml.evaluation import span_coordinates

        x = span_coordinates(x - x.mean(axis=0))[0]
    width = min(x.shape[1], len(x))
    if method == "pca" or len(x) < 5:
        xy = PCA(n_components=min(2, width), random_state=seed).fit_transform(x)
        return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    from sklearn.manifold import TSNE

    if x.shape[1] > 50:
        x = PCA(n_components=min(50, width), random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, (len(x) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def gallery_queries(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Rows of up to ``n`` query photos for a neighbour gallery: one photo (drawn with ``seed``) from each of
    ``n`` categories with at least two photos (drawn with ``seed`` too), in category order."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    names, counts = np.unique(labels, return_counts=True)
    eligible = names[counts > 1]
    chosen = np.sort(rng.choice(eligible, size=min(int(n), len(eligible)), replace=False)) if len(eligible) else []
    return np.array([rng.choice(np.flatnonzero(labels == c)) for c in chosen], dtype=np.int64)
