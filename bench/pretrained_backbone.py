"""Pretrained backbone benchmark: does training beat off-the-shelf ImageNet features on unseen parts?

    python bench/pretrained_backbone.py [--source "../shared/datasets/carparts/car parts.csv"] [--quick]

Cleans and preprocesses the photos with the project's own node functions (same rules as `kedro run`), holds
out an open set of categories (split.open_set_fraction, fixed seed) and compares, for EfficientNet-Lite0:

  * frozen features, no training (the pooled 1280-d ImageNet features used directly as embeddings),
  * frozen backbone + trained embedding head (features cached once),
  * the recommended configuration: `siamese_pretrained` exactly as conf/base/parameters_siamese_pretrained.yml
    sets it (partial fine-tuning of the last stages, backbone at a lower lr, BatchNorm statistics frozen),
  * full fine-tuning,

at 100 px, then no-training and the best trained mode at 224 px. Reports closed-set (test vs train) and
open-set (leave-one-out over unseen categories) precision@1 and MAP@R, training images/s and wall time.
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


COMMON = {k: v for k, v in recommended().items() if k not in ("train_mode", "epochs", "augment", "lr", "patience")}
COMMON["patience"] = None


def load(source: str, size: int):
    """Cleaned, preprocessed and split photos at ``size`` px (grayscale, as the study)."""
    raw = ImageSourceDataset(path=source).load()
    manifest, quarantine = scan_source(raw, {})
    clean = clean_manifest(manifest, quarantine, {})[0]
    images, index = preprocess_images(raw, clean, {"image_size": size})
    split_index, summary, _ = split_images(index, {})
    return images, split_index, summary


def no_training(images, index, size: int) -> dict:
    """The backbone's pooled ImageNet features used directly as embeddings."""
    p = config.TrainingParams(**COMMON, train_mode="frozen")
    t0 = time.perf_counter()
    feats = workflow.backbone_features(images, p)
    seconds = time.perf_counter() - t0
    rows = {s: workflow.split_rows(index, s) for s in ("train", "test", "open")}
    codes = np.asarray(index["label"].factorize()[0])
    closed = evaluation.retrieval_metrics(feats[rows["test"]], codes[rows["test"]], feats[rows["train"]],
                                          codes[rows["train"]])
    opened = evaluation.retrieval_metrics(feats[rows["open"]], codes[rows["open"]], prefix="open_set_")
    return {**closed, **opened, "train_images_per_second": float("nan"), "seconds": seconds,
            "feature_images_per_second": len(images) / seconds, "epochs": 0}


def trained(images, index, size: int, mode: str, epochs: int, **extra) -> dict:
    """Train one configuration and evaluate it with the project's evaluation contract."""
    if mode == "recommended":  # what `kedro run --pipeline=siamese_pretrained` trains (epochs may be capped)
        p = config.TrainingParams(**{**recommended(), **({"epochs": epochs} if epochs else {})})
    else:
        p = config.TrainingParams(**{**COMMON, **extra}, train_mode=mode, epochs=epochs,
                                  augment=mode != "frozen", lr=extra.get("lr", 1e-3 if mode == "frozen" else 5e-4))
    t0 = time.perf_counter()
    feats = workflow.backbone_features(images, p)
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
    ap.add_argument("--quick", action="store_true", help="fewer epochs, no 224 px (a smoke run)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    e = {"frozen": 20, "recommended": None, "full": 4, "224": 3} if not args.quick else \
        {"frozen": 3, "recommended": 1, "full": 1, "224": 1}
    rec = recommended()
    rec_name = (f"100 px, {rec['train_mode']} fine-tuning, {rec['loss']} = siamese_pretrained defaults "
                f"({rec['epochs'] if e['recommended'] is None else e['recommended']} epochs, patience {rec['patience']})")
    results: dict[str, dict] = {}
    images, index, summary = load(args.source, 100)
    print("open set:", summary["open_set_classes"], {k: v["images"] for k, v in summary["splits"].items()})
    results["100 px, frozen, no training"] = no_training(images, index, 100)
    results["100 px, frozen + trained head"] = trained(images, index, 100, "frozen", e["frozen"])
    results[rec_name] = trained(images, index, 100, "recommended", e["recommended"])
    results["100 px, full fine-tuning"] = trained(images, index, 100, "full", e["full"])
    trained_rows = {k: v for k, v in results.items() if "no training" not in k}
    best = max(trained_rows, key=lambda k: trained_rows[k]["open_set_precision_at_1"])
    if not args.quick:
        images, index, _ = load(args.source, 224)
        results["224 px, frozen, no training"] = no_training(images, index, 224)
        mode = "frozen" if "frozen" in best else "recommended" if best == rec_name else "full"
        epochs = e["frozen"] if mode == "frozen" else e["224"]
        results[f"224 px, {best.split(', ', 1)[1].split(' (')[0]} ({epochs} epochs)"] = trained(
            images, index, 224, mode, epochs)
    cols = ["precision_at_1", "map_at_r", "open_set_precision_at_1", "open_set_map_at_r", "epochs",
            "best_epoch", "train_images_per_second", "seconds"]
    lines = ["| EfficientNet-Lite0 (ImageNet), Proxy-Anchor head | closed P@1 | closed MAP@R | open P@1 | "
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
    base, rec_m = results["100 px, frozen, no training"], results[rec_name]
    verdict = "\n".join(
        f"recommended vs no training, {k}: {rec_m[k]:.4f} vs {base[k]:.4f} -> "
        f"{'BEATS' if rec_m[k] > base[k] else 'DOES NOT BEAT'}" for k in ("open_set_precision_at_1", "open_set_map_at_r"))
    print(verdict)
    (out / "pretrained_backbone.md").write_text(table + "\n\n" + verdict + "\n")


if __name__ == "__main__":
    main()
