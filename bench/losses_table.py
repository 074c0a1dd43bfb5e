"""Every loss, miner, sampler and distance of the registry on the car parts, side by side.

    OMP_WAIT_POLICY=PASSIVE nice -n 5 python bench/losses_table.py [--epochs 3] [--lr 1e-3] [--rows a,b] [--scratch]

Photos: ``../shared/datasets/carparts`` cleaned, 100 px grayscale (the study's input), split as the pipelines
split them (seed 42; 20 % of the categories held out as the open set). Two groups of rows, all seeded (seed 42):

* **pretrained head**: the frozen EfficientNet-Lite0 features (ImageNet weights; the image and its mirror,
  computed once for every row) and the identity head of ``siamese_pretrained`` (1280-d, L2-normalised,
  mirror augmentation, flip averaging), trained ``--epochs`` epochs at ``--lr`` (early stopping off) with each loss
  *alone* (``preserve_weight: 0``, so the loss is what moves the features): the study's contrastive and random
  triplets, semi-hard triplets, quadruplet, Proxy-Anchor, multi-similarity, the multi-objective recipe and its
  ablations (each term's weight 0, the plain m-per-class sampler instead of nearest proxies), the three
  distances; then ``siamese_pretrained`` and ``multi_objective`` exactly as configured (similarity-preserving
  penalty on) and the untrained features for reference;
* **scratch trunk** (``--scratch``, slow): the study's three models (``cnn``, ``siamese_contrastive``, ``siamese_triplet`` with the
  study's random triplets and no penalty) from their parameter files, ``--scratch-epochs`` epochs.

Columns: closed-set (test photos against the training photos) and open-set (leave-one-out among the unseen
categories) precision@1 and MAP@R, the training wall time (features excluded, computed once) and training
images/s. Prints a markdown table and writes it to bench/results/losses_table.md.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import yaml
from pretrained_backbone import DEFAULT_SOURCE, features, load, no_training  # bench/ is on sys.path

from partmatch import config
from partmatch.ml import workflow

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "base"


def conf(model: str) -> dict:
    params = yaml.safe_load((CONF / f"parameters_{model}.yml").read_text())[model]
    return {**params, "progress": False, "checkpoint_dir": None, "resume": False, "device": "cpu"}


MO = conf("multi_objective")
MO_PARTS = MO["loss"]["parts"]  # [multi_similarity + miner, proxy_anchor, proxy_repulsion]
# the head of siamese_pretrained / multi_objective, without its similarity-preserving penalty
HEAD = {k: v for k, v in MO.items() if k not in ("loss", "sampler")} | {"preserve_weight": 0.0, "patience": None}


def nested(*parts: dict, sampler: dict | None = None, **extra) -> dict:
    return {**HEAD, "loss": {"parts": list(parts)}, "sampler": sampler or {"name": "m_per_class", "m": 4}, **extra}


def mo(weights: tuple[float, float, float] = (1.0, 1.0, 1.0), sampler: dict | None = None, **extra) -> dict:
    parts = [{**copy.deepcopy(p), "weight": w} for p, w in zip(MO_PARTS, weights, strict=True)]
    return {**HEAD, "loss": {"parts": parts}, "sampler": sampler or MO["sampler"], **extra}


def follow(parts: list[dict]) -> list[dict]:
    """The parts with their distances following the model's ``distance``."""
    out = copy.deepcopy(parts)
    for p in out:
        p.get("args", {}).pop("distance", None)
        if p.get("miner"):
            p["miner"].get("args", {}).pop("distance", None)
    return out


TRIPLET_SEMIHARD = {"name": "triplet", "args": {"margin": 0.1}, "miner": {"name": "semihard", "args": {"margin": 0.1}}}

