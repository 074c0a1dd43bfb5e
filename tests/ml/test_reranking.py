"""Tests of re-ranking (partmatch.ml.reranking through GalleryIndex.search(rerank=...)): alpha-QE and k-reciprocal
encoding against independent numpy references of the papers' formulas on hand-made embeddings, the learned
pairwise re-ranker, approximate first stages, persistence and validation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from partmatch.ml import evaluation as E
from partmatch.ml.reranking import PairwiseReranker, RerankConfig, k_reciprocal_local
from partmatch.ml.retrieval import DISTANCES, GalleryIndex, IndexConfig, fit_pairwise_reranker, identify


def unit(deg):
    """Unit vectors at these angles (degrees) in the plane."""
    rad = np.deg2rad(np.asarray(deg, dtype=np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


def dist_fn(distance):
    def f(a, b):
        if distance == "cosine":
            a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
        return np.abs(a - b).sum() if distance == "manhattan" else np.sqrt(((a - b) ** 2).sum())
    return f


# ============================================================================================== alpha-QE


def ref_alpha_qe_order(q, gallery, distance, n, alpha):
    """Radenovic et al.'s alpha-QE, written out: the n nearest items x_i, weights cos(q, x_i)^alpha (negative
    similarities count 0), q' = (q + sum w x) / (1 + sum w) (normalised for cosine), gallery sorted by d(q', x)."""
    d = dist_fn(distance)
    if distance == "cosine":
        gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
        q = q / np.linalg.norm(q)
    first = sorted(range(len(gallery)), key=lambda j: (d(q, gallery[j]), j))
    num, den = q.copy(), 1.0
    for j in first[:n]:
        cos = q @ gallery[j] / (np.linalg.norm(q) * np.linalg.norm(gallery[j]))
        w = max(cos, 0.0) ** alpha
        num, den = num + w * gallery[j], den + w
    expanded = num / den
    if distance == "cosine":
        expanded = expanded / np.linalg.norm(expanded)
    return first, sorted(range(len(gallery)), key=lambda j: (d(expanded, gallery[j]), j))


def test_alpha_qe_hand_example_true_match_second_then_first():
    """Query at 0 deg; a wrong item at 20 deg, three right ones at -25, -30, -60 deg. Plain: the wrong item is
    nearest. alpha-QE (n=3, alpha=3) by hand: w = cos(20)^3 = 0.830, cos(25)^3 = 0.744, cos(30)^3 = 0.650, so
    q' = normalise(q + 0.830 x20 + 0.744 x-25 + 0.650 x-30) points at -6.72 deg: -25 (18.3 deg away) and
    -30 (23.3) now come before 20 (26.7), then -60."""
    g = unit([20, -25, -30, -60])
    lab = np.array(["wrong", "right", "right", "right"])
    q = unit([0])
    index = GalleryIndex(g, lab, distance="cosine")
    plain = index.search(q, 4)
    assert plain.positions[0].tolist() == [0, 1, 2, 3]
    cfg = RerankConfig(mode="qe", top_n=4, qe_n=3, qe_alpha=3.0)
    rr = index.search(q, 4, rerank=cfg)
    assert rr.positions[0].tolist() == [1, 2, 0, 3]
    assert rr.labels[0, 0] == "right"
    # the distances stay the true query distances, in the new order
    np.testing.assert_allclose(rr.distances[0], plain.distances[0][[1, 2, 0, 3]], rtol=1e-6)
    expanded = q[0] + sum(np.cos(np.deg2rad(a)) ** 3 * unit([a])[0] for a in (20, -25, -30))
    assert np.rad2deg(np.arctan2(expanded[1], expanded[0])) == pytest.approx(-6.72, abs=0.01)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("n,alpha", [(1, 0.0), (3, 3.0), (5, 1.0)])
def test_alpha_qe_matches_reference(distance, n, alpha):
    rng = np.random.default_rng(3)
    g = rng.normal(size=(30, 6)) + 0.5
    qs = rng.normal(size=(4, 6)) + 0.5
    index = GalleryIndex(g, np.arange(30), distance=distance)
    rr = index.search(qs, 30, rerank=RerankConfig(mode="qe", top_n=30, qe_n=n, qe_alpha=alpha))
    for i, q in enumerate(qs):
        _, want = ref_alpha_qe_order(q, g.copy(), distance, n, alpha)
        assert rr.positions[i].tolist() == want


def test_alpha_qe_only_reorders_the_top_n():
    rng = np.random.default_rng(4)
    g = rng.normal(size=(40, 5))
    q = rng.normal(size=(6, 5))
    index = GalleryIndex(g, np.arange(40))
    plain = index.search(q, 7)
    rr = index.search(q, 7, rerank=RerankConfig(mode="qe", top_n=7, qe_n=3))
    for i in range(len(q)):
        assert sorted(rr.positions[i]) == sorted(plain.positions[i])
    # deeper than top_n: the first top_n re-ordered, the rest in the first stage's order after them
    deep = index.search(q, 12, rerank=RerankConfig(mode="qe", top_n=7, qe_n=3))
    np.testing.assert_array_equal(deep.positions[:, :7], rr.positions)
    np.testing.assert_array_equal(deep.positions[:, 7:], index.search(q, 12).positions[:, 7:])


# ========================================================================================== k-reciprocal


def ref_k_reciprocal(dist, k1, k2, lam):
    """Zhong et al. 2017, written from the paper's definitions with Python sets: N(p, k) the k+1 nearest
    (itself first), R(p, k) = {g in N(p, k): p in N(g, k)}, R* = R(p, k1) joined by every R(c, round(k1/2)),
    c in R(p, k1), that shares more than 2/3 of its members with it; V_pg = exp(-d(p, g)) on R*, normalised;
    local QE V_p <- mean of V over N(p, k2 - 1); d_J = 1 - sum min / sum max; d* = (1 - lam) d_J + lam d.
    ``dist`` is the (m, m) local distance matrix, row/col 0 the query; d is divided by each row's maximum."""
    m = len(dist)
    d = dist / dist.max(axis=1, keepdims=True)
    rank = [list(np.argsort(d[i], kind="stable")) for i in range(m)]

    def nn(p, k):
        return set(rank[p][: k + 1])

    def recip(p, k):
        return {g for g in nn(p, k) if p in nn(g, k)}

    v = np.zeros((m, m))
    for p in range(m):
        r = recip(p, k1)
        star = set(r)
        for c in r:
            rc = recip(c, int(np.around(k1 / 2)))
            if len(rc & r) > 2 / 3 * len(rc):
                star |= rc
        for g in star:
            v[p, g] = np.exp(-d[p, g])
        v[p] /= v[p].sum()
    if k2 != 1:
        v = np.stack([v[rank[p][:k2]].mean(axis=0) for p in range(m)])
    jac = np.array([1 - np.minimum(v[0], v[g]).sum() / np.maximum(v[0], v[g]).sum() for g in range(1, m)])
    return (1 - lam) * jac + lam * d[0, 1:]


