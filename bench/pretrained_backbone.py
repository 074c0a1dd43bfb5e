"""Pretrained backbone benchmark: does training beat off-the-shelf ImageNet features on unseen parts?

    python bench/pretrained_backbone.py [--source "../shared/datasets/carparts/car parts.csv"] [--quick]

Cleans and preprocesses the photos with the project's own node functions (same rules as `kedro run`), holds
out an open set of categories (split.open_set_fraction, fixed seed) and compares, for EfficientNet-Lite0:

  * frozen features, no training (the pooled 1280-d ImageNet features, L2-normalised, used as embeddings),
  * the recommended configuration: `siamese_pretrained` exactly as conf/base/parameters_siamese_pretrained.yml
    sets it (frozen backbone, identity-initialised 1280-d head, semi-hard triplets),
  * frozen backbone + a 128-d Proxy-Anchor head (features cached once),
  * partial fine-tuning (last 2 stages, backbone at lr x 0.1, BatchNorm statistics frozen elsewhere),
  * full fine-tuning,

at 100 px, then no-training and the best trained row at 224 px (`--rows` / `--no-224` run a subset). Reports closed-set (test vs train) and
open-set (leave-one-out over unseen categories) precision@1 and MAP@R, training images/s and wall time.
Frozen features are computed once per image size and shared; the no-training row's wall time is that cost,
and the frozen rows' wall times exclude it.
Writes the table to bench/results/pretrained_backbone.md.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import yaml

from partmatch import config
from partmatch.datasets import ImageSourceDataset
from partmatch.ml import evaluation, workflow
from partmatch.pipelines.ingestion.nodes import clean_manifest, scan_source
from partmatch.pipelines.preprocessing.nodes import preprocess_images, split_images

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "datasets" / "carparts" / "car parts.csv"
RECOMMENDED_FILE = ROOT / "conf" / "base" / "parameters_siamese_pretrained.yml"


def recommended() -> dict:
    """The `siamese_pretrained` pipeline's own parameters: the configuration the project recommends."""
    params = yaml.safe_load(RECOMMENDED_FILE.read_text())["siamese_pretrained"]
    return {**params, "progress": False, "checkpoint_dir": None, "resume": False}


# The alternatives, spelled out (independent of the parameters file): a 128-d Proxy-Anchor head on the frozen
# features, and Proxy-Anchor fine-tuning of the last 2 stages / of everything.
PROXY = {"task": "embedding", "loss": "proxy_anchor", "margin": 0.1, "proxy_lr_multiplier": 100, "embedding_dim": 128,
         "head_init": "default", "normalize": True, "backbone": "efficientnet_lite0", "pretrained": True,
         "batch_size": 64, "m_per_class": 4, "weight_decay": 1e-4, "seed": 42, "progress": False,
         "checkpoint_dir": None, "trainable_blocks": 2, "backbone_lr_multiplier": 0.1}
CONFIGS = {
    "frozen_head": ("frozen + 128-d head, Proxy-Anchor", {**PROXY, "train_mode": "frozen", "epochs": 20, "lr": 1e-3,
                                                          "patience": None, "augment": False}),
    "partial": ("partial fine-tuning (2 stages), Proxy-Anchor 128-d, augmented",
                {**PROXY, "train_mode": "partial", "epochs": 10, "lr": 5e-4, "patience": 3, "augment": True}),
    "full": ("full fine-tuning, Proxy-Anchor 128-d, augmented",
             {**PROXY, "train_mode": "full", "epochs": 4, "lr": 5e-4, "patience": None, "augment": True}),
}


def load(source: str, size: int):
    """Cleaned, preprocessed and split photos at ``size`` px (grayscale, as the study)."""
    raw = ImageSourceDataset(path=source).load()
    manifest, quarantine = scan_source(raw, {})
    clean = clean_manifest(manifest, quarantine, {})[0]
    images, index = preprocess_images(raw, clean, {"image_size": size})
    split_index, summary, _ = split_images(index, {})
    return images, split_index, summary


_FEATURES: dict[tuple, np.ndarray] = {}


def features(images, p: config.TrainingParams) -> np.ndarray:
    """Frozen backbone features of ``images``, computed once per image set and backbone for every row that
    needs them (the no-training baseline and each frozen row); empty when ``p`` does not train on them."""
    if not workflow.uses_cached_features(p):
        return np.zeros((0, 0), dtype=np.float32)
    key = (images.shape, p.backbone, p.pretrained, p.weights_path)  # one source per run: shape tells 100/224 px
    if key not in _FEATURES:
        _FEATURES[key] = workflow.backbone_features(images, p)
    return _FEATURES[key]


