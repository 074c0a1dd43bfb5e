"""Where neighbours are searched: the gallery index of catalogue embeddings, and the k-NN vote over it.

:class:`GalleryIndex` holds the embeddings of a catalogue (one vector per photo) with each vector's id, part
name (label) and optional extra columns (file path, content hash, ...), and answers "which catalogue items
are nearest to these query embeddings". Everything that searches neighbours in partmatch goes through it:
the retrieval metrics (:func:`partmatch.ml.evaluation.retrieval_metrics` hands it to pytorch-metric-learning
as the ``knn_func``), the ``search`` pipelines and the served model, so metrics and search cannot disagree.

Search engine (faiss-cpu), chosen by the number of vectors (:class:`IndexConfig`, YAML ``search.index``):

* up to ``exact_max`` vectors: **exact** brute-force search (faiss's ``knn`` kernels, the code behind
  ``IndexFlatL2`` / ``IndexFlat(d, METRIC_L1)``) over the vectors themselves;
* above: an **approximate** index, ``IndexHNSWFlat`` (graph, default) or ``IndexIVFFlat`` (k-means cells,
  ``nprobe`` of ``nlist`` cells scanned per query).

Distances (:data:`DISTANCES`) are *true* distances in the units of
:func:`partmatch.ml.evaluation.pair_distances`, so a calibrated pair threshold applies to them unchanged:
``euclidean`` = L2 (not squared), ``cosine`` = L2 between L2-normalised vectors (``sqrt(2 - 2 cos)``, vectors
are normalised when they enter the index and the queries when they are searched), ``manhattan`` = L1. faiss
ranks the candidates; their distances are then recomputed in float64 from the stored vectors (and the
candidates re-sorted by them), so they match ``pair_distances`` to float32 precision.

Re-ranking (:mod:`partmatch.ml.reranking`, ``GalleryIndex.search(..., rerank=RerankConfig(...))``): the engine's
``top_n`` candidates are re-ordered by alpha query expansion (``qe``), k-reciprocal encoding (``k_reciprocal``)
or a learned pairwise head (``pairwise``, :func:`fit_pairwise_reranker`); the search is still this one.

:func:`identify` turns a :class:`SearchResult` into a part name per query by a distance-weighted vote of the
``k`` nearest items, with a confidence and the verdict :data:`UNKNOWN` when even the nearest item is farther
than the model's calibrated threshold.
"""

from __future__ import annotations

import io
import json
import logging
import math
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np
import pandas as pd

from partmatch.ml import reranking
from partmatch.ml.reranking import PairwiseReranker, RerankConfig
from partmatch.tempfiles import write_bytes_atomic

logger = logging.getLogger(__name__)

DISTANCES: tuple[str, ...] = ("euclidean", "cosine", "manhattan")
KINDS: tuple[str, ...] = ("exact", "hnsw", "ivf")
APPROXIMATE_KINDS: tuple[str, ...] = ("hnsw", "ivf")
UNKNOWN = "unknown part"
KNOWN = "known"
VOTE_TEMPERATURE = 0.1  # identify(): weight = exp(-(d - d_nearest) / (VOTE_TEMPERATURE * d_nearest + VOTE_EPS))
VOTE_EPS = 1e-6
IVF_TRAIN_ITERATIONS = 10
IVF_TRAIN_POINTS_PER_CELL = 64

FILE_FORMAT = "partmatch-gallery-index"
FILE_FORMAT_VERSION = 1
_RESERVED_COLUMNS = ("id", "label")
_RECOMPUTE_CHUNK = 1 << 22  # floats per chunk when recomputing neighbour distances
_RERANK_CHUNK = 1 << 24  # candidate-vector floats gathered at once for re-ranking


# ================================================================================================ config