def test_k_reciprocal_hand_example_true_match_second_then_first():
    """1-D: query at 0. The wrong part's photos sit at 1.0 and 1.5 / 1.6 / 1.7 (a tight group the 1.0 photo
    belongs to), the right part's at -1.2 / -1.4 / -1.6. Plain: 1.0 (wrong) first, -1.2 (right) second. With
    k1 = 3 the query is in the k-reciprocal set of the right photos, not of the wrong group (whose 3 nearest are
    each other): k-reciprocal ranks the three right photos first."""
    g = np.array([[1.0], [1.5], [1.6], [1.7], [-1.2], [-1.4], [-1.6]])
    lab = np.array(["W", "W", "W", "W", "R", "R", "R"])
    q = np.array([[0.0]])
    index = GalleryIndex(g, lab)
    assert index.search(q, 7).positions[0].tolist() == [0, 4, 5, 1, 2, 6, 3]
    cfg = RerankConfig(mode="k_reciprocal", top_n=7, k1=3, k2=1, lambda_value=0.3)
    rr = index.search(q, 7, rerank=cfg)
    assert rr.positions[0].tolist() == [4, 5, 6, 0, 1, 2, 3]
    pts = np.concatenate([q, g])
    want = ref_k_reciprocal((pts - pts.T) ** 2, 3, 1, 0.3)
    assert np.argsort(want, kind="stable").tolist() == [4, 5, 6, 0, 1, 2, 3]


