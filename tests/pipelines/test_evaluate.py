"""Evaluate nodes: the model's own preprocessing wins, and a new source is scored leave-one-out."""

import numpy as np
import pandas as pd
import pytest

from partmatch.pipelines.evaluate.nodes import evaluate_source, model_preprocessing
from partmatch.pipelines.training.nodes import calibrate_threshold
from tests.conftest import tiny_set


@pytest.fixture(scope="module")
def model(tiny_trained):
    """The session's tiny trained bundle, calibrated (its preprocessing: 16 px grayscale)."""
    t = tiny_trained
    return calibrate_threshold(t["bundle"], t["embeddings"], t["index"], t["params"])[0]


def test_model_preprocessing_overrides_the_current_settings(model):
    merged = model_preprocessing(model, {"image_size": 100, "color_mode": "rgb"})
    assert merged["image_size"] == 16 and merged["color_mode"] == "grayscale"
    assert "background" in merged  # the rest of the validated preprocessing section is kept


def test_evaluate_source_scores_every_category_as_unseen(model):
    images, index = tiny_set()
    single = pd.DataFrame([{"label": "Lonely Part"}])
    idx = pd.concat([index[["label"]], single], ignore_index=True)
    imgs = np.concatenate([images, images[:1]])
    metrics, mlflow = evaluate_source(model, imgs, idx, {"model": "siamese_triplet", "seed": 0})
    assert metrics["open_set_categories"] == 8 and metrics["open_set_images"] == len(index)  # 1-photo category out
    # reference, in plain numpy on the model's own embeddings (the 1-photo category left out): each photo's
    # nearest other photo, and the seeded pairs judged "same part" at the model's threshold
    from partmatch.ml.evaluation import sample_pairs
    from partmatch.ml.inference import Embedder

    assert model.get("distance", "euclidean") == "euclidean"
    emb = Embedder(model).embed(images).astype(np.float64)
    d = np.sqrt(((emb[:, None] - emb[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    labels = index["label"].to_numpy()
    assert metrics["open_set_precision_at_1"] == pytest.approx(float((labels[d.argmin(1)] == labels).mean()))
    a, b, same = sample_pairs(pd.factorize(labels)[0], 2000, seed=0)
    expected_acc = float(((d[a, b] <= model["threshold"]) == same).mean())
    assert metrics["open_set_pair_accuracy"] == pytest.approx(expected_acc)
    assert metrics["model"] == "siamese_triplet" and "model" not in mlflow
    assert mlflow["open_set_map_at_r"]["value"] == pytest.approx(metrics["open_set_map_at_r"])


def test_source_without_two_usable_categories_is_a_clear_error(model):
    images, _ = tiny_set(per_class=3)
    idx = pd.DataFrame({"label": ["A"] * 3 + ["B"] + ["C"]})
    with pytest.raises(ValueError, match="at least 2 categories with 2\\+ photos"):
        evaluate_source(model, images[:5], idx, {"model": "cnn", "seed": 0})