@dataclass(frozen=True)
class IndexConfig:
    """How a :class:`GalleryIndex` searches (YAML ``search.index``; same field names).

    Attributes:
        exact_max: up to this many vectors the search is exact (brute force); above it ``approximate``.
        approximate: ``"hnsw"`` (``IndexHNSWFlat``, no training, best recall per millisecond) or ``"ivf"``
            (``IndexIVFFlat``: k-means cells trained on the gallery, smaller build cost at very large sizes).
        hnsw_m: HNSW graph degree (more = better recall, more memory and build time).
        ef_construction: HNSW candidate list size while building.
        ef_search: HNSW candidate list size while searching (raised to k when k is larger).
        nlist: IVF number of cells; None = ``4 * sqrt(N)`` (at most ``N // 39`` so that k-means has 39
            training points per cell, at least 1).
        nprobe: IVF cells scanned per query (at most ``nlist``).

    IVF k-means is seeded and runs 10 iterations on at most 64 sampled points per cell.
    """

    exact_max: int = 50_000
    approximate: str = "hnsw"
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    nlist: int | None = None
    nprobe: int = 16

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
                raise ValueError(
                    f"search.index.{name} must be an integer >= {minimum}, got {value!r}; fix it in "
                    "conf/base/parameters_search.yml (search.index)"
                )

        positive_int("exact_max", self.exact_max, 0)
        if self.approximate not in APPROXIMATE_KINDS:
            raise ValueError(
                f"search.index.approximate must be one of {list(APPROXIMATE_KINDS)}, got {self.approximate!r}; "
                "fix it in conf/base/parameters_search.yml (search.index)"
            )
        positive_int("hnsw_m", self.hnsw_m, 2)
        positive_int("ef_construction", self.ef_construction)
        positive_int("ef_search", self.ef_search)
        if self.nlist is not None:
            positive_int("nlist", self.nlist)
        positive_int("nprobe", self.nprobe)

    @classmethod
    def from_dict(cls, d: dict | None) -> IndexConfig:
        """Config from a parameters dict (None or {} = defaults); unknown keys are an error naming them."""
        if d is None:
            return cls()
        if isinstance(d, IndexConfig):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"search.index must be a mapping of index settings, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"search.index has unknown key(s) {unknown}; valid keys are {sorted(known)} "
                "(conf/base/parameters_search.yml)"
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def kind_for(self, n: int) -> str:
        """``"exact"`` up to ``exact_max`` vectors, else the configured approximate kind."""
        return "exact" if n <= self.exact_max else self.approximate

    def nlist_for(self, n: int) -> int:
        want = self.nlist if self.nlist is not None else int(round(4 * math.sqrt(max(n, 1))))
        return int(max(1, min(want, n // 39)))


# ================================================================================================ result


class SearchResult(NamedTuple):
    """Neighbours of each query, nearest first; rows padded (+inf / -1 / None) where fewer than k exist.

    ``distances`` (Nq, k) float32 true distances (see the module doc), ``positions`` (Nq, k) int64 rows of
    the gallery (``index.metadata.iloc[positions[i, j]]``), ``ids`` / ``labels`` (Nq, k) object arrays.
    """

    distances: np.ndarray
    positions: np.ndarray
    ids: np.ndarray
    labels: np.ndarray


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero), float32. The one normalisation of partmatch's
    cosine distance (index, retrieval metrics)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def check_distance(distance: str, name: str = "distance") -> str:
    if distance not in DISTANCES:
        raise ValueError(f"{name} must be one of {list(DISTANCES)}, got {distance!r}")
    return distance


def _as_matrix(name: str, x: Any, dim: int | None = None, allow_empty: bool = False) -> np.ndarray:
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if arr.ndim == 1 and dim is not None and arr.shape[0] == dim:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D), got shape {arr.shape}")
    if len(arr) == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least one vector")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} has dimension {arr.shape[1]} but the index holds {dim}-dimensional vectors; "
                         "embed with the model the index was built with")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr).all(axis=1)).sum())
        raise ValueError(f"{name} contains NaN or infinite values ({bad} row(s)); drop or re-embed them")
    return arr


def _as_column(name: str, values: Any, n: int) -> np.ndarray:
    arr = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values, dtype=object)
    arr = np.asarray(arr).reshape(-1)
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} entries but the embeddings have {n} rows")
    return arr


# ================================================================================================ index


