"""Identify photographed parts with the recommended model, and add part lines it never saw without retraining.

The story of issue 9 on real photos, with the project's own code (Embedder, GalleryIndex, identify,
open_set_rejection) -- no Kedro in the loop, so every number below is one function call away:

1. train the recommended model (``conf/base/parameters_siamese_pretrained.yml``) on the train split; the
   split's open set (categories never trained on) is held out;
2. index the *training categories only* (their train photos are the catalogue);
3. query with the held-back test photos of known categories and with every photo of the unseen ones:
   top-1 part-name accuracy on known parts, the share of unseen-part queries answered "unknown part" at the
   model's calibrated threshold, FNMR at FMR = 1 %, and the whole FMR/FNMR curve;
4. add the unseen categories to the index (``--add-fraction`` of each category's photos become catalogue
   items, no retraining) and query with the rest: their top-1 accuracy, and known parts again.

Run after preprocessing the real photos once::

    kedro run --pipelines=ingestion,preprocessing --params=raw_source=../shared/datasets/carparts
    kedro run --pipeline=siamese_pretrained --nodes=siamese_pretrained.preprocess_model_input \
        --params=raw_source=../shared/datasets/carparts     # the model's own input (its image_size / color_mode)
    python bench/identify_parts.py            # ~2-4 min on 2 cores at 100 px, more at 224

Writes ``bench/results/identify_parts.md`` and ``bench/results/identify_parts_rejection.png``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from partmatch.config import TrainingParams  # noqa: E402
from partmatch.ml import evaluation, workflow  # noqa: E402
from partmatch.ml.inference import Embedder  # noqa: E402
from partmatch.ml.retrieval import UNKNOWN, GalleryIndex, identify  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def latest(pattern: str) -> Path:
    found = sorted(ROOT.glob(pattern))
    if not found:
        raise SystemExit(f"no {pattern} under {ROOT}: run `kedro run --pipelines=ingestion,preprocessing "
                         "--params=raw_source=../shared/datasets/carparts` and `kedro run --pipeline=siamese_pretrained "
                         "--nodes=siamese_pretrained.preprocess_model_input --params=raw_source=...` first")
    return found[-1]


def answer(gallery: GalleryIndex, emb: np.ndarray, truth: np.ndarray, threshold: float, k: int) -> pd.DataFrame:
    """Search + vote for every query; the truth and whether the name (and the verdict) are right."""
    out = identify(gallery.search(emb, k=k), threshold, k=k)
    out["truth"] = truth
    out["name_right"] = out["predicted_label"].to_numpy() == truth
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=None, help="override the recommended epochs")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--add-fraction", type=float, default=0.5,
                    help="share of each unseen category's photos added to the index (the rest are queries)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    # the recommended model's own input (its image_size / color_mode), made by its pipeline's preprocess_model_input
    images = np.load(latest("data/04_feature/siamese_pretrained/image_array.npy/*/image_array.npy"))
    index = pd.read_parquet(latest("data/05_model_input/split_index.parquet/*/split_index.parquet"))
    raw = yaml.safe_load((ROOT / "conf/base/parameters_siamese_pretrained.yml").read_text())["siamese_pretrained"]
    p = TrainingParams(**{**raw, "progress": False, "checkpoint_dir": None,
                          **({"epochs": args.epochs} if args.epochs else {})})
    size = int(images.shape[2])
    t0 = time.perf_counter()
    feats = workflow.backbone_features(images, p)
    t_feats = time.perf_counter() - t0
    bundle, _, summary = workflow.train(images, index, p, None, {"image_size": size,
                                        "color_mode": "grayscale" if images.shape[1] == 1 else "rgb"},
                                        features=feats)
    emb = workflow.embed_all(bundle, images, feats, device="cpu")
    bundle, *_ = workflow.calibrate_threshold(bundle, emb, index, p)
    embedder = Embedder(bundle)
    threshold = embedder.unknown_threshold  # "unknown part" beyond it (calibrated on the training photos)
    t_train = time.perf_counter() - t0 - t_feats

    labels = index["label"].astype(str).to_numpy()
    paths = index["path"].astype(str).to_numpy()
    rows = {s: workflow.split_rows(index, s) for s in ("train", "test", "open")}
    gallery = GalleryIndex(emb[rows["train"]], labels[rows["train"]], ids=paths[rows["train"]],
                           distance=embedder.distance)

    known = answer(gallery, emb[rows["test"]], labels[rows["test"]], threshold, args.top_k)
    unseen = answer(gallery, emb[rows["open"]], labels[rows["open"]], threshold, args.top_k)
    curve, rejection = evaluation.open_set_rejection(known["nearest_distance"].to_numpy(),
                                                     known["name_right"].to_numpy(),
                                                     unseen["nearest_distance"].to_numpy(), threshold)

    # new part lines without retraining: add part of every unseen category, query with the rest
    rng = np.random.default_rng(args.seed)
    add_rows, query_rows = [], []
    for label in sorted(set(labels[rows["open"]])):
        members = rng.permutation(rows["open"][labels[rows["open"]] == label])
        n_add = max(1, int(round(args.add_fraction * len(members))))
        add_rows.extend(members[:n_add])
        query_rows.extend(members[n_add:])
    add_rows, query_rows = np.asarray(add_rows), np.asarray(query_rows)
    before = len(gallery)
    t1 = time.perf_counter()
    gallery.add(emb[add_rows], labels[add_rows], ids=paths[add_rows])
    t_add = time.perf_counter() - t1
    new = answer(gallery, emb[query_rows], labels[query_rows], threshold, args.top_k)
    known_after = answer(gallery, emb[rows["test"]], labels[rows["test"]], threshold, args.top_k)
    new_before = answer(GalleryIndex(emb[rows["train"]], labels[rows["train"]], ids=paths[rows["train"]],
                                     distance=embedder.distance),
                        emb[query_rows], labels[query_rows], threshold, args.top_k)
    removed = gallery.remove_labels(sorted(set(labels[add_rows])))

    def share(mask) -> str:
        return f"{float(np.mean(mask)):.4f}"

    n_open_cats = len(set(labels[rows["open"]]))
    lines = [
        "# Identify a photographed part (`python bench/identify_parts.py`)",
        "",
        f"Images {images.shape}, model siamese_pretrained ({summary['epochs_run']} epochs, best {summary['best_epoch']}),"
        f" distance {embedder.distance}, unknown-part threshold {threshold:.4f} (pair threshold {embedder.threshold:.4f}); backbone features {t_feats:.0f} s,"
        f" head + embeddings + calibration {t_train:.0f} s.",
        f"Index = the train photos of the {len(set(labels[rows['train']]))} training categories ({before} items);"
        f" queries: {len(rows['test'])} held-back photos of known categories, {len(rows['open'])} photos of"
        f" {n_open_cats} unseen categories.",
        "",
        "| what | value |",
        "|---|---:|",
        f"| known parts: top-1 part name right (k={args.top_k} distance-weighted vote) | {share(known['name_right'])} |",
        f"| known parts: accepted and right at the threshold | {rejection['known_identified']:.4f} |",
        f"| known parts: rejected as unknown at the threshold (FNMR) | {rejection['fnmr']:.4f} |",
        f"| unseen parts: answered \"{UNKNOWN}\" at the threshold | {rejection['unknown_rejected']:.4f} |",
        f"| unseen parts: wrongly given a known name (FMR) | {rejection['fmr']:.4f} |",
        f"| FNMR at FMR = 1 % | {rejection['fnmr_at_fmr_1pct']:.4f} |",
        "",
        f"**New part lines, no retraining**: {len(add_rows)} photos of the {n_open_cats} unseen categories added to"
        f" the index in {t_add * 1000:.1f} ms (no other vector re-embedded); {len(query_rows)} other photos of them"
        " queried.",
        "",
        "| what | value |",
        "|---|---:|",
        f"| new categories: top-1 part name right, before the add | {share(new_before['name_right'])} |",
        f"| new categories: top-1 part name right, after the add | {share(new['name_right'])} |",
        f"| new categories: accepted and right at the threshold, after the add | "
        f"{share(new['name_right'] & (new['verdict'] != UNKNOWN))} |",
        f"| known parts after the add: top-1 right | {share(known_after['name_right'])} |",
        f"| part lines removed again (remove_labels) | {removed} vectors |",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "identify_parts.md").write_text(text + "\n")
    try:
        from partmatch.ml.plots import rejection_curve_figure

        rejection_curve_figure(curve, threshold).savefig(RESULTS / "identify_parts_rejection.png", dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
