"""Tests of partmatch.ml.evaluation on hand-made embeddings whose answers are known."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
from torch import nn

from partmatch.ml import evaluation as E
from partmatch.ml import inference as I
from partmatch.ml.retrieval import GalleryIndex

RETRIEVAL_KEYS = ["precision_at_1", "r_precision", "map_at_r", "recall_at_1", "recall_at_2", "recall_at_4",
                  "recall_at_8", "knn_accuracy"]
PAIR_KEYS = ["pair_accuracy", "pair_precision", "pair_recall", "pair_f1", "roc_auc"]


def clusters(n_classes: int = 3, per_class: int = 6, dim: int = 4, spread: float = 0.1, seed: int = 0,
             offset: float = 0.0):
    """Well-separated clusters: centres 10 apart on the axes, tiny noise."""
    rng = np.random.default_rng(seed)
    centres = np.eye(max(n_classes, dim))[:n_classes, :dim] * 10.0 + offset
    y = np.repeat(np.arange(n_classes), per_class)
    x = centres[y] + rng.normal(scale=spread, size=(len(y), dim))
    return x.astype(np.float32), y


# ------------------------------------------------------------------------ brute-force reference metrics


def reference_retrieval(q, ql, g=None, gl=None, k_values=(1, 2, 4, 8), metric="euclidean"):
    """Plain numpy definitions (no faiss, no PML) for cross-checking; assumes distinct distances."""
    loo = g is None
    if loo:
        g, gl = q, ql
    diff = q[:, None, :].astype(np.float64) - g[None, :, :]
    d = np.abs(diff).sum(-1) if metric == "manhattan" else (diff**2).sum(-1)
    if loo:
        np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")
    if loo:
        order = order[:, :-1]
    p1, rp, mapr, knn = [], [], [], []
    rec = {k: [] for k in k_values}
    for i in range(len(q)):
        r = int((gl == ql[i]).sum()) - int(loo)
        if r <= 0:
            continue
        hits = gl[order[i]] == ql[i]
        p1.append(hits[0])
        rp.append(hits[:r].mean())
        prec = np.cumsum(hits[:r]) / np.arange(1, r + 1)
        mapr.append((prec * hits[:r]).sum() / r)
        for k in k_values:
            rec[k].append(hits[:k].any())
        nb = gl[order[i][:5]]
        counts = {lab: (nb == lab).sum() for lab in nb}
        best = max(counts.values())
        vote = next(lab for lab in nb if counts[lab] == best)
        knn.append(vote == ql[i])
    out = {"precision_at_1": np.mean(p1), "r_precision": np.mean(rp), "map_at_r": np.mean(mapr),
           "knn_accuracy": np.mean(knn)}
    out |= {f"recall_at_{k}": np.mean(v) for k, v in rec.items()}
    return out


# ---------------------------------------------------------------------------------------- retrieval


def test_separated_clusters_are_perfect_closed_set_and_leave_one_out():
    gallery, gl = clusters(seed=1)
    query, ql = clusters(per_class=4, seed=2)
    for res in (E.retrieval_metrics(query, ql, gallery, gl), E.retrieval_metrics(query, ql)):
        assert list(res) == RETRIEVAL_KEYS
        assert all(isinstance(v, float) for v in res.values())
        for key in RETRIEVAL_KEYS:
            assert res[key] == pytest.approx(1.0), key


def test_exactly_one_wrong_nearest_neighbour():
    # gallery: class c at x = 10c (c = 0..4), 3 items each; queries next to their own class except one
    gl = np.repeat(np.arange(5), 3)
    gallery = np.stack([10.0 * gl + np.tile([0.0, 0.3, 0.6], 5), np.zeros(15)], axis=1).astype(np.float32)
    ql = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    qx = 10.0 * ql + 0.1
    qx[3] = 10.0 * 4 - 0.2  # class-3 query placed right next to the class-4 items
    query = np.stack([qx, np.zeros(10)], axis=1).astype(np.float32)
    res = E.retrieval_metrics(query, ql, gallery, gl)
    assert res["precision_at_1"] == pytest.approx(9 / 10)
    assert res["recall_at_1"] == pytest.approx(9 / 10)
    assert res["knn_accuracy"] == pytest.approx(9 / 10)  # its 5-NN: 3 of class 4, 2 of class 3
    assert res["recall_at_8"] == pytest.approx(1.0)  # the class-3 items are within its 8 nearest
    # R = 3 for every query; the misplaced one's 3 nearest are all class 4 (AP@R 0), the rest are perfect
    assert res["map_at_r"] == pytest.approx(9 / 10) and res["r_precision"] == pytest.approx(9 / 10)


def test_leave_one_out_never_counts_the_query_itself():
    # points on a line, classes alternating, gaps all different: each point's nearest *other* point is
    # of the other class, while the point itself (distance 0) would be a perfect match
    gaps = 1.0 + 0.01 * np.arange(11)
    x = np.concatenate([[0.0], np.cumsum(gaps)])[:, None].astype(np.float32)
    y = np.arange(12) % 2
    res = E.retrieval_metrics(x, y)
    assert res["precision_at_1"] == 0.0
    assert res["recall_at_1"] == 0.0
    # 5 same-class others each; the brute-force reference (which drops the query itself) agrees on every metric
    ref = reference_retrieval(x, y)
    assert res["r_precision"] == pytest.approx(0.4)
    assert {k: res[k] for k in RETRIEVAL_KEYS} == pytest.approx({k: float(ref[k]) for k in RETRIEVAL_KEYS})
    # the same points as an explicit gallery do find themselves
    assert E.retrieval_metrics(x, y, x, y)["precision_at_1"] == 1.0


def test_single_sample_classes_are_excluded_from_leave_one_out_queries(caplog):
    x, y = clusters(n_classes=2, per_class=5, dim=3)
    lone = np.array([[-500.0, -500.0, -500.0]], dtype=np.float32)  # far from everything, own class
    xs, ys = np.concatenate([x, lone]), np.concatenate([y, [7]])
    with caplog.at_level(logging.WARNING, logger="partmatch.ml.evaluation"):
        res = E.retrieval_metrics(xs, ys)
    assert res["precision_at_1"] == 1.0  # would be 10/11 if the lone sample were a query
    assert res["knn_accuracy"] == 1.0
    assert "1 of 11 queries excluded" in caplog.text and "single-sample" in caplog.text


def test_closed_set_queries_of_unknown_classes_are_excluded():
    gallery, gl = clusters(n_classes=3, seed=1)
    query, ql = clusters(n_classes=3, per_class=2, seed=2)
    ql = ql.copy()
    ql[:2] = 99  # class absent from the gallery
    res = E.retrieval_metrics(query, ql, gallery, gl)
    assert res["precision_at_1"] == 1.0


@pytest.mark.parametrize("per_class", [4, 9, 10, 30])
def test_no_spurious_pml_warning_and_r_metrics_exact(per_class, caplog):
    # PML warns "k is less than the max bin count" in leave-one-out when k == R (it counts the query)
    x, y = clusters(n_classes=3, per_class=per_class, dim=3)
    with caplog.at_level(logging.WARNING):
        for res in (E.retrieval_metrics(x, y), E.retrieval_metrics(x, y, x, y)):
            assert res["r_precision"] == 1.0 and res["map_at_r"] == 1.0
    assert caplog.records == []


def test_all_queries_unretrievable_gives_nan():
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    res = E.retrieval_metrics(x, np.arange(4))
    assert list(res) == RETRIEVAL_KEYS
    assert all(np.isnan(v) for v in res.values())


@pytest.mark.parametrize("loo", [True, False])
def test_matches_brute_force_reference_on_noisy_data(loo):
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 8))
    yq = np.concatenate([np.repeat(np.arange(6), [2, 3, 4, 5, 6, 7]), [6]])  # class 6 is a singleton
    q = (np.concatenate([centres, rng.normal(size=(1, 8))])[yq] + rng.normal(scale=0.9, size=(len(yq), 8)))
    q = q.astype(np.float32)
    if loo:
        res, ref = E.retrieval_metrics(q, yq), reference_retrieval(q, yq)
    else:
        yg = np.repeat(np.arange(6), [3, 9, 2, 4, 6, 5])
        g = (centres[yg] + rng.normal(scale=0.9, size=(len(yg), 8))).astype(np.float32)
        res, ref = E.retrieval_metrics(q, yq, g, yg), reference_retrieval(q, yq, g, yg)
    assert 0.2 < res["precision_at_1"] < 1.0  # a non-trivial case
    for key in RETRIEVAL_KEYS:
        assert res[key] == pytest.approx(ref[key], abs=1e-9), key


def test_recall_at_k_is_monotone_in_k():
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(10), 6)
    x = (rng.normal(size=(10, 6))[y] + rng.normal(scale=1.5, size=(60, 6))).astype(np.float32)
    ks = (1, 2, 3, 4, 8, 16)
    res = E.retrieval_metrics(x, y, k_values=ks)
    recalls = [res[f"recall_at_{k}"] for k in ks]
    assert recalls == sorted(recalls)
    assert recalls[0] == pytest.approx(res["precision_at_1"])
    assert recalls[0] < recalls[-1]


def test_k_larger_than_gallery_uses_the_whole_gallery():
    gallery = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    gl = np.array([1, 2, 0])  # the class-0 item is the *last* (faiss pads short results with -1)
    query = np.array([[-0.1, 0.0]], dtype=np.float32)
    res = E.retrieval_metrics(query, np.array([0]), gallery, gl)
    assert res["precision_at_1"] == 0.0
    assert res["recall_at_2"] == 0.0
    assert res["recall_at_4"] == 1.0 and res["recall_at_8"] == 1.0
    assert res["knn_accuracy"] == 0.0  # 3 neighbours, three classes: tie -> nearest (class 1)
    assert res["r_precision"] == 0.0 and res["map_at_r"] == 0.0  # R = 1: only the nearest item counts


def test_knn_vote_majority_and_tie_break():
    labels = np.array([[1, 2, 2, 3, 3], [1, 2, 3, 4, 5], [4, 5, 5, 4, 6], [7, 7, 8, 8, 8]])
    assert E._knn_vote(labels).tolist() == [2, 1, 4, 8]


def test_prefix_applied_and_string_labels():
    x, y = clusters()
    names = np.array(["brake_disc", "oil_filter", "spark_plug"])[y]
    res = E.retrieval_metrics(x, names, prefix="open_set_")
    assert list(res) == [f"open_set_{k}" for k in RETRIEVAL_KEYS]
    assert res["open_set_precision_at_1"] == 1.0


def test_cosine_distance_differs_from_euclidean():
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    gallery = np.array([[10.0, 1.0], [0.9, 0.5]], dtype=np.float32)  # same direction far / close but rotated
    gl = np.array([0, 1])
    assert E.retrieval_metrics(query, [0], gallery, gl)["precision_at_1"] == 0.0
    assert E.retrieval_metrics(query, [0], gallery, gl, distance="cosine")["precision_at_1"] == 1.0
    with pytest.raises(ValueError, match="distance"):
        E.retrieval_metrics(query, [0], gallery, gl, distance="chebyshev")


def test_retrieval_input_errors_name_the_argument():
    x, y = clusters()
    with pytest.raises(ValueError, match="query_emb"):
        E.retrieval_metrics(np.zeros((0, 4), np.float32), [])
    with pytest.raises(ValueError, match="query_labels"):
        E.retrieval_metrics(x, y[:-1])
    with pytest.raises(ValueError, match="gallery_emb"):
        E.retrieval_metrics(x, y, np.zeros((0, 4), np.float32), np.zeros(0))
    with pytest.raises(ValueError, match="gallery_labels"):
        E.retrieval_metrics(x, y, x, y[:3])
    with pytest.raises(ValueError, match="both"):
        E.retrieval_metrics(x, y, x, None)
    with pytest.raises(ValueError, match="dimension"):
        E.retrieval_metrics(x, y, x[:, :2], y)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="query_emb.*NaN"):
        E.retrieval_metrics(bad, y)
    with pytest.raises(ValueError, match="k_values"):
        E.retrieval_metrics(x, y, k_values=(0, 1))


# ------------------------------------------------------------------------------------------ pairs


def test_sample_pairs_balanced_valid_and_deterministic():
    y = np.repeat(np.arange(8), [10, 11, 12, 13, 14, 15, 16, 17])  # 820 positive pairs exist
    a, b, same = E.sample_pairs(y, 301, seed=7)
    assert len(a) == len(b) == len(same) == 301
    assert a.dtype == np.int64 and same.dtype == bool
    assert same.sum() == 150 and (~same).sum() == 151
    assert np.array_equal(y[a] == y[b], same)
    assert (a != b).all()
    pairs = {tuple(sorted(p)) for p in zip(a.tolist(), b.tolist())}
    assert len(pairs) == 301  # enough distinct pairs exist, so none repeats
    a2, b2, same2 = E.sample_pairs(y, 301, seed=7)
    assert np.array_equal(a, a2) and np.array_equal(b, b2) and np.array_equal(same, same2)
    a3, b3, _ = E.sample_pairs(y, 301, seed=8)
    assert not (np.array_equal(a, a3) and np.array_equal(b, b3))
    assert not np.array_equal(same[:20], np.sort(same[:20]))  # shuffled, not positives-then-negatives


def test_sample_pairs_repeats_when_the_pool_is_small_and_rejects_impossible_sets():
    y = np.array([0, 0, 1, 1])  # 2 positive pairs, 4 negative pairs
    a, b, same = E.sample_pairs(y, 20, seed=0)
    assert same.sum() == 10
    assert np.array_equal(y[a] == y[b], same)
    assert {tuple(sorted(p)) for p, s in zip(zip(a.tolist(), b.tolist()), same) if s} == {(0, 1), (2, 3)}
    with pytest.raises(ValueError, match="single class"):
        E.sample_pairs(np.zeros(5), 10, 0)
    with pytest.raises(ValueError, match="two items"):
        E.sample_pairs(np.arange(5), 10, 0)
    with pytest.raises(ValueError, match="n_pairs"):
        E.sample_pairs(y, 1, 0)


def test_pair_distances_are_euclidean():
    emb = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]], dtype=np.float32)
    d = E.pair_distances(emb, np.array([0, 1, 2]), np.array([1, 2, 2]))
    np.testing.assert_allclose(d, [5.0, np.sqrt(13.0), 0.0])


def test_choose_threshold_on_separable_distances():
    rng = np.random.default_rng(0)
    pos, neg = rng.uniform(0.1, 0.9, 50), rng.uniform(1.5, 3.0, 70)
    d = np.concatenate([pos, neg])
    same = np.concatenate([np.ones(50, bool), np.zeros(70, bool)])
    perm = rng.permutation(len(d))
    thr, curve = E.choose_threshold(d[perm], same[perm])
    assert pos.max() < thr < neg.min()
    assert list(curve.columns) == ["threshold", "accuracy", "precision", "recall", "f1"]
    assert curve["accuracy"].max() == 1.0
    assert curve["threshold"].is_monotonic_increasing
    assert curve["recall"].is_monotonic_increasing
    assert E.pair_metrics(d, same, thr) == {"pair_accuracy": 1.0, "pair_precision": 1.0, "pair_recall": 1.0,
                                            "pair_f1": 1.0, "roc_auc": 1.0}


def test_choose_threshold_maximises_accuracy_on_overlapping_distances():
    rng = np.random.default_rng(1)
    same = rng.random(400) < 0.5
    d = np.where(same, rng.normal(1.0, 0.4, 400), rng.normal(1.8, 0.4, 400))
    d = np.round(d, 2)  # ties
    thr, curve = E.choose_threshold(d, same)
    brute = max(np.mean((d <= t) == same) for t in np.concatenate([[-1.0], np.unique(d)]))
    assert np.mean((d <= thr) == same) == pytest.approx(brute)
    assert curve["accuracy"].max() == pytest.approx(brute)
    assert 0.7 < brute < 1.0
    row = curve.iloc[int(np.argmin(np.abs(curve["threshold"] - 1.4)))]
    t = row["threshold"]
    m = E.pair_metrics(d, same, t)
    assert row["accuracy"] == pytest.approx(m["pair_accuracy"])
    assert row["precision"] == pytest.approx(m["pair_precision"])
    assert row["recall"] == pytest.approx(m["pair_recall"])
    assert row["f1"] == pytest.approx(m["pair_f1"])


def test_pair_metrics_known_values_and_prefix():
    d = np.array([0.1, 0.5, 0.5, 0.9, 1.2, 2.0])
    same = np.array([True, True, False, True, False, False])
    m = E.pair_metrics(d, same, 0.5, prefix="open_set_")
    assert list(m) == [f"open_set_{k}" for k in PAIR_KEYS]
    # predicted same: d <= 0.5 -> first three (inclusive); TP=2, FP=1, FN=1, TN=2
    assert m["open_set_pair_accuracy"] == pytest.approx(4 / 6)
    assert m["open_set_pair_precision"] == pytest.approx(2 / 3)
    assert m["open_set_pair_recall"] == pytest.approx(2 / 3)
    assert m["open_set_pair_f1"] == pytest.approx(2 / 3)
    # AUC: of the 9 (pos, neg) pairs, pos closer in 7, tie (0.5, 0.5) counts half
    assert m["open_set_roc_auc"] == pytest.approx(7.5 / 9)
    with pytest.raises(ValueError, match="distances"):
        E.pair_metrics([], [], 0.5)


def test_classification_accuracy():
    logp = torch.log_softmax(torch.tensor([[2.0, 0.1, 0.0], [0.0, 3.0, 0.1], [0.0, 0.2, 0.1]]), dim=1)
    assert E.classification_accuracy(logp, torch.tensor([0, 1, 2])) == pytest.approx(2 / 3)
    assert E.classification_accuracy(np.array([1, 1, 0, 2]), np.array([1, 0, 0, 2])) == 0.75
    with pytest.raises(ValueError, match="labels"):
        E.classification_accuracy(np.array([1, 2]), np.array([1]))
    with pytest.raises(ValueError, match="empty"):
        E.classification_accuracy(np.zeros((0, 3)), np.zeros(0))


# ------------------------------------------------------------------------------------------ embedding


class MeanEmbedder(nn.Module):
    """embed(x) = per-channel mean; forward would return something else, so using embed is observable."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.seen_training: list[bool] = []
        self.seen_grad: list[bool] = []

    def embed(self, x):
        self.seen_training.append(self.training)
        self.seen_grad.append(torch.is_grad_enabled())
        return x.mean(dim=(2, 3)) + self.dummy

    def forward(self, x):
        return torch.full((x.shape[0], 7), 123.0)


