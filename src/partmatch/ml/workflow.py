"""Train / calibrate / evaluate one model from the preprocessed arrays: the logic behind the model pipelines.

Plain functions (no Kedro): the Kedro nodes in ``partmatch.pipelines.training`` only call these.
A trained model travels as a *bundle*, a dict of plain types and tensors that ``torch.load(...,
weights_only=True)`` reads back: ``spec`` and ``state_dict`` (see ``models.model_spec``), the class names
of the closed set, the preprocessing it expects, the input normalisation and the pair-decision threshold.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd
import torch

from partmatch.config import TrainingParams
from partmatch.ml import evaluation
from partmatch.ml.data import InMemoryFeatures, InMemoryImages
from partmatch.ml.engine import TrainConfig, fit, resolve_device, seed_everything
from partmatch.ml.models import build_model, combine_views, model_from_spec, model_spec
from partmatch.ml.objectives import BaseObjective, SimilarityPreservingObjective, build_objective

logger = logging.getLogger(__name__)

STUDY_STATS = ((0.5,), (0.5,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def normalisation(p: TrainingParams, channels: int) -> tuple[tuple, tuple]:
    """Input mean/std: ImageNet statistics for pretrained backbones (grey replicated), 0.5/0.5 otherwise."""
    if p.pretrained or p.backbone != "study_cnn":
        mean, std = IMAGENET_STATS
        if channels == 1:
            return (float(np.mean(mean)),), (float(np.mean(std)),)
        return mean, std
    return STUDY_STATS


def split_rows(split_index: pd.DataFrame, split: str) -> np.ndarray:
    """Row numbers (= rows of the image array) of one split."""
    return np.flatnonzero(split_index["split"].to_numpy() == split)


def class_mapping(split_index: pd.DataFrame) -> list[str]:
    """The closed-set classes a model is trained on: the categories present in the train split, sorted."""
    return sorted(split_index.loc[split_index["split"] == "train", "label"].unique().tolist())


def encode_labels(labels: pd.Series, classes: list[str]) -> np.ndarray:
    """Map category names to the model's class ids (-1 for categories it was not trained on)."""
    lookup = {c: i for i, c in enumerate(classes)}
    return labels.map(lambda c: lookup.get(c, -1)).to_numpy(dtype=np.int64)


def objective_params(p: TrainingParams) -> dict[str, Any]:
    """The keyword arguments of the chosen loss, from the pipeline's flat parameters."""
    single = {
        "cross_entropy": {},
        "contrastive": {"margin": p.margin, "m_per_class": p.m_per_class},
        "triplet": {"margin": p.margin, "sampling": p.sampling, "m_per_class": p.m_per_class},
        "quadruplet": {"margin1": p.margin, "margin2": p.margin2, "m_per_class": p.m_per_class},
        "proxy_anchor": {"proxy_lr_multiplier": p.proxy_lr_multiplier},
    }
    if "+" in p.loss:
        names = p.loss.split("+")
        out: dict[str, Any] = {n: single[n] for n in names}
        out["weights"] = {n: (p.proxy_weight if n == "proxy_anchor" else 1.0) for n in names}
        return out
    return single[p.loss]


def build_from_params(p: TrainingParams, num_classes: int, in_channels: int, image_size: int) -> torch.nn.Module:
    """The model described by the parameters (study trunk or a registered backbone)."""
    kwargs: dict[str, Any] = {}
    if p.backbone != "study_cnn":
        kwargs = {"pretrained": p.pretrained, "weights_path": p.weights_path}
    return build_model(p.task, num_classes=num_classes, embedding_dim=p.embedding_dim, in_channels=in_channels,
                       image_size=image_size, backbone=p.backbone, normalize=p.normalize,
                       head_init=p.head_init, flip_tta=p.flip_tta, **kwargs)


def make_objective(p: TrainingParams, model: torch.nn.Module, num_classes: int) -> BaseObjective:
    """The training objective of the parameters for a freshly built ``model`` (before any training step): the
    chosen loss, wrapped in the similarity-preserving penalty when ``preserve_weight > 0``, whose reference is
    the cached features themselves (frozen mode) or a frozen copy of the model's initial backbone."""
    embedding_dim = p.embedding_dim if p.task == "embedding" else num_classes
    objective = build_objective(p.loss, objective_params(p), num_classes=num_classes, embedding_dim=embedding_dim)
    if p.preserve_weight > 0:
        reference = None if uses_cached_features(p) else copy.deepcopy(model.backbone)
        objective = SimilarityPreservingObjective(objective, p.preserve_weight, reference)
    return objective