HEAD_ROWS: dict[str, dict] = {
    "contrastive (study)": {**HEAD, "loss": "contrastive", "margin": 1.0, "m_per_class": 4},
    "triplet, random (study)": {**HEAD, "loss": "triplet", "sampling": "random", "margin": 0.1, "m_per_class": 4},
    "triplet, semi-hard": nested(TRIPLET_SEMIHARD),
    "quadruplet": nested({"name": "quadruplet", "args": {"margin1": 0.2, "margin2": 0.1}}),
    "proxy_anchor": nested({"name": "proxy_anchor", "args": {"distance": "cosine"}}),
    "multi_similarity + miner": nested(copy.deepcopy(MO_PARTS[0])),
    "multi_objective": mo(),
    "multi_objective - pair term": mo((0.0, 1.0, 1.0)),
    "multi_objective - proxy_anchor": mo((1.0, 0.0, 1.0)),
    "multi_objective - proxy-proxy": mo((1.0, 1.0, 0.0)),
    "multi_objective, m_per_class sampler": mo(sampler={"name": "m_per_class", "m": 4}),
    "triplet semi-hard, cosine": nested(TRIPLET_SEMIHARD, distance="cosine"),
    "triplet semi-hard, manhattan": nested(TRIPLET_SEMIHARD, distance="manhattan"),
    "multi_objective, euclidean": {**mo(), "loss": {"parts": follow(MO_PARTS)}, "distance": "euclidean"},
    "multi_objective, manhattan": {**mo(), "loss": {"parts": follow(MO_PARTS)}, "distance": "manhattan",
                                   "sampler": {**MO["sampler"], "distance": "manhattan"}},
    "siamese_pretrained (as configured)": {**conf("siamese_pretrained"), "patience": None},
    "multi_objective (as configured)": {**MO, "patience": None},
}
FLAT = ("loss", "sampler", "sampling", "margin", "margin2", "proxy_weight", "proxy_lr_multiplier", "m_per_class")
# the study trunk of siamese_triplet (64-d, L2-normalised) without its penalty: each loss alone moves the features
TRUNK = {k: v for k, v in conf("siamese_triplet").items() if k not in FLAT} | {"preserve_weight": 0.0,
                                                                                "patience": None}


def on_trunk(*parts: dict, sampler: dict | None = None) -> dict:
    return {**TRUNK, "loss": {"parts": follow(list(parts))}, "sampler": sampler or {"name": "m_per_class", "m": 4}}


CNN = {k: v for k, v in conf("cnn").items() if k not in FLAT} | {"patience": None, "loss": {"parts": [
    {"name": "cross_entropy"}]}}
SCRATCH_ROWS = {"cnn (study, scratch)": conf("cnn") | {"patience": None},
                "cnn + augment (scratch)": CNN | {"augment": True},
                "cnn + augment + over-sampling to 150 (scratch)": CNN | {
                    "augment": True, "sampler": {"name": "shuffled", "oversample_to": 150}},
                "triplet semi-hard (scratch)": on_trunk({"name": "triplet", "args": {"margin": 0.2},
                                                         "miner": {"name": "semihard", "args": {"margin": 0.2}}}),
                "quadruplet (scratch)": on_trunk({"name": "quadruplet", "args": {"margin1": 0.2, "margin2": 0.1}}),
                "proxy_anchor (scratch)": on_trunk({"name": "proxy_anchor"}),
                "multi_similarity + miner (scratch)": on_trunk(copy.deepcopy(MO_PARTS[0])),
                "multi_objective (scratch)": on_trunk(*copy.deepcopy(MO_PARTS), sampler=MO["sampler"]),
                "siamese_contrastive (study, scratch)": conf("siamese_contrastive") | {"patience": None},
                "siamese_triplet random (study, scratch)": conf("siamese_triplet") | {
                    "sampling": "random", "preserve_weight": 0.0, "patience": None}}
COLUMNS = ("precision_at_1", "map_at_r", "open_set_precision_at_1", "open_set_map_at_r")


