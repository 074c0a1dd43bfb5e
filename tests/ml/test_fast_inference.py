"""Fast frozen inference (issue 11): BatchNorm folding, channels_last, bfloat16 and the backbone_precision
parameter. Exactness is checked against the plain eval-mode model; bf16 against fp32 within the tolerance its
8-bit mantissa allows (see test_bf16_features_agree_with_fp32_on_real_photos)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from partmatch import config
from partmatch.imaging import preprocess_bytes
from partmatch.ml import backbones as B
from partmatch.ml import workflow
from partmatch.ml.inference import Embedder, _run_batches, embed_images
from partmatch.ml.models import build_model, model_spec
from tests.conftest import CARPARTS, PROJECT_ROOT, make_photo

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

GREY = ((0.449,), (0.226,))


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row relative difference |a - b| / |b|."""
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def _photos(n: int = 6, size: int = 64) -> np.ndarray:
    rows = [np.asarray(make_photo(k, size=(size + 8 * k, size), seed=k).convert("L")) for k in range(n)]
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(r).resize((size, size)))[None] for r in rows]).astype(np.uint8)


def _plain_features(backbone: torch.nn.Module, images: np.ndarray, mirror: bool = False) -> np.ndarray:
    """The reference: the eval-mode backbone, NCHW, fp32, on (u8/255 - mean)/std."""
    x = torch.from_numpy(images).float() / 255.0
    x = (x - GREY[0][0]) / GREY[1][0]
    if mirror:
        x = torch.flip(x, dims=[-1])
    with torch.no_grad():
        return backbone.eval()(x).numpy()


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return B.build_backbone("efficientnet_lite0", in_channels=1, pretrained=True)[0].eval()


@pytest.fixture(scope="module")
def car_photos() -> np.ndarray:
    """16 real car-part photos (one per category of the first 16 train folders), grey, 100 px."""
    folders = sorted((CARPARTS / "train").iterdir())[:16]
    files = [min(f.glob("*.jpg")) for f in folders]
    return np.stack([preprocess_bytes(f.read_bytes(), image_size=100, color_mode="grayscale") for f in files])


# ------------------------------------------------------------------------------------------ folding


def test_inference_copy_folds_every_batchnorm_and_keeps_the_features(lite0):
    images = _photos()
    fast = B.inference_copy(lite0)
    assert [m for m in fast.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] == []
    assert fast.net.conv_stem.weight.shape == (32, 1, 3, 3)  # grey replication folded into the stem
    assert fast.replicate_gray is False
    got = embed_images(fast, images, batch_size=4, mean=GREY[0], std=GREY[1])
    ref = _plain_features(lite0, images)
    # fp32 rounding only: the fold is computed in float64; measured max 4e-6
    assert _rel(got, ref).max() < 1e-5


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_inference_copy_folds_the_larger_lite_backbones_too(name):
    plain = B.build_backbone(name, in_channels=1, pretrained=True)[0].eval()
    images = _photos()[:4]
    fast = B.inference_copy(plain)
    assert [m for m in fast.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)] == []
    assert fast.net.conv_stem.weight.shape == (32, 1, 3, 3)
    got = embed_images(fast, images, batch_size=4, mean=GREY[0], std=GREY[1])
    assert _rel(got, _plain_features(plain, images)).max() < 1e-5


def test_inference_copy_leaves_the_original_untouched(lite0):
    before = {k: v.clone() for k, v in lite0.state_dict().items()}
    B.inference_copy(lite0)
    after = lite0.state_dict()
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert lite0.replicate_gray is True
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in lite0.modules()) == 49


def test_resnet18_with_nontrivial_batchnorm_statistics_folds_exactly():
    torch.manual_seed(0)
    bb, _ = B.build_backbone("resnet18", in_channels=3)
    for m in bb.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # running stats / affine far from the identity
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    bb.eval()
    fast = B.inference_copy(bb)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules()) == 0
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref, got = bb(x).numpy(), fast(x.contiguous(memory_format=torch.channels_last)).numpy()
    assert _rel(got, ref).max() < 1e-5


# ------------------------------------------------------------------------------------------ layout and views


def test_channels_last_embeddings_equal_nchw_within_1e5(lite0):
    images = _photos(4)
    model = build_model("embedding", num_classes=2, embedding_dim=16, in_channels=1, image_size=64)
    for net in (model, lite0):
        forward = net.embed if hasattr(net, "embed") else net
        nchw = _run_batches(net, images, forward, 4, "cpu", GREY[0], GREY[1], None, channels_last=False)
        nhwc = _run_batches(net, images, forward, 4, "cpu", GREY[0], GREY[1], None, channels_last=True)
        assert np.abs(nhwc - nchw).max() < 1e-5 * max(1.0, float(np.abs(nchw).max()))


