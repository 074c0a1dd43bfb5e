"""Interpretability: neighbours, per-category precision@1, confused pairs, 2-D maps, gallery queries, and the
clustering / classification probes (NMI, AMI, k-NN, linear SVM) -- on embeddings whose answers are known."""

import numpy as np
import pytest
from scipy.spatial.distance import pdist
from sklearn.neighbors import KNeighborsClassifier

from partmatch.ml import evaluation, interpret


def clusters(n_classes=4, per_class=6, dim=8, spread=0.01, seed=0):
    """Tight, far-apart clusters: class c around 10 * e_c."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    centres = 10.0 * np.eye(n_classes, dim)
    return (centres[labels] + spread * rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def test_perfectly_clustered_embeddings_score_one_everywhere():
    emb, labels = clusters()
    assert evaluation.clustering_metrics(emb, labels, prefix="open_set_") == {
        "open_set_nmi": pytest.approx(1.0), "open_set_ami": pytest.approx(1.0)}
    test_emb, test_labels = clusters(seed=1)
    assert evaluation.linear_svm_accuracy(emb, labels, test_emb, test_labels) == 1.0
    assert evaluation.retrieval_metrics(test_emb, test_labels, emb, labels)["knn_accuracy"] == 1.0


def test_clusters_that_mix_the_categories_halve_the_information():
    # categories 0/1 share one tight cluster, 2/3 another: the best 4 clusters still cannot tell 0 from 1
    emb, labels = clusters(n_classes=2, per_class=12)
    labels4 = labels * 2 + np.tile([0, 1], 12)  # each cluster holds two categories, half and half
    nmi = evaluation.clustering_metrics(emb, labels4)["nmi"]
    # k-means with 4 clusters on 2 point clouds splits each cloud by noise: I(C;Y) ~ H(cloud) = 1 bit, and
    # NMI = 2 I / (H(Y) + H(C)) <= 2 * 1 / (2 + 1) (H(Y) = 2 bits, H(C) >= 1) -- far from 1
    assert nmi <= 2 / 3 + 0.05


def test_knn_accuracy_is_sklearns_five_nearest_neighbours_classifier():
    rng = np.random.default_rng(3)
    train, ytrain = rng.normal(size=(60, 5)), rng.integers(0, 3, 60)
    test, ytest = rng.normal(size=(25, 5)), rng.integers(0, 3, 25)
    sk = KNeighborsClassifier(n_neighbors=5).fit(train, ytrain).predict(test)
    # odd votes over 3 classes can tie (2-2-1): compare on the queries whose vote has a single winner
    _, idx = KNeighborsClassifier(n_neighbors=5).fit(train, ytrain).kneighbors(test)
    counts = np.stack([(ytrain[idx] == c).sum(1) for c in range(3)], 1)
    clear = (counts == counts.max(1, keepdims=True)).sum(1) == 1
    assert clear.sum() >= 15
    ours = evaluation.retrieval_metrics(test[clear], ytest[clear], train, ytrain)["knn_accuracy"]
    assert ours == pytest.approx(float((sk[clear] == ytest[clear]).mean()))


def test_a_category_that_always_retrieves_another_is_the_top_confused_pair():
    emb, labels = clusters(n_classes=3, per_class=5)
    names = np.array(["A", "B", "C"])[labels]
    # A's photos sit exactly on B's: each A photo's nearest other photo is a B photo (closer than any A)
    rng = np.random.default_rng(1)
    emb = emb.copy()
    emb[names == "A"] = emb[names == "B"] + 1e-4 * rng.normal(size=(5, emb.shape[1]))
    emb[names == "A"] += np.array([0.05] + [0] * (emb.shape[1] - 1), dtype=np.float32) * np.arange(1, 6)[:, None]
    nb = interpret.leave_one_out_neighbours(emb, 5)
    table = interpret.confused_pairs(names, nb)
    assert (table.loc[0, "query_category"], table.loc[0, "retrieved_category"]) == ("A", "B")
    precision = interpret.per_category_precision(names, nb).set_index("category")["precision_at_1"]
    assert precision["C"] == 1.0 and precision.index[0] == "A"  # worst first
    assert table.loc[0, "count"] == int(round(table.loc[0, "share"] * 5))


def test_per_category_precision_and_confusions_by_hand():
    names = np.array(["A", "A", "B", "B", "B", "C"])
    # nearest other photo of each row, written by hand: A0->A1, A1->B2, B2->B3, B3->A0, B4->A0, C5->B4
    nb = np.array([[1], [2], [3], [0], [0], [4]])
    table = interpret.per_category_precision(names, nb)
    assert table.to_dict("records") == [{"category": "B", "queries": 3, "precision_at_1": pytest.approx(1 / 3)},
                                        {"category": "A", "queries": 2, "precision_at_1": 0.5}]  # C: one photo
    pairs = interpret.confused_pairs(names, nb)
    assert pairs[["query_category", "retrieved_category", "count"]].values.tolist() == [
        ["B", "A", 2], ["A", "B", 1]]  # C's single photo has nothing of its own to find: not a confusion
    assert pairs["share"].tolist() == pytest.approx([2 / 3, 1 / 2])


def test_pca_map_of_planar_embeddings_keeps_every_distance():
    rng = np.random.default_rng(0)
    plane = rng.normal(size=(2, 10))
    emb = rng.normal(size=(30, 2)) @ plane + 3.0
    xy = interpret.project_2d(emb, "pca", seed=0)
    np.testing.assert_allclose(pdist(xy), pdist(emb), rtol=1e-6)


def test_tsne_map_is_seeded_and_separates_clusters():
    emb, labels = clusters(n_classes=3, per_class=10, dim=64)
    a, b = interpret.project_2d(emb, "tsne", seed=4), interpret.project_2d(emb, "tsne", seed=4)
    np.testing.assert_array_equal(a, b)
    # every point's nearest point on the map is of its own cluster
    d = np.linalg.norm(a[:, None] - a[None], axis=2) + np.eye(len(a)) * 1e9
    assert (labels[d.argmin(1)] == labels).all()


def test_gallery_queries_take_one_photo_of_distinct_categories():
    names = np.array(["A", "A", "B", "C", "C", "C", "D", "D"])
    rows = interpret.gallery_queries(names, 10, seed=0)
    assert sorted(names[rows]) == ["A", "C", "D"]  # B has a single photo: nothing to retrieve
    assert len(interpret.gallery_queries(names, 2, seed=0)) == 2
    np.testing.assert_array_equal(rows, interpret.gallery_queries(names, 10, seed=0))


def test_span_coordinates_keep_every_inner_product_in_at_most_n_dimensions():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 50)).astype(np.float32)
    x[5] = x[0] + 2 * x[1]  # rank 5
    other = rng.normal(size=(3, 50)).astype(np.float32)
    z, w = evaluation.span_coordinates(x, other)
    assert z.shape == (6, 5) and w.shape == (3, 5)
    np.testing.assert_allclose(z @ z.T, x @ x.T, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(w @ z.T, other @ x.T, rtol=1e-4, atol=1e-3)  # projections onto the span kept
