"""Second-stage re-ranking of a search's top-N candidates (used by :meth:`GalleryIndex.search`, ``rerank=``).

The first stage (:class:`partmatch.ml.retrieval.GalleryIndex`: exact, HNSW or IVF) returns each query's
``top_n`` nearest gallery items; a re-ranker re-orders those candidates (nothing outside them can enter):

* ``qe`` -- **alpha query expansion** (Radenovic, Tolias, Chum, TPAMI 2019 "Fine-tuning CNN image retrieval
  with no human annotation", section 5.2): the query is replaced by
  ``q' = (q + sum_{i<=n} w_i x_i) / (1 + sum_{i<=n} w_i)``, ``w_i = max(sim(q, x_i), 0) ** alpha`` over its ``n``
  nearest candidates ``x_i`` (``sim`` = cosine similarity; with the cosine distance ``q'`` is L2-normalised,
  which is the paper's ``normalise(q + sum w_i x_i)``); the candidates are re-ordered by their distance to ``q'``
  (:func:`alpha_query_expansion`).
* ``k_reciprocal`` -- **k-reciprocal encoding** (Zhong, Zheng, Cao, Li, CVPR 2017 "Re-ranking person
  re-identification with k-reciprocal encoding"): on the local set {query} + its candidates, the
  k-reciprocal neighbour sets ``R(p, k1)`` expanded by the ``R(c, round(k1/2))`` that share more than 2/3 of
  their members with it, Gaussian weights ``V_pg = exp(-d(p, g))`` normalised to sum 1, local query expansion
  (each ``V_p`` replaced by the mean over its ``k2`` nearest items), the Jaccard distance
  ``d_J = 1 - sum min(V_p, V_g) / sum max(V_p, V_g)`` and the final ``d* = (1 - lambda) d_J + lambda d``, with
  ``d`` the distances divided by each row's maximum as in the authors' code (squared L2 for the euclidean and
  cosine distances, as there; L1 for manhattan) (:func:`k_reciprocal_distances`).
* ``pairwise`` -- a **learned pairwise re-ranker** (the Siamese network as a second stage, as
  open-metric-learning's ``PairwiseReranker``): a (query, candidate) pair scores "same part" as a learned
  correction of the first-stage distance, ``bias - scale * d + MLP([|a - b|, a * b])``, trained with binary
  cross-entropy on the gallery's own top-N neighbour lists (positives = same category); candidates are ordered
  by that score (:class:`PairwiseReranker`).

Every function here works on arrays (no index, no Kedro); :meth:`GalleryIndex.search` gathers the candidates'
vectors and applies them. The re-ranked result keeps each candidate's true distance to the query (so the
calibrated unknown-part threshold still means the same), in the new order.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from partmatch.tempfiles import write_bytes_atomic

MODES: tuple[str, ...] = ("none", "qe", "k_reciprocal", "pairwise")
PAIRWISE_FORMAT = "partmatch-pairwise-reranker"
PAIRWISE_FORMAT_VERSION = 1
_LOCAL_CHUNK = 1 << 22  # local-set entries (queries x m x m) handled at once


@dataclass(frozen=True)
class RerankConfig:
    """How the top-N candidates of a search are re-ordered (YAML ``rerank``; same field names).

    Attributes:
        mode: ``none`` | ``qe`` | ``k_reciprocal`` | ``pairwise``.
        top_n: candidates of the first stage re-ordered (a search for more than ``top_n`` neighbours returns
            the deeper ones after them, in the first stage's order).
        qe_n: alpha-QE: nearest candidates averaged into the query (the paper's ``n``).
        qe_alpha: alpha-QE: weight exponent (``alpha``; 0 = plain average query expansion).
        k1, k2, lambda_value: k-reciprocal (the paper's ``k1``, ``k2``, ``lambda``; its defaults 20, 6, 0.3).
        pairwise_neighbours: pairwise: neighbours per gallery item the head is trained on (its top-N lists).
        pairwise_hidden: pairwise: hidden units of the MLP.
        pairwise_epochs, pairwise_lr, pairwise_batch_size: pairwise training (Adam, BCE).
        pairwise_max_anchors: pairwise: at most this many gallery items (seeded sample) give neighbour lists.
        seed: pairwise: seed of the sample, the initial weights and the batches.
    """

    mode: str = "none"
    top_n: int = 100
    qe_n: int = 2
    qe_alpha: float = 3.0
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    pairwise_neighbours: int = 20
    pairwise_hidden: int = 16
    pairwise_epochs: int = 2
    pairwise_lr: float = 3e-4
    pairwise_batch_size: int = 512
    pairwise_max_anchors: int = 3000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"rerank.mode must be one of {list(MODES)}, got {self.mode!r}")
        for name in ("top_n", "qe_n", "k1", "k2", "pairwise_neighbours", "pairwise_hidden", "pairwise_epochs",
                     "pairwise_batch_size", "pairwise_max_anchors"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"rerank.{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.qe_alpha, int | float) and self.qe_alpha >= 0):
            raise ValueError(f"rerank.qe_alpha must be a number >= 0, got {self.qe_alpha!r}")
        if not (isinstance(self.lambda_value, int | float) and 0 <= self.lambda_value <= 1):
            raise ValueError(f"rerank.lambda_value must be in [0, 1], got {self.lambda_value!r}")
        if not (isinstance(self.pairwise_lr, int | float) and self.pairwise_lr > 0):
            raise ValueError(f"rerank.pairwise_lr must be > 0, got {self.pairwise_lr!r}")

    @classmethod
    def from_dict(cls, d: Any) -> RerankConfig:
        """Config from a parameters dict / pydantic model / RerankConfig (None = no re-ranking)."""
        if d is None:
            return cls()
        if isinstance(d, RerankConfig):
            return d
        if hasattr(d, "model_dump"):
            d = d.model_dump()
        if not isinstance(d, dict):
            raise ValueError(f"rerank must be a mapping of re-ranking settings, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"rerank has unknown key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def candidates(self, k: int) -> int:
        """How deep the first stage searches for ``k`` results (``top_n`` of them re-ordered)."""
        return max(int(k), self.top_n) if self.active else int(k)


# ============================================================================================== helpers


def local_distances(a: np.ndarray, b: np.ndarray, distance: str) -> np.ndarray:
    """Batched float64 distances ``a[i, p]`` to ``b[i, g]``: (B, P, D) x (B, G, D) -> (B, P, G), in the
    index's units (L2 for euclidean and cosine -- the vectors are already normalised for cosine --, L1 for
    manhattan)."""
    ta = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    tb = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64))
    p = 1.0 if distance == "manhattan" else 2.0
    return torch.cdist(ta, tb, p=p, compute_mode="donot_use_mm_for_euclid_dist").numpy()


def _cosine(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Cosine similarity of ``q[i]`` with each ``x[i, j]``: (B, D), (B, N, D) -> (B, N)."""
    qn = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    xn = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return np.einsum("bd,bnd->bn", qn, xn)


# ============================================================================================== alpha-QE


def expand_queries(queries: np.ndarray, neighbours: np.ndarray, valid: np.ndarray, n: int, alpha: float,
                   distance: str) -> np.ndarray:
    """alpha-QE query vectors: ``(q + sum w_i x_i) / (1 + sum w_i)`` over the first ``n`` valid neighbours,
    ``w_i = max(cos(q, x_i), 0) ** alpha``; L2-normalised for the cosine distance.

    Args:
        queries: (B, D) query vectors (as the index searches them: normalised for cosine).
        neighbours: (B, N, D) the candidates' vectors, nearest first.
        valid: (B, N) bool, False for padding.
    """
    q = np.asarray(queries, dtype=np.float64)
    x = np.asarray(neighbours, dtype=np.float64)[:, :n]
    ok = np.asarray(valid, dtype=bool)[:, :n]
    w = np.where(ok, np.maximum(_cosine(q, x), 0.0) ** float(alpha), 0.0) if x.shape[1] else np.zeros((len(q), 0))
    expanded = (q + np.einsum("bn,bnd->bd", w, x)) / (1.0 + w.sum(axis=1, keepdims=True))
    if distance == "cosine":
        expanded /= np.maximum(np.linalg.norm(expanded, axis=1, keepdims=True), 1e-12)
    return expanded


def alpha_query_expansion(queries: np.ndarray, candidates: np.ndarray, valid: np.ndarray, distance: str,
                          n: int, alpha: float) -> np.ndarray:
    """Re-ranking distances of alpha-QE: (B, N) distance of each candidate to the expanded query (+inf for
    padding); sort ascending for the new order."""
    expanded = expand_queries(queries, candidates, valid, n, alpha, distance)
    d = local_distances(expanded[:, None, :], candidates, distance)[:, 0, :]
    return np.where(valid, d, np.inf)


# ========================================================================================== k-reciprocal


def _top_mask(rank: np.ndarray, k: int, m: int) -> np.ndarray:
    """(B, m, m) bool: ``mask[b, i, j]`` = j is among the first ``k`` of row i's ranking (itself included)."""
    out = np.zeros(rank.shape[:2] + (m,), dtype=bool)
    np.put_along_axis(out, rank[:, :, :k], True, axis=2)
    return out


def k_reciprocal_local(dist: np.ndarray, k1: int, k2: int, lambda_value: float,
                       valid: np.ndarray | None = None) -> np.ndarray:
    """k-reciprocal re-ranking distances of item 0 (the query) to items 1..m-1 of local sets.

    Args:
        dist: (B, m, m) original distances among {query} + its m-1 candidates (symmetric, zero diagonal),
            already in the reference code's units (squared L2 / L1).
        valid: (B, m) bool, False for padding items (they are pushed to the end of every ranking).

    Returns:
        (B, m-1) final distances ``(1 - lambda) d_J + lambda d`` (+inf for padding).
    """
    dist = np.asarray(dist, dtype=np.float64)
    b, m, _ = dist.shape
    if valid is None:
        valid = np.ones((b, m), dtype=bool)
    pair_ok = valid[:, :, None] & valid[:, None, :]
    row_max = np.where(pair_ok, dist, 0.0).max(axis=2, keepdims=True)
    d = np.where(pair_ok, dist / np.where(row_max > 0, row_max, 1.0), np.inf)  # row-normalised, as the code
    # padding ranks last (inf); the diagonal is 0 so every item is first in its own ranking
    rank = np.argsort(d, axis=2, kind="stable")
    k1 = int(k1)
    half = int(np.around(k1 / 2))
    forward = _top_mask(rank, k1 + 1, m) & pair_ok
    recip = forward & forward.transpose(0, 2, 1)  # R(i, k1): j in top(i) and i in top(j)
    fwd_half = _top_mask(rank, half + 1, m) & pair_ok
    recip_half = fwd_half & fwd_half.transpose(0, 2, 1)  # R(c, k1/2)
    rf, rhf = recip.astype(np.float32), recip_half.astype(np.float32)
    inter = np.einsum("bij,bcj->bic", rf, rhf)  # |R(i, k1) & R(c, k1/2)| (einsum: faster than matmul here)
    size_half = rhf.sum(axis=2)  # |R(c, k1/2)|
    add = recip & (inter > (2.0 / 3.0) * size_half[:, None, :])  # candidates c of R(i, k1) whose set joins
    expansion = recip | (np.einsum("bic,bcj->bij", add.astype(np.float32), rhf) > 0)
    weight = np.where(expansion, np.exp(-np.where(pair_ok, d, 0.0)), 0.0)
    v = weight / np.maximum(weight.sum(axis=2, keepdims=True), 1e-300)
    if k2 != 1:  # local query expansion: each V_i replaced by the mean of its k2 nearest items' (valid ones)
        near = _top_mask(rank, min(int(k2), m), m) & valid[:, None, :]
        v = np.einsum("big,bgj->bij", near.astype(np.float64), v) / np.maximum(near.sum(axis=2, keepdims=True), 1)
    vq = v[:, :1, :]  # the query's vector
    s_min = np.minimum(vq, v).sum(axis=2)[:, 1:]
    s_max = np.maximum(vq, v).sum(axis=2)[:, 1:]
    jaccard = 1.0 - s_min / np.maximum(s_max, 1e-300)
    final = (1.0 - lambda_value) * jaccard + lambda_value * d[:, 0, 1:]
    return np.where(valid[:, 1:], final, np.inf)


def k_reciprocal_distances(queries: np.ndarray, candidates: np.ndarray, valid: np.ndarray, distance: str,
                           k1: int, k2: int, lambda_value: float) -> np.ndarray:
    """Re-ranking distances of k-reciprocal encoding for each query over its candidates: (B, N), +inf for
    padding. The local set of a query is itself and its N candidates; ``k1`` is capped at N."""
    q = np.asarray(queries, dtype=np.float64)
    x = np.asarray(candidates, dtype=np.float64)
    bsz, n, _ = x.shape
    m = n + 1
    out = np.full((bsz, n), np.inf)
    chunk = max(1, _LOCAL_CHUNK // (m * m * m))
    k1 = min(int(k1), n)
    for s in range(0, bsz, chunk):
        pts = np.concatenate([q[s:s + chunk, None, :], x[s:s + chunk]], axis=1)
        ok = np.concatenate([np.ones((len(pts), 1), bool), valid[s:s + chunk]], axis=1)
        d = local_distances(pts, pts, distance)
        if distance != "manhattan":
            d = d * d  # the authors' code works on squared L2 distances
        out[s:s + chunk] = k_reciprocal_local(d, k1, k2, lambda_value, ok)
    return out


# ============================================================================================== pairwise


class PairwiseHead(torch.nn.Module):
    """Scores a (query, candidate) pair, one logit ("same part"): a correction learned over the first stage,
    ``bias - scale * d(a, b) + MLP([|a - b|, a * b])`` with ``d`` the index's distance (L1 for manhattan, else
    L2) and the MLP's last layer starting at zero -- untrained, the head ranks exactly as the first stage."""

    def __init__(self, dim: int, hidden: int, norm: float = 2.0) -> None:
        super().__init__()
        self.dim, self.hidden, self.norm = int(dim), int(hidden), float(norm)
        self.net = torch.nn.Sequential(torch.nn.Linear(2 * dim, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, 1))
        torch.nn.init.zeros_(self.net[2].weight)
        torch.nn.init.zeros_(self.net[2].bias)
        self.log_scale = torch.nn.Parameter(torch.zeros(()))
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        diff = a - b
        d = torch.linalg.vector_norm(diff, ord=self.norm, dim=-1)
        return self.bias - self.log_scale.exp() * d + self.net(torch.cat([diff.abs(), a * b], dim=-1)).squeeze(-1)


class PairwiseReranker:
    """The learned second stage: a :class:`PairwiseHead` trained on a gallery's top-N neighbour lists.

    Build with :meth:`fit` (or :func:`partmatch.ml.retrieval.fit_pairwise_reranker`, which searches the
    neighbour lists); save with :meth:`to_bundle` / :meth:`save` -- a dict of plain tensors and numbers that
    ``torch.load(weights_only=True)`` reads -- and load with :meth:`from_bundle` / :meth:`load`.
    """

    def __init__(self, head: PairwiseHead, distance: str, info: dict[str, Any] | None = None) -> None:
        self.head = head.eval()
        self.distance = distance
        self.info = dict(info or {})

    @property
    def dim(self) -> int:
        return self.head.dim

    @classmethod
    def fit(cls, vectors: np.ndarray, labels: np.ndarray, neighbours: np.ndarray, distance: str,
            config: RerankConfig) -> PairwiseReranker:
        """Train on (anchor, neighbour) pairs: ``neighbours`` (N, n) gallery positions of each anchor's nearest
        other items (-1 = none), a pair positive when both carry the same label. Anchors beyond
        ``config.pairwise_max_anchors`` are a seeded sample. Binary cross-entropy with the positive class
        weighted by negatives / positives (top-N lists are dominated by one or the other)."""
        vec = np.array(vectors, dtype=np.float32, copy=True)  # writable (torch.from_numpy)
        lab = np.asarray(labels)
        nb = np.asarray(neighbours, dtype=np.int64)[:, : config.pairwise_neighbours]
        rng = np.random.default_rng(config.seed)
        anchors = np.arange(len(vec))
        if len(anchors) > config.pairwise_max_anchors:
            anchors = np.sort(rng.choice(anchors, config.pairwise_max_anchors, replace=False))
        a_idx = np.repeat(anchors, nb.shape[1])
        b_idx = nb[anchors].reshape(-1)
        keep = b_idx >= 0
        a_idx, b_idx = a_idx[keep], b_idx[keep]
        target = (lab[a_idx] == lab[b_idx]).astype(np.float32)
        n_pos = float(target.sum())
        n_neg = float(len(target) - n_pos)
        torch.manual_seed(config.seed)
        head = PairwiseHead(vec.shape[1], config.pairwise_hidden, 1.0 if distance == "manhattan" else 2.0)
        info = {"pairs": int(len(target)), "positives": int(n_pos), "anchors": int(len(anchors)),
                "epochs": int(config.pairwise_epochs)}
        if len(target) == 0 or n_pos == 0 or n_neg == 0:
            info["trained"] = 0  # nothing to tell apart: an untrained head would only add noise
            return cls(head, distance, info)
        va = torch.from_numpy(vec)
        t = torch.from_numpy(target)
        ai, bi = torch.from_numpy(a_idx), torch.from_numpy(b_idx)
        with torch.no_grad():  # start from the standardised first-stage distance: logit = (mean - d) / std
            d = torch.linalg.vector_norm(va[ai] - va[bi], ord=head.norm, dim=-1)
            std = float(d.std()) if len(d) > 1 and float(d.std()) > 0 else 1.0
            head.log_scale.fill_(-math.log(std))
            head.bias.fill_(float(d.mean()) / std)
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(n_neg / n_pos))
        opt = torch.optim.Adam(head.parameters(), lr=config.pairwise_lr)
        gen = torch.Generator().manual_seed(config.seed)
        head.train()
        last = math.nan
        for _ in range(config.pairwise_epochs):
            order = torch.randperm(len(t), generator=gen)
            total = 0.0
            for s in range(0, len(order), config.pairwise_batch_size):
                sel = order[s:s + config.pairwise_batch_size]
                logits = head(va[ai[sel]], va[bi[sel]])
                loss = loss_fn(logits, t[sel])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(sel)
            last = total / len(order)
        info.update(trained=1, final_loss=float(last))
        return cls(head, distance, info)

    @torch.no_grad()
    def scores(self, queries: np.ndarray, candidates: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """(B, N) "same part" logits of each query with each candidate (-inf for padding)."""
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        x = torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.float32))
        if x.shape[-1] != self.dim:
            raise ValueError(f"the pairwise re-ranker scores {self.dim}-dimensional vectors, got {x.shape[-1]}")
        s = self.head(q[:, None, :].expand_as(x), x).numpy().astype(np.float64)
        return np.where(valid, s, -np.inf)

    def rerank_distances(self, queries: np.ndarray, candidates: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Ascending-is-better form of :meth:`scores` (minus the logit)."""
        return -self.scores(queries, candidates, valid)

    # ------------------------------------------------------------------ persistence

    def to_bundle(self) -> dict[str, Any]:
        """Plain tensors, strings and numbers only (``torch.load(weights_only=True)`` safe)."""
        return {"format": PAIRWISE_FORMAT, "format_version": PAIRWISE_FORMAT_VERSION, "distance": self.distance,
                "dim": self.head.dim, "hidden": self.head.hidden, "norm": self.head.norm,
                "state_dict": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
                "info": {k: v for k, v in self.info.items() if isinstance(v, int | float | str)}}

    @classmethod
    def from_bundle(cls, bundle: dict[str, Any]) -> PairwiseReranker:
        if not isinstance(bundle, dict) or bundle.get("format") != PAIRWISE_FORMAT:
            raise ValueError("not a partmatch pairwise re-ranker bundle")
        if bundle.get("format_version") != PAIRWISE_FORMAT_VERSION:
            raise ValueError(f"pairwise re-ranker format version {bundle.get('format_version')}, this partmatch "
                             f"reads {PAIRWISE_FORMAT_VERSION}")
        head = PairwiseHead(int(bundle["dim"]), int(bundle["hidden"]), float(bundle["norm"]))
        head.load_state_dict(bundle["state_dict"])
        return cls(head, str(bundle["distance"]), bundle.get("info"))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.to_bundle(), buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PairwiseReranker:
        return cls.from_bundle(torch.load(io.BytesIO(data), weights_only=True))

    def save(self, path: str | Path) -> None:
        """:meth:`to_bytes` written to ``path`` (parent folders created; through a temporary file)."""
        write_bytes_atomic(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> PairwiseReranker:
        """Read a :meth:`save` file (``torch.load(weights_only=True)``: no pickled code runs)."""
        return cls.from_bytes(Path(path).read_bytes())
