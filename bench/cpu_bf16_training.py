"""What `<model>.cpu_bf16: true` costs in retrieval quality: one model trained twice on the shared car parts,
fp32 and bf16-autocast training steps, same seed, same data, scored the same way.

    python bench/cpu_bf16_training.py                       # siamese_contrastive, 3 epochs
    python bench/cpu_bf16_training.py --model cnn --epochs 5

The data go through the project's own nodes (ingestion's one decode, preprocessing, the split) with the
pipeline's parameters (conf/base); the model's parameters are the pipeline's, with `epochs` and `cpu_bf16`
overridden and no checkpointing. Prints wall time, training images/s and the evaluation metrics side by side
(closed-set and open-set precision@1 / MAP@R, pair accuracy) and their differences.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from partmatch import config  # noqa: E402
from partmatch.datasets import ImageSourceDataset  # noqa: E402
from partmatch.ml import workflow  # noqa: E402
from partmatch.pipelines.ingestion.nodes import clean_manifest, scan_and_decode  # noqa: E402
from partmatch.pipelines.preprocessing.nodes import preprocess_images, split_images  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CARPARTS = ROOT.parent / "shared" / "datasets" / "carparts"
KEYS = ("precision_at_1", "map_at_r", "open_set_precision_at_1", "open_set_map_at_r",
        "pair_accuracy")


def params(name: str, file: str | None = None) -> dict:
    return yaml.safe_load((ROOT / "conf" / "base" / f"parameters_{file or name}.yml").read_text())[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="siamese_contrastive")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--source", default=str(CARPARTS))
    args = ap.parse_args()

    t0 = time.perf_counter()
    source = ImageSourceDataset(path=args.source).load()
    ing, pre, spl = params("ingestion"), params("preprocessing"), params("split", "preprocessing")
    raw, quarantine, decoded = scan_and_decode(source, ing, pre)
    clean, _ = clean_manifest(raw, quarantine, ing)
    images, index = preprocess_images(source, clean, pre, decoded, ing)
    split_index, _, _ = split_images(index, spl)
    print(f"data: {len(images)} images {images.shape[1:]} in {time.perf_counter() - t0:.1f} s")

    rows = {}
    for bf16 in (False, True):
        p = config.TrainingParams(**{**params(args.model), "epochs": args.epochs, "patience": None,
                                     "cpu_bf16": bf16, "checkpoint_dir": None, "resume": False, "device": "cpu",
                                     "progress": False})
        started = time.perf_counter()
        bundle, history, summary = workflow.train(images, split_index, p, None, pre)
        wall = time.perf_counter() - started
        emb = workflow.embed_all(bundle, images, device="cpu", batch_size=p.eval_batch_size)
        calibrated, *_ = workflow.calibrate_threshold(bundle, emb, split_index, p)
        metrics = workflow.evaluate(calibrated, emb, split_index, p)
        rows["bf16" if bf16 else "fp32"] = {"wall_s": wall, "train_img_s": summary["images_per_second"],
                                            **{k: metrics.get(k, float("nan")) for k in KEYS}}
        print(f"{'bf16' if bf16 else 'fp32'}: trained {args.epochs} epochs in {wall:.1f} s", flush=True)

    print(f"\n{args.model}, {args.epochs} epochs, seed {params(args.model).get('seed', 42)}, car parts")
    print(f"{'':28s} {'fp32':>9s} {'bf16':>9s} {'bf16-fp32':>10s}")
    for key in ("wall_s", "train_img_s", *KEYS):
        a, b = rows["fp32"][key], rows["bf16"][key]
        print(f"{key:28s} {a:9.4f} {b:9.4f} {b - a:+10.4f}")
    print(f"training speed-up bf16 / fp32: {rows['bf16']['train_img_s'] / rows['fp32']['train_img_s']:.2f}x")


if __name__ == "__main__":
    main()
