import copy
import math
import os

import numpy as np
import pytest
import torch

from partmatch.ml.data import InMemoryFeatures, InMemoryImages, make_augmentation
from partmatch.ml.training import NonFiniteLossError, TrainConfig, fit, load_checkpoint, resolve_device, seed_everything
from partmatch.ml.models import build_model, model_from_spec
from partmatch.ml.objectives import (
    BaseObjective,
    ClassificationObjective,
    SimilarityPreservingObjective,
    build_objective,
)

SIZE = 16


def toy_images(n_per_class=12, classes=4, seed=0):
    """Separable toy set: class k is a bright square in quadrant k on a noisy dark background."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 60, size=(n_per_class * classes, 1, SIZE, SIZE), dtype=np.uint8)
    labels = np.repeat(np.arange(classes), n_per_class)
    h = SIZE // 2
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 2)
        imgs[i, 0, r * h : (r + 1) * h, c * h : (c + 1) * h] = 220
    return InMemoryImages(imgs, labels)


def small_model(task="embedding", seed=0):
    seed_everything(seed)
    return build_model(task, num_classes=4, embedding_dim=8, in_channels=1, image_size=SIZE, channels=(4, 8))


def config(**kw):
    base = dict(epochs=2, batch_size=16, lr=1e-2, patience=None, device="cpu", progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------------------------- data


def test_batch_scales_and_normalises_once():
    imgs = np.zeros((3, SIZE, SIZE), dtype=np.uint8)  # (N, H, W) is read as grayscale
    imgs[1] = 255
    imgs[2] = 51
    data = InMemoryImages(imgs, np.array([2, 0, 1]))
    x, y = data.batch(np.array([2, 1, 0]), "cpu")
    assert x.shape == (3, 1, SIZE, SIZE) and x.dtype == torch.float32
    assert y.tolist() == [1, 0, 2] and y.dtype == torch.int64
    torch.testing.assert_close(x[:, 0, 0, 0], torch.tensor([(0.2 - 0.5) / 0.5, 1.0, -1.0]))
    x2, _ = data.batch([1], "cpu", mean=(0.0,), std=(1.0,))
    assert x2.max().item() == pytest.approx(1.0)
    with pytest.raises(TypeError):
        InMemoryImages(imgs.astype(np.float32), np.zeros(3))


def test_augmentation_is_per_sample_and_keeps_range():
    torch.manual_seed(0)
    x = torch.rand(1, 1, SIZE, SIZE).repeat(8, 1, 1, 1)
    out = make_augmentation(True, SIZE)(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out[0], out[1])  # each image gets its own crop / flip / rotation / jitter
    assert make_augmentation(False, SIZE) is None


def test_augmentation_is_seeded_and_keeps_white_padding_white():
    white = torch.ones(4, 3, SIZE, SIZE)
    torch.manual_seed(1)
    geometric = make_augmentation(True, SIZE, brightness=0.0, contrast=0.0)
    assert torch.allclose(geometric(white), white, atol=1e-5)  # crops / rotations fill with white, not black
    augment = make_augmentation(True, SIZE)
    x = torch.rand(4, 1, SIZE, SIZE)
    torch.manual_seed(2)
    a = augment(x)
    torch.manual_seed(2)
    assert torch.equal(a, augment(x))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            resolve_device("cuda")


# ---------------------------------------------------------------------------------------------- fit


def test_loss_decreases_on_a_separable_toy_problem():
    data = toy_images()
    model = small_model("classifier")
    result = fit(model, ClassificationObjective(), data, None, config(epochs=4))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        model.eval()
        x, y = data.batch(np.arange(len(data)), "cpu")
        assert (model(x).argmax(1) == y).float().mean() > 0.9
    assert result.epochs_run == 4 and result.device == "cpu" and result.images_per_second > 0
    assert set(result.history[0]) >= {"epoch", "train_loss", "val_score", "images_per_second", "seconds", "lr"}


def test_contrastive_embedding_training_decreases_loss():
    data = toy_images()
    model = small_model()
    obj = build_objective("contrastive", {"margin": 1.0, "m_per_class": 4}, 4, 8)
    result = fit(model, obj, data, None, config(epochs=4))
    assert result.history[-1]["train_loss"] < 0.5 * result.history[0]["train_loss"]


def _run(tmp_path, name, epochs, resume=False, preserve=False):
    model = small_model(seed=1)
    obj = build_objective("contrastive+proxy_anchor", {"m_per_class": 4}, 4, 8)
    if preserve:  # the similarity-preserving penalty against a frozen copy of the initial trunk
        obj = SimilarityPreservingObjective(obj, 5.0, copy.deepcopy(model.backbone))
    cfg = config(epochs=epochs, augment=True, checkpoint_dir=str(tmp_path / name), resume=resume)
    result = fit(model, obj, toy_images(), lambda m: 0.0, cfg)  # constant score: best = first epoch
    return model, result


@pytest.mark.parametrize("preserve", [False, True])
def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path, preserve):
    _, full = _run(tmp_path, "full", epochs=2, preserve=preserve)
    _, first = _run(tmp_path, "split", epochs=1, preserve=preserve)
    assert first.epochs_run == 1
    _, resumed = _run(tmp_path, "split", epochs=2, resume=True, preserve=preserve)
    assert resumed.resumed_from_epoch == 1 and resumed.epochs_run == 2
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key in ("model", "objective"):  # objective = proxies (own param group, lr x100)
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["train_loss"] for h in full.history] == [h["train_loss"] for h in resumed.history]
    # and the weights actually moved in epoch 2 (otherwise the comparison would be vacuous)
    assert not all(torch.equal(a["model"][k], a["best_state"][k]) for k in a["model"])


def test_checkpoints_load_with_weights_only(tmp_path):
    model = small_model()
    obj = build_objective("triplet", {"sampling": "semihard", "margin": 0.5}, 4, 8)
    fit(model, obj, toy_images(), None, config(epochs=1, checkpoint_dir=str(tmp_path)))
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "objective", "epoch", "history", "best_state", "best_score", "rng"} <= set(last)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    again = model_from_spec(best["spec"], best["state_dict"])
    x = torch.randn(2, 1, SIZE, SIZE)
    model.eval(), again.eval()
    # the trained model is channels-last, the rebuilt one contiguous: same maths, different summation order
    torch.testing.assert_close(again(x), model(x), atol=1e-5, rtol=1e-5)
    assert not list(tmp_path.glob("*.tmp*"))


class NanAfter(BaseObjective):
    task = "classifier"

    def __init__(self, after):
        super().__init__()
        self.after, self.calls = after, 0

    def loss(self, model, images, labels):
        self.calls += 1
        out = torch.nn.functional.nll_loss(model(images), labels)
        return out * float("nan") if self.calls > self.after else out


def test_nan_loss_raises_before_a_checkpoint_is_written(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, batch 2.*lower the learning rate"):
        fit(small_model("classifier"), NanAfter(1), toy_images(), None, config(checkpoint_dir=str(tmp_path)))
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()


def test_exploding_learning_rate_raises(tmp_path):
    with pytest.raises(NonFiniteLossError):
        fit(small_model("classifier"), ClassificationObjective(), toy_images(), None,
            config(lr=1e30, epochs=3, checkpoint_dir=str(tmp_path)))
    assert not (tmp_path / "best.pt").exists()


def test_early_stopping_stops_and_restores_the_best_weights():
    scores = iter([0.1, 0.5, 0.3, 0.2, 0.4, 0.9, 0.9])
    snapshots = {}
    model = small_model()

    def on_epoch_end(epoch, record):
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    obj = build_objective("triplet", {"margin": 1.0}, 4, 8)
    result = fit(model, obj, toy_images(), lambda m: next(scores), config(epochs=10, patience=3),
                 on_epoch_end=on_epoch_end)
    assert result.stopped_early and result.epochs_run == 5
    assert result.best_epoch == 2 and result.best_score == pytest.approx(0.5)
    assert [h["val_score"] for h in result.history] == pytest.approx([0.1, 0.5, 0.3, 0.2, 0.4])
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[2][k])
    assert not all(torch.equal(snapshots[5][k], snapshots[2][k]) for k in snapshots[2])


def test_max_batches_and_task_mismatch():
    model = small_model()
    result = fit(model, build_objective("contrastive", {}, 4, 8), toy_images(), None,
                 config(epochs=1, max_batches_per_epoch=1))
    assert result.history[0]["images_per_second"] > 0
    assert not math.isnan(result.best_score)
    with pytest.raises(ValueError, match="task"):
        fit(model, ClassificationObjective(), toy_images(), None, config(epochs=1))


def test_cached_feature_views_are_drawn_per_sample_only_when_augmenting():
    feats = np.stack([np.zeros((10, 3)), np.ones((10, 3))], axis=1).astype(np.float32)   # view 0 = 0, view 1 = 1
    data = InMemoryFeatures(feats, np.arange(10))
    x, y = data.batch(np.arange(10))
    assert x.shape == (10, 3) and (x == 0).all() and y.tolist() == list(range(10))
    torch.manual_seed(0)
    a, _ = data.batch(np.arange(10), augment=True)
    torch.manual_seed(0)
    b, _ = data.batch(np.arange(10), augment=True)
    assert torch.equal(a, b) and 0 < a[:, 0].sum() < 10           # seeded, and both views occur
    assert InMemoryFeatures(np.ones((4, 3)), np.arange(4)).batch([0, 1], augment=True)[0].shape == (2, 3)
    with pytest.raises(ValueError, match=r"\(N, D\) or \(N, views, D\)"):
        InMemoryFeatures(np.ones((4, 3, 2, 2)), np.arange(4))


def test_a_reference_network_in_the_objective_gets_the_models_memory_format(tmp_path):
    model = small_model(seed=1)
    reference = copy.deepcopy(model.backbone)
    obj = SimilarityPreservingObjective(build_objective("triplet", {"m_per_class": 4}, 4, 8), 5.0, reference)
    fit(model, obj, toy_images(), None, config(epochs=1))
    conv = reference.features[3].weight  # (8, 4, 3, 3): NCHW and NHWC layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


@pytest.mark.parametrize("cpu_bf16, dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_cpu_bf16_runs_the_training_step_in_bfloat16_only_when_asked(cpu_bf16, dtype):
    data = toy_images()
    model = small_model("classifier")
    seen = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    handle = conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype) if mod.training else None)
    try:
        result = fit(model, ClassificationObjective(), data, None, config(epochs=1, cpu_bf16=cpu_bf16))
    finally:
        handle.remove()
    assert set(seen) == {dtype}                      # every training step's convolution
    assert all(p.dtype == torch.float32 for p in model.parameters())   # weights stay fp32 (autocast, not .half())
    assert math.isfinite(result.history[0]["train_loss"])


def test_dead_checkpoint_temp_files_of_this_host_only_are_removed(tmp_path):
    from partmatch.ml.training.checkpoint import remove_dead_temp_files as _remove_dead_temp_files
    from partmatch.tempfiles import temp_host

    dead = 2 ** 22 + 12345                     # above Linux's pid_max default: no such process
    mine = tmp_path / f".last.pt.tmp-{temp_host()}-{dead}-0a1b2c3d"
    other = tmp_path / f".last.pt.tmp-otherhost-{dead}-0a1b2c3d"
    alive = tmp_path / f".best.pt.tmp-{temp_host()}-{os.getpid()}-0a1b2c3d"
    for p in (mine, other, alive):
        p.write_bytes(b"partial")
    _remove_dead_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, alive.name])


def test_each_part_of_a_combined_loss_is_recorded_per_epoch_and_the_parts_add_up():
    """The loop records the epoch mean of every named term the objective reports (``last_terms``): for a weighted
    contrastive + Proxy-Anchor + similarity-preserving objective the three means add up to the epoch's loss."""
    model = small_model()
    objective = SimilarityPreservingObjective(build_objective("contrastive+proxy_anchor", {"proxy_weight": 0.5}, 4, 8),
                                              2.0, copy.deepcopy(model.backbone))
    result = fit(model, objective, toy_images(), None, config(epochs=2))
    for record in result.history:
        terms = {k: v for k, v in record.items() if k.startswith("train_loss_")}
        assert sorted(terms) == ["train_loss_contrastive", "train_loss_preserve", "train_loss_proxy_anchor"]
        assert sum(terms.values()) == pytest.approx(record["train_loss"], rel=1e-5)