def run_row(images, index, params: dict, epochs: int, lr: float | None) -> dict:
    p = config.parse("bench", {**params, "epochs": epochs, **({"lr": lr} if lr else {})}, config.TrainingParams)
    feats = features(images, p)
    t0 = time.perf_counter()
    bundle, history, summary = workflow.train(images, index, p, None, {"image_size": int(images.shape[2])},
                                              features=feats if feats.size else None)
    seconds = time.perf_counter() - t0
    emb = workflow.embed_all(bundle, images, feats if feats.size else None, device="cpu")
    bundle, *_ = workflow.calibrate_threshold(bundle, emb, index, p)
    metrics = workflow.evaluate(bundle, emb, index, p)
    return {**metrics, "seconds": seconds, "images_per_second": summary["images_per_second"],
            "epochs": summary["epochs_run"], "loss": p.loss_name, "sampler": p.sampler["name"],
            "distance": p.distance}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the pretrained-head rows")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the loss-alone head rows (the "
                        "configured rows keep their own)")
    parser.add_argument("--scratch-epochs", type=int, default=2, help="epochs of the scratch-trunk rows")
    parser.add_argument("--rows", default="", help="comma-separated substrings: only the rows that contain one")
    parser.add_argument("--scratch", action="store_true", help="also the study's scratch-trunk rows (slow: minutes "
                        "per epoch on 2 cores)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    images, index, summary, _ = load(args.source, 100)
    print(f"# Losses, miners, samplers, distances on {Path(args.source).parent.name}: {len(images)} photos, "
          f"100 px grayscale; {index.loc[index['split'] == 'open', 'label'].nunique()} open-set categories of "
          f"{index['label'].nunique()}; head rows {args.epochs} epochs at lr {args.lr:g} (as configured: their own "
          f"lr), early stopping off" + (f", scratch rows {args.scratch_epochs} epochs" if args.scratch else "")
          + ", seed 42\n", flush=True)
    wanted = [w.strip() for w in args.rows.split(",") if w.strip()]
    rows = [(name, params, args.epochs, None if "as configured" in name else args.lr)
            for name, params in HEAD_ROWS.items()]
    if args.scratch:
        rows += [(name, params, args.scratch_epochs, None) for name, params in SCRATCH_ROWS.items()]
    if wanted:
        rows = [r for r in rows if any(w in r[0] for w in wanted)]
    t0 = time.perf_counter()
    features(images, config.parse("bench", HEAD, config.TrainingParams))
    print(f"frozen features (image + mirror) computed once in {time.perf_counter() - t0:.1f} s\n", flush=True)
    head = ("| row | loss | sampler | distance | P@1 | MAP@R | open P@1 | open MAP@R | train s | images/s |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    base = no_training(images, index, 100, flip=True)
    lines.append("| untrained features (L2-normalised, flip averaged) | - | - | cosine | "
                 + " | ".join(f"{base[c]:.4f}" for c in COLUMNS) + " | 0 | - |")
    print("\n".join(lines), flush=True)
    results = {}
    for name, params, epochs, lr in rows:
        m = run_row(images, index, params, epochs, lr)
        results[name] = m
        line = (f"| {name} | {m['loss']} | {m['sampler']} | {m['distance']} | "
                + " | ".join(f"{m[c]:.4f}" for c in COLUMNS) + f" | {m['seconds']:.1f} | {m['images_per_second']:.0f} |")
        lines.append(line)
        print(line, flush=True)
    head_rows = {k: v for k, v in results.items() if k in HEAD_ROWS and "as configured" not in k}
    if head_rows:
        spread = {c: (max(v[c] for v in head_rows.values()) - min(v[c] for v in head_rows.values())) for c in COLUMNS}
        lines.append("\nSpread (max - min) over the pretrained-head rows: "
                     + ", ".join(f"{c} {s:.4f}" for c, s in spread.items()))
    lines.append(f"\nTotal {time.perf_counter() - started:.0f} s.")
    print("\n".join(lines[-2:]))
    out = ROOT / "bench" / "results" / "losses_table.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