def test_mirror_embeds_the_flipped_images_exactly(lite0):
    images = _photos(3)
    flipped = np.ascontiguousarray(images[..., ::-1])
    a = embed_images(lite0, images, mean=GREY[0], std=GREY[1], mirror=True)
    b = embed_images(lite0, flipped, mean=GREY[0], std=GREY[1])
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------ bf16


def test_bf16_is_autocast_of_the_same_forward(lite0):
    images = _photos(2)
    fast = B.inference_copy(lite0)
    got = embed_images(fast, images, mean=GREY[0], std=GREY[1], precision="bf16")
    x = ((torch.from_numpy(images).float() / 255.0 - GREY[0][0]) / GREY[1][0]).contiguous(
        memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = fast(x).float().numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert _rel(got, _plain_features(lite0, images)).min() > 1e-4  # it really ran in bf16


@pytest.mark.skipif(not (CARPARTS / "train").is_dir(), reason="needs ../shared/datasets/carparts")
def test_bf16_features_agree_with_fp32_on_real_photos(lite0, car_photos):
    """bf16 keeps 8 significant bits (relative rounding 2**-9 = 0.2 %) at each of ~50 layers, so the pooled
    features move by a few per cent: on all 7,310 car-part photos at 100 px (bench/embed_throughput.py) the
    relative difference was median 0.033, max 0.10, cosine similarity >= 0.985. Bounds here: median <= 0.06,
    max <= 0.15, cosine >= 0.97 -- far below the distance between two different parts' features."""
    fast = B.inference_copy(lite0)
    fp32 = embed_images(fast, car_photos, mean=GREY[0], std=GREY[1])
    bf16 = embed_images(fast, car_photos, mean=GREY[0], std=GREY[1], precision="bf16")
    rel = _rel(bf16, fp32)
    cos = (bf16 * fp32).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(fp32, axis=1)
    assert np.median(rel) <= 0.06 and rel.max() <= 0.15, rel
    assert cos.min() >= 0.97, cos
    # every photo's nearest other photo is the same in bf16 as in fp32 on these 16 different parts
    def nearest(f):
        d = ((f[:, None] - f[None]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        return d.argmin(1)

    np.testing.assert_array_equal(nearest(bf16), nearest(fp32))


def test_run_batches_refuses_an_unresolved_precision(lite0):
    with pytest.raises(ValueError, match="precision must be 'fp32' or 'bf16'.*resolve_precision"):
        embed_images(lite0, _photos(1), mean=GREY[0], std=GREY[1], precision="auto")


# ------------------------------------------------------------------------------------------ the parameter


def test_resolve_precision(monkeypatch):
    assert B.resolve_precision("fp32", "cpu", "efficientnet_lite0", 100, "cosine") == "fp32"
    assert B.resolve_precision("bf16", "cpu", "efficientnet_lite0", 100, "cosine") == "bf16"
    monkeypatch.setattr(B, "BF16_VERIFIED", frozenset({("efficientnet_lite0", 100, "cosine")}))
    monkeypatch.setattr(B, "native_bf16", lambda device="cpu": True)
    assert B.resolve_precision("auto", "cpu", "efficientnet_lite0", 100, "cosine") == "bf16"
    assert B.resolve_precision("auto", "cpu", "efficientnet_lite0", 100, "euclidean") == "fp32"  # not checked
    assert B.resolve_precision("auto", "cpu", "efficientnet_lite0", 128, "cosine") == "fp32"  # size not checked
    assert B.resolve_precision("auto", "cpu", "resnet18", 100, "cosine") == "fp32"
    monkeypatch.setattr(B, "native_bf16", lambda device="cpu": False)
    assert B.resolve_precision("auto", "cpu", "efficientnet_lite0", 100, "cosine") == "fp32"  # emulated: slow
    with pytest.raises(ValueError, match=r"backbone_precision must be one of \['auto', 'fp32', 'bf16'\]"):
        B.resolve_precision("fp16")


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(B, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert B.native_bf16("cpu") is False
    monkeypatch.setattr(B, "_cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert B.native_bf16("cpu") is torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert B.native_bf16("mps") is False


def test_backbone_precision_parameter_is_validated():
    assert config.TrainingParams().backbone_precision == "auto"
    assert config.TrainingParams(backbone_precision="bf16").backbone_precision == "bf16"
    with pytest.raises(ValidationError, match="backbone_precision"):
        config.TrainingParams(backbone_precision="fp16")
    params = yaml.safe_load((PROJECT_ROOT / "conf/base/parameters_siamese_pretrained.yml").read_text())
    assert config.TrainingParams(**params["siamese_pretrained"]).backbone_precision == "auto"


# ------------------------------------------------------------------------------------------ the pipeline's path


FROZEN = {"task": "embedding", "loss": "triplet", "backbone": "efficientnet_lite0", "pretrained": True,
          "train_mode": "frozen", "embedding_dim": 1280, "head_init": "identity", "normalize": True,
          "flip_tta": True, "eval_batch_size": 4, "device": "cpu", "progress": False}


def test_cached_backbone_features_fp32_are_the_plain_backbone_on_both_views(lite0):
    images = _photos(5)
    feats = workflow.backbone_features(images, config.TrainingParams(**FROZEN, backbone_precision="fp32"))
    assert feats.shape == (5, 2, 1280)
    assert _rel(feats[:, 0], _plain_features(lite0, images)).max() < 1e-5
    assert _rel(feats[:, 1], _plain_features(lite0, images, mirror=True)).max() < 1e-5


def test_the_same_frozen_features_are_computed_once_per_process(monkeypatch):
    """siamese_pretrained and multi_objective in one kedro run: the second model's cache node reuses the first's
    features when everything they depend on is the same, and recomputes them when anything differs."""
    images = _photos(3)
    calls = []
    real = workflow.embed_images
    monkeypatch.setattr(workflow, "embed_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    workflow._FEATURES_MEMO.clear()
    p = config.TrainingParams(**FROZEN, backbone_precision="fp32")
    first = workflow.backbone_features(images, p)
    assert len(calls) == 2   # the image and its mirror
    other_loss = {**FROZEN, "loss": {"parts": [{"name": "multi_similarity"}]}, "backbone_precision": "fp32"}
    second = workflow.backbone_features(images, config.TrainingParams(**other_loss))
    assert len(calls) == 2 and np.array_equal(first, second) and second is not first
    second[:] = 0            # a caller's copy: the memo keeps the features
    assert np.array_equal(workflow.backbone_features(images, p), first) and len(calls) == 2
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    workflow.backbone_features(changed, p)
    assert len(calls) == 4   # other pixels: computed again
    workflow.backbone_features(changed, config.TrainingParams(**{**FROZEN, "flip_tta": False},
                                                              backbone_precision="fp32"))
    assert len(calls) == 5   # one view only: computed again


def test_cached_backbone_features_bf16_are_the_bf16_embedding(lite0):
    images = _photos(3)
    feats = workflow.backbone_features(images, config.TrainingParams(**FROZEN, backbone_precision="bf16"))
    ref = embed_images(B.inference_copy(lite0), images, mean=GREY[0], std=GREY[1], precision="bf16")
    np.testing.assert_allclose(feats[:, 0], ref, rtol=0, atol=1e-6)


def test_embedder_of_a_saved_frozen_model_embeds_like_the_plain_model():
    images = _photos(4)
    torch.manual_seed(0)
    model = build_model("embedding", num_classes=2, embedding_dim=1280, in_channels=1, image_size=64,
                        backbone="efficientnet_lite0", pretrained=True, normalize=True, head_init="identity",
                        flip_tta=True)
    bundle = {"spec": model_spec(model), "state_dict": model.state_dict(), "classes": ["a", "b"],
              "normalization": {"mean": list(GREY[0]), "std": list(GREY[1])}}
    x = (torch.from_numpy(images).float() / 255.0 - GREY[0][0]) / GREY[1][0]
    with torch.no_grad():
        ref = model.eval().embed(x).numpy()
    fp32 = Embedder(bundle, precision="fp32")
    assert fp32.precision == "fp32"
    np.testing.assert_allclose(fp32.embed(images), ref, rtol=0, atol=1e-5)
    bf16 = Embedder({**bundle, "backbone_precision": "bf16"})  # what the catalogue was cached in
    assert bf16.precision == "bf16"
    got = bf16.embed(images)
    assert got.dtype == np.float32
    assert (got * ref).sum(1).min() > 0.97  # unit vectors: cosine similarity to fp32


def test_auto_uses_bf16_only_where_the_car_parts_check_passed(monkeypatch):
    """bench/embed_throughput.py on the 7,310 car parts: cosine (L2-normalised) passed at 100 and 224 px, raw
    Euclidean failed at both (P@1 -0.0044 / +0.0022): those stay fp32 on any hardware."""
    monkeypatch.setattr(B, "native_bf16", lambda device="cpu": True)
    got = {(s, g): B.resolve_precision("auto", "cpu", "efficientnet_lite0", s, g)
           for s in (100, 224) for g in ("cosine", "euclidean")}
    assert got == {(100, "cosine"): "bf16", (224, "cosine"): "bf16", (100, "euclidean"): "fp32",
                   (224, "euclidean"): "fp32"}
    p = config.TrainingParams(**FROZEN)  # normalize: true, as the recommended siamese_pretrained
    assert workflow.backbone_precision(p, 100, "cpu") == "bf16"
    assert workflow.backbone_precision(p.model_copy(update={"normalize": False}), 100, "cpu") == "fp32"
