"""Open-set precision@1 after every epoch of one model pipeline's training (why the study trunk stalls on unseen parts).

    python bench/open_set_trajectory.py siamese_triplet ['{"sampling": "random", "preserve_weight": 0}']

Reads the latest preprocessed `image_array` / `split_index` under data/ (run `kedro run
--pipelines=ingestion,preprocessing --params=raw_source=...` first), trains the pipeline's configuration from
conf/base/parameters_<pipeline>.yml (plus JSON overrides) and prints, at random initialisation and after each
epoch, the closed-set validation precision@1 (what early stopping sees) next to the open-set precision@1 and
MAP@R on the unseen categories (what it does not see).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from partmatch.config import TrainingParams
from partmatch.ml import evaluation, workflow
from partmatch.ml.data import InMemoryImages
from partmatch.ml.training import fit, seed_everything
from partmatch.ml.inference import Embedder

ROOT = Path(__file__).resolve().parents[1]


def latest(pattern: str) -> Path:
    """The newest version of a versioned dataset file."""
    return sorted(ROOT.glob(pattern))[-1]


def main() -> None:
    """Train one configuration, reporting open-set retrieval after every epoch."""
    pipeline = sys.argv[1] if len(sys.argv) > 1 else "siamese_triplet"
    overrides = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    images = np.load(latest("data/04_feature/image_array.npy/*/image_array.npy"))
    index = pd.read_parquet(latest("data/05_model_input/split_index.parquet/*/split_index.parquet"))
    raw = yaml.safe_load((ROOT / "conf" / "base" / f"parameters_{pipeline}.yml").read_text())[pipeline]
    p = TrainingParams(**{**raw, **overrides, "progress": False, "patience": None, "checkpoint_dir": None})
    if p.task != "embedding" or workflow.uses_cached_features(p):
        raise SystemExit("open_set_trajectory trains embedding models on images (not cached features)")
    classes = workflow.class_mapping(index)
    y = workflow.encode_labels(index["label"], classes)
    codes = pd.factorize(index["label"])[0]
    train, val, unseen = (workflow.split_rows(index, s) for s in ("train", "val", "open"))
    channels, size = int(images.shape[1]), int(images.shape[2])
    mean, std = workflow.normalisation(p, channels)
    seed_everything(p.seed)
    model = workflow.build_from_params(p, len(classes), channels, size)
    epoch = [0]

    def report(_model=None) -> float:
        emb = Embedder.for_model(model, mean, std).embed(images, np.concatenate([train, val, unseen]))
        e_train, e_val, e_open = emb[:len(train)], emb[len(train):len(train) + len(val)], emb[len(train) + len(val):]
        v = evaluation.retrieval_metrics(e_val, y[val], e_train, y[train], k_values=(1,))["precision_at_1"]
        o = evaluation.retrieval_metrics(e_open, codes[unseen], prefix="open_set_")
        print(f"epoch {epoch[0]:2d}  val P@1 {v:.4f}  open P@1 {o['open_set_precision_at_1']:.4f}  "
              f"open MAP@R {o['open_set_map_at_r']:.4f}", flush=True)
        epoch[0] += 1
        return v

    report()
    objective = workflow.make_objective(p, model, len(classes))
    fit(model, objective, InMemoryImages(images[train], y[train], mean=mean, std=std), report,
        workflow.train_config(p, None, mean, std), param_groups=workflow.prepare_backbone(model, p))


if __name__ == "__main__":
    main()