@pytest.mark.parametrize("k1,k2,lam", [(3, 1, 0.3), (4, 2, 0.0), (6, 3, 0.5), (20, 6, 0.3)])
def test_k_reciprocal_local_matches_reference(k1, k2, lam):
    rng = np.random.default_rng(k1 * 10 + k2)
    pts = rng.normal(size=(12, 3))
    dist = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
    k1 = min(k1, 11)
    got = k_reciprocal_local(dist[None], k1, k2, lam)[0]
    np.testing.assert_allclose(got, ref_k_reciprocal(dist, k1, k2, lam), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("distance", DISTANCES)
def test_k_reciprocal_search_matches_reference(distance):
    """Through the index: the local set is the query and its top_n candidates; distances are squared L2
    (euclidean, cosine on normalised vectors) or L1 (manhattan)."""
    rng = np.random.default_rng(5)
    g = rng.normal(size=(15, 4)) + 1.0
    qs = rng.normal(size=(3, 4)) + 1.0
    index = GalleryIndex(g, np.arange(15), distance=distance)
    cfg = RerankConfig(mode="k_reciprocal", top_n=9, k1=4, k2=2, lambda_value=0.3)
    rr = index.search(qs, 9, rerank=cfg)
    plain = index.search(qs, 9)
    d = dist_fn(distance)
    for i, q in enumerate(qs):
        cand = plain.positions[i]
        pts = np.concatenate([q[None], g[cand]])
        local = np.array([[d(a, b) for b in pts] for a in pts])
        if distance != "manhattan":
            local = local**2
        want = cand[np.argsort(ref_k_reciprocal(local, 4, 2, 0.3), kind="stable")]
        assert rr.positions[i].tolist() == want.tolist()


def test_k_reciprocal_padding_and_k_beyond_gallery():
    g = np.array([[0.0], [1.0], [2.0]])
    index = GalleryIndex(g, ["a", "b", "c"])
    rr = index.search(np.array([[0.1]]), 5, rerank=RerankConfig(mode="k_reciprocal", top_n=5, k1=2, k2=1))
    assert sorted(rr.positions[0, :3].tolist()) == [0, 1, 2]
    assert rr.positions[0, 3:].tolist() == [-1, -1]
    assert np.isinf(rr.distances[0, 3:]).all()


# ============================================================================================ approximate


@pytest.mark.parametrize("approximate", ["hnsw", "ivf"])
@pytest.mark.parametrize("mode", ["qe", "k_reciprocal"])
def test_rerank_on_approximate_index_matches_exact(approximate, mode):
    """Re-ranking works on the candidates an HNSW / IVF index returns; on an easy set they are the exact ones,
    so the re-ranked orders agree."""
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(20, 8)) * 5
    g = np.repeat(centres, 20, axis=0) + rng.normal(size=(400, 8))
    qs = centres[:5] + rng.normal(size=(5, 8)) * 0.5
    cfg = RerankConfig(mode=mode, top_n=15, k1=5, k2=2)
    exact = GalleryIndex(g, np.arange(400)).search(qs, 10, rerank=cfg)
    approx_index = GalleryIndex(g, np.arange(400), config=IndexConfig(exact_max=10, approximate=approximate,
                                                                       nprobe=64))
    assert approx_index.kind == approximate
    approx = approx_index.search(qs, 10, rerank=cfg)
    np.testing.assert_array_equal(approx.positions, exact.positions)


# ============================================================================================== pairwise


