"""Nodes of the served model. The work is done by Embedder (partmatch.ml.inference) and GalleryIndex /
identify (partmatch.ml.retrieval); these nodes only check the request and shape the answer.

A request that cannot be answered at all (no ``image`` column, no rows, bad ``top_k`` / ``threshold``, not one
readable photo) raises :class:`partmatch.serving.BadRequest`: HTTP 400 with the message. A batch where only
some photos are unreadable is answered: those rows carry ``verdict`` "error" and the reason in ``error``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from partmatch.ml.inference import Embedder
from partmatch.ml.retrieval import UNKNOWN, GalleryIndex, SearchResult, identify
from partmatch.serving import IMAGE_COLUMN, NAME_COLUMN, BadRequest, unwrap

ERROR = "error"
ANSWER_COLUMNS = ["name", "verdict", "part", "confidence", "nearest_distance", "threshold", "top_parts",
                  "top_distances", "top_items", "error"]
EXAMPLE = '{"dataframe_split": {"columns": ["image", "name"], "data": [["<base64 of the photo file>", "my photo"]]}}'

_cache: dict[str, Any] = {"bundle": None, "embedder": None}


def _embedder(model: Any) -> Embedder:
    """The Embedder of ``model``: the served model hands one over ready; a bundle dict is built once and kept."""
    model = unwrap(model)
    if isinstance(model, Embedder):
        return model
    if _cache["bundle"] is not model:
        _cache["bundle"], _cache["embedder"] = model, Embedder(model)
    return _cache["embedder"]


def _top_k(top_k: Any) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
        raise BadRequest(f"parameter 'top_k' must be a whole number >= 1, got {top_k!r}; "
                         'e.g. "params": {"top_k": 5}')
    return int(top_k)


def read_request(query_images: pd.DataFrame) -> pd.DataFrame:
    """Check the request and return one row per photo: ``name`` (given, else the row number) and ``image`` bytes."""
    if not isinstance(query_images, pd.DataFrame):
        raise BadRequest(f"the request must be a table with an '{IMAGE_COLUMN}' column, got "
                         f"{type(query_images).__name__}. Send {EXAMPLE}")
    if IMAGE_COLUMN not in query_images.columns:
        raise BadRequest(f"the request has no '{IMAGE_COLUMN}' column (it has {list(map(str, query_images.columns))}"
                         f"). Send {EXAMPLE}")
    if len(query_images) == 0:
        raise BadRequest(f"the request holds no photo. Send {EXAMPLE}")
    names = (query_images[NAME_COLUMN] if NAME_COLUMN in query_images.columns
             else pd.Series([None] * len(query_images), index=query_images.index))
    rows = []
    for i, (blob, name) in enumerate(zip(query_images[IMAGE_COLUMN], names, strict=True)):
        if isinstance(blob, bytearray | memoryview):
            blob = bytes(blob)
        rows.append({"name": str(i) if name is None or (isinstance(name, float) and math.isnan(name)) else str(name),
                     "image": blob})
    return pd.DataFrame(rows, columns=["name", "image"])


def preprocess_photos(query_table: pd.DataFrame, model: Any) -> tuple[np.ndarray, list[str | None]]:
    """Decode and preprocess each photo as in training; the pixels of the readable ones and a reason per photo."""
    embedder = _embedder(model)
    blobs, pre_errors = [], []
    for blob in query_table["image"]:
        if not isinstance(blob, bytes):
            pre_errors.append(f"'{IMAGE_COLUMN}' must be the photo file's bytes (base64 in JSON), got "
                              f"{type(blob).__name__}")
            blobs.append(b"")
        else:
            pre_errors.append(None)
            blobs.append(blob)
    pixels, decode_errors = embedder.preprocess_many(blobs)
    errors = [pre or dec for pre, dec in zip(pre_errors, decode_errors, strict=True)]
    if all(e is not None for e in errors):
        reasons = "; ".join(f"'{name}': {err}" for name, err in zip(query_table["name"], errors, strict=True))
        raise BadRequest(f"no photo in the request could be read ({reasons}). '{IMAGE_COLUMN}' must hold a JPEG, "
                         "PNG, ... file's bytes, base64-encoded in JSON.")
    return pixels, errors  # pixels: the readable photos only, in order (a non-bytes value was sent as b"": unreadable)


def embed_photos(query_pixels: np.ndarray, model: Any) -> np.ndarray:
    """Embed the readable photos with the model's normalisation (and flip averaging where it has it)."""
    return _embedder(model).embed(query_pixels)


def search_catalogue(query_embeddings: np.ndarray, gallery_index: Any, top_k: Any) -> SearchResult:
    """The ``top_k`` nearest catalogue photos of each query (fewer when the catalogue is smaller)."""
    index: GalleryIndex = unwrap(gallery_index)
    return index.search(query_embeddings, k=min(_top_k(top_k), len(index)))


def identify_photos(query_table: pd.DataFrame, query_errors: list[str | None], query_neighbours: SearchResult,
                    model: Any, top_k: Any, threshold: float | None) -> pd.DataFrame:
    """One row per photo: verdict ("known", "unknown part", or "error" with the reason), part name by
    distance-weighted vote, confidence, nearest distance, the threshold used and the top-K matches.

    ``threshold``: "unknown part" when the nearest catalogue photo is farther; negative (the default) or None =
    the model's calibrated threshold."""
    k = min(_top_k(top_k), query_neighbours.distances.shape[1])
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                  or math.isnan(threshold)):
        raise BadRequest(f"parameter 'threshold' must be a distance >= 0, or negative for the model's calibrated "
                         f"threshold, got {threshold!r}")
    used = float(threshold) if threshold is not None and threshold >= 0 else _embedder(model).unknown_threshold
    votes = identify(query_neighbours, used, k=k)
    rows, answered = [], 0
    for name, err in zip(query_table["name"], query_errors, strict=True):
        if err is not None:
            rows.append({"name": name, "verdict": ERROR, "part": None, "confidence": None, "nearest_distance": None,
                         "threshold": used, "top_parts": [], "top_distances": [], "top_items": [], "error": err})
            continue
        vote = votes.iloc[answered]
        found = query_neighbours.positions[answered] >= 0
        rows.append({
            "name": name, "verdict": vote["verdict"],
            "part": UNKNOWN if vote["verdict"] == UNKNOWN else vote["predicted_label"],
            "confidence": float(vote["confidence"]), "nearest_distance": float(vote["nearest_distance"]),
            "threshold": used,
            "top_parts": [str(v) for v in query_neighbours.labels[answered][found]],
            "top_distances": [float(v) for v in query_neighbours.distances[answered][found]],
            "top_items": [str(v) for v in query_neighbours.ids[answered][found]],
            "error": None,
        })
        answered += 1
    return pd.DataFrame(rows, columns=ANSWER_COLUMNS, dtype=object)
