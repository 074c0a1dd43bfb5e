"""The default run's catalogue index reuses the model's own embeddings: only photos its run did not embed go
through the network, and the index is the one embedding every photo would give."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from partmatch.datasets import ImageSourceDataset
from partmatch.ml import workflow
from partmatch.ml.inference import Embedder
from partmatch.ml.models import build_model, model_spec
from partmatch.pipelines.ingestion.nodes import clean_manifest, scan_source
from partmatch.pipelines.search import nodes
from tests.conftest import make_photo, save_jpeg

PARTS = {"Brake Disc": 0, "Bracket": 1, "Caliper": 2}
SEARCH = {"top_k": 3, "device": "cpu", "batch_size": 4}


@pytest.fixture(scope="module")
def bundle() -> dict:
    torch.manual_seed(0)
    model = build_model(task="embedding", num_classes=3, embedding_dim=16, in_channels=1, image_size=32,
                        normalize=True)
    return {"spec": model_spec(model), "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "classes": sorted(PARTS), "preprocessing": {"image_size": 32, "color_mode": "grayscale",
                                                         "background": 255},
            "normalization": {"mean": [0.5], "std": [0.5]}, "distance": "euclidean", "threshold": 0.5}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse") / "catalogue"
    for name, kind in PARTS.items():
        for i in range(4):
            save_jpeg(make_photo(kind, seed=50 * kind + i), root / name / f"{i:02d}.jpg")
    source = ImageSourceDataset(path=str(root)).load()
    rules = nodes.catalogue_cleaning_rules({"min_images_per_class": 2}, SEARCH)
    raw, quarantine = scan_source(source, rules)
    clean, _ = clean_manifest(raw, quarantine, rules)
    return source, clean


def _model_run(bundle: dict, source, clean: pd.DataFrame, parts: set[str]) -> tuple[dict, np.ndarray, pd.DataFrame]:
    """What a model pipeline leaves: embeddings of its training photos (row i = split_index row i), digest stored."""
    rows = clean[clean["label"].isin(parts)].iloc[::-1].reset_index(drop=True)    # another order than the catalogue
    emb, errors = Embedder(bundle).embed_bytes([source.read_bytes(p) for p in rows["path"]])
    assert errors == [None] * len(rows)
    split_index = rows[["path", "label", "sha256"]].assign(split="train")
    return {**bundle, "embeddings_digest": workflow.embeddings_digest(emb)}, emb, split_index


def _count_embedded(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = Embedder.embed_bytes

    def counting(self, blobs):
        calls.append(len(blobs))
        return original(self, blobs)

    monkeypatch.setattr(Embedder, "embed_bytes", counting)
    return calls


def test_only_photos_the_model_did_not_embed_are_embedded_and_the_index_is_unchanged(bundle, catalogue,
                                                                                     monkeypatch):
    source, clean = catalogue
    model, emb, split_index = _model_run(bundle, source, clean, {"Brake Disc", "Bracket"})
    full, full_card = nodes.build_catalogue_index(model, source, clean, SEARCH)
    calls = _count_embedded(monkeypatch)
    reused, card = nodes.index_catalogue(model, emb, split_index, source, clean, SEARCH)
    assert sum(calls) == 4                                     # the 4 Caliper photos only
    assert list(reused.ids) == list(full.ids)                  # same vectors, same order (the manifest's)
    assert list(reused.labels) == list(full.labels)
    np.testing.assert_allclose(reused.vectors, full.vectors, atol=1e-6)
    assert card["history"][0]["reused_model_embeddings"] == 8
    assert card["vectors"] == full_card["vectors"] == 12


def test_embeddings_of_another_model_or_misaligned_rows_are_not_reused(bundle, catalogue, monkeypatch):
    source, clean = catalogue
    model, emb, split_index = _model_run(bundle, source, clean, set(PARTS))
    calls = _count_embedded(monkeypatch)
    nodes.index_catalogue(model, emb[:-1], split_index, source, clean, SEARCH)          # one row short
    assert sum(calls) == 12
    calls.clear()
    nodes.index_catalogue(model, emb + 1.0, split_index, source, clean, SEARCH)         # not this model's
    assert sum(calls) == 12
    calls.clear()
    nodes.index_catalogue(model, emb, split_index, source, clean, SEARCH)
    assert sum(calls) == 0