def no_training(images, index, size: int) -> dict:
    """The backbone's pooled ImageNet features, L2-normalised, used directly as embeddings (cosine retrieval,
    the stronger of the two off-the-shelf baselines: raw Euclidean features score lower MAP@R)."""
    p = config.TrainingParams(**{**PROXY, "train_mode": "frozen"})
    t0 = time.perf_counter()
    feats = features(images, p)
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    seconds = time.perf_counter() - t0
    rows = {s: workflow.split_rows(index, s) for s in ("train", "test", "open")}
    codes = np.asarray(index["label"].factorize()[0])
    closed = evaluation.retrieval_metrics(feats[rows["test"]], codes[rows["test"]], feats[rows["train"]],
                                          codes[rows["train"]])
    opened = evaluation.retrieval_metrics(feats[rows["open"]], codes[rows["open"]], prefix="open_set_")
    return {**closed, **opened, "train_images_per_second": float("nan"), "seconds": seconds,
            "feature_images_per_second": len(images) / seconds, "epochs": 0}


def trained(images, index, size: int, params: dict, epochs: int | None = None) -> dict:
    """Train one configuration and evaluate it with the project's evaluation contract."""
    p = config.TrainingParams(**{**params, **({"epochs": epochs} if epochs else {})})
    t0 = time.perf_counter()
    feats = features(images, p)
    bundle, history, summary = workflow.train(images, index, p, None, {"image_size": size},
                                              features=feats if feats.size else None)
    bundle, *_ = workflow.calibrate_threshold(bundle, images, index, p)
    metrics = workflow.evaluate(bundle, images, index, p)
    return {**metrics, "train_images_per_second": summary["images_per_second"], "epochs": summary["epochs_run"],
            "best_epoch": summary["best_epoch"], "seconds": time.perf_counter() - t0}


def main() -> None:
    """Run every configuration and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(DEFAULT_SOURCE))
    ap.add_argument("--quick", action="store_true", help="one epoch each, no 224 px (a smoke run)")
    ap.add_argument("--rows", nargs="*", default=["recommended", *CONFIGS],
                    help=f"trained rows to run (default all): recommended {' '.join(CONFIGS)}")
    ap.add_argument("--no-224", action="store_true", help="skip the 224 px rows")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rec = recommended()
    configs = {"recommended": (f"recommended = siamese_pretrained defaults ({rec['train_mode']}, {rec['loss']}"
                               f"{'/' + rec['sampling'] if rec['loss'] == 'triplet' else ''}, head_init "
                               f"{rec.get('head_init', 'default')}, {rec['embedding_dim']}-d)", rec), **CONFIGS}
    epochs = 1 if args.quick else None
    results: dict[str, dict] = {}
    images, index, summary = load(args.source, 100)
    print("open set:", summary["open_set_classes"], {k: v["images"] for k, v in summary["splits"].items()})
    results["100 px, frozen features, no training"] = no_training(images, index, 100)
    for key in args.rows:
        name, params = configs[key]
        results[f"100 px, {name}"] = trained(images, index, 100, params, epochs)
    trained_rows = {k: v for k, v in results.items() if "no training" not in k}
    best = max(trained_rows, key=lambda k: trained_rows[k]["open_set_precision_at_1"])
    if not (args.quick or args.no_224):
        key = next(k for k, (name, _) in configs.items() if best == f"100 px, {name}")
        name, params = configs[key]
        images, index, _ = load(args.source, 224)
        results["224 px, frozen features, no training"] = no_training(images, index, 224)
        # fine-tuning at 224 px costs ~5x more per epoch: cap it at 3 epochs on a CPU
        capped = 3 if params["train_mode"] != "frozen" else None
        results[f"224 px, {name}" + (f" ({capped} epochs)" if capped else "")] = trained(images, index, 224, params,
                                                                                        capped)
    cols = ["precision_at_1", "map_at_r", "open_set_precision_at_1", "open_set_map_at_r", "epochs",
            "best_epoch", "train_images_per_second", "seconds"]
    lines = ["| EfficientNet-Lite0 (ImageNet) | closed P@1 | closed MAP@R | open P@1 | "
             "open MAP@R | epochs | best epoch | train img/s | wall s |", "|---|" + "---:|" * len(cols)]
    for name, m in results.items():
        cells = [("-" if m.get(c) is None or (isinstance(m[c], float) and np.isnan(m[c])) else
                  f"{m[c]:.4f}" if c not in ("epochs", "best_epoch", "seconds", "train_images_per_second") else f"{m[c]:.0f}")
                 for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for size in (100, 224):
        base = results.get(f"{size} px, frozen features, no training")
        rec_m = results.get(f"{size} px, {configs['recommended'][0]}")
        if base and rec_m:
            lines += [f"{size} px: recommended vs no training, {k}: {rec_m[k]:.4f} vs {base[k]:.4f} -> "
                      f"{'BEATS' if rec_m[k] > base[k] else 'DOES NOT BEAT'}"
                      for k in ("open_set_precision_at_1", "open_set_map_at_r")]
    verdict = "\n".join(lines)
    print(verdict)
    (out / "pretrained_backbone.md").write_text(table + "\n\n" + verdict + "\n")


if __name__ == "__main__":
    main()
