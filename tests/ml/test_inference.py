"""The embedder: photo bytes -> the training preprocessing -> the model's embedding, equal to what training,
calibration and evaluation compute."""

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from partmatch.config import TrainingParams
from partmatch.imaging import preprocess_bytes
from partmatch.ml import workflow
from partmatch.ml.inference import Embedder, ImageDecodeError, embed_images
from tests.conftest import make_photo, png_bytes


def jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def photo_set(n_classes=4, per_class=6, size=32):
    """Generated product photos (JPEG bytes) and the preprocessed array + split index the pipelines would build."""
    blobs, rows = [], []
    for c in range(n_classes + 1):
        for i in range(per_class):
            blobs.append(jpeg_bytes(make_photo(c, size=(48 + 4 * c, 40), seed=10 * c + i)))
            split = "open" if c == n_classes else ("train" if i < 4 else "val" if i == 4 else "test")
            rows.append({"path": f"c{c}/{i}.jpg", "label": f"part{c}", "split": split})
    images = np.stack([preprocess_bytes(b, image_size=size, color_mode="grayscale") for b in blobs])
    return blobs, images, pd.DataFrame(rows)


TINY = {"epochs": 1, "batch_size": 8, "m_per_class": 2, "progress": False, "threshold_pairs": 20, "eval_pairs": 20,
        "patience": None, "embedding_dim": 8, "loss": "triplet", "normalize": True, "margin": 0.2}


@pytest.fixture(scope="module")
def trained():
    blobs, images, index = photo_set()
    p = TrainingParams(**TINY)
    bundle, _, _ = workflow.train(images, index, p, None, {"image_size": 32, "color_mode": "grayscale",
                                                           "background": 255})
    emb = workflow.embed_all(bundle, images, device="cpu")
    model, *_ = workflow.calibrate_threshold(bundle, emb, index, p)
    return blobs, images, index, model, emb


def test_embedder_from_a_saved_file_embeds_photo_bytes_like_the_pipeline(trained, tmp_path):
    blobs, images, _, model, emb = trained
    path = tmp_path / "model.pt"
    torch.save(model, path)
    embedder = Embedder.from_file(path)
    assert embedder.preprocessing == {"image_size": 32, "color_mode": "grayscale", "background": 255}
    assert embedder.threshold == model["threshold"] and embedder.distance == "euclidean" and embedder.dim == 8
    np.testing.assert_array_equal(embedder.preprocess(blobs[3]), images[3])       # the training preprocessing
    got, errors = embedder.embed_bytes(blobs[:5])
    assert errors == [None] * 5
    np.testing.assert_allclose(got, emb[:5], atol=1e-5)                           # = what evaluation read


def test_hostile_bytes_are_reported_per_photo_and_the_good_ones_still_embedded(trained):
    blobs, images, _, model, emb = trained
    embedder = Embedder(model)
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))                              # fully transparent PNG: white
    hostile = [b"", b"this is text, not a jpeg", blobs[0][:200], blobs[1], png_bytes(rgba)]
    good, errors = embedder.preprocess_many(hostile)
    assert errors[0] == "empty file"
    assert errors[1].startswith("not an image")
    assert errors[2].startswith("unreadable image")
    assert errors[3] is None and errors[4] is None
    np.testing.assert_array_equal(good[0], images[1])
    assert (good[1] == 255).all()
    with pytest.raises(ImageDecodeError, match="empty file"):
        embedder.preprocess(b"")
    vectors, _ = embedder.embed_bytes(hostile)
    np.testing.assert_allclose(vectors[0], emb[1], atol=1e-5)


def test_embed_refuses_images_preprocessed_for_another_model(trained):
    _, images, _, model, _ = trained
    with pytest.raises(ValueError, match=r"\(N, 1, S, S\).*Embedder.preprocess"):
        Embedder(model).embed(np.repeat(images, 3, axis=1))
    assert Embedder(model).embed(images[:0]).shape == (0, 8)