def uses_cached_features(p: TrainingParams) -> bool:
    """Frozen pretrained backbone: features are computed once and only the head trains."""
    return p.train_mode == "frozen" and p.backbone != "study_cnn"


def prepare_backbone(model: torch.nn.Module, p: TrainingParams) -> list[dict]:
    """Freeze the backbone as ``train_mode`` asks and return optimiser groups (backbone at a lower rate)."""
    if p.backbone == "study_cnn":
        return [{"params": [q for q in model.parameters() if q.requires_grad], "name": "model"}]
    from partmatch.ml.backbones import set_trainable

    set_trainable(model.backbone, p.train_mode, p.trainable_blocks)
    backbone = [q for q in model.backbone.parameters() if q.requires_grad]
    head = [q for n, q in model.named_parameters() if q.requires_grad and not n.startswith("backbone.")]
    groups = [{"params": head, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "name": "backbone", "lr_multiplier": p.backbone_lr_multiplier})
    logger.info("Backbone %s, mode %s: %d trainable backbone tensors at lr x %g, %d head tensors.", p.backbone,
                p.train_mode, len(backbone), p.backbone_lr_multiplier, len(head))
    return groups


def feature_views(p: TrainingParams) -> int:
    """Views cached per image in frozen mode: 2 (the image and its horizontal mirror) when the head trains
    with augmentation or embeds with flip averaging, else 1."""
    return 2 if (p.augment or p.flip_tta) else 1


def backbone_features(images: np.ndarray, p: TrainingParams) -> np.ndarray:
    """Pooled features of the frozen pretrained backbone for every image, ``(N, D)``, or ``(N, 2, D)`` with the
    mirrored image's features as view 1 (see :func:`feature_views`); empty when the mode is not frozen."""
    if not uses_cached_features(p):
        return np.zeros((0, 0), dtype=np.float32)
    channels, size = int(images.shape[1]), int(images.shape[2])
    model = build_from_params(p, 2, channels, size)
    mean, std = normalisation(p, channels)
    device = str(resolve_device(p.device))
    started = time.perf_counter()
    feats = evaluation.embed_images(model.backbone.eval(), images, batch_size=p.eval_batch_size, device=device,
                                    mean=mean, std=std)
    if feature_views(p) == 2:
        mirrored = evaluation.embed_images(_Mirrored(model.backbone).eval(), images, batch_size=p.eval_batch_size,
                                           device=device, mean=mean, std=std)
        feats = np.stack([feats, mirrored], axis=1)
    logger.info("Cached %s features %s for %d images in %.1f s.", p.backbone, feats.shape[1:], len(feats),
                time.perf_counter() - started)
    return feats


class _Mirrored(torch.nn.Module):
    """A module applied to the horizontally mirrored input (to cache the mirror view's features)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.flip(x, dims=[-1]))


def train_config(p: TrainingParams, checkpoint_dir: str | None, mean: tuple, std: tuple) -> TrainConfig:
    """Engine configuration from the pipeline's parameters."""
    return TrainConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                       patience=p.patience, device=p.device, seed=p.seed, amp=p.amp, augment=p.augment,
                       checkpoint_dir=checkpoint_dir, resume=p.resume, max_batches_per_epoch=p.max_batches_per_epoch,
                       progress=p.progress, mean=mean, std=std)


def _val_scorer(p: TrainingParams, embed, log_probs, train_rows: np.ndarray, val_rows: np.ndarray, y: np.ndarray):
    """Validation score for early stopping: accuracy (classifier) or val-vs-train precision@1 (embeddings)."""
    if len(val_rows) == 0:
        return None

    def score(model: torch.nn.Module) -> float:
        if p.task == "classifier":
            return evaluation.classification_accuracy(log_probs(val_rows), y[val_rows])
        emb = embed(np.concatenate([train_rows, val_rows]))
        m = evaluation.retrieval_metrics(emb[len(train_rows):], y[val_rows], emb[: len(train_rows)], y[train_rows],
                                         k_values=(1,), distance=p.distance)
        return m["precision_at_1"]

    return score