class GalleryIndex:
    """Searchable catalogue of embeddings: where neighbours are searched (see the module doc).

    Args:
        embeddings: (N, D) vectors (float32 is stored; cosine: L2-normalised on entry). N may be 0.
        labels: (N,) part names.
        ids: (N,) unique ids (stored as str); default ``"0" .. "N-1"``.
        distance: one of :data:`DISTANCES`.
        config: :class:`IndexConfig` (or a dict of its fields); default ``IndexConfig()``.
        metadata: optional DataFrame of N rows of extra per-vector columns (e.g. ``path``, ``sha256``), kept
            aligned with the vectors through add / remove; its row order is the embeddings' order.

    Attributes: ``len(index)``, ``dim``, ``distance``, ``config``, ``kind`` (``"exact"`` | ``"hnsw"`` |
    ``"ivf"``, follows the size: adding past ``exact_max`` builds the approximate index, removing below it
    returns to exact), ``labels``, ``ids``, ``metadata`` (DataFrame: ``id``, ``label`` + extra columns; row
    ``i`` is gallery position ``i``).
    """

    def __init__(
        self,
        embeddings: Any,
        labels: Any,
        ids: Any = None,
        distance: str = "euclidean",
        config: IndexConfig | dict | None = None,
        metadata: pd.DataFrame | None = None,
    ) -> None:
        self.distance = check_distance(distance)
        self.config = IndexConfig.from_dict(config) if not isinstance(config, IndexConfig) else config
        emb = _as_matrix("embeddings", embeddings, allow_empty=True)
        self.dim = int(emb.shape[1])
        if self.dim < 1:
            raise ValueError("embeddings has 0 columns; pass (N, D) vectors with D >= 1")
        self._vectors = self._prepare(emb)
        self._meta = self._make_meta(len(emb), labels, ids, metadata, first_default_id=0)
        self._keys = np.arange(len(emb), dtype=np.int64)  # faiss labels of an IVF index (increasing)
        self._next_key = len(emb)
        self._faiss: Any = None
        self.kind = "exact"
        self._id_pos: dict[str, int] | None = None
        self._cols: tuple[np.ndarray, np.ndarray] | None = None
        self._sync_kind()

    # ------------------------------------------------------------------ properties

    def __len__(self) -> int:
        return len(self._vectors)

    def __repr__(self) -> str:
        return f"GalleryIndex(n={len(self)}, dim={self.dim}, distance={self.distance!r}, kind={self.kind!r})"

    @property
    def labels(self) -> np.ndarray:
        return self._columns()[1].copy()

    @property
    def ids(self) -> np.ndarray:
        return self._columns()[0].copy()

    def _columns(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, labels) object arrays, cached until the next add / remove."""
        if self._cols is None:
            self._cols = (self._meta["id"].to_numpy(dtype=object), self._meta["label"].to_numpy(dtype=object))
        return self._cols

    def _changed(self) -> None:
        self._id_pos = None
        self._cols = None

    @property
    def metadata(self) -> pd.DataFrame:
        return self._meta.copy()

    @property
    def vectors(self) -> np.ndarray:
        """The stored (N, D) float32 vectors (cosine: L2-normalised), read-only view."""
        v = self._vectors.view()
        v.flags.writeable = False
        return v

    # ------------------------------------------------------------------ building

    def _prepare(self, emb: np.ndarray) -> np.ndarray:
        return l2_normalize(emb) if self.distance == "cosine" else emb

    @property
    def _metric(self) -> int:
        return faiss.METRIC_L1 if self.distance == "manhattan" else faiss.METRIC_L2

    def _make_meta(self, n: int, labels: Any, ids: Any, metadata: pd.DataFrame | None,
                   first_default_id: int) -> pd.DataFrame:
        lab = _as_column("labels", labels, n)
        if ids is None:
            id_arr = np.array([str(i) for i in range(first_default_id, first_default_id + n)], dtype=object)
        else:
            id_arr = np.array([str(i) for i in _as_column("ids", ids, n)], dtype=object)
        _, first, counts = np.unique(id_arr.astype(str), return_index=True, return_counts=True)
        if (counts > 1).any():
            dup = sorted({str(id_arr[i]) for i in first[counts > 1]})
            raise ValueError(f"ids must be unique; duplicated: {dup[:5]}{' ...' if len(dup) > 5 else ''}")
        meta = pd.DataFrame({"id": pd.Series(id_arr, dtype=object), "label": pd.Series(list(lab), dtype=object)})
        if metadata is not None:
            if not isinstance(metadata, pd.DataFrame):
                raise ValueError(f"metadata must be a pandas DataFrame, got {type(metadata).__name__}")
            if len(metadata) != n:
                raise ValueError(f"metadata has {len(metadata)} rows but the embeddings have {n}")
            clash = [c for c in metadata.columns if c in _RESERVED_COLUMNS]
            if clash:
                raise ValueError(f"metadata must not have column(s) {clash}: pass them as ids= / labels=")
            extra = metadata.reset_index(drop=True)
            meta = pd.concat([meta, extra], axis=1)
        return meta

    def _new_faiss(self, kind: str, n: int) -> Any:
        cfg = self.config
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, cfg.hnsw_m, self._metric)
            index.hnsw.efConstruction = cfg.ef_construction
            return index
        nlist = cfg.nlist_for(n)
        quantizer = faiss.IndexFlat(self.dim, self._metric)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, self._metric)
        # k-means: seeded, 10 iterations on at most 64 points per cell (faiss's default 25 x 256 trains for
        # an hour at 1M x 1280 on two cores; the cells only route queries, nprobe absorbs the rest)
        index.cp.seed = 1234
        index.cp.niter = IVF_TRAIN_ITERATIONS
        index.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_CELL
        return index

    def _build_approximate(self, kind: str) -> None:
        """(Re)build the approximate faiss index from the stored vectors (labels: positions for HNSW,
        ``self._keys`` for IVF)."""
        index = self._new_faiss(kind, len(self))
        if kind == "ivf":
            index.train(self._vectors)
            index.add_with_ids(self._vectors, self._keys)
        else:
            index.add(self._vectors)
        self._faiss, self.kind = index, kind
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        if self.kind == "hnsw":
            self._faiss.hnsw.efSearch = self.config.ef_search
        elif self.kind == "ivf":
            self._faiss.nprobe = min(self.config.nprobe, self._faiss.nlist)

    def _sync_kind(self) -> None:
        """Make the search engine match the size: exact up to ``exact_max``, else build the approximate one
        if it is not there yet."""
        want = self.config.kind_for(len(self))
        if want == "exact":
            self._faiss, self.kind = None, "exact"
        elif self.kind != want or self._faiss is None:
            logger.info("building a %s index over %d vectors", want, len(self))
            self._build_approximate(want)

    # ------------------------------------------------------------------ search

    def _position_of(self) -> dict[str, int]:
        if self._id_pos is None:
            self._id_pos = {str(i): p for p, i in enumerate(self._meta["id"].tolist())}
        return self._id_pos

    def _exclusions(self, exclude_ids: Any, exclude_positions: Any, nq: int) -> np.ndarray | None:
        """(Nq, m) int64 positions to drop from each query's result (-1 = nothing), or None."""
        rows: list[list[int]] = [[] for _ in range(nq)]
        any_ = False
        if exclude_positions is not None:
            ep = np.asarray(exclude_positions, dtype=np.int64)
            if ep.ndim == 1:
                ep = ep[:, None]
            if len(ep) != nq:
                raise ValueError(f"exclude_positions has {len(ep)} rows but there are {nq} queries")
            for r, vals in enumerate(ep.tolist()):
                rows[r].extend(v for v in vals if v >= 0)
            any_ = True
        if exclude_ids is not None:
            if isinstance(exclude_ids, str) or len(exclude_ids) != nq:
                raise ValueError(
                    f"exclude_ids must have one entry per query ({nq}): an id, a list of ids, or None"
                )
            pos = self._position_of()
            for r, entry in enumerate(exclude_ids):
                if entry is None:
                    continue
                items = [entry] if isinstance(entry, str | int | np.integer) else list(entry)
                rows[r].extend(pos[str(i)] for i in items if str(i) in pos)
            any_ = True
        if not any_:
            return None
        width = max((len(r) for r in rows), default=0)
        out = np.full((nq, max(width, 1)), -1, dtype=np.int64)
        for r, vals in enumerate(rows):
            out[r, : len(vals)] = vals
        return out if width else None

    def _raw_search(self, q: np.ndarray, kk: int) -> np.ndarray:
        """(Nq, kk) candidate positions, nearest first by faiss, -1 padded."""
        if self.kind == "exact":
            _, pos = faiss.knn(q, self._vectors, kk, metric=self._metric)
            return pos
        if self.kind == "hnsw":  # per-call parameters: concurrent searches never see each other's ef
            params = faiss.SearchParametersHNSW(efSearch=max(self.config.ef_search, kk))
            # faiss.contrib.torch_utils (imported by pytorch-metric-learning) replaces `search` with a version
            # without `params`; the numpy original stays available as `search_numpy`
            search = getattr(self._faiss, "search_numpy", self._faiss.search)
            return search(q, kk, params=params)[1]
        _, labels = self._faiss.search(q, kk)
        pos = np.searchsorted(self._keys, labels)
        pos = np.minimum(pos, len(self._keys) - 1)
        return np.where((labels >= 0) & (self._keys[pos] == labels), pos, -1)

    def _true_distances(self, q: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """float64 distances between ``q[i]`` and ``vectors[pos[i, j]]`` (+inf where pos < 0)."""
        out = np.full(pos.shape, np.inf)
        if pos.size == 0:
            return out
        chunk = max(1, _RECOMPUTE_CHUNK // max(1, pos.shape[1] * self.dim))
        for s in range(0, len(q), chunk):
            p = pos[s : s + chunk]
            valid = p >= 0
            diff = self._vectors[np.where(valid, p, 0)].astype(np.float64) - q[s : s + chunk, None, :]
            if self.distance == "manhattan":
                d = np.abs(diff).sum(axis=2)
            else:
                d = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
            out[s : s + chunk] = np.where(valid, d, np.inf)
        return out

    def search(self, queries: Any, k: int, exclude_ids: Sequence | None = None, *,
               exclude_positions: Any = None, rerank: RerankConfig | dict | None = None,
               reranker: PairwiseReranker | None = None) -> SearchResult:
        """The ``k`` nearest gallery items of each query (rows of ``queries``), nearest first.

        Neighbours are searched in this index's vectors by its engine (``kind``): exact brute force, or the
        approximate HNSW / IVF index. Distances are true distances in ``pair_distances`` units.

        Args:
            queries: (Nq, D) embeddings (or one (D,) vector), from the model the index was built with;
                Nq = 0 gives (0, k) arrays.
            k: neighbours per query; with more than the gallery holds, rows are padded (+inf, -1, None).
            exclude_ids: optional, one entry per query: an id, a list of ids, or None -- those gallery items
                are skipped for that query (e.g. the query itself in leave-one-out search). The search then
                looks ``k + m`` deep (m = most exclusions of a query) and drops them.
            exclude_positions: the same by gallery position, (Nq,) or (Nq, m) int (-1 = none).
            rerank: optional :class:`~partmatch.ml.reranking.RerankConfig` (or its dict): the engine returns the
                ``max(k, top_n)`` nearest candidates, the re-ranker (``qe``, ``k_reciprocal`` or ``pairwise``)
                re-orders the first ``top_n`` (deeper ones follow in the engine's order, as open-metric-learning's
                re-rankers do: the cost stays bounded by ``top_n`` whatever ``k``); the first ``k`` are returned,
                each with its true distance to the query (so the distances are no longer sorted). ``mode: none`` =
                plain search.
            reranker: the trained :class:`~partmatch.ml.reranking.PairwiseReranker` of ``mode: pairwise``
                (:func:`fit_pairwise_reranker`).

        Returns:
            :class:`SearchResult` of (Nq, k) arrays.
        """
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer (neighbours per query), got {k!r}")
        k = int(k)
        cfg = None if rerank is None else RerankConfig.from_dict(rerank)
        if cfg is not None and cfg.active:
            return self._search_reranked(queries, k, cfg, reranker, exclude_ids, exclude_positions)
        q = self._prepare(_as_matrix("queries", queries, dim=self.dim, allow_empty=True))
        nq, n = len(q), len(self)
        excl = self._exclusions(exclude_ids, exclude_positions, nq)
        extra = 0 if excl is None else excl.shape[1]
        kk = min(k + extra, n)
        if kk == 0 or nq == 0:
            pos = np.full((nq, 0), -1, dtype=np.int64)
        else:
            pos = self._raw_search(q, kk).astype(np.int64, copy=False)
        if excl is not None and pos.shape[1]:
            drop = (pos[:, :, None] == excl[:, None, :]).any(axis=2) & (pos >= 0)
            pos = np.where(drop, -1, pos)
        dist = self._true_distances(q, pos)
        order = np.argsort(dist, axis=1, kind="stable")  # exact order among the candidates, padding last
        pos = np.take_along_axis(pos, order, axis=1)[:, :k]
        dist = np.take_along_axis(dist, order, axis=1)[:, :k]
        return self._result(pos, dist, k)

    def _result(self, pos: np.ndarray, dist: np.ndarray, k: int) -> SearchResult:
        """SearchResult of (Nq, k) arrays from candidate positions / distances (padded to k)."""
        nq = len(pos)
        if pos.shape[1] < k:
            pad = k - pos.shape[1]
            pos = np.concatenate([pos, np.full((nq, pad), -1, dtype=np.int64)], axis=1)
            dist = np.concatenate([dist, np.full((nq, pad), np.inf)], axis=1)
        valid = pos >= 0
        safe = np.where(valid, pos, 0)
        if len(self):
            id_arr, label_arr = self._columns()
            ids = np.where(valid, id_arr[safe], None)
            labels = np.where(valid, label_arr[safe], None)
        else:
            ids = np.full(pos.shape, None, dtype=object)
            labels = np.full(pos.shape, None, dtype=object)
        return SearchResult(dist.astype(np.float32), pos, ids.astype(object), labels.astype(object))

    def _search_reranked(self, queries: Any, k: int, cfg: RerankConfig, reranker: PairwiseReranker | None,
                         exclude_ids: Sequence | None, exclude_positions: Any) -> SearchResult:
        """First stage: the ``cfg.candidates(k)`` nearest by this index's engine; second stage: re-order them
        (:mod:`partmatch.ml.reranking`), keep the first ``k``."""
        if cfg.mode == "pairwise":
            if reranker is None:
                raise ValueError("rerank mode 'pairwise' needs a trained re-ranker: pass reranker="
                                 "fit_pairwise_reranker(...) (trained on the gallery's categories)")
            if reranker.dim != self.dim:
                raise ValueError(f"the pairwise re-ranker scores {reranker.dim}-dimensional vectors but the index "
                                 f"holds {self.dim}-dimensional ones; train it on this model's embeddings")
        first = self.search(queries, cfg.candidates(k), exclude_ids, exclude_positions=exclude_positions)
        q = self._prepare(_as_matrix("queries", queries, dim=self.dim, allow_empty=True))
        # only the first top_n are re-ordered; deeper ones (k > top_n) keep the first stage's order after them
        pos_all, dist_all = first.positions, first.distances.astype(np.float64)
        pos, dist = pos_all[:, :cfg.top_n], dist_all[:, :cfg.top_n]
        valid = pos >= 0
        score = np.full(pos.shape, np.inf)
        chunk = max(1, _RERANK_CHUNK // (max(1, pos.shape[1]) * self.dim))
        for s in range(0, len(q), chunk):
            ok = valid[s:s + chunk]
            cand = self._vectors[np.where(ok, pos[s:s + chunk], 0)]
            if cfg.mode == "qe":
                score[s:s + chunk] = reranking.alpha_query_expansion(q[s:s + chunk], cand, ok, self.distance,
                                                                     cfg.qe_n, cfg.qe_alpha)
            elif cfg.mode == "k_reciprocal":
                score[s:s + chunk] = reranking.k_reciprocal_distances(q[s:s + chunk], cand, ok, self.distance,
                                                                      cfg.k1, cfg.k2, cfg.lambda_value)
            else:
                score[s:s + chunk] = reranker.rerank_distances(q[s:s + chunk], cand, ok)
        score = np.where(valid, score, np.inf)
        order = np.argsort(score, axis=1, kind="stable")  # ties keep the first stage's order; padding last
        pos = np.concatenate([np.take_along_axis(pos, order, axis=1), pos_all[:, cfg.top_n:]], axis=1)[:, :k]
        dist = np.concatenate([np.take_along_axis(dist, order, axis=1), dist_all[:, cfg.top_n:]], axis=1)[:, :k]
        return self._result(pos, dist, k)

    # ------------------------------------------------------------------ add / remove

    def add(self, embeddings: Any, labels: Any, ids: Any, metadata: pd.DataFrame | None = None) -> None:
        """Append vectors (new part lines or photos) without touching the existing ones.

        ``ids`` must be new (a duplicate, within the batch or with the index, is a ValueError naming it).
        ``metadata`` must have the same extra columns as the index (missing ones are filled with NaN /
        None). Exact: the vectors are appended; HNSW / IVF: added to the existing graph / cells (IVF cells
        are not re-trained); crossing ``exact_max`` builds the approximate index.
        """
        emb = _as_matrix("embeddings", embeddings, dim=self.dim)
        new_meta = self._make_meta(len(emb), labels, ids, metadata, first_default_id=self._next_key)
        clash = sorted(set(new_meta["id"]) & set(self._position_of()))
        if clash:
            raise ValueError(
                f"ids already in the index: {clash[:5]}{' ...' if len(clash) > 5 else ''}; remove them first "
                "or give the new photos other ids"
            )
        vec = self._prepare(emb)
        keys = np.arange(self._next_key, self._next_key + len(vec), dtype=np.int64)
        extra_new = [c for c in new_meta.columns if c not in self._meta.columns]
        if extra_new and len(self._meta):
            logger.warning("add(): new metadata column(s) %s are empty for the existing vectors", extra_new)
        self._meta = pd.concat([self._meta, new_meta], ignore_index=True)
        self._vectors = np.concatenate([self._vectors, vec]) if len(self._vectors) else vec
        self._keys = np.concatenate([self._keys, keys])
        self._next_key += len(vec)
        self._changed()
        if self._faiss is not None and self.config.kind_for(len(self)) == self.kind:
            if self.kind == "ivf":
                self._faiss.add_with_ids(vec, keys)
            else:
                self._faiss.add(vec)
        else:
            self._sync_kind()

    def _remove_mask(self, mask: np.ndarray) -> int:
        n_removed = int(mask.sum())
        if not n_removed:
            return 0
        keep = ~mask
        removed_keys = self._keys[mask]
        self._vectors = np.ascontiguousarray(self._vectors[keep])
        self._meta = self._meta.loc[keep].reset_index(drop=True)
        self._keys = self._keys[keep]
        self._changed()
        want = self.config.kind_for(len(self))
        if want == "exact":
            self._faiss, self.kind = None, "exact"
        elif self.kind == "ivf" and want == "ivf":
            self._faiss.remove_ids(faiss.IDSelectorBatch(removed_keys))
        else:  # HNSW graphs cannot delete: rebuild from the remaining vectors
            logger.info("rebuilding the %s index after removing %d vectors", want, n_removed)
            self._build_approximate(want)
        return n_removed

    def remove(self, ids: Iterable) -> int:
        """Remove the items with these ids (unknown ids are ignored); returns how many were removed.

        Positions of the remaining items shift down (they stay in insertion order). HNSW is rebuilt from the
        remaining vectors (faiss's HNSW cannot delete); IVF deletes in place; exact drops the rows.
        """
        if isinstance(ids, str):
            ids = [ids]
        wanted = {str(i) for i in ids}
        return self._remove_mask(self._meta["id"].astype(str).isin(wanted).to_numpy())

    def remove_labels(self, labels: Iterable) -> int:
        """Remove every item of these part names (a whole part line); returns how many were removed."""
        if isinstance(labels, str):
            labels = [labels]
        wanted = list(labels)
        return self._remove_mask(self._meta["label"].isin(wanted).to_numpy())

    # ------------------------------------------------------------------ persistence

    def to_bytes(self) -> bytes:
        """One self-describing zip file, no pickle anywhere:

        * ``manifest.json``: format name and version, distance, kind, dim, size, config, faiss version;
        * ``vectors.npy``: the stored float32 vectors (``np.save``, ``allow_pickle=False``);
        * ``keys.npy``: the int64 faiss labels of an IVF index;
        * ``metadata.parquet``: ``id``, ``label`` and the extra columns;
        * ``index.faiss`` (approximate kinds only): ``faiss.serialize_index`` bytes, so loading does not
          rebuild the graph / retrain the cells. If it cannot be read back (e.g. another faiss build),
          :meth:`from_bytes` rebuilds it from the vectors.
        """
        manifest = {
            "format": FILE_FORMAT,
            "format_version": FILE_FORMAT_VERSION,
            "distance": self.distance,
            "kind": self.kind,
            "dim": self.dim,
            "size": len(self),
            "next_key": int(self._next_key),
            "config": self.config.to_dict(),
            "faiss_version": faiss.__version__,
            "label_kind": _label_kind(self._meta["label"]),
            "has_faiss_index": self._faiss is not None,
        }
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("manifest.json", json.dumps(manifest, indent=2))
            zf.writestr("vectors.npy", _npy_bytes(self._vectors))
            zf.writestr("keys.npy", _npy_bytes(self._keys))
            meta = self._meta.copy()
            meta["id"] = meta["id"].astype(str)
            if manifest["label_kind"] == "str":
                meta["label"] = meta["label"].astype(str)
            pq = io.BytesIO()
            meta.to_parquet(pq, index=False)
            zf.writestr("metadata.parquet", pq.getvalue())
            if self._faiss is not None:
                zf.writestr("index.faiss", faiss.serialize_index(self._faiss).tobytes())
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "gallery index bytes") -> GalleryIndex:
        """Inverse of :meth:`to_bytes`. ``source`` names the file in error messages."""
        try:
            zf = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile as err:
            raise ValueError(f"{source} is not a partmatch gallery index (not a zip file); "
                             "rebuild it with the search_index pipeline") from err
        with zf:
            names = set(zf.namelist())
            missing = {"manifest.json", "vectors.npy", "keys.npy", "metadata.parquet"} - names
            if missing:
                raise ValueError(f"{source} is not a partmatch gallery index (missing {sorted(missing)}); "
                                 "rebuild it with the search_index pipeline")
            manifest = json.loads(zf.read("manifest.json"))
            if manifest.get("format") != FILE_FORMAT:
                raise ValueError(f"{source}: format is {manifest.get('format')!r}, expected {FILE_FORMAT!r}")
            version = manifest.get("format_version")
            if version != FILE_FORMAT_VERSION:
                raise ValueError(
                    f"{source} has gallery-index format version {version}, this partmatch reads version "
                    f"{FILE_FORMAT_VERSION}; rebuild the index with the search_index pipeline"
                )
            vectors = np.load(io.BytesIO(zf.read("vectors.npy")), allow_pickle=False)
            keys = np.load(io.BytesIO(zf.read("keys.npy")), allow_pickle=False)
            meta = pd.read_parquet(io.BytesIO(zf.read("metadata.parquet")))
            faiss_bytes = zf.read("index.faiss") if "index.faiss" in names else None
        if (vectors.shape != (manifest["size"], manifest["dim"]) or len(meta) != len(vectors)
                or len(keys) != len(vectors)):
            raise ValueError(f"{source} is inconsistent (vectors {vectors.shape}, metadata {len(meta)} rows); "
                             "rebuild it with the search_index pipeline")
        self = cls.__new__(cls)
        self.distance = check_distance(manifest["distance"], f"{source}: distance")
        self.config = IndexConfig.from_dict(manifest["config"])
        self.dim = int(manifest["dim"])
        self._vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        meta = meta.reset_index(drop=True)
        meta["id"] = meta["id"].astype(object)
        meta["label"] = pd.Series(meta["label"].tolist(), dtype=object)
        self._meta = meta
        self._keys = keys.astype(np.int64)
        self._next_key = int(manifest.get("next_key", len(keys)))
        self._id_pos = None
        self._cols = None
        self._faiss, self.kind = None, "exact"
        kind = manifest["kind"]
        if kind not in KINDS:
            raise ValueError(f"{source}: unknown index kind {kind!r}; rebuild it with the search_index pipeline")
        if kind in APPROXIMATE_KINDS and faiss_bytes is not None:
            try:
                index = faiss.deserialize_index(np.frombuffer(faiss_bytes, dtype=np.uint8))
                if index.ntotal != len(vectors) or index.d != self.dim:
                    raise ValueError(f"faiss index holds {index.ntotal} x {index.d}")
                self._faiss, self.kind = index, kind
                self._apply_search_params()
            except Exception as err:  # noqa: BLE001 - any unreadable index is rebuilt from the vectors
                logger.warning("%s: stored %s index unreadable (%s); rebuilding it from the vectors",
                               source, kind, err)
                self._build_approximate(kind)
        elif kind in APPROXIMATE_KINDS:
            self._build_approximate(kind)
        return self

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_bytes` to ``path`` (parent folders created; written to a temporary file first)."""
        write_bytes_atomic(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> GalleryIndex:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"gallery index file {path} does not exist; build it with "
                                    "`kedro run --pipeline=search_index`")
        return cls.from_bytes(path.read_bytes(), source=str(path))


def _npy_bytes(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, arr, allow_pickle=False)
    return b.getvalue()


def _label_kind(labels: pd.Series) -> str:
    vals = labels.tolist()
    if all(isinstance(v, str) for v in vals):
        return "str"
    if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in vals):
        return "int"
    raise ValueError("labels must be all strings (part names) or all integers to be saved; "
                     f"got types {sorted({type(v).__name__ for v in vals})}")


# ================================================================================================ identify


def identify(result: SearchResult, threshold: float | None, k: int = 5,
             temperature: float = VOTE_TEMPERATURE, eps: float = VOTE_EPS) -> pd.DataFrame:
    """Part name per query from its nearest gallery items: a distance-weighted k-NN vote.

    Each of the ``k`` nearest items (padding ignored) votes for its label with weight
    ``exp(-(d - d1) / (temperature * d1 + eps))``, ``d1`` the nearest item's distance: the nearest votes 1,
    an item 10 % farther (``temperature`` 0.1) ``exp(-1)``. Relative to the nearest distance, so the vote is
    the same at any scale of distances, and photos much farther than the nearest barely count -- a part line
    with one or two catalogue photos is not outvoted by a big line's crowd of farther photos (with ``1/d``
    weights it was: on the demo catalogue 0.76 vs 0.91 for the nearest alone; on the car parts this vote
    scores 0.888 top-1 at k=5 vs 0.857 for the nearest alone and 0.884 for ``1/d``). An exact duplicate
    (``d1 = 0``) decides alone. The label with the largest summed weight wins (a tie goes to the tied label
    met nearest). ``confidence`` = the winner's share of the summed weight (1.0 when all k agree).

    Returns a DataFrame, one row per query, columns:

    * ``predicted_label``: the vote's winner (None when the gallery is empty);
    * ``confidence``: 0..1 (0 with no neighbour);
    * ``nearest_distance``: the smallest distance among the k (inf with no neighbour); ``nearest_label``: the
      first-ranked item's label (None with no neighbour) -- for a plain search both are the nearest item's, for a
      re-ranked one (``GalleryIndex.search(rerank=...)``) the label is the re-ranker's first choice while the
      unknown-part test still uses the nearest true distance;
    * ``verdict``: :data:`UNKNOWN` (``"unknown part"``) when ``nearest_distance > threshold`` (or no
      neighbour), else ``"known"``; ``threshold`` None never answers unknown;
    * ``answer``: ``predicted_label``, or :data:`UNKNOWN` when the verdict is unknown.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer (neighbours that vote), got {k!r}")
    if threshold is not None and (not isinstance(threshold, int | float | np.number) or math.isnan(threshold)):
        raise ValueError(f"threshold must be a number or None, got {threshold!r}")
    d = np.asarray(result.distances, dtype=np.float64)[:, :k]
    pos = np.asarray(result.positions)[:, :k]
    lab = np.asarray(result.labels, dtype=object)[:, :k]
    nq = len(d)
    valid = (pos >= 0) & np.isfinite(d)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (relative distance scale of the vote), got {temperature!r}")
    # the nearest distance among the k (= column 0 of a plain search; a re-ranked result is not sorted by it)
    d_min = np.where(valid, d, np.inf).min(axis=1, initial=np.inf)
    d1 = np.where(np.isfinite(d_min), d_min, 0.0)[:, None]
    w = np.where(valid, np.exp(-(np.where(valid, d, 0.0) - d1) / (temperature * d1 + eps)), 0.0)
    same = np.zeros((nq, d.shape[1], d.shape[1]), dtype=bool)
    for j in range(d.shape[1]):  # same[i, j, l]: neighbours j and l carry the same label (k is small)
        same[:, j, :] = (lab == lab[:, j : j + 1]) & valid & valid[:, j : j + 1]
    label_weight = np.einsum("ijl,il->ij", same.astype(np.float64), w)  # weight of neighbour j's label
    label_weight = np.where(valid, label_weight, -1.0)
    best = np.argmax(label_weight, axis=1) if d.shape[1] else np.zeros(nq, dtype=np.int64)
    total = w.sum(axis=1)
    has = valid.any(axis=1)
    rows = np.arange(nq)
    predicted = np.where(has, lab[rows, best] if d.shape[1] else None, None)
    confidence = np.where(has, label_weight[rows, best] / np.where(total > 0, total, 1.0), 0.0) \
        if d.shape[1] else np.zeros(nq)
    nearest = d_min
    nearest_label = np.where(valid[:, 0], lab[:, 0], None) if d.shape[1] else np.full(nq, None)
    unknown = ~has
    if threshold is not None:
        unknown |= nearest > float(threshold)
    verdict = np.where(unknown, UNKNOWN, KNOWN)
    answer = np.where(unknown, UNKNOWN, predicted)
    return pd.DataFrame({
        "predicted_label": pd.Series(list(predicted), dtype=object),
        "confidence": confidence.astype(np.float64),
        "nearest_distance": nearest.astype(np.float64),
        "nearest_label": pd.Series(list(nearest_label), dtype=object),
        "verdict": pd.Series(list(verdict), dtype=object),
        "answer": pd.Series(list(answer), dtype=object),
    })


# ================================================================================================ re-ranking


def fit_pairwise_reranker(vectors: Any, labels: Any, distance: str = "euclidean",
                          config: RerankConfig | dict | None = None) -> PairwiseReranker:
    """Train the pairwise re-ranker (:class:`~partmatch.ml.reranking.PairwiseReranker`) on a labelled gallery:
    each item's ``config.pairwise_neighbours`` nearest *other* items (exact search, the same distance as the
    index it will re-rank) are its pairs, positive when they carry the same label. Train it on the known
    (training) categories only; it then re-orders searches of any query, unseen categories included."""
    cfg = RerankConfig.from_dict(config)
    emb = _as_matrix("vectors", vectors)
    lab = _as_column("labels", labels, len(emb))
    index = GalleryIndex(emb, np.zeros(len(emb), dtype=np.int64), distance=distance,
                         config=IndexConfig(exact_max=max(len(emb), IndexConfig().exact_max)))
    k = min(cfg.pairwise_neighbours, max(len(emb) - 1, 1))
    found = index.search(emb, k, exclude_positions=np.arange(len(emb)))
    return PairwiseReranker.fit(index.vectors, lab, found.positions, distance, cfg)