def test_not_a_bundle_names_the_fix():
    with pytest.raises(ValueError, match="normalization.*model.pt"):
        Embedder({"spec": {}, "state_dict": {}})
    with pytest.raises(FileNotFoundError, match="kedro run --pipeline"):
        Embedder.from_file("/nonexistent/model.pt")


def test_flip_averaged_frozen_model_embeds_cached_features_like_images():
    """The recommended set-up: the embedding from cached backbone features (image + mirror view) equals the full
    model's flip-averaged embedding of the photo."""
    _, images, index = photo_set(size=64)
    p = TrainingParams(**{**TINY, "embedding_dim": 1280}, backbone="efficientnet_lite0", pretrained=True,
                       train_mode="frozen", head_init="identity", flip_tta=True, augment=True, lr=1e-3)
    feats = workflow.backbone_features(images, p)
    bundle, _, _ = workflow.train(images, index, p, None, {"image_size": 64}, features=feats)
    embedder = Embedder(bundle)
    from_features = embedder.embed_features(feats)
    from_images = embedder.embed(images)
    np.testing.assert_allclose(from_features, from_images, atol=1e-4)
    # flip averaging: the mirrored photo has the same embedding
    np.testing.assert_allclose(embedder.embed(images[:3, :, :, ::-1].copy()), from_images[:3], atol=1e-4)
    # and it is what the bare function computes with the stored normalisation
    np.testing.assert_allclose(embed_images(embedder.model, images[:3], mean=embedder.mean, std=embedder.std),
                               from_images[:3], atol=1e-6)


def test_real_car_part_photo_is_preprocessed_like_the_preprocessing_pipeline(carparts, trained):
    *_, model, _ = trained
    path = sorted((carparts / "test").glob("*/*.jpg"))[0]
    data = path.read_bytes()
    embedder = Embedder(model)
    np.testing.assert_array_equal(embedder.preprocess(data), preprocess_bytes(data, image_size=32,
                                                                               color_mode="grayscale"))


def test_embed_is_the_model_on_normalised_pixels(trained):
    """Independent of the embedding helpers: (x / 255 - mean) / std through the model's own embed."""
    _, images, _, model, emb = trained
    embedder = Embedder(model)
    net = embedder.model
    x = (torch.as_tensor(images[:5]).float() / 255 - torch.tensor(embedder.mean).view(1, -1, 1, 1)) \
        / torch.tensor(embedder.std).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = net.embed(x).numpy()
    np.testing.assert_allclose(embedder.embed(images[:5]), expected, atol=1e-5)
    np.testing.assert_allclose(emb[:5], expected, atol=1e-5)


def test_unknown_threshold_falls_back_to_the_pair_threshold(trained):
    *_, model, _ = trained
    assert Embedder(model).unknown_threshold == model["unknown_threshold"] != model["threshold"]
    assert Embedder({**model, "unknown_threshold": None}).unknown_threshold == model["threshold"]
    old = {k: v for k, v in model.items() if k != "unknown_threshold"}          # a model.pt from before
    assert Embedder(old).unknown_threshold == model["threshold"]


def test_stored_preprocessing_is_what_the_model_learnt_from_not_todays_parameters():
    _, images, index = photo_set(size=32)
    p = TrainingParams(**TINY)
    bundle, _, _ = workflow.train(images, index, p, None, {"image_size": 100, "color_mode": "rgb", "background": 0})
    assert bundle["preprocessing"] == {"image_size": 32, "color_mode": "grayscale", "background": 0}


def test_a_model_refuses_embeddings_of_another_run(trained):
    *_, model, emb = trained
    workflow.check_embeddings_of(model, emb, "m.embeddings", "m.model")
    with pytest.raises(ValueError, match="m.embeddings is not the embeddings m.model was calibrated with"):
        workflow.check_embeddings_of(model, emb + 1e-3, "m.embeddings", "m.model")
