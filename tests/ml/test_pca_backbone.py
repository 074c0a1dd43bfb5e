"""The PCA-input model (backbone: pca): a projection fitted on the train split only, stored in the model as plain
tensors, and the same embedding for a photo whichever way it is embedded."""

import io

import numpy as np
import pytest
import torch

from partmatch.config import ParameterError, TrainingParams, parse
from partmatch.ml import workflow
from partmatch.ml.inference import Embedder
from partmatch.ml.models import PCAProjection, build_model, model_from_spec, model_spec

from .test_workflow import TINY, toy


def rank2_images(n=12, size=6, seed=0):
    """Images in a 2-D affine plane of pixel space: base + a*u + b*v, with (a, b) centred over the rows."""
    rng = np.random.default_rng(seed)
    u, v = rng.normal(size=size * size), rng.normal(size=size * size)
    ab = rng.normal(size=(n, 2))
    ab -= ab.mean(axis=0)
    return (1.0 + ab[:, :1] * u + ab[:, 1:] * v).astype(np.float32)


def test_rank2_data_two_components_explain_everything_and_reconstruct_exactly():
    x = rank2_images()
    pca = PCAProjection(1, 6, components=2)
    ratio = pca.fit(x, seed=0)
    assert ratio.sum() == pytest.approx(1.0, abs=1e-5)
    z = pca(torch.from_numpy(x).view(-1, 1, 6, 6))
    assert z.shape == (12, 2)
    back = z @ pca.components + pca.mean  # orthonormal rows: the projection's transpose reconstructs
    np.testing.assert_allclose(back.numpy(), x, atol=1e-4)
    np.testing.assert_allclose((pca.components @ pca.components.T).numpy(), np.eye(2), atol=1e-5)
    np.testing.assert_allclose(pca.mean.numpy(), x.mean(axis=0), atol=1e-6)


def test_whitening_gives_unit_variance_on_the_fitted_rows():
    x = rank2_images(n=40)
    pca = PCAProjection(1, 6, components=2)
    pca.fit(x, seed=0, whiten=True)
    z = pca(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(z.var(axis=0, ddof=1), [1.0, 1.0], rtol=1e-4)


def test_fewer_rows_than_components_is_refused():
    with pytest.raises(ValueError, match="at least as many images"):
        PCAProjection(1, 6, components=5).fit(rank2_images(n=4))
    with pytest.raises(ValueError, match="1 <= components <= 36"):
        PCAProjection(1, 6, components=37)


def test_spec_round_trip_keeps_the_projection_as_plain_tensors():
    model = build_model("embedding", 2, 8, in_channels=1, image_size=6, backbone="pca", components=3,
                        head_hidden=16, normalize=True)
    model.backbone.fit(np.random.default_rng(0).normal(size=(10, 36)), seed=1)
    state = model.state_dict()
    assert state["backbone.mean"].shape == (36,) and state["backbone.components"].shape == (3, 36)
    buf = io.BytesIO()
    torch.save({"spec": model_spec(model), "state_dict": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    again = model_from_spec(loaded["spec"], loaded["state_dict"])
    x = torch.randn(4, 1, 6, 6)
    torch.testing.assert_close(again.eval()(x), model.eval()(x))
    assert isinstance(again.head, torch.nn.Sequential) and again.head[0].out_features == 16


def test_components_depend_on_the_train_split_only():
    images, index = toy()
    p = TrainingParams(**TINY, backbone="pca", pca_components=10, head_hidden=8, loss="triplet", normalize=True,
                       margin=0.2)
    first, _, summary = workflow.train(images, index, p, None, {})
    changed = images.copy()
    rng = np.random.default_rng(7)
    others = index["split"].to_numpy() != "train"
    changed[others] = rng.integers(0, 256, size=changed[others].shape, dtype=np.uint8)
    second, _, _ = workflow.train(changed, index, p, None, {})
    for key in ("backbone.mean", "backbone.components"):
        torch.testing.assert_close(first["state_dict"][key], second["state_dict"][key])
    # and the projection is that of the train rows' normalised pixels
    train = workflow.split_rows(index, "train")
    x = (images[train].reshape(len(train), -1).astype(np.float32) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(first["state_dict"]["backbone.mean"].numpy(), x.mean(axis=0), atol=1e-5)
    assert summary["pca_components"] == 10
    ratio = np.linalg.svd(x - x.mean(axis=0), compute_uv=False) ** 2
    # sklearn picks its randomized solver here (1024 pixels, 10 of 24 axes): within 1e-3 of the exact spectrum
    assert summary["pca_explained_variance"] == pytest.approx(ratio[:10].sum() / ratio.sum(), abs=1e-3)


def test_a_query_photo_is_embedded_like_the_training_features():
    images, index = toy()
    p = TrainingParams(**TINY, backbone="pca", pca_components=500, head_hidden=8, loss="triplet", normalize=True,
                       margin=0.2, augment=True, flip_tta=True)
    bundle, history, summary = workflow.train(images, index, p, None, {})
    n_train = len(workflow.split_rows(index, "train"))
    assert summary["pca_components"] == n_train  # capped at the number of training images
    emb = workflow.embed_all(bundle, images, device="cpu")  # the saved model on the images, like a query photo
    model = model_from_spec(bundle["spec"], bundle["state_dict"])
    feats, _ = workflow.fit_pca_features(model, images, workflow.split_rows(index, "train"), p, (0.5,), (0.5,))
    np.testing.assert_allclose(emb, Embedder(bundle).embed_features(feats), atol=1e-5)
    assert len(history) == 2 and bundle["normalization"] == {"mean": [0.5], "std": [0.5]}


def test_pca_parameters_are_checked():
    with pytest.raises(ParameterError, match="'pca' is fitted on the train split; it has no pretrained weights"):
        parse("siamese_pca", {"backbone": "pca", "pretrained": True})
    with pytest.raises(ParameterError, match="head_hidden"):
        parse("siamese_pca", {"task": "classifier", "loss": "cross_entropy", "head_hidden": 8})
    with pytest.raises(ParameterError, match="siamese_pca.pca_components"):
        parse("siamese_pca", {"pca_components": 0})