def noisy_classes(n_classes, per_class, seed):
    """Category = first coordinate (classes 1 apart, small noise); 6 more coordinates of large noise hide it
    from the plain distance. A pairwise head can learn to look at |a0 - b0| only."""
    rng = np.random.default_rng(seed)
    lab = np.repeat(np.arange(n_classes), per_class)
    x = np.concatenate([lab[:, None] * 1.0 + rng.normal(size=(len(lab), 1)) * 0.05,
                        rng.normal(size=(len(lab), 6)) * 1.5], axis=1)
    return x.astype(np.float32), lab


def test_pairwise_reranker_learns_what_the_distance_misses():
    x, lab = noisy_classes(12, 20, seed=0)
    cfg = RerankConfig(mode="pairwise", top_n=40, pairwise_neighbours=40, pairwise_hidden=32, pairwise_epochs=10,
                       pairwise_lr=3e-3, pairwise_batch_size=256, seed=0)
    reranker = fit_pairwise_reranker(x, lab, "euclidean", cfg)
    # a new draw of the same categories: queries against the training photos
    xq, lq = noisy_classes(12, 5, seed=1)
    index = GalleryIndex(x, lab)
    plain = (index.search(xq, 1).labels[:, 0] == lq).mean()
    rr = index.search(xq, 1, rerank=cfg, reranker=reranker)
    reranked = (rr.labels[:, 0] == lq).mean()
    assert plain < 0.7
    assert reranked >= 0.95