@torch.inference_mode()
def _apply_to_features(model: torch.nn.Module, features: np.ndarray, rows: np.ndarray, device: str) -> np.ndarray:
    """Run a head-only model (backbone swapped for the identity) over cached feature rows, averaging the
    image and mirror views when the model embeds with flip averaging (as ``model.embed`` does on images)."""
    x = torch.as_tensor(features[rows], device=device)
    if x.ndim == 2:
        x = x[:, None]
    flip = getattr(model, "flip_tta", False)
    if flip and x.shape[1] < 2:
        raise ValueError("this model embeds with flip averaging (flip_tta): its cached features need the mirror "
                         "view too, shape (N, 2, D) from workflow.backbone_features")
    was = model.training
    model.eval()
    out = model(x[:, 0])
    if flip:
        out = combine_views(out, model(x[:, 1]), model.normalize)
    model.train(was)
    return out.float().cpu().numpy()


def train(images: np.ndarray, split_index: pd.DataFrame, p: TrainingParams, checkpoint_dir: str | None,
          preprocessing: dict[str, Any], features: np.ndarray | None = None) -> tuple[dict, list[dict], dict]:
    """Train one model on the train split with early stopping on the validation split; return (bundle, history, summary)."""
    classes = class_mapping(split_index)
    if len(classes) < 2:
        raise ValueError(f"Training needs at least 2 categories in the train split, found {len(classes)}.")
    train_rows, val_rows = split_rows(split_index, "train"), split_rows(split_index, "val")
    y = encode_labels(split_index["label"], classes)
    channels, size = int(images.shape[1]), int(images.shape[2])
    mean, std = normalisation(p, channels)
    seed_everything(p.seed)
    model = build_from_params(p, len(classes), channels, size)
    objective = make_objective(p, model, len(classes))
    device = str(resolve_device(p.device))
    groups = prepare_backbone(model, p)
    config = train_config(p, checkpoint_dir, mean, std)
    logger.info("Training %s (%s, loss %s%s) on %d images / %d categories, validating on %d, device %s.",
                p.task, p.backbone, p.loss, f", sampling {p.sampling}" if p.loss == "triplet" else "",
                len(train_rows), len(classes), len(val_rows), device)
    started = time.perf_counter()
    if uses_cached_features(p):
        if features is None or len(features) != len(images):
            raise ValueError("train_mode 'frozen' needs the cached backbone features of every image")
        views = 1 if features.ndim == 2 else int(features.shape[1])
        if views < feature_views(p):
            raise ValueError(f"cached features have {views} view(s) per image, but flip_tta / augment need the "
                             f"mirror image's too: recompute them with workflow.backbone_features(images, params)")
        backbone, model.backbone = model.backbone, torch.nn.Identity()  # train the head on cached features
        try:
            apply = lambda rows: _apply_to_features(model, features, rows, device)  # noqa: E731
            scorer = _val_scorer(p, apply, apply, train_rows, val_rows, y)
            result = fit(model, objective, InMemoryFeatures(features[train_rows], y[train_rows]), scorer, config)
        finally:
            model.backbone = backbone
    else:
        train_set = InMemoryImages(images[train_rows], y[train_rows], mean=mean, std=std)
        embed = lambda rows: evaluation.embed_images(model, images, batch_size=p.eval_batch_size,  # noqa: E731
                                                     device=device, mean=mean, std=std, rows=rows)
        log_probs = lambda rows: evaluation.predict_log_probs(model, images, batch_size=p.eval_batch_size,  # noqa: E731
                                                              device=device, mean=mean, std=std, rows=rows)
        scorer = _val_scorer(p, embed, log_probs, train_rows, val_rows, y)
        result = fit(model, objective, train_set, scorer, config, param_groups=groups)
    summary = {k: v for k, v in asdict(result).items() if k != "history"}
    summary.update({"wall_seconds": time.perf_counter() - started, "train_images": int(len(train_rows)),
                    "classes": len(classes)})
    bundle = {
        "spec": model_spec(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "classes": classes,
        "preprocessing": {k: preprocessing[k] for k in ("image_size", "color_mode", "background") if k in preprocessing},
        "normalization": {"mean": list(mean), "std": list(std)},
        "distance": p.distance,
        "threshold": None,
    }
    return bundle, result.history, summary


def load_bundle(bundle: dict, device: str = "cpu") -> torch.nn.Module:
    """Rebuild the trained model of a bundle, in eval mode on ``device``."""
    model = model_from_spec(bundle["spec"], bundle["state_dict"])
    return model.to(device).eval()


def embed_cached_features(bundle: dict, features: np.ndarray, rows: np.ndarray | None = None,
                          device: str = "cpu") -> np.ndarray:
    """Embeddings of a frozen-backbone bundle computed from cached backbone features instead of images: the
    trained head (with flip averaging over the cached views when the model uses it). Equal to embedding the
    images with the full model, at a fraction of the cost (for benchmarks over many splits)."""
    model = load_bundle(bundle, device)
    model.backbone = torch.nn.Identity()
    return _apply_to_features(model, features, np.arange(len(features)) if rows is None else rows, device)


def _stats(bundle: dict) -> tuple[tuple, tuple]:
    return tuple(bundle["normalization"]["mean"]), tuple(bundle["normalization"]["std"])


def calibrate_threshold(bundle: dict, images: np.ndarray, split_index: pd.DataFrame,
                        p: TrainingParams) -> tuple[dict, pd.DataFrame, np.ndarray, np.ndarray]:
    """Pick the accuracy-maximising distance threshold on seeded balanced *training* pairs (as the study did)."""
    device = str(resolve_device(p.device))
    model = load_bundle(bundle, device)
    rows = split_rows(split_index, "train")
    labels = encode_labels(split_index["label"], bundle["classes"])[rows]
    emb = evaluation.embed_images(model, images, batch_size=p.eval_batch_size, device=device,
                                  mean=_stats(bundle)[0], std=_stats(bundle)[1], rows=rows)
    a, b, same = evaluation.sample_pairs(labels, p.threshold_pairs, seed=p.seed)
    dist = evaluation.pair_distances(emb, a, b, distance=bundle.get("distance", "euclidean"))
    threshold, curve = evaluation.choose_threshold(dist, same)
    logger.info("Pair threshold %.4f chosen on %d training pairs (train pair accuracy %.4f).", threshold, len(dist),
                float(curve["accuracy"].max()))
    return {**bundle, "threshold": float(threshold)}, curve, dist, same


def evaluate(bundle: dict, images: np.ndarray, split_index: pd.DataFrame, p: TrainingParams) -> dict[str, float]:
    """The evaluation contract: closed-set retrieval (test vs train), open-set leave-one-out, pairs, accuracy."""
    device = str(resolve_device(p.device))
    model = load_bundle(bundle, device)
    mean, std = _stats(bundle)
    y = encode_labels(split_index["label"], bundle["classes"])
    codes = pd.factorize(split_index["label"])[0]  # open-set categories need ids too (not the model's)
    rows = {s: split_rows(split_index, s) for s in ("train", "test", "open")}
    emb = {s: evaluation.embed_images(model, images, batch_size=p.eval_batch_size, device=device, mean=mean,
                                      std=std, rows=r) for s, r in rows.items()}
    metrics = evaluation.evaluate_embeddings(
        emb["train"], y[rows["train"]], emb["test"], y[rows["test"]],
        emb["open"] if len(rows["open"]) else None, codes[rows["open"]] if len(rows["open"]) else None,
        threshold=bundle["threshold"], seed=p.seed, n_pairs=p.eval_pairs, distance=bundle.get("distance", "euclidean"))
    if p.task == "classifier" and len(rows["test"]):
        logp = evaluation.predict_log_probs(model, images[rows["test"]], batch_size=p.eval_batch_size, device=device,
                                            mean=mean, std=std)
        metrics["test_accuracy"] = evaluation.classification_accuracy(logp, y[rows["test"]])
    metrics["threshold"] = float(bundle["threshold"]) if bundle["threshold"] is not None else float("nan")
    return metrics


def evaluate_unseen(bundle: dict, images: np.ndarray, labels: pd.Series, seed: int = 0,
                    n_pairs: int = 2000, batch_size: int = 256) -> dict[str, float]:
    """Score a trained model on a new image source, every category unseen: leave-one-out retrieval and pairs."""
    device = str(resolve_device("auto"))
    model = load_bundle(bundle, device)
    mean, std = _stats(bundle)
    emb = evaluation.embed_images(model, images, batch_size=batch_size, device=device, mean=mean, std=std)
    codes = pd.factorize(labels)[0]
    metrics = evaluation.retrieval_metrics(emb, codes, prefix="open_set_", distance=bundle.get("distance", "euclidean"))
    if bundle.get("threshold") is not None:
        a, b, same = evaluation.sample_pairs(codes, n_pairs, seed=seed)
        dist = evaluation.pair_distances(emb, a, b, distance=bundle.get("distance", "euclidean"))
        metrics.update(evaluation.pair_metrics(dist, same, bundle["threshold"], prefix="open_set_"))
    metrics.update({"open_set_images": int(len(codes)), "open_set_categories": int(codes.max() + 1)})
    return metrics