def test_a_proxy_anchor_checkpoint_written_before_losses_had_parts_resumes(tmp_path):
    """``last.pt`` of a lone Proxy-Anchor (with the similarity penalty) from before the losses registry stored the
    proxies as ``inner.criterion.proxies``; they now live at ``inner.parts.0.criterion.proxies``. Resuming such a
    checkpoint continues it: the result equals an uninterrupted run's."""
    def objective(model):
        return SimilarityPreservingObjective(build_objective("proxy_anchor", {}, 4, 8), 1.0,
                                             copy.deepcopy(model.backbone))

    whole = small_model()
    fit(whole, objective(whole), toy_images(), None, config(epochs=2))
    cut = small_model()
    fit(cut, objective(cut), toy_images(), None, config(epochs=1, checkpoint_dir=str(tmp_path)))
    ckpt = load_checkpoint(tmp_path / "last.pt")
    for key in ("objective", "best_objective_state"):   # rewrite it as the old code wrote it
        assert "inner.parts.0.criterion.proxies" in ckpt[key]
        ckpt[key] = {k.replace("parts.0.", ""): v for k, v in ckpt[key].items()}
    torch.save(ckpt, tmp_path / "last.pt")
    resumed = small_model()
    result = fit(resumed, objective(resumed), toy_images(), None,
                 config(epochs=2, checkpoint_dir=str(tmp_path), resume=True))
    assert result.resumed_from_epoch == 1
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