def test_pairwise_training_pairs_are_the_top_n_lists():
    x, lab = noisy_classes(4, 10, seed=2)
    cfg = RerankConfig(mode="pairwise", pairwise_neighbours=5, pairwise_epochs=1, pairwise_max_anchors=40)
    reranker = fit_pairwise_reranker(x, lab, "euclidean", cfg)
    d = np.sqrt(((x[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1, kind="stable")[:, :5]
    assert reranker.info["pairs"] == 40 * 5
    assert reranker.info["positives"] == int((lab[nearest] == lab[:, None]).sum())


@pytest.mark.parametrize("distance", DISTANCES)
def test_untrained_pairwise_head_ranks_as_the_first_stage(distance):
    """The head is bias - scale * d + MLP with the MLP's last layer at zero: with nothing to learn (every label
    distinct: no positive pair) it stays untrained and the re-ranked order is the plain one."""
    rng = np.random.default_rng(8)
    g, q = rng.normal(size=(30, 5)), rng.normal(size=(4, 5))
    reranker = fit_pairwise_reranker(g, np.arange(30), distance, {"mode": "pairwise", "pairwise_neighbours": 5})
    assert reranker.info["trained"] == 0 and reranker.info["positives"] == 0
    index = GalleryIndex(g, np.arange(30), distance=distance)
    rr = index.search(q, 10, rerank={"mode": "pairwise", "top_n": 10}, reranker=reranker)
    np.testing.assert_array_equal(rr.positions, index.search(q, 10).positions)


def test_pairwise_bundle_is_plain_tensors_and_round_trips():
    x, lab = noisy_classes(4, 10, seed=3)
    cfg = RerankConfig(mode="pairwise", pairwise_neighbours=5, pairwise_epochs=2)
    reranker = fit_pairwise_reranker(x, lab, "cosine", cfg)
    buf = io.BytesIO()
    torch.save(reranker.to_bundle(), buf)
    buf.seek(0)
    loaded = PairwiseReranker.from_bundle(torch.load(buf, weights_only=True))
    assert loaded.distance == "cosine"
    cand = np.stack([x[:6]] * 3)
    ok = np.ones((3, 6), bool)
    np.testing.assert_array_equal(loaded.scores(x[:3], cand, ok), reranker.scores(x[:3], cand, ok))
    again = PairwiseReranker.from_bytes(reranker.to_bytes())
    np.testing.assert_array_equal(again.scores(x[:3], cand, ok), reranker.scores(x[:3], cand, ok))


def test_pairwise_reranker_file_round_trip(tmp_path):
    x, lab = noisy_classes(4, 10, seed=4)
    reranker = fit_pairwise_reranker(x, lab, "manhattan", {"mode": "pairwise", "pairwise_epochs": 2})
    reranker.save(tmp_path / "sub" / "reranker.pt")
    loaded = PairwiseReranker.load(tmp_path / "sub" / "reranker.pt")
    assert loaded.distance == "manhattan" and loaded.head.norm == 1.0 and loaded.info == reranker.info
    cand, ok = np.stack([x[:6]] * 2), np.ones((2, 6), bool)
    np.testing.assert_array_equal(loaded.scores(x[:2], cand, ok), reranker.scores(x[:2], cand, ok))
    with pytest.raises(ValueError, match="not a partmatch pairwise re-ranker"):
        PairwiseReranker.from_bundle({"format": "other"})


def test_pairwise_needs_a_reranker_of_the_right_size():
    index = GalleryIndex(np.eye(3), ["a", "b", "c"])
    with pytest.raises(ValueError, match="needs a trained re-ranker"):
        index.search(np.eye(3), 2, rerank={"mode": "pairwise"})
    x, lab = noisy_classes(3, 4, seed=0)
    other = fit_pairwise_reranker(x, lab, config={"mode": "pairwise", "pairwise_epochs": 1})
    with pytest.raises(ValueError, match="7-dimensional"):
        index.search(np.eye(3), 2, rerank={"mode": "pairwise"}, reranker=other)


# ============================================================================== identify, metrics, config


def test_identify_on_a_reranked_result_uses_the_nearest_true_distance():
    """Re-ranked results are not sorted by distance: the unknown-part test uses the nearest of the k, the
    vote's reference distance too (weights <= 1), the label the re-ranker's first choice."""
    from partmatch.ml.retrieval import SearchResult

    res = SearchResult(np.array([[2.0, 1.0]], np.float32), np.array([[0, 1]]), np.array([["x", "y"]], object),
                       np.array([["A", "B"]], object))
    out = identify(res, threshold=1.5, k=2)
    assert out.loc[0, "nearest_distance"] == 1.0
    assert out.loc[0, "verdict"] == "known"
    assert out.loc[0, "nearest_label"] == "A"
    # weights: B (d=1.0) 1, A (d=2.0) exp(-1 / 0.1) -> B wins with confidence 1 / (1 + e^-10)
    assert out.loc[0, "predicted_label"] == "B"
    assert out.loc[0, "confidence"] == pytest.approx(1 / (1 + np.exp(-10)), rel=1e-6)


def test_rerank_none_is_the_plain_search():
    rng = np.random.default_rng(7)
    g, q = rng.normal(size=(50, 4)), rng.normal(size=(5, 4))
    index = GalleryIndex(g, np.arange(50))
    a, b = index.search(q, 6), index.search(q, 6, rerank={"mode": "none"})
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_array_equal(a.distances, b.distances)


def test_retrieval_metrics_with_rerank_use_the_reranked_order():
    """The k-reciprocal hand example through the metrics: plain P@1 0 (the wrong photo is nearest), re-ranked 1."""
    g = np.array([[1.0], [1.5], [1.6], [1.7], [-1.2], [-1.4], [-1.6]])
    lab = np.array([0, 0, 0, 0, 1, 1, 1])
    q, ql = np.array([[0.0]]), np.array([1])
    plain = E.retrieval_metrics(q, ql, g, lab)
    cfg = RerankConfig(mode="k_reciprocal", top_n=7, k1=3, k2=1, lambda_value=0.3)
    rr = E.retrieval_metrics(q, ql, g, lab, rerank=cfg)
    assert plain["precision_at_1"] == 0.0
    assert rr["precision_at_1"] == 1.0
    assert rr["map_at_r"] == 1.0  # R = 3 right photos, all three first
    assert plain["map_at_r"] == pytest.approx((1 / 2 + 2 / 3) / 3)


@pytest.mark.parametrize("bad,match", [
    ({"mode": "rerank"}, "rerank.mode must be one of"),
    ({"top_n": 0}, "rerank.top_n"),
    ({"lambda_value": 1.5}, "rerank.lambda_value"),
    ({"k1": 2.5}, "rerank.k1"),
    ({"topn": 3}, "unknown key"),
])
def test_rerank_config_errors_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        RerankConfig.from_dict(bad)
