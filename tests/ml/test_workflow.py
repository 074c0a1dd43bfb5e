"""Train / calibrate / evaluate from arrays: the study trunk and the pretrained backbone in every mode."""

import numpy as np
import pandas as pd
import pytest
import torch

from partmatch.config import TrainingParams
from partmatch.ml import evaluation, workflow
from partmatch.ml.inference import Embedder

SPLITS = ["train"] * 6 + ["val", "test"]


def toy(n_classes=4, size=32, channels=1, seed=0):
    """Separable toy photos: each class a bright square at its own position, on noise; 8 photos a class."""
    rng = np.random.default_rng(seed)
    images, rows = [], []
    for c in range(n_classes + 2):                                   # two extra classes form the open set
        for i in range(8):
            img = rng.integers(0, 60, size=(channels, size, size), dtype=np.uint8)
            y0, x0 = (c * 5) % (size - 8), (c * 7) % (size - 8)
            img[:, y0:y0 + 8, x0:x0 + 8] = 250
            images.append(img)
            split = "open" if c >= n_classes else SPLITS[i]
            rows.append({"path": f"{c}/{i}.png", "label": f"class{c}", "split": split})
    return np.stack(images), pd.DataFrame(rows)


TINY = {"epochs": 2, "batch_size": 8, "m_per_class": 2, "progress": False, "threshold_pairs": 40,
        "eval_pairs": 40, "patience": None, "embedding_dim": 16}


@pytest.mark.parametrize("overrides", [
    {"task": "classifier", "loss": "cross_entropy"},
    {"loss": "contrastive"},
    {"loss": "triplet", "sampling": "random", "normalize": True, "margin": 0.2},
    {"loss": "contrastive+proxy_anchor", "normalize": True},
    {"loss": "triplet", "sampling": "semihard", "normalize": True, "margin": 0.2, "preserve_weight": 10.0},
])
def test_study_trunk_end_to_end(overrides):
    images, index = toy()
    p = TrainingParams(**TINY, **overrides)
    bundle, history, summary = workflow.train(images, index, p, None, {"image_size": 32, "color_mode": "grayscale"})
    assert len(history) == 2 and summary["epochs_run"] == 2
    emb = workflow.embed_all(bundle, images, device="cpu")
    assert emb.shape == (len(images), 16 if p.task == "embedding" else 64 * 8 * 8)
    calibrated, curve, dist, same = workflow.calibrate_threshold(bundle, emb, index, p)
    assert len(dist) == len(same) == p.threshold_pairs
    # the pair threshold reaches the best accuracy any cut of the training pairs' distances reaches
    def accuracy(t: float) -> float:
        return float(((dist <= t) == same).mean())

    best = max(accuracy(t) for t in [-1.0, *dist])
    assert accuracy(calibrated["threshold"]) == best and curve["accuracy"].max() == pytest.approx(best)
    # the unknown-part threshold: leave-one-out on the training photos only, at the balanced-accuracy point
    rows = workflow.split_rows(index, "train")
    known, unknown = evaluation.leave_one_out_nearest(emb[rows], index["label"].to_numpy()[rows], "euclidean")
    assert calibrated["unknown_threshold"] == pytest.approx(evaluation.balanced_rejection_threshold(known, unknown))
    metrics = workflow.evaluate(calibrated, emb, index, p)
    assert set(metrics) >= {"precision_at_1", "map_at_r", "open_set_map_at_r", "pair_accuracy", "unknown_part_fmr",
                            "unknown_part_fnmr", "fnmr_at_fmr_1pct"}
    assert metrics["unknown_threshold"] == calibrated["unknown_threshold"]
    if p.task == "classifier":
        # the accuracy from the stored pre-logit embeddings equals a second pass over the test images
        from partmatch.ml.inference import Embedder

        rows = workflow.split_rows(index, "test")
        y = workflow.encode_labels(index["label"], calibrated["classes"])[rows]
        direct = Embedder(calibrated).log_probs(images, rows)
        assert metrics["test_accuracy"] == pytest.approx(float((direct.argmax(1) == y).mean()))
    back = torch.load(_roundtrip(calibrated), weights_only=True)
    assert back["classes"] == [f"class{c}" for c in range(4)]


def _roundtrip(bundle):
    import io

    buf = io.BytesIO()
    torch.save(bundle, buf)
    buf.seek(0)
    return buf


