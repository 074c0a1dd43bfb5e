"""Tests of partmatch.ml.retrieval: search against numpy brute force, approximate recall, persistence,
add / remove, identify() on hand-computed votes."""

from __future__ import annotations

import io
import logging
import zipfile

import numpy as np
import pandas as pd
import pytest

from partmatch.ml import evaluation as E
from partmatch.ml.retrieval import (
    DISTANCES,
    UNKNOWN,
    GalleryIndex,
    IndexConfig,
    SearchResult,
    identify,
)

APPROX = [IndexConfig(exact_max=10, approximate="hnsw"), IndexConfig(exact_max=10, approximate="ivf")]


def brute(q, g, distance, k):
    """Numpy float64 reference: (distances, positions) of the k nearest, ties by position."""
    q, g = np.asarray(q, np.float64), np.asarray(g, np.float64)
    if distance == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    diff = q[:, None, :] - g[None, :, :]
    d = np.abs(diff).sum(-1) if distance == "manhattan" else np.sqrt((diff**2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, axis=1), order


def clustered(n, dim=24, n_clusters=50, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    y = rng.integers(0, n_clusters, n)
    x = centres[y] + spread * rng.normal(size=(n, dim))
    return x.astype(np.float32), np.array([f"part_{c:02d}" for c in y], dtype=object)


# ------------------------------------------------------------------------------------------ exact search


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("k", [1, 5, 60])
def test_exact_search_equals_brute_force(distance, k):
    rng = np.random.default_rng(1)
    g = rng.normal(size=(60, 7)).astype(np.float32) * rng.uniform(0.5, 3.0, size=(60, 1)).astype(np.float32)
    q = rng.normal(size=(9, 7)).astype(np.float32)
    labels = np.array(list("abc") * 20, dtype=object)
    index = GalleryIndex(g, labels, distance=distance)
    assert index.kind == "exact" and len(index) == 60 and index.dim == 7
    res = index.search(q, k)
    d_ref, p_ref = brute(q, g, distance, k)
    np.testing.assert_array_equal(res.positions, p_ref)
    np.testing.assert_allclose(res.distances, d_ref, rtol=1e-5, atol=1e-5)
    assert res.distances.dtype == np.float32 and res.positions.dtype == np.int64
    assert res.ids.tolist() == [[str(p) for p in row] for row in p_ref]
    assert res.labels.tolist() == labels[p_ref].tolist()
    # the distances are those of evaluation.pair_distances (the units of the calibrated threshold)
    emb = np.concatenate([q, g])
    pair = E.pair_distances(emb, np.repeat(np.arange(9), k), 9 + res.positions.reshape(-1), distance=distance)
    np.testing.assert_allclose(res.distances.reshape(-1), pair, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("distance", DISTANCES)
def test_k_larger_than_the_gallery_is_padded(distance):
    g = np.array([[0.0, 1.0], [2.0, 0.5], [1.0, 1.0]], dtype=np.float32)
    index = GalleryIndex(g, ["x", "y", "z"], ids=["a", "b", "c"], distance=distance)
    res = index.search(np.array([[0.1, 0.9]], dtype=np.float32), 5)
    _, p_ref = brute([[0.1, 0.9]], g, distance, 3)
    assert res.positions.tolist() == [p_ref[0].tolist() + [-1, -1]]
    assert np.isfinite(res.distances[0, :3]).all() and np.isinf(res.distances[0, 3:]).all()
    assert res.ids[0, 3:].tolist() == [None, None] and res.labels[0, 3:].tolist() == [None, None]
    assert res.ids[0, :3].tolist() == [["a", "b", "c"][p] for p in p_ref[0]]


def test_cosine_ignores_vector_length_and_manhattan_differs_from_euclidean():
    g = np.array([[10.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    q = np.array([[1.0, 0.1]], dtype=np.float32)
    assert GalleryIndex(g, ["far", "near"]).search(q, 1).labels[0, 0] == "near"
    cos = GalleryIndex(g, ["far", "near"], distance="cosine").search(q, 2)
    assert cos.labels[0, 0] == "far"  # same direction
    np.testing.assert_allclose(cos.distances[0, 0], np.sqrt(2 - 2 * (1.0 / np.sqrt(1.01))), rtol=1e-5)
    # from the origin: (1.6, 1.6) is nearer in L2 (2.26 < 3) but farther in L1 (3.2 > 3) than (3, 0)
    o = np.zeros((1, 2), np.float32)
    g3 = np.array([[3.0, 0.0], [1.6, 1.6]], dtype=np.float32)
    man = GalleryIndex(g3, ["line", "diag"], distance="manhattan").search(o, 2)
    assert man.distances[0].tolist() == pytest.approx([3.0, 3.2])
    assert GalleryIndex(g3, ["line", "diag"]).search(o, 1).labels[0, 0] == "diag"
    assert GalleryIndex(g3, ["line", "diag"], distance="manhattan").search(o, 1).labels[0, 0] == "line"


@pytest.mark.parametrize("config", [IndexConfig(), *APPROX], ids=["exact", "hnsw", "ivf"])
def test_exclude_ids_gives_leave_one_out(config):
    x, y = clustered(400, dim=8, n_clusters=10, seed=3)
    index = GalleryIndex(x, y, ids=[f"img{i}" for i in range(400)], config=config)
    res = index.search(x[:30], 4, exclude_ids=[f"img{i}" for i in range(30)])
    d = np.sqrt(((x[:30, None].astype(np.float64) - x[None]) ** 2).sum(-1))
    d[np.arange(30), np.arange(30)] = np.inf
    ref = np.argsort(d, axis=1, kind="stable")[:, :4]
    assert not (res.positions == np.arange(30)[:, None]).any()
    if config.kind_for(400) == "exact":
        np.testing.assert_array_equal(res.positions, ref)
    else:
        assert np.mean([len(set(a) & set(b)) / 4 for a, b in zip(res.positions, ref)]) > 0.95
    # a list of ids per query, and positions
    two = index.search(x[:2], 3, exclude_ids=[["img0", res.ids[0, 0]], None])
    assert "img0" not in two.ids[0] and res.ids[0, 0] not in two.ids[0]
    assert two.ids[1, 0] == "img1"  # nothing excluded for the second query: it finds itself
    by_pos = index.search(x[:30], 4, exclude_positions=np.arange(30))
    np.testing.assert_array_equal(by_pos.positions, res.positions)


# ---------------------------------------------------------------------------------------- approximate


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("approximate", ["hnsw", "ivf"])
def test_approximate_recall_at_10_against_exact(distance, approximate):
    x, y = clustered(5000, dim=24, n_clusters=100, seed=5)
    q, _ = clustered(200, dim=24, n_clusters=100, seed=5)  # same centres (same seed), fresh points
    q = q + np.random.default_rng(9).normal(scale=0.3, size=q.shape).astype(np.float32)
    config = IndexConfig(exact_max=1000, approximate=approximate)
    index = GalleryIndex(x, y, distance=distance, config=config)
    assert index.kind == approximate
    res = index.search(q, 10)
    d_ref, p_ref = brute(q, x, distance, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.positions, p_ref)])
    assert recall >= 0.95, recall
    # what it returns carries true distances, nearest first
    rows = np.repeat(np.arange(len(q)), 10)
    emb = np.concatenate([q, x])
    pair = E.pair_distances(emb, rows, len(q) + res.positions.reshape(-1), distance=distance)
    np.testing.assert_allclose(res.distances.reshape(-1), pair, rtol=1e-5, atol=1e-5)
    assert (np.diff(res.distances, axis=1) >= 0).all()


def test_kind_follows_the_size_and_config():
    x, y = clustered(300, dim=8, n_clusters=5)
    assert GalleryIndex(x, y, config=IndexConfig(exact_max=300)).kind == "exact"
    assert GalleryIndex(x, y, config=IndexConfig(exact_max=299)).kind == "hnsw"
    ivf = GalleryIndex(x, y, config={"exact_max": 0, "approximate": "ivf", "nprobe": 3})
    assert ivf.kind == "ivf" and ivf._faiss.nlist == 300 // 39 and ivf._faiss.nprobe == 3
    assert IndexConfig().nlist_for(1_000_000) == 4000 and IndexConfig(nlist=50).nlist_for(10_000) == 50
    assert IndexConfig().nlist_for(10) == 1


# ------------------------------------------------------------------------------------------ persistence


@pytest.mark.parametrize("config", [IndexConfig(), *APPROX], ids=["exact", "hnsw", "ivf"])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_save_load_round_trip(tmp_path, config, distance):
    x, y = clustered(500, dim=16, n_clusters=20, seed=7)
    meta = pd.DataFrame({"path": [f"photos/{i}.jpg" for i in range(500)], "sha256": [f"{i:064x}" for i in range(500)]})
    index = GalleryIndex(x, y, ids=[f"id{i}" for i in range(500)], distance=distance, config=config, metadata=meta)
    q = x[:40] + 0.05
    before = index.search(q, 7)
    blob = index.to_bytes()
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        names = set(zf.namelist())
        assert {"manifest.json", "vectors.npy", "metadata.parquet", "keys.npy"} <= names
        assert ("index.faiss" in names) == (index.kind != "exact")
        np.load(io.BytesIO(zf.read("vectors.npy")), allow_pickle=False)  # no pickled objects
    for loaded in (GalleryIndex.from_bytes(blob), _save_load(index, tmp_path / "sub" / "gallery.idx")):
        assert (loaded.kind, loaded.distance, loaded.dim, len(loaded)) == (index.kind, distance, 16, 500)
        assert loaded.config == config
        after = loaded.search(q, 7)
        np.testing.assert_array_equal(after.positions, before.positions)
        np.testing.assert_array_equal(after.distances, before.distances)
        assert after.ids.tolist() == before.ids.tolist() and after.labels.tolist() == before.labels.tolist()
        pd.testing.assert_frame_equal(loaded.metadata, index.metadata, check_dtype=False)
        assert loaded.metadata.columns.tolist() == ["id", "label", "path", "sha256"]


def _save_load(index, path):
    index.save(path)
    return GalleryIndex.load(path)


def test_integer_labels_round_trip_and_unreadable_faiss_part_is_rebuilt(caplog):
    x, _ = clustered(300, dim=8, n_clusters=5)
    index = GalleryIndex(x, np.arange(300) % 7, config=IndexConfig(exact_max=10, approximate="hnsw"))
    loaded = GalleryIndex.from_bytes(index.to_bytes())
    assert loaded.labels.tolist() == (np.arange(300) % 7).tolist()
    # replace the faiss part with garbage: loading rebuilds it from the vectors
    src = zipfile.ZipFile(io.BytesIO(index.to_bytes()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, b"garbage" if name == "index.faiss" else src.read(name))
    with caplog.at_level(logging.WARNING, logger="partmatch.ml.retrieval"):
        rebuilt = GalleryIndex.from_bytes(buf.getvalue())
    assert "rebuilding" in caplog.text
    assert rebuilt.kind == "hnsw"
    assert rebuilt.search(x[:5], 1).positions[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_load_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="search_index"):
        GalleryIndex.load(tmp_path / "missing.idx")
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"bad\.idx.*not a partmatch gallery index"):
        GalleryIndex.load(bad)
    index = GalleryIndex(np.eye(3, dtype=np.float32), ["a", "b", "c"])
    src = zipfile.ZipFile(io.BytesIO(index.to_bytes()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "manifest.json":
                data = data.replace(b'"format_version": 1', b'"format_version": 99')
            dst.writestr(name, data)
    with pytest.raises(ValueError, match="version 99.*rebuild"):
        GalleryIndex.from_bytes(buf.getvalue())


# ------------------------------------------------------------------------------------------ add / remove


@pytest.mark.parametrize("config", [IndexConfig(), *APPROX], ids=["exact", "hnsw", "ivf"])
def test_add_remove_then_search_equals_brute_force_on_what_remains(config):
    x, y = clustered(600, dim=8, n_clusters=12, seed=11)
    ids = np.array([f"p{i}" for i in range(600)], dtype=object)
    meta = pd.DataFrame({"path": [f"{i}.png" for i in range(600)]})
    index = GalleryIndex(x[:400], y[:400], ids=ids[:400], config=config, metadata=meta.iloc[:400])
    index.add(x[400:], y[400:], ids[400:], metadata=meta.iloc[400:])
    assert len(index) == 600 and index.metadata["path"].tolist() == meta["path"].tolist()
    removed_ids = [f"p{i}" for i in range(0, 600, 7)] + ["not-there"]
    assert index.remove(removed_ids) == len(range(0, 600, 7))
    line = y[3]
    n_line = int(((y == line) & (np.arange(600) % 7 != 0)).sum())
    assert index.remove_labels([line]) == n_line
    keep = (np.arange(600) % 7 != 0) & (y != line)
    assert index.ids.tolist() == ids[keep].tolist()
    assert index.metadata["path"].tolist() == meta["path"][keep].tolist()
    q = x[:50] + 0.01
    res = index.search(q, 5)
    d_ref, p_ref = brute(q, x[keep], "euclidean", 5)
    assert not set(res.ids.reshape(-1)) & set(removed_ids)
    assert line not in set(res.labels.reshape(-1))
    if index.kind == "exact":
        np.testing.assert_array_equal(res.positions, p_ref)
    else:
        assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(res.positions, p_ref)]) >= 0.95
    # positions index the current rows: id / label / metadata agree
    p = res.positions[0, 0]
    assert res.ids[0, 0] == index.metadata["id"].iloc[p] and res.labels[0, 0] == index.labels[p]
    np.testing.assert_allclose(res.distances[0, 0], np.linalg.norm(q[0] - x[keep][p]), rtol=1e-5)


def test_new_part_line_is_found_after_add_and_kind_follows_size():
    x, y = clustered(200, dim=8, n_clusters=4, seed=2)
    index = GalleryIndex(x, y, config=IndexConfig(exact_max=250))
    new = np.full((80, 8), 30.0, dtype=np.float32) + np.random.default_rng(0).normal(size=(80, 8)).astype(np.float32)
    q = new[:5] + 0.01
    before = identify(index.search(q, 1), threshold=1.0)
    assert "brand_new" not in set(index.labels) and (before["verdict"] == UNKNOWN).all()
    index.add(new, ["brand_new"] * 80, [f"new{i}" for i in range(80)])
    assert index.kind == "hnsw"  # 280 > exact_max
    assert set(index.search(q, 1).labels[:, 0]) == {"brand_new"}
    assert (identify(index.search(q, 1), threshold=1.0)["answer"] == "brand_new").all()
    assert index.remove_labels("brand_new") == 80
    assert index.kind == "exact" and len(index) == 200
    assert "brand_new" not in set(index.search(q, 3).labels.reshape(-1))


def test_duplicate_ids_are_refused_with_the_id():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"unique.*'b'"):
        GalleryIndex(x, list("wxyz"), ids=["a", "b", "b", "c"])
    index = GalleryIndex(x, list("wxyz"), ids=list("abcd"))
    with pytest.raises(ValueError, match=r"already in the index: \['c'\]"):
        index.add(x[:2], ["w", "x"], ["e", "c"])
    assert len(index) == 4  # nothing half-added


def test_empty_gallery_searches_to_padding_and_identifies_unknown():
    index = GalleryIndex(np.zeros((0, 3), np.float32), [])
    res = index.search(np.ones((2, 3), np.float32), 2)
    assert (res.positions == -1).all() and np.isinf(res.distances).all()
    out = identify(res, threshold=None)
    assert out["verdict"].tolist() == [UNKNOWN, UNKNOWN] and out["confidence"].tolist() == [0.0, 0.0]
    # no query at all (e.g. every photo undecodable): empty results, an empty table with the columns
    none = GalleryIndex(np.eye(3, dtype=np.float32), list("abc")).search(np.zeros((0, 3), np.float32), 2)
    assert none.positions.shape == (0, 2) and none.distances.shape == (0, 2) and none.ids.shape == (0, 2)
    table = identify(none, threshold=1.0)
    assert len(table) == 0 and "answer" in table.columns


def test_validation_errors_name_the_argument_and_the_fix():
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    index = GalleryIndex(x, list("abcde"))
    with pytest.raises(ValueError, match="queries has dimension 3.*4-dimensional.*model"):
        index.search(x[:, :3], 2)
    with pytest.raises(ValueError, match="queries contains NaN"):
        index.search(np.full((1, 4), np.nan), 2)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(x, 0)
    with pytest.raises(ValueError, match="exclude_ids must have one entry per query"):
        index.search(x, 2, exclude_ids=["0"])
    with pytest.raises(ValueError, match="labels has 4 entries"):
        GalleryIndex(x, list("abcd"))
    with pytest.raises(ValueError, match="distance must be one of"):
        GalleryIndex(x, list("abcde"), distance="chebyshev")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['ef'\].*parameters_search.yml"):
        IndexConfig.from_dict({"ef": 3})
    with pytest.raises(ValueError, match="search.index.approximate.*'annoy'"):
        IndexConfig(approximate="annoy")
    with pytest.raises(ValueError, match="search.index.nprobe must be an integer >= 1"):
        IndexConfig.from_dict({"nprobe": 0})
    with pytest.raises(ValueError, match=r"metadata must not have column\(s\) \['label'\]"):
        GalleryIndex(x, list("abcde"), metadata=pd.DataFrame({"label": list("abcde")}))
    assert index.search(x[0], 1).positions.tolist() == [[0]]  # one (D,) vector is one query


# ---------------------------------------------------------------------------------------------- identify


def _result(distances, labels):
    d = np.asarray(distances, dtype=np.float32)
    lab = np.asarray(labels, dtype=object)
    pos = np.where(pd.isna(lab), -1, np.arange(d.size).reshape(d.shape))
    return SearchResult(d, pos.astype(np.int64), lab, lab)


def test_identify_hand_computed_votes():
    inf = np.inf
    res = _result(
        [[0.5, 1.0, 2.0], [0.2, 0.25, 0.3], [3.0, 3.5, 4.0], [1.0, 1.0, inf], [0.4, inf, inf], [1.0, 1.01, 1.02]],
        [["A", "B", "B"], ["X", "Y", "Y"], ["A", "A", "B"], ["P", "Q", None], ["Z", None, None], ["X", "Y", "Y"]],
    )
    out = identify(res, threshold=1.5, k=3)
    assert out.columns.tolist() == ["predicted_label", "confidence", "nearest_distance", "nearest_label",
                                    "verdict", "answer"]
    e = np.exp
    # weight exp(-(d - d1) / (0.1 d1)):
    # row 0: A = 1, B = e^-10 + e^-30 -> A
    # row 1: X = 1, Y = e^-2.5 + e^-5 -> X (photos 25 % and 50 % farther do not outvote the nearest)
    # row 2: A = 1 + e^-5/3, B = e^-10/3 -> A, but nearest 3.0 > 1.5 -> unknown part
    # row 3: P = Q = 1 -> tie, the nearer (listed first) wins; 1 / 2
    # row 4: a single neighbour -> confidence 1
    # row 5: X = 1, Y = e^-0.1 + e^-0.2 -> Y: two photos within 2 % of the nearest outvote it
    assert out["predicted_label"].tolist() == ["A", "X", "A", "P", "Z", "Y"]
    np.testing.assert_allclose(out["confidence"], [1 / (1 + e(-10) + e(-30)), 1 / (1 + e(-2.5) + e(-5)),
                                                   (1 + e(-5 / 3)) / (1 + e(-5 / 3) + e(-10 / 3)), 0.5, 1.0,
                                                   (e(-0.1) + e(-0.2)) / (1 + e(-0.1) + e(-0.2))], rtol=1e-4)
    assert out["nearest_label"].tolist() == ["A", "X", "A", "P", "Z", "X"]
    np.testing.assert_allclose(out["nearest_distance"], [0.5, 0.2, 3.0, 1.0, 0.4, 1.0], rtol=1e-6)
    assert out["verdict"].tolist() == ["known", "known", UNKNOWN, "known", "known", "known"]
    assert out["answer"].tolist() == ["A", "X", UNKNOWN, "P", "Z", "Y"]
    # k limits the vote: with k=1 the nearest decides
    assert identify(res, threshold=None, k=1)["predicted_label"].tolist() == ["A", "X", "A", "P", "Z", "X"]
    # a flatter vote (temperature 1): row 1's two Y photos outvote the nearest X
    assert identify(res, threshold=None, k=3, temperature=1.0)["predicted_label"].tolist()[1] == "Y"
    # an exact duplicate decides alone
    dup = identify(_result([[0.0, 0.001, 0.001]], [["A", "B", "B"]]), threshold=None, k=3)
    assert dup["predicted_label"].tolist() == ["A"] and dup["confidence"].iloc[0] == pytest.approx(1.0)
    # threshold None never answers unknown; a threshold equal to the distance is still known
    assert (identify(res, threshold=None)["verdict"] == "known").all()
    assert identify(res, threshold=3.0)["verdict"].tolist()[2] == "known"
    with pytest.raises(ValueError, match="temperature"):
        identify(res, threshold=None, temperature=0)


def test_identify_on_a_real_search():
    x, y = clustered(300, dim=8, n_clusters=6, seed=4)
    index = GalleryIndex(x, y)
    far = np.full((1, 8), 100.0, dtype=np.float32)
    out = identify(index.search(np.concatenate([x[:20] + 0.01, far]), 5), threshold=2.0)
    assert out["answer"].tolist()[:20] == y[:20].tolist()
    assert out["answer"].iloc[20] == UNKNOWN and out["predicted_label"].iloc[20] in set(y)
    with pytest.raises(ValueError, match="k must be"):
        identify(index.search(x[:2], 3), 1.0, k=0)
