"""Search nodes: index a catalogue with a trained model, identify query photos, add / remove part lines, and
measure open-set rejection.

Everything is embedded through :class:`partmatch.ml.inference.Embedder` (the model's own preprocessing,
normalisation and flip averaging) and searched through :class:`partmatch.ml.retrieval.GalleryIndex`, the
same code the training metrics and the served model use.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from partmatch import config
from partmatch.datasets import ImageSource
from partmatch.ml import evaluation, plots, workflow
from partmatch.ml.training import resolve_device
from partmatch.ml.inference import Embedder
from partmatch.ml.reranking import PairwiseReranker, RerankConfig
from partmatch.ml.retrieval import UNKNOWN, GalleryIndex, IndexConfig, fit_pairwise_reranker, identify
from partmatch.reports import search_report_html, thumbnail_data_uri

from .datasets import QueryPhotos

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ["query", "file", "true_label", "error", "answer", "predicted_label", "verdict", "confidence",
                  "nearest_distance", "threshold", "expected_answer", "correct"]


class IndexMismatchError(ValueError):
    """The catalogue index was built with another model than the one asked for."""


# ============================================================================================= helpers


def model_fingerprint(bundle: dict) -> str:
    """SHA-256 of a model's architecture and weights: which model's vectors an index holds."""
    h = hashlib.sha256(json.dumps(bundle.get("spec", {}), sort_keys=True, default=str).encode())
    for key in sorted(bundle["state_dict"]):
        tensor = bundle["state_dict"][key]
        h.update(key.encode())
        if isinstance(tensor, torch.Tensor):
            h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _embedder(model: dict, p: config.SearchParams) -> Embedder:
    return Embedder(model, device=str(resolve_device(p.device)), batch_size=p.batch_size)


def _index_config(p: config.SearchParams) -> IndexConfig:
    return IndexConfig.from_dict(p.index.model_dump())


def _rerank_config(p: config.SearchParams) -> RerankConfig:
    return RerankConfig.from_dict(p.rerank.model_dump())


def _reranker(index: GalleryIndex, cfg: RerankConfig) -> PairwiseReranker | None:
    """The pairwise re-ranker of ``search.rerank.mode: pairwise``, trained on the index's own labelled vectors
    (its part names' top-N neighbour lists); None for the other modes."""
    if cfg.mode != "pairwise":
        return None
    reranker = fit_pairwise_reranker(index.vectors, index.labels.astype(str), index.distance, cfg)
    logger.info("search: pairwise re-ranker trained on the index's %d photos (%s).", len(index), reranker.info)
    return reranker


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _embed_source(embedder: Embedder, source: ImageSource, manifest: pd.DataFrame,
                  batch_size: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Embed the manifest's photos in chunks; returns (vectors, the rows that embedded) -- a photo that changed
    since ingestion and no longer decodes is logged and left out."""
    vectors, kept, failed = [], [], []
    rows = manifest.reset_index(drop=True)
    for start in range(0, len(rows), batch_size):
        chunk = rows.iloc[start:start + batch_size]
        blobs, readable = [], []
        for i, path in zip(chunk.index, chunk["path"], strict=True):
            try:
                blobs.append(source.read_bytes(path))
                readable.append(i)
            except OSError as exc:
                failed.append((path, f"cannot read file: {exc}"))
        emb, errors = embedder.embed_bytes(blobs)
        vectors.append(emb)
        for i, err in zip(readable, errors, strict=True):
            if err is None:
                kept.append(i)
            else:
                failed.append((rows.at[i, "path"], err))
        logger.info("search: embedded %d / %d catalogue photos.", min(start + batch_size, len(rows)), len(rows))
    for path, reason in failed:
        logger.warning("search: catalogue photo %s left out: %s (re-run the index if the source changed)", path,
                       reason)
    emb = np.concatenate(vectors) if vectors else np.zeros((0, embedder.dim), np.float32)
    return emb.astype(np.float32, copy=False), rows.loc[kept].reset_index(drop=True)


def _vector_metadata(source: ImageSource, rows: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """Ids (absolute file paths: unique across sources) and the per-vector metadata kept in the index."""
    root = Path(source.root).absolute()
    files = [str(root / p) for p in rows["path"]]
    meta = pd.DataFrame({"path": rows["path"].astype(str).to_numpy(), "file": files,
                         "sha256": rows["sha256"].astype(str).to_numpy(), "source": str(root)})
    return files, meta


def _info_counts(index: GalleryIndex) -> dict[str, Any]:
    """What the index holds: vectors, part names, engine, photos per part."""
    labels = pd.Series(index.labels, dtype=object)
    return {"vectors": int(len(index)), "ids_digest": _ids_digest(index), "parts": int(labels.nunique()),
            "kind": index.kind,
            "photos_per_part": {str(k): int(v) for k, v in labels.value_counts().sort_index().items()}}


def _info(index: GalleryIndex, embedder: Embedder, p: config.SearchParams, fingerprint: str,
          history: list[dict]) -> dict[str, Any]:
    """The index's card (saved beside it): which model made the vectors, its threshold, what it holds, history."""
    return {"model": p.model, "model_fingerprint": fingerprint, "distance": embedder.distance,
            "threshold": embedder.unknown_threshold, "dim": int(index.dim), "preprocessing": dict(embedder.preprocessing),
            **_info_counts(index), "history": history}


def _ids_digest(index: GalleryIndex) -> str:
    """SHA-256 of the index's ids in order: which photos it holds (two versions of the same size differ here)."""
    return hashlib.sha256("\n".join(map(str, index.ids)).encode()).hexdigest()


def _check_card(info: dict, index: GalleryIndex) -> None:
    """The card saved beside the index must describe this very index version."""
    if info.get("vectors") != len(index) or info.get("ids_digest", _ids_digest(index)) != _ids_digest(index):
        raise IndexMismatchError(
            f"The catalogue index ({len(index)} photos) and its card ({info.get('vectors')} photos) are different "
            "versions (search.catalogue_index / search.catalogue_index_card): load matching versions with "
            "--load-versions, or rebuild: kedro run --pipeline=search_index")


def _check_same_model(info: dict, model: dict, p: config.SearchParams, index: GalleryIndex | None = None) -> str:
    """The index's card must describe this index and this model; returns the model's fingerprint."""
    if index is not None:
        _check_card(info, index)
    fingerprint = model_fingerprint(model)
    if info.get("model_fingerprint") != fingerprint:
        raise IndexMismatchError(
            f"The catalogue index was built with model '{info.get('model')}' (another version or another model), "
            f"not with the current data/06_models/{p.model}/model.pt: its distances would mean nothing. Rebuild "
            f"it: kedro run --pipeline=search_index --params=search.model={p.model}")
    return fingerprint


def _labels(values: Sequence[str] | np.ndarray) -> np.ndarray:
    return np.asarray([str(v) for v in values], dtype=object)


# ====================================================================================== index / add / remove


def catalogue_cleaning_rules(ingestion: dict[str, Any], search: dict[str, Any]) -> dict[str, Any]:
    """The ingestion rules for a search catalogue: training's, except that ``search.min_photos_per_part``
    photos (default 1) make a part line -- one reference photo of a part is enough to find it."""
    rules = config.parse("ingestion", ingestion).model_dump()
    rules["min_images_per_class"] = config.parse("search", search).min_photos_per_part
    return rules


def build_catalogue_index(model: dict, catalogue: ImageSource, clean_manifest: pd.DataFrame,
                          params: dict[str, Any]) -> tuple[GalleryIndex, dict[str, Any]]:
    """Embed every cleaned catalogue photo with the model and index it (part name, file, content hash)."""
    p = config.parse("search", params)
    embedder = _embedder(model, p)
    emb, rows = _embed_source(embedder, catalogue, clean_manifest, p.batch_size)
    if len(rows) == 0:
        raise ValueError(f"No catalogue photo could be embedded from {catalogue.root}: see the warnings above.")
    ids, meta = _vector_metadata(catalogue, rows)
    index = GalleryIndex(emb, _labels(rows["label"]), ids=ids, distance=embedder.distance, config=_index_config(p),
                         metadata=meta)
    history = [{"action": "index", "source": str(Path(catalogue.root).absolute()), "vectors": int(len(index)),
                "at": _now()}]
    info = _info(index, embedder, p, model_fingerprint(model), history)
    logger.info("search: indexed %d photos of %d part names with %s (%s, %s index).", len(index), info["parts"],
                p.model, embedder.distance, index.kind)
    return index, info


def known_embeddings(model: dict, model_embeddings: np.ndarray, split_index: pd.DataFrame) -> dict[str, int]:
    """{photo sha256: row of the model's embeddings} for the photos the model's own run embedded (its training
    source); empty when the embeddings are not the model's or do not align with ``split_index``."""
    emb = np.asarray(model_embeddings)
    if emb.ndim != 2 or len(emb) != len(split_index) or "sha256" not in split_index:
        logger.info("search: the model's embeddings (%s rows) do not align with split_index (%d rows): every "
                    "catalogue photo is embedded.", emb.shape[0] if emb.ndim else 0, len(split_index))
        return {}
    try:
        workflow.check_embeddings_of(model, emb, "the model's embeddings", "the search model")
    except ValueError as exc:
        logger.warning("search: %s; every catalogue photo is embedded.", exc)
        return {}
    shas = split_index["sha256"].astype(str).to_numpy()
    return {sha: i for i, sha in enumerate(shas)}


def index_catalogue(model: dict, model_embeddings: np.ndarray, split_index: pd.DataFrame, catalogue: ImageSource,
                    clean_manifest: pd.DataFrame, params: dict[str, Any]) -> tuple[GalleryIndex, dict[str, Any]]:
    """:func:`build_catalogue_index`, reusing the model's own embeddings for catalogue photos its run already
    embedded (same bytes, by SHA-256: same preprocessing, same vector); only the other photos are embedded.
    Indexing the training source itself (the default) embeds nothing again."""
    known = known_embeddings(model, model_embeddings, split_index)
    reuse = clean_manifest["sha256"].astype(str).isin(known).to_numpy() if known else np.zeros(len(clean_manifest),
                                                                                                   bool)
    if not reuse.any():
        return build_catalogue_index(model, catalogue, clean_manifest, params)
    p = config.parse("search", params)
    embedder = _embedder(model, p)
    logger.info("search: %d of %d catalogue photos reuse the model's embeddings; embedding the other %d.",
                int(reuse.sum()), len(reuse), int((~reuse).sum()))
    new_emb, new_rows = _embed_source(embedder, catalogue, clean_manifest.loc[~reuse], p.batch_size)
    old_rows = clean_manifest.loc[reuse].reset_index(drop=True)
    old_emb = np.asarray(model_embeddings, dtype=np.float32)[old_rows["sha256"].astype(str).map(known).to_numpy()]
    rows = pd.concat([old_rows, new_rows], ignore_index=True)
    emb = np.concatenate([old_emb, new_emb]) if len(new_rows) else old_emb
    position = {path: i for i, path in enumerate(clean_manifest["path"].astype(str))}
    order = np.argsort(rows["path"].astype(str).map(position).to_numpy(), kind="stable")  # the manifest's order
    rows, emb = rows.iloc[order].reset_index(drop=True), emb[order]
    ids, meta = _vector_metadata(catalogue, rows)
    index = GalleryIndex(emb, _labels(rows["label"]), ids=ids, distance=embedder.distance, config=_index_config(p),
                         metadata=meta)
    history = [{"action": "index", "source": str(Path(catalogue.root).absolute()), "vectors": int(len(index)),
                "reused_model_embeddings": int(reuse.sum()), "at": _now()}]
    info = _info(index, embedder, p, model_fingerprint(model), history)
    logger.info("search: indexed %d photos of %d part names with %s (%s, %s index).", len(index), info["parts"],
                p.model, embedder.distance, index.kind)
    return index, info


def add_to_catalogue_index(index: GalleryIndex, info: dict[str, Any], model: dict, new_parts: ImageSource,
                           clean_manifest: pd.DataFrame, params: dict[str, Any]) -> tuple[GalleryIndex, dict]:
    """Add new photos (e.g. a part line the model never saw) to the latest index: only they are embedded, the
    model is not retrained. Photos already in the index (same file or same bytes) are skipped."""
    p = config.parse("search", params)
    if p.add is None:
        raise ValueError("search.add is not set: pass the folder (or CSV) of photos to add, e.g. kedro run "
                         "--pipeline=search_add --params=search.add=PATH (the demo's new part line: "
                         "search.add=data/01_raw/demo_new_parts).")
    fingerprint = _check_same_model(info, model, p, index)
    meta = index.metadata
    known_ids = set(map(str, index.ids))
    known_hashes = set(meta["sha256"].astype(str)) if "sha256" in meta else set()
    root = Path(new_parts.root).absolute()
    files = clean_manifest["path"].map(lambda rel: str(root / rel))
    fresh = ~(files.isin(known_ids) | clean_manifest["sha256"].astype(str).isin(known_hashes))
    skipped = int((~fresh).sum())
    if skipped:
        logger.info("search_add: %d photo(s) already in the index (same file or same bytes): skipped.", skipped)
    embedder = _embedder(model, p)
    emb, rows = _embed_source(embedder, new_parts, clean_manifest.loc[fresh.to_numpy()], p.batch_size)
    if len(rows):
        ids, new_meta = _vector_metadata(new_parts, rows)
        index.add(emb, _labels(rows["label"]), ids, metadata=new_meta)
    added_parts = sorted(set(rows["label"].astype(str)) - set(info.get("photos_per_part", {})))
    history = [*info.get("history", []), {"action": "add", "source": str(root), "vectors": int(len(rows)),
                                          "skipped_already_indexed": skipped, "new_part_names": added_parts,
                                          "at": _now()}]
    new_info = _info(index, embedder, p, fingerprint, history)
    logger.info("search_add: added %d photo(s) (%d new part name(s): %s); the index now holds %d photos of %d parts.",
                len(rows), len(added_parts), ", ".join(added_parts) or "none", len(index), new_info["parts"])
    return index, new_info


def remove_from_catalogue_index(index: GalleryIndex, info: dict[str, Any],
                                params: dict[str, Any]) -> tuple[GalleryIndex, dict]:
    """Drop whole part lines (``search.remove``) from the latest index; a name not in it is an error."""
    p = config.parse("search", params)
    _check_card(info, index)
    if not p.remove:
        raise ValueError('search.remove is empty: name the part(s) to drop, e.g. --params="search.remove=Gear" '
                         '(several separated by ";").')
    present = set(map(str, index.labels))
    missing = [label for label in p.remove if label not in present]
    if missing:
        close = sorted(present)[:20]
        raise ValueError(f"search.remove: {missing} not in the catalogue index (part names are case-sensitive). "
                         f"It holds {len(present)} part names, e.g. {close}.")
    removed = index.remove_labels(p.remove)
    history = [*info.get("history", []), {"action": "remove", "part_names": list(p.remove), "vectors": int(removed),
                                          "at": _now()}]
    new_info = {**info, **_info_counts(index), "history": history}
    logger.info("search_remove: removed %d photo(s) of %s; %d photos left.", removed, p.remove, len(index))
    return index, new_info


# ============================================================================================== search


def identify_query_photos(model: dict, index: GalleryIndex, info: dict[str, Any], queries: QueryPhotos,
                          params: dict[str, Any]) -> pd.DataFrame:
    """Top-K catalogue matches, voted part name with confidence, or "unknown part", for every query file.

    A file that cannot be read or decoded gets its reason in ``error``; the other files are still answered.
    """
    p = config.parse("search", params)
    _check_same_model(info, model, p, index)
    if len(index) == 0:
        raise ValueError("The catalogue index is empty (every part line removed?): rebuild it with "
                         "kedro run --pipeline=search_index")
    embedder = _embedder(model, p)
    threshold = p.threshold if p.threshold is not None else embedder.unknown_threshold
    errors: list[str | None] = []
    chunks = []
    for start in range(0, len(queries.photos), p.batch_size):  # read and embed in chunks: bounded memory
        blobs, readable = [], []
        for photo in queries.photos[start:start + p.batch_size]:
            try:
                blobs.append(photo.read())
                readable.append(len(errors))
                errors.append(None)
            except OSError as exc:
                errors.append(f"cannot read file: {type(exc).__name__}: {exc}")
        emb_part, decode_errors = embedder.embed_bytes(blobs)
        chunks.append(emb_part)
        for i, err in zip(readable, decode_errors, strict=True):
            errors[i] = err
    emb = np.concatenate(chunks) if chunks else np.zeros((0, embedder.dim), np.float32)
    answered = [i for i, e in enumerate(errors) if e is None]

    top_k = min(p.top_k, len(index))
    vote_k = min(p.vote_k or p.top_k, top_k)
    known_labels = set(map(str, index.labels))
    rows = []
    position = {q: j for j, q in enumerate(answered)}
    if answered:
        rerank = _rerank_config(p)
        result = index.search(emb, top_k, rerank=rerank, reranker=_reranker(index, rerank))
        verdicts = identify(result, threshold, k=vote_k).reset_index(drop=True)
        files = index.metadata.set_index("id")["file"] if "file" in index.metadata else None
    for photo, err in zip(queries.photos, errors, strict=True):
        truth = photo.true_label
        row = {"query": photo.name, "file": photo.file, "true_label": truth, "error": err}
        if err is None:
            j = position[len(rows)]
            v = verdicts.iloc[j]
            known = v["verdict"] != UNKNOWN
            row.update(answer=v["predicted_label"] if known else UNKNOWN, predicted_label=v["predicted_label"],
                       verdict="known" if known else UNKNOWN, confidence=float(v["confidence"]),
                       nearest_distance=float(v["nearest_distance"]),
                       threshold=np.nan if threshold is None else float(threshold))
            if truth is not None:
                row["expected_answer"] = truth if truth in known_labels else UNKNOWN
                row["correct"] = bool(row["answer"] == row["expected_answer"])
            for r in range(top_k):
                mid = result.ids[j, r]
                if mid is None or result.positions[j, r] < 0:
                    continue
                row[f"match_{r + 1}_label"] = result.labels[j, r]
                row[f"match_{r + 1}_distance"] = float(result.distances[j, r])
                row[f"match_{r + 1}_path"] = files.get(mid, mid) if files is not None else mid
        rows.append(row)
    columns = RESULT_COLUMNS + [f"match_{r}_{c}" for r in range(1, p.top_k + 1) for c in ("label", "distance", "path")]
    table = pd.DataFrame(rows).reindex(columns=columns)
    n_unknown = int((table["verdict"] == UNKNOWN).sum())
    logger.info("search: %d query photo(s): %d answered (%d unknown part), %d unreadable; threshold %s (%s).",
                len(table), len(answered), n_unknown, len(table) - len(answered),
                "none" if threshold is None else f"{threshold:.4f}",
                "search.threshold" if p.threshold is not None else "calibrated with the model")
    return table


def render_search_report(results: pd.DataFrame, queries: QueryPhotos, info: dict[str, Any],
                         params: dict[str, Any]) -> str:
    """The HTML report: each query photo beside its K matches, names, distances, verdict, wrong matches marked.

    Catalogue thumbnails are read from the file paths stored in the index (``match_<r>_path``); a photo moved or
    changed since indexing is shown as a placeholder with the reason.
    """
    p = config.parse("search", params)
    thumbs: dict[str, str | None] = {}
    reasons: dict[str, str] = {}
    for photo in queries.photos:
        try:
            thumbs[photo.file] = thumbnail_data_uri(photo.read(), p.thumbnail_px)
        except Exception:  # noqa: BLE001 - the reason is already in the results' error column
            reasons[photo.file] = "no preview"
    match_files = {f for c in results.columns if c.startswith("match_") and c.endswith("_path")
                   for f in results[c].dropna()}
    for file in sorted(match_files):
        try:
            thumbs[file] = thumbnail_data_uri(Path(file).read_bytes(), p.thumbnail_px)
        except FileNotFoundError:
            reasons[file] = "catalogue photo not found (moved since indexing?)"
        except Exception as exc:  # noqa: BLE001 - a preview is best effort
            reasons[file] = f"no preview: {type(exc).__name__}"
    threshold = results["threshold"].dropna()
    summary = {"model": info.get("model"), "distance": info.get("distance"),
               "threshold": float(threshold.iloc[0]) if len(threshold) else None,
               "threshold_source": "search.threshold" if p.threshold is not None else "calibrated with the model",
               "index_vectors": info.get("vectors"), "index_parts": info.get("parts"), "index_kind": info.get("kind")}
    return search_report_html(results, thumbs, summary, top_k=p.top_k, thumbnail_px=p.thumbnail_px, reasons=reasons)


# ====================================================================================== open-set rejection


def _split_new_parts(labels: np.ndarray, rows: np.ndarray, share: float) -> tuple[np.ndarray, np.ndarray]:
    """Per unseen category: the first ``share`` of its photos become catalogue references, the rest queries
    (at least one of each where the category has 2+ photos)."""
    refs, queries = [], []
    for label in sorted(set(labels[rows])):
        members = rows[labels[rows] == label]
        n_ref = len(members) if len(members) < 2 else min(len(members) - 1, max(1, round(share * len(members))))
        refs.extend(members[:n_ref])
        queries.extend(members[n_ref:])
    return np.asarray(refs, dtype=np.int64), np.asarray(queries, dtype=np.int64)


def measure_open_set_rejection(model: dict, embeddings: np.ndarray, split_index: pd.DataFrame,
                               params: dict[str, Any]) -> tuple[pd.DataFrame, Figure, dict[str, Any]]:
    """Open-set rejection of the model, measured, then new part lines added without retraining.

    The index holds the model's training photos of the known categories; queries are held-back photos of known
    categories (test, as in the model's ``metrics.json``) and photos of the unseen categories (split ``open``, never trained on). Returns the
    FMR/FNMR curve over thresholds, its figure with the calibrated operating point, and the numbers: FNMR at
    FMR = 1 %, FMR / FNMR at the calibrated threshold, top-1 accuracy on known parts; then part of each unseen
    category's photos is added to the index (no retraining) and the rest are identified again. Without unseen
    categories or held-back known photos nothing can be measured: a warning, and outputs that say why.
    """
    p = config.parse("search", params)
    embedder = _embedder(model, p)
    emb = np.asarray(embeddings, dtype=np.float32)
    workflow.check_embeddings_of(model, emb, f"{p.model}.embeddings", f"{p.model}.model")
    if len(emb) != len(split_index):
        raise ValueError(f"{p.model}.embeddings has {len(emb)} rows but split_index has {len(split_index)}: the "
                         f"model was trained on another preprocessing run. Re-run kedro run --pipeline={p.model}.")
    labels = _labels(split_index["label"])
    split = split_index["split"].astype(str).to_numpy()
    gallery = np.flatnonzero(split == "train")
    known_q = np.flatnonzero(split == "test")  # as the model's metrics.json (unknown_part_fmr, ...): same numbers
    unseen = np.flatnonzero(split == "open")
    missing = ("no unseen categories in split_index (split.open_set_fraction is 0, or too few categories): set "
               "split.open_set_fraction > 0 in conf/base/parameters_preprocessing.yml, then re-run preprocessing and "
               f"kedro run --pipeline={p.model}" if len(unseen) == 0 else
               "no held-back test photos of known categories in split_index to query with"
               if len(known_q) == 0 else None)
    if missing is not None:  # nothing to measure: say so in the outputs instead of failing the end of kedro run
        logger.warning("search_eval skipped: %s.", missing)
        figure = Figure(figsize=(8, 2))
        figure.text(0.5, 0.5, f"open-set rejection not measured:\n{missing}", ha="center", va="center", wrap=True)
        curve = pd.DataFrame(columns=["threshold", "fmr", "fnmr", "known_identified", "known_misnamed"])
        return curve, figure, {"model": p.model, "skipped": missing}
    threshold = p.threshold if p.threshold is not None else embedder.unknown_threshold
    if threshold is None:
        raise ValueError(f"{p.model}'s model.pt has no calibrated threshold; set search.threshold.")
    index = GalleryIndex(emb[gallery], labels[gallery], ids=[str(i) for i in gallery], distance=embedder.distance,
                         config=_index_config(p))
    k = min(p.vote_k or p.top_k, len(index))
    res_known = index.search(emb[known_q], k)
    res_unseen = index.search(emb[unseen], k)
    vote_known = identify(res_known, threshold, k=k)
    top1_known = res_known.labels[:, 0].astype(str) == labels[known_q]
    voted_known = vote_known["predicted_label"].astype(str).to_numpy() == labels[known_q]
    curve, summary = evaluation.open_set_rejection(res_known.distances[:, 0], voted_known,
                                                   res_unseen.distances[:, 0], threshold)
    figure = plots.rejection_curve_figure(curve, threshold=threshold, summary=summary)
    figure.suptitle(f"{p.model}: open-set rejection ({len(unseen)} photos of {len(set(labels[unseen]))} unseen "
                    f"parts, {len(known_q)} held-back photos of known parts)")

    refs, new_q = _split_new_parts(labels, unseen, p.new_part_reference_share)
    before = res_unseen.distances[:, 0][np.isin(unseen, new_q)] > threshold
    index.add(emb[refs], labels[refs], [str(i) for i in refs])
    res_new = index.search(emb[new_q], k) if len(new_q) else None
    res_known_after = index.search(emb[known_q], k)
    rerank = _rerank_config(p)
    # the top-1 answers on the enlarged index again after re-ranking (the rejection curve stays the plain search's)
    if rerank.active:
        reranker = _reranker(index, rerank)
        known_rr = index.search(emb[known_q], k, rerank=rerank, reranker=reranker)
        rerank_metrics = {"rerank": rerank.mode, "known_top1_accuracy_reranked":
                          float((known_rr.labels[:, 0].astype(str) == labels[known_q]).mean())}
        if len(new_q):
            new_rr = index.search(emb[new_q], k, rerank=rerank, reranker=reranker)
            rerank_metrics["new_parts_top1_accuracy_reranked"] = float(
                (new_rr.labels[:, 0].astype(str) == labels[new_q]).mean())
    else:
        rerank_metrics = {}
    at_threshold = {"fmr": "fmr_at_threshold", "fnmr": "fnmr_at_threshold",
                    "unknown_rejected": "unknown_rejected_at_threshold",
                    "known_identified": "known_identified_at_threshold",
                    "known_misnamed": "known_misnamed_at_threshold", "fnmr_at_fmr_1pct": "fnmr_at_fmr_1pct",
                    "eer": "eer"}
    metrics: dict[str, Any] = {
        "model": p.model, "distance": embedder.distance, "threshold": float(threshold),
        "threshold_source": "search.threshold" if p.threshold is not None else "calibrated",
        "known_parts": int(len(set(labels[gallery]))), "gallery_photos": int(len(gallery)),
        "known_queries": int(len(known_q)), "unseen_parts": int(len(set(labels[unseen]))),
        "unseen_queries": int(len(unseen)),
        "known_top1_accuracy": float(top1_known.mean()), "known_vote_accuracy": float(voted_known.mean()),
        **{new: float(summary[old]) for old, new in at_threshold.items()},
        # operating points a user can pass as search.threshold to trade wrong names for rejections
        "threshold_at_fmr_1pct": float(np.quantile(res_unseen.distances[:, 0], 0.01)),
        "threshold_at_eer": float(curve["threshold"].iloc[int(np.argmin(np.abs(curve["fmr"] - curve["fnmr"])))]),
        "new_parts_reference_photos": int(len(refs)), "new_parts_queries": int(len(new_q)),
        "known_top1_accuracy_after_adding": float((res_known_after.labels[:, 0].astype(str) == labels[known_q]).mean()),
        **rerank_metrics,
    }
    if res_new is not None:
        vote_new = identify(res_new, threshold, k=k)
        metrics.update({
            "new_parts_unknown_before_adding": float(before.mean()),
            "new_parts_top1_accuracy": float((res_new.labels[:, 0].astype(str) == labels[new_q]).mean()),
            "new_parts_vote_accuracy": float((vote_new["predicted_label"].astype(str).to_numpy()
                                              == labels[new_q]).mean()),
            "new_parts_accepted_after_adding": float((res_new.distances[:, 0] <= threshold).mean()),
        })
    logger.info("search_eval %s: known top-1 %.3f, unseen rejected %.3f at threshold %.4f, new parts top-1 after "
                "adding %s.", p.model, metrics["known_top1_accuracy"], metrics["unknown_rejected_at_threshold"],
                threshold, f"{metrics.get('new_parts_top1_accuracy', float('nan')):.3f}")
    return curve, figure, metrics