def test_frozen_pretrained_caches_features_and_trains_only_the_head():
    images, index = toy(size=64, channels=3)
    p = TrainingParams(**{**TINY, "epochs": 3}, loss="proxy_anchor", normalize=True, backbone="efficientnet_lite0",
                       pretrained=True, train_mode="frozen")
    feats = workflow.backbone_features(images, p)
    assert feats.shape == (len(images), 1280) and np.isfinite(feats).all()
    bundle, history, _ = workflow.train(images, index, p, None, {"image_size": 64}, features=feats)
    # the precision its cached features were computed in travels with the model, so query photos match them
    assert bundle["backbone_precision"] == workflow.backbone_precision(p, 64, "cpu")
    assert Embedder(bundle).precision == bundle["backbone_precision"]
    reference = workflow.build_from_params(p, 4, 3, 64).state_dict()
    for key, value in bundle["state_dict"].items():
        if key.startswith("backbone."):
            assert torch.equal(value, reference[key]), f"{key} changed although the backbone is frozen"
    assert not torch.equal(bundle["state_dict"]["head.weight"], reference["head.weight"])
    # the full model (backbone + trained head) reproduces the head-on-cached-features embeddings
    model = Embedder(bundle).model
    with torch.no_grad():
        x = (torch.as_tensor(images[:4]).float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) \
            / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        full = model(x)
        head = model.head(torch.as_tensor(feats[:4]))
        head = torch.nn.functional.normalize(head, dim=1)
    torch.testing.assert_close(full, head, atol=1e-4, rtol=1e-4)


def test_partial_fine_tuning_updates_only_the_last_blocks():
    images, index = toy(size=64, channels=1)
    p = TrainingParams(**{**TINY, "epochs": 1}, loss="triplet", normalize=True, margin=0.2,
                       backbone="efficientnet_lite0", pretrained=True, train_mode="partial", trainable_blocks=1,
                       augment=True)
    bundle, _, _ = workflow.train(images, index, p, None, {"image_size": 64})
    reference = workflow.build_from_params(p, 4, 1, 64).state_dict()
    changed = {k for k, v in bundle["state_dict"].items() if not torch.equal(v, reference[k])}
    assert any(k.startswith("backbone.net.blocks.6.") for k in changed)
    assert not any(k.startswith(("backbone.net.blocks.0.", "backbone.net.conv_stem", "backbone.net.bn1."))
                   for k in changed), "early stages must stay frozen (weights and BatchNorm statistics)"


def test_invalid_training_parameters():
    from partmatch.config import ParameterError, parse

    with pytest.raises(ParameterError, match="siamese_pretrained.*study_cnn"):
        parse("siamese_pretrained", {"backbone": "study_cnn", "pretrained": True})
    with pytest.raises(ParameterError, match=r"'cnn\.lr'"):
        parse("cnn", {"task": "classifier", "loss": "cross_entropy", "lr": -1})
    with pytest.raises(ParameterError, match=r"'siamese_triplet\.sampling'"):
        parse("siamese_triplet", {"loss": "triplet", "sampling": "hardest"})
    with pytest.raises(ParameterError, match=r"head_init 'identity' needs embedding_dim == 1280"):
        parse("siamese_pretrained", {"backbone": "efficientnet_lite0", "head_init": "identity", "embedding_dim": 128})


def test_identity_head_starts_at_the_backbone_features_and_training_moves_it():
    """The recommended set-up: an untrained identity head embeds exactly like the normalised ImageNet features."""
    images, index = toy(size=64, channels=3)
    p = TrainingParams(**{**TINY, "epochs": 2, "embedding_dim": 1280}, loss="triplet", sampling="semihard", margin=0.1,
                       normalize=True, backbone="efficientnet_lite0", pretrained=True, train_mode="frozen",
                       head_init="identity", lr=1e-3)
    feats = workflow.backbone_features(images, p)
    untrained = workflow.build_from_params(p, 4, 3, 64)
    untrained.backbone = torch.nn.Identity()
    with torch.no_grad():
        start = untrained(torch.as_tensor(feats)).numpy()
    np.testing.assert_allclose(start, feats / np.linalg.norm(feats, axis=1, keepdims=True), atol=1e-5)
    bundle, _, _ = workflow.train(images, index, p, None, {"image_size": 64}, features=feats)
    assert bundle["spec"]["head_init"] == "identity"
    assert not torch.equal(bundle["state_dict"]["head.weight"], torch.eye(1280))
    model = Embedder(torch.load(_roundtrip(bundle), weights_only=True)).model
    assert torch.equal(model.state_dict()["head.weight"], bundle["state_dict"]["head.weight"])


