"""Training nodes on a tiny generated image set: train -> calibrate -> evaluate, as the model pipelines wire them."""

import io
import json

import numpy as np
import pytest
import torch

from partmatch.config import ParameterError
from partmatch.ml.models import model_from_spec
from partmatch.pipelines.training.nodes import (
    cache_backbone_features,
    calibrate_threshold,
    embed_images,
    evaluate_model,
    index_gallery,
    interpret_embeddings,
    train_model,
)
from tests.conftest import TINY_CLASSES, tiny_set, training_params

CLASSES = TINY_CLASSES
params = training_params


@pytest.fixture(scope="module")
def trained(tiny_trained):
    t = tiny_trained
    return t["images"], t["index"], t["params"], t["bundle"], t["history"], t["summary"], t["embeddings"]


def test_study_trunk_caches_no_features():
    images, _ = tiny_set(per_class=2)
    assert cache_backbone_features(images, params()).size == 0


def test_train_model_returns_a_bundle_that_loads_with_weights_only(trained):
    images, index, p, bundle, history, summary, emb = trained
    assert bundle["classes"] == sorted(CLASSES)          # open-set categories are never trained on
    assert bundle["threshold"] is None and bundle["preprocessing"] == {"image_size": 16, "color_mode": "grayscale"}
    assert list(history["epoch"]) == [1, 2] and np.isfinite(history["train_loss"]).all()
    assert summary["epochs_run"] == 2 and summary["train_images"] == 6 * len(CLASSES)
    buf = io.BytesIO()
    torch.save(bundle, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    model = model_from_spec(loaded["spec"], loaded["state_dict"])
    assert model(torch.zeros(3, 1, 16, 16)).shape == (3, 8)


def test_calibrate_threshold_stores_the_accuracy_maximising_threshold(trained):
    images, index, p, bundle, _, _, emb = trained
    model, curve, histogram, curves = calibrate_threshold(bundle, emb, index, p)
    assert isinstance(model["threshold"], float) and bundle["threshold"] is None  # input bundle untouched
    best = curve.loc[curve["accuracy"].idxmax(), "threshold"]
    nxt = curve.loc[curve["threshold"] > best, "threshold"].min()
    # the best-accuracy candidate, moved into the gap before the next distance: it predicts the same pairs
    assert best <= model["threshold"] < nxt
    assert {"accuracy", "precision", "recall", "f1"} <= set(curve.columns)
    # both figures mark the stored threshold with one dashed vertical line, and no other
    for fig in (histogram, curves):
        assert [ln.get_xdata()[0] for ln in fig.axes[0].get_lines()
                if ln.get_linestyle() == "--" and len(set(ln.get_xdata())) == 1] == [model["threshold"]]


def test_evaluate_model_writes_the_metrics_contract(trained):
    images, index, p, bundle, history, summary, emb = trained
    model = calibrate_threshold(bundle, emb, index, p)[0]
    metrics, figure = evaluate_model(model, emb, index, history, summary, p)
    json.dumps(metrics)
    for key in ["precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "r_precision",
                "map_at_r", "knn_accuracy", "pair_accuracy", "roc_auc", "open_set_precision_at_1",
                "open_set_map_at_r", "open_set_pair_accuracy", "epochs", "train_images_per_second", "device"]:
        assert key in metrics, key
    assert metrics["epochs"] == 2 and metrics["device"] == "cpu"
    # squares at distinct positions (even raw pixels separate them): two epochs retrieve every test photo's
    # category first and rank all its photos ahead of any other
    assert metrics["precision_at_1"] == 1.0 and metrics["map_at_r"] == 1.0 and metrics["recall_at_1"] == 1.0
    # ... so the test photos cluster by category and a linear SVM on the train photos' embeddings names them all
    assert metrics["nmi"] == pytest.approx(1.0) and metrics["ami"] == pytest.approx(1.0)
    assert metrics["linear_svm_accuracy"] == 1.0 and metrics["knn_accuracy"] == 1.0
    assert {"open_set_nmi", "open_set_ami"} <= set(metrics)
    # the loss figure plots the history's losses per epoch
    (loss_line,) = [ln for ln in figure.axes[0].get_lines() if ln.get_label() == "train loss"]
    assert list(loss_line.get_xdata()) == [1, 2]
    np.testing.assert_allclose(loss_line.get_ydata(), history["train_loss"])


def test_classifier_adds_test_accuracy(trained):
    images, index, *_ = trained
    p = params(task="classifier", loss="cross_entropy", epochs=1)
    bundle, history, summary = train_model(images, index, p, {"image_size": 16})
    emb = embed_images(bundle, images, p)
    assert emb.shape == (len(images), 64 * 4 * 4)                   # the CNN retrieves with pre-logit features
    model = calibrate_threshold(bundle, emb, index, p)[0]
    metrics = evaluate_model(model, emb, index, history, summary, p)[0]
    # the accuracy from the stored pre-logit embeddings is the classifier's own on the test images
    from partmatch.ml.inference import Embedder

    rows = np.flatnonzero(index["split"].to_numpy() == "test")
    truth = np.array([model["classes"].index(label) for label in index["label"].to_numpy()[rows]])
    direct = Embedder(model).log_probs(images, rows).argmax(axis=1)
    assert metrics["test_accuracy"] == pytest.approx(float((direct == truth).mean()))
    assert "open_set_precision_at_1" in metrics


def test_invalid_parameters_fail_before_training():
    images, index = tiny_set(per_class=2)
    with pytest.raises(ParameterError, match=r"model\.epochs"):
        train_model(images, index, params(epochs=0), {"image_size": 16})
    with pytest.raises(ParameterError, match=r"model\.sampling"):
        train_model(images, index, params(sampling="easy"), {"image_size": 16})


def test_gallery_index_holds_every_catalogue_photo_and_finds_itself(trained):
    images, index, p, bundle, _, _, emb = trained
    index = index.assign(path=[f"{lab}/{i}.png" for i, lab in enumerate(index["label"])], sha256="x")
    index.loc[0, "split"] = "excluded"                          # identical pixels under two names: not an item
    model = calibrate_threshold(bundle, emb, index, p)[0]
    gallery = index_gallery(model, emb, index, {"exact_max": 1000})
    assert len(gallery) == len(index) - 1 and gallery.kind == "exact"
    result = gallery.search(emb[1:4], k=1)
    assert list(result.ids[:, 0]) == list(index["path"][1:4])   # each photo's nearest item is itself, at 0
    np.testing.assert_allclose(result.distances[:, 0], 0, atol=1e-5)
    assert list(result.labels[:, 0]) == list(index["label"][1:4])


def test_interpretability_figures_and_tables_describe_the_open_set(trained):
    from partmatch.ml import interpret

    images, index, p, bundle, _, _, emb = trained
    model = calibrate_threshold(bundle, emb, index, p)[0]
    emap, gallery, confused_fig, per_cat_fig, confused, per_category = interpret_embeddings(
        model, emb, index, images, params(gallery_queries=2, embedding_map="pca"))
    open_rows = np.flatnonzero(index["split"].to_numpy() == "open")
    labels = index["label"].to_numpy()[open_rows]
    # the tables are those of the open set's leave-one-out neighbours
    nb = interpret.leave_one_out_neighbours(emb[open_rows], 5)
    assert per_category.equals(interpret.per_category_precision(labels, nb))
    assert confused.equals(interpret.confused_pairs(labels, nb))
    assert sorted(per_category["category"]) == sorted(set(labels))
    # the map shows every open-set photo, one colour per category; the gallery 2 queries x (1 + 5 neighbours)
    assert sum(len(c.get_offsets()) for c in emap.axes[0].collections) == len(open_rows)
    assert len(emap.axes[0].collections) == len(set(labels))
    assert len(gallery.axes) == 2 * 6
    assert len(per_cat_fig.axes[0].patches) == len(per_category)


def test_the_recommended_model_preprocesses_its_own_input_the_study_models_share_image_array():
    from partmatch.pipeline_registry import register_pipelines

    pipelines = register_pipelines()
    own = pipelines["siamese_pretrained"]
    node = next(n for n in own.nodes if n.name == "siamese_pretrained.preprocess_model_input")
    assert node.outputs == ["siamese_pretrained.image_array"]
    assert {"raw_images", "clean_manifest", "decoded_images", "split_index", "params:siamese_pretrained",
            "params:preprocessing", "params:ingestion"} <= set(node.inputs)
    assert "image_array" not in own.inputs()   # `kedro run --pipeline=siamese_pretrained` needs no study array
    trains = [n for n in own.nodes if "siamese_pretrained.image_array" in n.inputs]
    assert {n.name.split(".")[1] for n in trains} == {"cache_backbone_features", "train_model", "embed_images",
                                                      "interpret_embeddings"}
    for study in ("cnn", "siamese_contrastive", "siamese_triplet", "multi_objective"):
        assert "image_array" in pipelines[study].inputs()
        assert not [n for n in pipelines[study].nodes if n.name.endswith("preprocess_model_input")]
    # the default run builds both inputs: the study's by the preprocessing pipeline, the model's by its own node
    default = pipelines["__default__"]
    produced = default.all_outputs()
    assert {"image_array", "siamese_pretrained.image_array", "split_index"} <= produced
