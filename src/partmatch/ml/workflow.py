"""Train / calibrate / evaluate one model from the preprocessed arrays: the logic behind the model pipelines.

Plain functions (no Kedro): the Kedro nodes in ``partmatch.pipelines.training`` only call these.
A trained model travels as a *bundle*, a dict of plain types and tensors that ``torch.load(...,
weights_only=True)`` reads back: ``spec`` and ``state_dict`` (see ``models.model_spec``), the class names
of the closed set, the preprocessing it expects, the input normalisation and the pair-decision threshold.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from partmatch.config import TrainingParams
from partmatch.ml import evaluation
from partmatch.ml.data import InMemoryFeatures, InMemoryImages
from partmatch.ml.inference import Embedder, apply_head, embed_images
from partmatch.ml.models import build_model, model_spec
from partmatch.ml.objectives import BaseObjective, SimilarityPreservingObjective, build_objective
from partmatch.ml.retrieval import GalleryIndex
from partmatch.ml.training import TrainConfig, distributed, fit, resolve_device, seed_everything

logger = logging.getLogger(__name__)

STUDY_STATS = ((0.5,), (0.5,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def normalisation(p: TrainingParams, channels: int) -> tuple[tuple, tuple]:
    """Input mean/std: ImageNet statistics for pretrained backbones (grey replicated), 0.5/0.5 otherwise."""
    if p.pretrained or p.backbone not in ("study_cnn", "pca"):
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


def build_from_params(p: TrainingParams, num_classes: int, in_channels: int, image_size: int,
                      pca_components: int | None = None) -> torch.nn.Module:
    """The model described by the parameters (study trunk, PCA projection or a registered backbone).
    ``pca_components``: the components the PCA keeps (:func:`pca_size`; default ``p.pca_components``)."""
    kwargs: dict[str, Any] = {}
    if p.backbone == "pca":
        kwargs = {"components": int(pca_components or p.pca_components)}
    elif p.backbone != "study_cnn":
        kwargs = {"pretrained": p.pretrained, "weights_path": p.weights_path}
    return build_model(p.task, num_classes=num_classes, embedding_dim=p.embedding_dim, in_channels=in_channels,
                       image_size=image_size, backbone=p.backbone, normalize=p.normalize,
                       head_init=p.head_init, flip_tta=p.flip_tta, head_hidden=p.head_hidden, **kwargs)


def pca_size(p: TrainingParams, train_images: int, pixels: int) -> int:
    """Components the PCA backbone keeps: ``p.pca_components``, at most the number of training images and of
    pixel values (a PCA of n rows has at most n axes; small data sets such as the demo get fewer)."""
    k = min(int(p.pca_components), int(train_images), int(pixels))
    if k < p.pca_components:
        logger.info("PCA: %d components instead of %d (%d training images, %d pixel values).", k, p.pca_components,
                    train_images, pixels)
    return k


def fit_pca_features(model: torch.nn.Module, images: np.ndarray, train_rows: np.ndarray, p: TrainingParams,
                     mean: tuple, std: tuple, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Fit the model's PCA backbone on the TRAIN rows only (normalised pixels, as the model sees them), then
    project every image through it: ``(features, explained_variance_ratio)``. ``features`` is ``(N, k)``, or
    ``(N, 2, k)`` with the mirrored image as view 1 (:func:`feature_views`), computed by the fitted backbone
    itself (the same code that embeds a query photo)."""
    pca = model.backbone
    channels = int(images.shape[1])
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    if m.size == 1 and channels > 1:
        m, s = np.repeat(m, channels, axis=1), np.repeat(s, channels, axis=1)
    x = (np.asarray(images[np.asarray(train_rows)], dtype=np.float32) / 255.0 - m) / s
    started = time.perf_counter()
    ratio = pca.fit(x.reshape(len(x), -1), seed=p.seed, whiten=p.pca_whiten)
    del x
    fitted = time.perf_counter() - started
    views = [embed_images(pca, images, batch_size=p.eval_batch_size, device=device, mean=mean, std=std,
                          mirror=mirror) for mirror in (False, True)[: feature_views(p)]]
    feats = views[0] if len(views) == 1 else np.stack(views, axis=1)
    logger.info("PCA fitted on %d training images in %.1f s: %d components explain %.2f%% of their variance; "
                "projected %d images in %.1f s.", len(train_rows), fitted, len(ratio), 100 * float(np.sum(ratio)),
                len(images), time.perf_counter() - started - fitted)
    return feats, np.asarray(ratio)