def test_flip_averaging_head_with_similarity_preservation_end_to_end():
    """Frozen backbone, mirror views cached, head trained with flip augmentation and the similarity-preserving
    penalty; the full model's flip-averaged embedding equals the head applied to both cached views."""
    images, index = toy(size=64, channels=1)
    p = TrainingParams(**{**TINY, "epochs": 2, "embedding_dim": 1280}, loss="triplet", sampling="semihard", margin=0.1,
                       normalize=True, backbone="efficientnet_lite0", pretrained=True, train_mode="frozen",
                       head_init="identity", lr=1e-3, augment=True, flip_tta=True, preserve_weight=10.0)
    feats = workflow.backbone_features(images, p)
    assert feats.shape == (len(images), 2, 1280)
    mirrored = workflow.backbone_features(images[..., ::-1].copy(), p)
    np.testing.assert_allclose(feats[:, 1], mirrored[:, 0], atol=1e-4)   # view 1 = the mirror image's features
    bundle, history, _ = workflow.train(images, index, p, None, {"image_size": 64}, features=feats)
    assert bundle["spec"]["flip_tta"] is True and np.isfinite(history[-1]["train_loss"])
    model = Embedder(torch.load(_roundtrip(bundle), weights_only=True)).model
    from partmatch.ml.inference import embed_images

    emb = embed_images(model, images[:6], mean=(0.449,), std=(0.226,))
    np.testing.assert_allclose(emb, workflow.embed_cached_features(bundle, feats, np.arange(6)), atol=1e-4)
    # evaluation reads the embeddings computed once from the cached features: the same numbers as from images
    from_features = workflow.embed_all(bundle, images, feats, device="cpu")
    from_images = workflow.embed_all(bundle, images, device="cpu")
    np.testing.assert_allclose(from_features, from_images, atol=1e-4)
    m1 = workflow.evaluate({**bundle, "threshold": 0.5}, from_features, index, p)
    m2 = workflow.evaluate({**bundle, "threshold": 0.5}, from_images, index, p)
    assert m1["open_set_precision_at_1"] == pytest.approx(m2["open_set_precision_at_1"])
    assert m1["map_at_r"] == pytest.approx(m2["map_at_r"], abs=1e-6)


def test_cached_features_must_match_the_views_the_parameters_need():
    images, index = toy(size=64, channels=1)
    p = TrainingParams(**{**TINY, "embedding_dim": 1280}, loss="triplet", normalize=True, backbone="efficientnet_lite0",
                       pretrained=True, train_mode="frozen", head_init="identity", flip_tta=True)
    single = np.zeros((len(images), 1280), dtype=np.float32)
    with pytest.raises(ValueError, match=r"flip_tta.*mirror.*backbone_features"):
        workflow.train(images, index, p, None, {"image_size": 64}, features=single)
    from partmatch.ml.models import model_spec

    model = workflow.build_from_params(p, 4, 1, 64)
    bundle = {"spec": model_spec(model), "state_dict": model.state_dict(),
              "normalization": {"mean": [0.449], "std": [0.226]}}
    with pytest.raises(ValueError, match=r"flip_tta.*mirror view"):
        workflow.embed_cached_features(bundle, single)


def test_flip_and_preservation_parameters_are_checked_before_work():
    from partmatch.config import ParameterError, parse

    with pytest.raises(ParameterError, match="preserve_weight > 0.*task: embedding"):
        parse("cnn", {"task": "classifier", "loss": "cross_entropy", "preserve_weight": 1.0})
    with pytest.raises(ParameterError, match="flip_tta.*embedding"):
        parse("cnn", {"task": "classifier", "loss": "cross_entropy", "flip_tta": True})
    with pytest.raises(ParameterError, match="preserve_weight"):
        parse("siamese_pretrained", {"loss": "triplet", "preserve_weight": -1})


def test_embeddings_that_do_not_match_the_split_index_are_refused():
    images, index = toy()
    p = TrainingParams(**TINY, loss="contrastive")
    bundle, _, _ = workflow.train(images, index, p, None, {"image_size": 32})
    emb = workflow.embed_all(bundle, images, device="cpu")
    with pytest.raises(ValueError, match="different runs"):
        workflow.calibrate_threshold(bundle, emb[:-1], index, p)