def test_embed_images_normalises_batches_and_uses_embed():
    imgs = np.zeros((7, 3, 4, 4), dtype=np.uint8)
    imgs[:, 0] = 255
    imgs[:, 1] = np.arange(7, dtype=np.uint8)[:, None, None] * 30
    model = MeanEmbedder()
    model.train()
    emb = I.embed_images(model, imgs, batch_size=3)
    assert emb.dtype == np.float32 and emb.shape == (7, 3)
    np.testing.assert_allclose(emb[:, 0], 1.0, atol=1e-6)  # (1 - 0.5) / 0.5
    np.testing.assert_allclose(emb[:, 2], -1.0, atol=1e-6)
    np.testing.assert_allclose(emb[:, 1], (np.arange(7) * 30 / 255 - 0.5) / 0.5, atol=1e-6)
    assert model.seen_training == [False, False, False] and model.seen_grad == [False] * 3
    assert model.training  # mode restored
    np.testing.assert_array_equal(I.embed_images(model, imgs, batch_size=256), emb)
    emb_c = I.embed_images(model, imgs, mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 0.25))
    np.testing.assert_allclose(emb_c[:, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(emb_c[:, 2], -4.0, atol=1e-6)


def test_embed_images_falls_back_to_forward_and_validates():
    seq = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    gray = np.random.default_rng(0).integers(0, 256, (4, 4, 4), dtype=np.uint8)  # (N, H, W)
    emb = I.embed_images(seq, gray)
    with torch.no_grad():
        ref = seq(torch.from_numpy(gray).float().div(255).sub(0.5).div(0.5)[:, None])
    np.testing.assert_allclose(emb, ref.numpy(), atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        I.embed_images(seq, gray.astype(np.float32))
    with pytest.raises(ValueError, match="images_uint8"):
        I.embed_images(seq, np.zeros((0, 1, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="mean"):
        I.embed_images(seq, gray, mean=(0.5, 0.5))


# ------------------------------------------------------------------------------------------ bundle


def test_evaluate_embeddings_keys_values_and_determinism():
    train, ytr = clusters(n_classes=4, per_class=8, seed=1)
    test, yte = clusters(n_classes=4, per_class=5, seed=2)
    open_x, yo = clusters(n_classes=3, per_class=4, seed=3, offset=100.0)
    res = E.evaluate_embeddings(train, ytr, test, yte, open_x, yo + 10, threshold=2.0, seed=11, n_pairs=200)
    expected = RETRIEVAL_KEYS + PAIR_KEYS + [f"open_set_{k}" for k in RETRIEVAL_KEYS + PAIR_KEYS]
    assert sorted(res) == sorted(expected)
    assert all(v == 1.0 for v in res.values()), res  # separated clusters, threshold in the gap
    for k in RETRIEVAL_KEYS:
        assert res[k] == E.retrieval_metrics(test, yte, train, ytr)[k]
    again = E.evaluate_embeddings(train, ytr, test, yte, open_x, yo + 10, threshold=2.0, seed=11, n_pairs=200)
    assert again == res
    # noisy embeddings: pair metrics depend on the pairs drawn, so on the seed
    rng = np.random.default_rng(0)
    noisy = test + rng.normal(scale=6.0, size=test.shape).astype(np.float32)
    r1 = E.evaluate_embeddings(train, ytr, noisy, yte, None, None, threshold=8.0, seed=1, n_pairs=200)
    r1b = E.evaluate_embeddings(train, ytr, noisy, yte, None, None, threshold=8.0, seed=1, n_pairs=200)
    r2 = E.evaluate_embeddings(train, ytr, noisy, yte, None, None, threshold=8.0, seed=2, n_pairs=200)
    assert r1 == r1b
    assert r1["pair_accuracy"] != r2["pair_accuracy"] or r1["roc_auc"] != r2["roc_auc"]
    assert sorted(r1) == sorted(RETRIEVAL_KEYS + PAIR_KEYS)  # no open set -> no open_set_ keys


@pytest.mark.parametrize("mode", ["qe", "k_reciprocal", "pairwise"])
def test_evaluate_embeddings_with_rerank_adds_reranked_keys_and_keeps_the_plain_ones(mode):
    rng = np.random.default_rng(4)
    train, ytr = clusters(n_classes=4, per_class=8, seed=1)
    test, yte = clusters(n_classes=4, per_class=5, seed=2)
    open_x, yo = clusters(n_classes=3, per_class=6, seed=3, offset=100.0)
    train = train + rng.normal(scale=3.0, size=train.shape).astype(np.float32)  # overlapping: re-ranking matters
    test = test + rng.normal(scale=3.0, size=test.shape).astype(np.float32)
    cfg = {"mode": mode, "top_n": 12, "k1": 5, "k2": 2, "qe_n": 3, "pairwise_epochs": 3, "pairwise_neighbours": 8}
    plain = E.evaluate_embeddings(train, ytr, test, yte, open_x, yo, threshold=2.0, seed=11, n_pairs=200)
    res = E.evaluate_embeddings(train, ytr, test, yte, open_x, yo, threshold=2.0, seed=11, n_pairs=200, rerank=cfg)
    extra = [f"rerank_{mode}_{k}" for k in RETRIEVAL_KEYS] + [f"open_set_rerank_{mode}_{k}" for k in RETRIEVAL_KEYS]
    assert sorted(res) == sorted([*plain, *extra])
    assert {k: res[k] for k in plain} == plain
    reranker = None
    if mode == "pairwise":  # trained on the gallery (train split) only
        from partmatch.ml.retrieval import fit_pairwise_reranker

        reranker = fit_pairwise_reranker(train, ytr, "euclidean", cfg)
    closed = E.retrieval_metrics(test, yte, train, ytr, rerank=cfg, reranker=reranker)
    opened = E.retrieval_metrics(open_x, yo, rerank=cfg, reranker=reranker)
    for k in RETRIEVAL_KEYS:
        assert res[f"rerank_{mode}_{k}"] == closed[k]
        assert res[f"open_set_rerank_{mode}_{k}"] == opened[k]


def test_evaluate_embeddings_empty_and_degenerate_open_set():
    train, ytr = clusters(seed=1)
    test, yte = clusters(per_class=3, seed=2)
    res = E.evaluate_embeddings(train, ytr, test, yte, np.zeros((0, 4), np.float32), np.zeros(0), 2.0, 0, 50)
    assert not any(k.startswith("open_set_") for k in res)
    # open set of singletons: nothing retrievable, no positive pair -> NaN, keys present
    res = E.evaluate_embeddings(train, ytr, test, yte, test[:3], np.array([5, 6, 7]), 2.0, 0, 50)
    assert all(np.isnan(res[f"open_set_{k}"]) for k in RETRIEVAL_KEYS + PAIR_KEYS)
    assert sorted(res) == sorted(RETRIEVAL_KEYS + PAIR_KEYS + [f"open_set_{k}" for k in RETRIEVAL_KEYS + PAIR_KEYS])
    assert all(res[k] == 1.0 for k in RETRIEVAL_KEYS + PAIR_KEYS)   # the closed set is still scored (separated)


def test_pair_sampling_covers_many_pairs():
    y = np.repeat(np.arange(20), 15)  # 2100 positive pairs exist, 1000 wanted
    a, b, same = E.sample_pairs(y, 2000, seed=3)
    n_distinct = len({tuple(sorted(p)) for p in zip(a.tolist(), b.tolist())})
    assert n_distinct == 2000
    # anchors cover (nearly) all images
    assert len(set(itertools.chain(a.tolist(), b.tolist()))) == 300


# ------------------------------------------------------------------- extras used by partmatch.ml.workflow


def test_embed_images_rows_select_and_order_without_copying_everything():
    imgs = (np.arange(6, dtype=np.uint8)[:, None, None, None] * 40 * np.ones((6, 1, 2, 2), np.uint8))
    model = MeanEmbedder()
    full = I.embed_images(model, imgs)
    sub = I.embed_images(model, imgs, rows=np.array([4, 1, 1]), batch_size=2)
    np.testing.assert_array_equal(sub, full[[4, 1, 1]])
    empty = I.embed_images(model, imgs, rows=np.array([], dtype=np.int64))
    assert empty.shape == (0, 1) and empty.dtype == np.float32


def test_predict_log_probs_normalises_and_feeds_classification_accuracy():
    class Logits(nn.Module):
        def forward(self, x):  # class scores from the mean brightness: dark -> 0, mid -> 1, bright -> 2
            v = x.mean(dim=(1, 2, 3))
            return torch.stack([-10 * (v + 1).abs(), -10 * v.abs(), -10 * (v - 1).abs()], dim=1)

    imgs = np.stack([np.full((1, 3, 3), v, np.uint8) for v in (0, 128, 255, 255)])
    logp = I.predict_log_probs(Logits(), imgs, batch_size=3)
    assert logp.shape == (4, 3) and logp.dtype == np.float32
    np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, atol=1e-5)
    assert logp.argmax(axis=1).tolist() == [0, 1, 2, 2]
    assert E.classification_accuracy(logp, [0, 1, 2, 0]) == 0.75
    sub = I.predict_log_probs(Logits(), imgs, rows=[2, 0])
    np.testing.assert_allclose(sub, logp[[2, 0]], atol=1e-6)


def test_cosine_pair_distances_and_scale_invariant_evaluation():
    emb = np.array([[1.0, 0.0], [5.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    d = E.pair_distances(emb, [0, 0, 0], [1, 2, 3], distance="cosine")
    np.testing.assert_allclose(d, [0.0, np.sqrt(2.0), 2.0], atol=1e-12)
    with pytest.raises(ValueError, match="distance"):
        E.pair_distances(emb, [0], [1], distance="l1")
    train, ytr = clusters(n_classes=4, per_class=8, seed=1, offset=1.0)
    test, yte = clusters(n_classes=4, per_class=5, seed=2, offset=1.0)
    scale = np.random.default_rng(0).uniform(0.1, 10.0, size=(len(test), 1)).astype(np.float32)
    kw = dict(open_emb=None, open_labels=None, threshold=0.5, seed=3, n_pairs=100, distance="cosine")
    r1 = E.evaluate_embeddings(train, ytr, test, yte, **kw)
    r2 = E.evaluate_embeddings(train, ytr, test * scale, yte, **kw)
    for key in r1:
        assert r1[key] == pytest.approx(r2[key], abs=1e-9), key
    assert r1["pair_accuracy"] == 1.0
    # Euclidean is not scale invariant: rescaled same-class points are far apart
    kw["distance"] = "euclidean"
    assert E.evaluate_embeddings(train, ytr, test, yte, **kw)["pair_accuracy"] == 1.0
    assert E.evaluate_embeddings(train, ytr, test * scale, yte, **kw)["pair_accuracy"] < 0.8


# ------------------------------------------------------------------ search through GalleryIndex, manhattan


class OldFaissKNN:
    """The knn_func retrieval_metrics used before GalleryIndex: PML's FaissKNN (IndexFlatL2) on embeddings
    L2-normalised beforehand for cosine."""

    def __init__(self, distance="euclidean"):
        from pytorch_metric_learning.utils.inference import FaissKNN

        self.inner, self.distance = FaissKNN(), distance
        self.distances = self.indices = None

    def __call__(self, query, k, reference=None, ref_includes_query=False):
        if self.distance == "cosine":
            query = torch.nn.functional.normalize(query, dim=1)
            reference = query if reference is None or ref_includes_query else \
                torch.nn.functional.normalize(reference, dim=1)
        self.distances, self.indices = self.inner(query, k, reference, ref_includes_query)
        return self.distances, self.indices


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("loo", [True, False])
def test_gallery_index_search_gives_the_old_faiss_metrics(monkeypatch, distance, loo):
    rng = np.random.default_rng(11)
    centres = rng.normal(size=(12, 16))
    yq = rng.integers(0, 12, 150)
    q = (centres[yq] + rng.normal(scale=1.1, size=(150, 16))).astype(np.float32)
    yg = rng.integers(0, 12, 400)
    g = (centres[yg] + rng.normal(scale=1.1, size=(400, 16))).astype(np.float32)
    args = (q, yq) if loo else (q, yq, g, yg)
    new = E.retrieval_metrics(*args, distance=distance, k_values=(1, 2, 4, 8, 16))
    seen = []
    monkeypatch.setattr(E, "_RecordingKNN", lambda d: seen.append(d) or OldFaissKNN(d))
    old = E.retrieval_metrics(*args, distance=distance, k_values=(1, 2, 4, 8, 16))
    assert seen == [distance]  # the old path really ran
    assert 0.2 < new["precision_at_1"] < 0.95  # non-trivial
    assert new == old


def test_recording_knn_is_the_gallery_index_search():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    knn = E._RecordingKNN("manhattan")
    d, i = knn(torch.from_numpy(x[:7]), 4, torch.from_numpy(x), ref_includes_query=False)
    res = GalleryIndex(x, np.zeros(40), distance="manhattan").search(x[:7], 4)
    np.testing.assert_array_equal(i.numpy(), res.positions)
    np.testing.assert_array_equal(d.numpy(), res.distances)
    # leave-one-out: the query's own row never appears, k neighbours remain
    _, i_loo = knn(torch.from_numpy(x), 4, torch.from_numpy(x), ref_includes_query=True)
    assert i_loo.shape == (40, 4)
    assert not (i_loo.numpy() == np.arange(40)[:, None]).any()
    brute = np.abs(x[:, None] - x[None]).sum(-1) + np.diag(np.full(40, np.inf))
    np.testing.assert_array_equal(i_loo.numpy(), np.argsort(brute, axis=1, kind="stable")[:, :4])


@pytest.mark.parametrize("loo", [True, False])
def test_manhattan_retrieval_matches_brute_force(loo):
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(5, 6))
    yq = np.repeat(np.arange(5), [3, 4, 5, 6, 7])
    q = (centres[yq] + rng.normal(scale=0.8, size=(len(yq), 6))).astype(np.float32)
    yg = np.repeat(np.arange(5), [4, 4, 6, 3, 5])
    g = (centres[yg] + rng.normal(scale=0.8, size=(len(yg), 6))).astype(np.float32)
    args = (q, yq) if loo else (q, yq, g, yg)
    res = E.retrieval_metrics(*args, distance="manhattan")
    ref = reference_retrieval(*args, metric="manhattan")
    assert 0.2 < res["precision_at_1"] < 1.0
    for key in RETRIEVAL_KEYS:
        assert res[key] == pytest.approx(ref[key], abs=1e-9), key
    # and the L1 ranking differs from the L2 one on this data somewhere
    assert reference_retrieval(*args) != ref


def test_manhattan_pair_distances():
    emb = np.array([[0.0, 0.0], [3.0, -4.0], [1.0, 1.0]], dtype=np.float32)
    d = E.pair_distances(emb, [0, 1, 2], [1, 2, 2], distance="manhattan")
    np.testing.assert_allclose(d, [7.0, 7.0, 0.0])


# ------------------------------------------------------------------------------------ open-set rejection


def test_open_set_rejection_hand_example():
    known = np.array([0.1, 0.2, 0.4, 0.9])
    correct = np.array([True, False, True, True])
    unknown = np.array([0.3, 0.5, 0.6, 1.0, np.inf])  # inf: an empty gallery never accepts
    curve, s = E.open_set_rejection(known, correct, unknown, threshold=0.45)
    # at 0.45: known accepted 0.1, 0.2, 0.4 -> FNMR 1/4; unknown accepted 0.3 -> FMR 1/5
    assert s["fnmr"] == pytest.approx(0.25) and s["fmr"] == pytest.approx(0.2)
    assert s["unknown_rejected"] == pytest.approx(0.8)
    assert s["known_identified"] == pytest.approx(0.5)  # 0.1 and 0.4 are accepted and right
    assert s["known_misnamed"] == pytest.approx(0.25)  # 0.2 accepted with a wrong name
    assert s["n_known"] == 4 and s["n_unknown"] == 5
    assert list(curve.columns) == ["threshold", "fmr", "fnmr", "known_identified", "known_misnamed"]
    assert len(curve) == 1 + 8  # below everything + 8 distinct finite distances
    first, last = curve.iloc[0], curve.iloc[-1]
    assert first["fmr"] == 0.0 and first["fnmr"] == 1.0  # nothing accepted
    assert last["threshold"] == 1.0 and last["fnmr"] == 0.0 and last["fmr"] == pytest.approx(4 / 5)
    assert curve["fmr"].is_monotonic_increasing and curve["fnmr"].is_monotonic_decreasing
    row = curve[curve["threshold"] == 0.4].iloc[0]  # the curve agrees with the point evaluation
    p = E.open_set_rejection(known, correct, unknown, threshold=0.4)[1]
    assert (row["fmr"], row["fnmr"], row["known_identified"]) == (p["fmr"], p["fnmr"], p["known_identified"])
    # EER: at t=0.3 FMR 1/5, FNMR 2/4 ... at t=0.4: FMR 1/5, FNMR 1/4 (gap 0.05, the closest)
    assert s["eer"] == pytest.approx((0.2 + 0.25) / 2)
    # 1 % quantile of [0.3, 0.5, 0.6, 1.0] (inf dropped) = 0.3 + 0.03 * 0.2 = 0.306; known >= it: 0.4, 0.9
    assert s["fnmr_at_fmr_1pct"] == pytest.approx(0.5)
    none = E.open_set_rejection(known, correct, unknown, threshold=None)[1]
    assert np.isnan(none["fmr"]) and none["fnmr_at_fmr_1pct"] == s["fnmr_at_fmr_1pct"]


def test_fnmr_at_fmr_matches_open_metric_learning_docs(monkeypatch):
    # calc_fnmr_at_fmr docstring: pos [0,0,1,1,2,2,5,5,9,9], neg [3,3,4,4,6,6,7,7,8,8]: fmr 0.1 -> 0.4, 0.5 -> 0.2
    pos = np.array([0, 0, 1, 1, 2, 2, 5, 5, 9, 9], dtype=float)
    neg = np.array([3, 3, 4, 4, 6, 6, 7, 7, 8, 8], dtype=float)
    for target, expected in ((0.1, 0.4), (0.5, 0.2)):
        monkeypatch.setattr(E, "OPEN_SET_FMR_TARGET", target)
        assert E.open_set_rejection(pos, np.ones(10, bool), neg, 4.0)[1]["fnmr_at_fmr_1pct"] == pytest.approx(expected)


def test_open_set_rejection_input_errors():
    with pytest.raises(ValueError, match="unknown_nearest"):
        E.open_set_rejection([0.1], [True], [], 0.5)
    with pytest.raises(ValueError, match="known_correct"):
        E.open_set_rejection([0.1, 0.2], [True], [0.3], 0.5)
    with pytest.raises(ValueError, match="threshold"):
        E.open_set_rejection([0.1], [True], [0.3], float("nan"))


def test_rejection_curve_figure_draws_the_curve_and_the_operating_point():
    from partmatch.ml.plots import rejection_curve_figure

    known = np.array([0.1, 0.2, 0.4, 0.9])
    unknown = np.array([0.3, 0.5, 0.6, 1.0])
    curve, summary = E.open_set_rejection(known, [True, False, True, True], unknown, threshold=0.45)
    fig = rejection_curve_figure(curve, 0.45, summary)
    ax, ax_det = fig.axes
    fmr_line = ax.get_lines()[0]
    np.testing.assert_allclose(fmr_line.get_ydata(), curve["fmr"])
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "threshold = 0.450 (FMR 25.0%, FNMR 25.0%)" in legend
    assert "FNMR@FMR=1 % = 50.0%" in " ".join(t.get_text() for t in ax_det.get_legend().get_texts())
    with pytest.raises(ValueError, match="fmr"):
        rejection_curve_figure(curve.drop(columns="fmr"))


def test_leave_one_out_nearest_same_and_other_part_on_a_line():
    emb = np.array([[0.0], [1.0], [5.0], [7.0]], dtype=np.float32)
    known, unknown = E.leave_one_out_nearest(emb, np.array(["a", "a", "b", "b"]))
    np.testing.assert_allclose(known, [1, 1, 2, 2])
    np.testing.assert_allclose(unknown, [5, 4, 4, 6])
    known, _ = E.leave_one_out_nearest(emb, np.array(["a", "b", "c", "c"]))
    assert np.isinf(known[:2]).all() and list(known[2:]) == [2, 2]   # a single-photo part has no known match


def test_balanced_rejection_threshold_hand_example():
    # accept-known + reject-unknown is 4/3, 5/3, 4/3, 5/3, 4/3, 1 at 0.1 .. 0.6: the first best (0.2) moved into
    # the gap before the next distance (0.25)
    t = E.balanced_rejection_threshold(np.array([0.1, 0.2, 0.3]), np.array([0.25, 0.5, 0.6]))
    assert t == pytest.approx(0.225)
    assert E.balanced_rejection_threshold(np.array([0.1, 0.2]), np.array([0.8, 0.9])) == pytest.approx(0.5)


@pytest.mark.parametrize("distance", ["euclidean", "cosine", "manhattan"])
def test_pair_distances_of_wide_embeddings_span_several_chunks_exactly(distance):
    # 100,000-d rows: 41 pairs per chunk, so 101 pairs cross 2 chunk boundaries (the study CNN's features are
    # 40,000-d; a single copy of every pair would take GBs)
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(12, 100_000)).astype(np.float32)
    a, b = rng.integers(0, 12, 101), rng.integers(0, 12, 101)
    ea, eb = emb[a].astype(np.float64), emb[b].astype(np.float64)
    if distance == "cosine":
        ea, eb = ea / np.linalg.norm(ea, axis=1, keepdims=True), eb / np.linalg.norm(eb, axis=1, keepdims=True)
    expected = np.abs(ea - eb).sum(axis=1) if distance == "manhattan" else np.linalg.norm(ea - eb, axis=1)
    np.testing.assert_allclose(E.pair_distances(emb, a, b, distance=distance), expected, rtol=1e-12, atol=1e-9)
    assert (E.pair_distances(emb, a, b, distance=distance)[a == b] == 0).all()