def make_objective(p: TrainingParams, model: torch.nn.Module, num_classes: int) -> BaseObjective:
    """The training objective of the parameters for a freshly built ``model`` (before any training step): the
    chosen loss, wrapped in the similarity-preserving penalty when ``preserve_weight > 0``, whose reference is
    the cached features themselves (frozen mode) or a frozen copy of the model's initial backbone."""
    embedding_dim = p.embedding_dim if p.task == "embedding" else num_classes
    objective = build_objective(p.loss, None, num_classes=num_classes, embedding_dim=embedding_dim, sampler=p.sampler,
                                distance=p.distance)
    if p.preserve_weight > 0:
        reference = None if uses_cached_features(p) else copy.deepcopy(model.backbone)
        objective = SimilarityPreservingObjective(objective, p.preserve_weight, reference)
    return objective


def uses_cached_features(p: TrainingParams) -> bool:
    """Frozen pretrained backbone or the PCA projection: features are computed once and only the head trains."""
    return p.backbone == "pca" or (p.train_mode == "frozen" and p.backbone != "study_cnn")


def prepare_backbone(model: torch.nn.Module, p: TrainingParams) -> list[dict]:
    """Freeze the backbone as ``train_mode`` asks and return optimiser groups (backbone at a lower rate)."""
    if p.backbone in ("study_cnn", "pca"):  # the PCA projection has no parameters (buffers only)
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
    mirrored image's features as view 1 (see :func:`feature_views`); empty when the mode is not frozen, and for
    the PCA backbone, whose projection is fitted on the train split inside :func:`train`."""
    if not uses_cached_features(p) or p.backbone == "pca":
        return np.zeros((0, 0), dtype=np.float32)
    from partmatch.ml.backbones import inference_copy

    channels, size = int(images.shape[1]), int(images.shape[2])
    mean, std = normalisation(p, channels)
    device = str(resolve_device(p.device))
    key = _features_key(images, p, device)
    if _FEATURES_MEMO.get("key") == key:  # a second model of the same run on the same frozen features
        logger.info("Reusing the %s features %s of %d images computed earlier in this process.", p.backbone,
                    _FEATURES_MEMO["features"].shape[1:], len(images))
        return _FEATURES_MEMO["features"].copy()
    model = build_from_params(p, 2, channels, size)
    # BatchNorm folded, channels_last; bf16 where backbones.resolve_precision says it is native and checked
    backbone = inference_copy(model.backbone)
    precision = backbone_precision(p, size, device)
    started = time.perf_counter()
    views = [embed_images(backbone, images, batch_size=p.eval_batch_size, device=device, mean=mean, std=std,
                          precision=precision, mirror=mirror)
             for mirror in (False, True)[: feature_views(p)]]
    feats = views[0] if len(views) == 1 else np.stack(views, axis=1)
    seconds = time.perf_counter() - started
    logger.info("Cached %s features %s for %d images in %.1f s (%.0f images/s, %d view(s), %s).", p.backbone,
                feats.shape[1:], len(feats), seconds, len(feats) * len(views) / max(seconds, 1e-9), len(views),
                precision)
    _FEATURES_MEMO.clear()
    _FEATURES_MEMO.update(key=key, features=feats.copy())
    return feats


#: The last frozen-backbone features computed in this process and what they depend on: ``siamese_pretrained``
#: and ``multi_objective`` cache the same features in one ``kedro run``, computed once (one entry).
_FEATURES_MEMO: dict[str, Any] = {}


def _features_key(images: np.ndarray, p: TrainingParams, device: str) -> tuple:
    """Everything the cached features depend on: the images' bytes, the backbone and its weights, the views, the
    input normalisation, the device, the precision and the batch size."""
    weights = None
    if p.weights_path:
        from pathlib import Path

        stat = Path(p.weights_path).stat()
        weights = (str(Path(p.weights_path).resolve()), stat.st_size, stat.st_mtime_ns)
    size = int(images.shape[2])
    return (embeddings_digest(images), p.backbone, p.pretrained, weights, feature_views(p),
            normalisation(p, int(images.shape[1])), device, backbone_precision(p, size, device), p.eval_batch_size)


def backbone_precision(p: TrainingParams, image_size: int, device: str) -> str:
    """``fp32`` or ``bf16``: what ``p.backbone_precision`` means for this backbone, image size and device
    (``backbones.resolve_precision``; ``auto`` is bf16 only where it was checked on real photos for embeddings
    compared like this model's: L2-normalised (``normalize``) or by cosine, else raw Euclidean)."""
    from partmatch.ml.backbones import resolve_precision

    geometry = "cosine" if (p.normalize or p.distance == "cosine") else "euclidean"
    return resolve_precision(p.backbone_precision, device, p.backbone, image_size, geometry)


def train_config(p: TrainingParams, checkpoint_dir: str | None, mean: tuple, std: tuple) -> TrainConfig:
    """Engine configuration from the pipeline's parameters."""
    return TrainConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay,
                       patience=p.patience, device=p.device, seed=p.seed, amp=p.amp, cpu_bf16=p.cpu_bf16,
                       augment=p.augment,
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


def train(images: np.ndarray, split_index: pd.DataFrame, p: TrainingParams, checkpoint_dir: str | None,
          preprocessing: dict[str, Any], features: np.ndarray | None = None) -> tuple[dict, list[dict], dict]:
    """Train one model on the train split with early stopping on the validation split; return (bundle, history, summary).

    With ``p.distributed`` asking for more than one process, the training runs in ``nproc_per_node`` processes
    launched like ``torchrun`` (:func:`train_distributed`); the result is rank 0's. Frozen mode (cached backbone
    features: only a small head trains, seconds per epoch) always trains in this process."""
    dist_config = distributed.DistributedConfig(**p.distributed.model_dump())
    if dist_config.enabled and uses_cached_features(p):
        logger.warning("%s trains a head on cached frozen-backbone features (seconds per epoch): it trains in this "
                       "process; distributed.nproc_per_node=%d is ignored.", p.backbone, dist_config.nproc_per_node)
    elif dist_config.enabled:
        return train_distributed(images, split_index, p, checkpoint_dir, preprocessing, dist_config)
    return _train_here(images, split_index, p, checkpoint_dir, preprocessing, features)


@dataclass(frozen=True)
class TrainJob:
    """What every process of a distributed training needs (picklable): the images as a ``.npy`` file each process
    memory-maps, and the rest of :func:`train`'s arguments."""

    images_path: str
    split_index: pd.DataFrame
    params: TrainingParams
    checkpoint_dir: str | None
    preprocessing: dict[str, Any]


def _train_worker(job: TrainJob) -> tuple[dict, list[dict], dict]:
    """One process of a distributed training (launched by :func:`train_distributed`)."""
    images = np.load(job.images_path, mmap_mode="r")
    result = _train_here(images, job.split_index, job.params, job.checkpoint_dir, job.preprocessing)
    return result if os.environ.get("LOCAL_RANK", "0") == "0" else None  # one copy of the model per machine


def train_distributed(images: np.ndarray, split_index: pd.DataFrame, p: TrainingParams, checkpoint_dir: str | None,
                      preprocessing: dict[str, Any],
                      dist_config: distributed.DistributedConfig) -> tuple[dict, list[dict], dict]:
    """:func:`train` on ``dist_config.world_size`` processes (torch.distributed, PyTorch's elastic launcher): every
    process trains on its slice of each global batch; rank 0 writes the checkpoints; every process ends with the
    same model, and this machine's lowest rank's (bundle, history, summary) is returned."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="partmatch-dist-") as folder:
        path = getattr(images, "filename", None)
        if not (isinstance(images, np.memmap) and path and Path(path).suffix == ".npy"):
            path = str(Path(folder) / "images.npy")
            np.save(path, np.ascontiguousarray(images))
        job = TrainJob(str(path), split_index, p, checkpoint_dir, preprocessing)
        results = distributed.launch(_train_worker, job, dist_config, resolve_device(p.device))
    bundle, history, summary = next(r for _, r in sorted(results.items()) if r is not None)
    summary = {**summary, "wall_seconds": time.perf_counter() - started}
    return bundle, history, summary


def _train_here(images: np.ndarray, split_index: pd.DataFrame, p: TrainingParams, checkpoint_dir: str | None,
                preprocessing: dict[str, Any], features: np.ndarray | None = None) -> tuple[dict, list[dict], dict]:
    """:func:`train` in this process (one of N when a distributed run launched it)."""
    classes = class_mapping(split_index)
    if len(classes) < 2:
        raise ValueError(f"Training needs at least 2 categories in the train split, found {len(classes)}.")
    train_rows, val_rows = split_rows(split_index, "train"), split_rows(split_index, "val")
    y = encode_labels(split_index["label"], classes)
    channels, size = int(images.shape[1]), int(images.shape[2])
    mean, std = normalisation(p, channels)
    seed_everything(p.seed)
    pca_k = pca_size(p, len(train_rows), channels * size * size) if p.backbone == "pca" else None
    model = build_from_params(p, len(classes), channels, size, pca_components=pca_k)
    device = str(resolve_device(p.device))
    explained, pca_seconds = None, 0.0
    if p.backbone == "pca":  # fitted on the train rows only; its projections are the head's cached features
        # (sklearn's seeded generator: torch's, which initialised the head and draws the batches, is untouched)
        pca_started = time.perf_counter()
        features, explained = fit_pca_features(model, images, train_rows, p, mean, std, device)
        pca_seconds = time.perf_counter() - pca_started
    objective = make_objective(p, model, len(classes))
    groups = prepare_backbone(model, p)
    config = train_config(p, checkpoint_dir, mean, std)
    logger.info("Training %s (%s, loss %s, sampler %s) on %d images / %d categories, validating on %d, device %s.",
                p.task, p.backbone, p.loss_name, p.sampler["name"],
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
            apply = lambda rows: apply_head(model, features, rows, device)  # noqa: E731
            scorer = _val_scorer(p, apply, apply, train_rows, val_rows, y)
            result = fit(model, objective, InMemoryFeatures(features[train_rows], y[train_rows]), scorer, config)
        finally:
            model.backbone = backbone
    else:
        train_set = InMemoryImages(images[train_rows], y[train_rows], mean=mean, std=std)
        live = Embedder.for_model(model, mean, std, device=device, batch_size=p.eval_batch_size)
        # validation embeddings: each process embeds its share of the rows, every process gets them all
        embed = distributed.gather_rows(lambda rows: live.embed(images, rows))
        log_probs = distributed.gather_rows(lambda rows: live.log_probs(images, rows))
        scorer = _val_scorer(p, embed, log_probs, train_rows, val_rows, y)
        result = fit(model, objective, train_set, scorer, config, param_groups=groups)
    summary = {k: v for k, v in asdict(result).items() if k != "history"}
    summary.update({"wall_seconds": time.perf_counter() - started, "train_images": int(len(train_rows)),
                    "classes": len(classes)})
    if explained is not None:
        summary.update({"pca_components": int(len(explained)), "pca_explained_variance": float(np.sum(explained)),
                        "pca_fit_seconds": float(pca_seconds)})
    bundle = {
        "spec": model_spec(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "classes": classes,
        # what the images it learnt from really are (the array's size and channels), not today's parameters
        "preprocessing": {**{k: preprocessing[k] for k in ("background",) if k in preprocessing},
                          "image_size": size, "color_mode": "grayscale" if channels == 1 else "rgb"},
        "normalization": {"mean": list(mean), "std": list(std)},
        "distance": p.distance,
        "threshold": None,
    }
    if uses_cached_features(p):  # query photos are embedded in the precision the catalogue's features were
        bundle["backbone_precision"] = backbone_precision(p, size, device)
    return bundle, result.history, summary


def embed_cached_features(bundle: dict, features: np.ndarray, rows: np.ndarray | None = None,
                          device: str = "cpu") -> np.ndarray:
    """Embeddings of a frozen-backbone bundle from cached backbone features (``Embedder.embed_features``)."""
    return Embedder(bundle, device=device).embed_features(features, rows)


def embed_all(bundle: dict, images: np.ndarray, features: np.ndarray | None = None, device: str = "auto",
              batch_size: int = 256) -> np.ndarray:
    """The embedding of every image of the source (row i = image i) by a trained bundle, computed once per
    trained model: from the cached frozen-backbone features when there are some (the backbone never runs
    again), else from the images. Calibration, evaluation and the gallery index all read this array."""
    embedder = Embedder(bundle, device=str(resolve_device(device)), batch_size=batch_size)
    started = time.perf_counter()
    if features is not None and features.size:
        if len(features) != len(images):
            raise ValueError(f"cached backbone features have {len(features)} rows but image_array has {len(images)}: "
                             "they come from different preprocessing runs; re-run the model pipeline")
        emb = embedder.embed_features(features)
    else:
        emb = embedder.embed(images)
    logger.info("Embedded %d images -> %s in %.1f s (%s).", len(emb), emb.shape[1:], time.perf_counter() - started,
                "cached backbone features" if features is not None and features.size else "images")
    return emb


def _check_embeddings(embeddings: np.ndarray, split_index: pd.DataFrame) -> np.ndarray:
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or len(emb) != len(split_index):
        raise ValueError(f"embeddings have shape {emb.shape} but split_index has {len(split_index)} rows: they come "
                         "from different runs; re-run the model pipeline (kedro run --pipeline=<model>)")
    return emb


def calibrate_threshold(bundle: dict, embeddings: np.ndarray, split_index: pd.DataFrame,
                        p: TrainingParams) -> tuple[dict, pd.DataFrame, np.ndarray, np.ndarray]:
    """Pick the accuracy-maximising distance threshold on seeded balanced *training* pairs (as the study did)."""
    emb = _check_embeddings(embeddings, split_index)
    rows = split_rows(split_index, "train")
    labels = encode_labels(split_index["label"], bundle["classes"])[rows]
    a, b, same = evaluation.sample_pairs(labels, p.threshold_pairs, seed=p.seed)
    dist = evaluation.pair_distances(emb[rows], a, b, distance=bundle.get("distance", "euclidean"))
    threshold, curve = evaluation.choose_threshold(dist, same)
    logger.info("Pair threshold %.4f chosen on %d training pairs (train pair accuracy %.4f).", threshold, len(dist),
                float(curve["accuracy"].max()))
    unknown = unknown_part_threshold(emb[rows], labels, bundle.get("distance", "euclidean"))
    calibrated = {**bundle, "threshold": float(threshold), "unknown_threshold": unknown,
                  "embeddings_digest": embeddings_digest(emb)}
    return calibrated, curve, dist, same


def embeddings_digest(embeddings: np.ndarray) -> str:
    """SHA-256 of an embeddings array (shape, dtype and bytes): stored in the calibrated model, so whoever reads a
    model and an embeddings file can tell whether they come from the same run."""
    arr = np.ascontiguousarray(embeddings)
    digest = hashlib.sha256(f"{arr.shape}|{arr.dtype}|".encode())
    digest.update(memoryview(arr.reshape(-1)).cast("B"))  # the same digest as of the bytes, without copying them
    return digest.hexdigest()


def check_embeddings_of(bundle: dict, embeddings: np.ndarray, embeddings_name: str, model_name: str) -> None:
    """Refuse embeddings that are not the ones the model was calibrated with (e.g. the latest versions of the two
    datasets come from different runs after a failed one). Bundles without a digest are not checked."""
    expected = bundle.get("embeddings_digest")
    if expected is not None and embeddings_digest(embeddings) != expected:
        raise ValueError(f"{embeddings_name} is not the embeddings {model_name} was calibrated with (the latest "
                         "versions come from different runs, e.g. after a failed run): re-run the model pipeline, "
                         "or load matching versions with --load-versions")


def unknown_part_threshold(train_emb: np.ndarray, train_labels: np.ndarray, distance: str) -> float | None:
    """The "unknown part" threshold of a model, chosen on its training photos only.

    The pair threshold answers "are these two photos the same part?" for random pairs; a search answers
    "is the *nearest* catalogue photo the same part?", whose distances are much smaller, so the pair threshold
    accepts almost every photo of a part absent from the catalogue. Here each training photo plays both
    roles, leave-one-out: its nearest same-category photo is a known-part match, its nearest other-category
    photo is what it would be matched to were its category absent; the threshold maximises balanced accuracy
    between the two (``evaluation.balanced_rejection_threshold``). None when there are too few photos.
    """
    counts = pd.Series(train_labels).value_counts()
    if len(train_labels) < 3 or len(counts) < 2 or counts.max() < 2:
        logger.warning("Too few training photos to calibrate the unknown-part threshold; search will use the pair "
                       "threshold.")
        return None
    known, unknown = evaluation.leave_one_out_nearest(train_emb, train_labels, distance)
    value = evaluation.balanced_rejection_threshold(known, unknown)
    logger.info("Unknown-part threshold %.4f chosen on %d training photos (leave-one-out: known-part nearest median "
                "%.4f, other-part nearest median %.4f).", value, len(known), float(np.median(known)),
                float(np.median(unknown)))
    return value


def evaluate(bundle: dict, embeddings: np.ndarray, split_index: pd.DataFrame, p: TrainingParams) -> dict[str, float]:
    """The evaluation contract: closed-set retrieval (test vs train), open-set leave-one-out, pairs, accuracy,
    clustering quality (``nmi`` / ``ami`` of the test embeddings, ``open_set_nmi`` / ``open_set_ami``) and the
    linear-SVM probe of embedding models (``linear_svm_accuracy``: trained on the train split's embeddings, scored
    on the test split; a classifier's ``test_accuracy`` is already a linear probe of its features)."""
    emb = _check_embeddings(embeddings, split_index)
    y = encode_labels(split_index["label"], bundle["classes"])
    codes = pd.factorize(split_index["label"])[0]  # open-set categories need ids too (not the model's)
    rows = {s: split_rows(split_index, s) for s in ("train", "test", "open")}
    metrics = evaluation.evaluate_embeddings(
        emb[rows["train"]], y[rows["train"]], emb[rows["test"]], y[rows["test"]],
        emb[rows["open"]] if len(rows["open"]) else None, codes[rows["open"]] if len(rows["open"]) else None,
        threshold=bundle["threshold"], seed=p.seed, n_pairs=p.eval_pairs, distance=bundle.get("distance", "euclidean"),
        rerank=p.rerank.model_dump())
    unknown_threshold = bundle.get("unknown_threshold")
    if len(rows["test"]) and len(rows["open"]) and unknown_threshold is not None:
        metrics.update(rejection_metrics(emb[rows["train"]], split_index["label"].to_numpy()[rows["train"]],
                                         emb[rows["test"]], split_index["label"].to_numpy()[rows["test"]],
                                         emb[rows["open"]], unknown_threshold, bundle.get("distance", "euclidean")))
    distance = bundle.get("distance", "euclidean")
    if len(rows["test"]):  # clustering quality and the linear-SVM probe (k-NN: knn_accuracy above)
        metrics.update(evaluation.clustering_metrics(emb[rows["test"]], y[rows["test"]], seed=p.seed,
                                                     distance=distance))
        if p.task == "embedding":  # a classifier's own head is a linear probe of its features: test_accuracy
            metrics["linear_svm_accuracy"] = evaluation.linear_svm_accuracy(
                emb[rows["train"]], y[rows["train"]], emb[rows["test"]], y[rows["test"]], seed=p.seed,
                distance=distance)
    if len(rows["open"]):
        metrics.update(evaluation.clustering_metrics(emb[rows["open"]], codes[rows["open"]], prefix="open_set_",
                                                     seed=p.seed, distance=distance))
    if p.task == "classifier" and len(rows["test"]):
        logp = Embedder(bundle).log_probs_from_embeddings(emb[rows["test"]])
        metrics["test_accuracy"] = evaluation.classification_accuracy(logp, y[rows["test"]])
    metrics["threshold"] = float(bundle["threshold"]) if bundle["threshold"] is not None else float("nan")
    return metrics


def interpretability(bundle: dict, embeddings: np.ndarray, split_index: pd.DataFrame, p: TrainingParams,
                     k: int = 5) -> dict[str, Any]:
    """What the interpretability figures show, for the open set (the categories no model trained on; the test
    split when there is no open set): each photo's ``k`` nearest other photos (leave-one-out), per-category
    precision@1, the most confused category pairs, a seeded 2-D map (``p.embedding_map``) and a seeded choice
    of ``p.gallery_queries`` query photos. Rows are rows of the image array."""
    from partmatch.ml import interpret

    emb = _check_embeddings(embeddings, split_index)
    distance = bundle.get("distance", "euclidean")
    split = "open" if len(split_rows(split_index, "open")) >= 3 else "test"
    rows = split_rows(split_index, split)
    labels = split_index["label"].to_numpy()[rows].astype(str)
    out: dict[str, Any] = {"split": split, "rows": rows, "labels": labels}
    if len(rows) < 2:
        return {**out, "neighbours": np.zeros((0, k), dtype=np.int64), "queries": np.zeros(0, dtype=np.int64),
                "xy": np.zeros((len(rows), 2)), "per_category": interpret.per_category_precision(labels[:0],
                np.zeros((0, 1), dtype=np.int64)), "confused": interpret.confused_pairs(labels[:0],
                np.zeros((0, 1), dtype=np.int64))}
    neighbours = interpret.leave_one_out_neighbours(emb[rows], k, distance)
    picked = interpret.gallery_queries(labels, p.gallery_queries, seed=p.seed)
    return {**out, "neighbours": rows[neighbours[picked]], "queries": rows[picked],
            "per_category": interpret.per_category_precision(labels, neighbours),
            "confused": interpret.confused_pairs(labels, neighbours),
            "xy": interpret.project_2d(emb[rows], p.embedding_map, seed=p.seed, distance=distance)}


def rejection_metrics(gallery_emb: np.ndarray, gallery_labels: np.ndarray, known_emb: np.ndarray,
                      known_labels: np.ndarray, unknown_emb: np.ndarray, threshold: float,
                      distance: str) -> dict[str, float]:
    """Open-set rejection of a search of the training categories' photos: test photos of known parts and photos
    of the unseen categories as queries, the nearest catalogue photo against ``threshold`` (the model's
    unknown-part threshold). Keys ``unknown_part_fmr`` (unseen parts wrongly given a known name),
    ``unknown_part_fnmr`` (known parts rejected), ``fnmr_at_fmr_1pct``, ``unknown_part_eer``,
    ``unknown_threshold``."""
    gallery = GalleryIndex(gallery_emb, np.asarray(gallery_labels).astype(str), distance=distance)
    known = gallery.search(known_emb, k=1)
    unknown = gallery.search(unknown_emb, k=1)
    _, summary = evaluation.open_set_rejection(known.distances[:, 0], known.labels[:, 0] == np.asarray(known_labels),
                                               unknown.distances[:, 0], threshold)
    return {"unknown_threshold": float(threshold), "unknown_part_fmr": summary["fmr"],
            "unknown_part_fnmr": summary["fnmr"], "fnmr_at_fmr_1pct": summary["fnmr_at_fmr_1pct"],
            "unknown_part_eer": summary["eer"]}


def evaluate_unseen(bundle: dict, images: np.ndarray, labels: pd.Series, seed: int = 0,
                    n_pairs: int = 2000, batch_size: int = 256) -> dict[str, float]:
    """Score a trained model on a new image source, every category unseen: leave-one-out retrieval and pairs."""
    embedder = Embedder(bundle, device=str(resolve_device("auto")), batch_size=batch_size)
    emb = embedder.embed(images)
    codes = pd.factorize(labels)[0]
    metrics = evaluation.retrieval_metrics(emb, codes, prefix="open_set_", distance=embedder.distance)
    if embedder.threshold is not None:
        a, b, same = evaluation.sample_pairs(codes, n_pairs, seed=seed)
        dist = evaluation.pair_distances(emb, a, b, distance=embedder.distance)
        metrics.update(evaluation.pair_metrics(dist, same, embedder.threshold, prefix="open_set_"))
    metrics.update({"open_set_images": int(len(codes)), "open_set_categories": int(codes.max() + 1)})
    return metrics
