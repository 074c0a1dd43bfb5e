"""Search pipelines on generated photos with known answers: index, identify, hostile queries, add / remove a part
line without retraining, open-set rejection, the HTML report, and one KedroSession run of search_index + search.

The model is the recommended architecture (ImageNet EfficientNet-Lite0 + identity head, the packaged weights,
no download), untrained, with its pair threshold calibrated on the catalogue's pairs like ``calibrate_threshold``
does: ImageNet features tell the generated shapes apart well enough for known answers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from partmatch import config
from partmatch.config import ParameterError
from partmatch.datasets import ImageSourceDataset
from partmatch.ml import evaluation
from partmatch.ml.inference import Embedder
from partmatch.ml.models import build_model, model_spec
from partmatch.ml.retrieval import UNKNOWN, GalleryIndex
from partmatch.pipelines.ingestion.nodes import clean_manifest, scan_source
from partmatch.pipelines.search import nodes
from partmatch.pipelines.search.datasets import NewPartsSourceDataset, QueryPhotosDataset
from partmatch.reports import search_report_html
from tests.conftest import jpeg_bytes, make_photo, png_bytes, save_jpeg

CATALOGUE = {"Brake Disc": 0, "Bracket": 1, "Caliper": 2}   # part name -> make_photo kind (circle/square/triangle)
PER_PART = 5
SEARCH = {"top_k": 3, "device": "cpu", "batch_size": 8, "thumbnail_px": 48}
INGESTION = {"min_images_per_class": 2}


def cross_photo(seed: int) -> Image.Image:
    """A part line absent from the catalogue: a dark X (the demo's "Wishbone" idea)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (64, 48), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    cx, cy = 32 + rng.uniform(-3, 3), 24 + rng.uniform(-3, 3)
    draw.line([(cx - 18, cy - 18), (cx + 18, cy + 18)], fill=(40, 40, 40), width=5)
    draw.line([(cx - 18, cy + 18), (cx + 18, cy - 18)], fill=(40, 40, 40), width=5)
    return img


def write_catalogue(root: Path) -> Path:
    for name, kind in CATALOGUE.items():
        for i in range(PER_PART):
            save_jpeg(make_photo(kind, seed=100 * kind + i), root / name / f"{i:03d}.jpg")
    return root


def write_new_parts(root: Path, n: int = 4) -> Path:
    for i in range(n):
        save_jpeg(cross_photo(seed=i), root / "Wishbone" / f"{i:03d}.jpg")
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> dict:
    """The recommended architecture, 48 px grey, threshold calibrated on the catalogue's pairs."""
    torch.manual_seed(0)
    model = build_model(task="embedding", num_classes=len(CATALOGUE), embedding_dim=1280, in_channels=1,
                        image_size=48, backbone="efficientnet_lite0", normalize=True, head_init="identity",
                        pretrained=True)
    mean, std = float(np.mean((0.485, 0.456, 0.406))), float(np.mean((0.229, 0.224, 0.225)))
    b = {"spec": model_spec(model), "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
         "classes": sorted(CATALOGUE),
         "preprocessing": {"image_size": 48, "color_mode": "grayscale", "background": 255},
         "normalization": {"mean": [mean], "std": [std]}, "distance": "euclidean", "threshold": None}
    emb, _ = Embedder(b).embed_bytes([jpeg_bytes(make_photo(k, seed=100 * k + i)) for k in CATALOGUE.values()
                                      for i in range(PER_PART)])
    labels = np.repeat(np.arange(len(CATALOGUE)), PER_PART)
    a, c, same = evaluation.sample_pairs(labels, 200, seed=0)
    threshold, _ = evaluation.choose_threshold(evaluation.pair_distances(emb, a, c), same)
    # the unknown-part threshold as workflow.calibrate_threshold chooses it (leave-one-out over the catalogue)
    known, other = evaluation.leave_one_out_nearest(emb, labels)
    return {**b, "threshold": float(threshold),
            "unknown_threshold": evaluation.balanced_rejection_threshold(known, other)}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    return write_catalogue(tmp_path_factory.mktemp("cat") / "catalogue")


def cleaned(source_path: Path, search: dict | None = None):
    source = ImageSourceDataset(path=str(source_path)).load()
    rules = nodes.catalogue_cleaning_rules(INGESTION, {**SEARCH, **(search or {})})
    raw, quarantine = scan_source(source, rules)
    clean, _ = clean_manifest(raw, quarantine, rules)
    return source, clean


@pytest.fixture
def index(bundle, catalogue):
    source, clean = cleaned(catalogue)
    return nodes.build_catalogue_index(bundle, source, clean, SEARCH)


def queries_in(root: Path):
    return QueryPhotosDataset(path=str(root)).load()


# ---------------------------------------------------------------------------------------------------- parameters
def test_search_parameters_are_validated_with_the_dotted_key():
    p = config.parse("search", {"remove": "Brake Disc; Gear", "index": {"approximate": "ivf"}})
    assert p.remove == ["Brake Disc", "Gear"] and p.index.approximate == "ivf" and p.top_k == 5
    for bad, key in [({"top_k": 0}, "search.top_k"), ({"model": "resnet"}, "search.model"),
                     ({"top_k": 3, "vote_k": 4}, "search.vote_k"), ({"index": {"nprobe": "x"}}, "search.index.nprobe"),
                     ({"index": {"approximate": "lsh"}}, "search.index.approximate"),
                     ({"threshold": -1}, "search.threshold")]:
        with pytest.raises(ParameterError, match=re.escape(f"'{key}'")) as err:
            config.parse("search", bad)
        assert "parameters_search.yml" in str(err.value)


def test_parameters_file_matches_the_model():
    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "conf/base/parameters_search.yml").read_text())
    p = config.parse("search", raw["search"])
    assert p == config.SearchParams()  # the YAML states the defaults
    assert set(raw["search"]["index"]) == set(config.IndexParams.model_fields)
    from partmatch.ml.retrieval import IndexConfig

    assert IndexConfig.from_dict(p.index.model_dump()) == IndexConfig()
    from partmatch.ml.reranking import RerankConfig

    assert set(raw["search"]["rerank"]) == set(config.RerankParams.model_fields)
    assert RerankConfig.from_dict(p.rerank.model_dump()) == RerankConfig()  # mode none: plain search


# ---------------------------------------------------------------------------------------------------- index
def test_index_holds_every_cleaned_photo_with_name_file_and_hash(index, catalogue, bundle):
    gallery, card = index
    assert len(gallery) == len(CATALOGUE) * PER_PART and gallery.kind == "exact"
    meta = gallery.metadata
    assert set(meta["label"]) == set(CATALOGUE)
    first = catalogue / "Brake Disc" / "000.jpg"
    row = meta[meta["path"] == "Brake Disc/000.jpg"].iloc[0]
    assert row["file"] == str(first.absolute()) and row["id"] == row["file"]
    import hashlib

    assert row["sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert card["model"] == "siamese_pretrained" and card["distance"] == "euclidean"
    assert card["threshold"] == pytest.approx(bundle["unknown_threshold"]) and card["dim"] == 1280
    assert card["vectors"] == 15 and card["parts"] == 3 and card["photos_per_part"]["Bracket"] == PER_PART
    assert card["model_fingerprint"] == nodes.model_fingerprint(bundle) and card["history"][0]["action"] == "index"
    json.dumps(card)  # the card is plain JSON


def test_catalogue_keeps_a_single_photo_part_line_but_training_rules_otherwise(tmp_path, bundle):
    root = write_catalogue(tmp_path / "cat")
    save_jpeg(make_photo(3, seed=5), root / "Lonely Part" / "000.jpg")
    save_jpeg(make_photo(3, seed=6), root / "Wheel Bearing" / "000.jpg")     # excluded family, like training
    (root / "Bracket" / "copy.jpg").write_bytes((root / "Bracket" / "000.jpg").read_bytes())  # duplicate
    source, clean = cleaned(root)
    assert "Lonely Part" in set(clean["label"]) and "Wheel Bearing" not in set(clean["label"])
    assert len(clean) == 16
    _, strict = cleaned(root, {"min_photos_per_part": 2})
    assert "Lonely Part" not in set(strict["label"])


def test_a_kaggle_csv_catalogue_is_indexed_with_real_file_paths(tmp_path, bundle):
    from tests.conftest import write_csv_manifest

    root = write_catalogue(tmp_path / "photos dir" / "train")
    rows = [(f"train/{p.parent.name}/{p.name}", p.parent.name, "train") for p in sorted(root.rglob("*.jpg"))]
    csv = write_csv_manifest(tmp_path / "photos dir", rows, name="parts.csv")
    source, clean = cleaned(csv)
    gallery, card = nodes.build_catalogue_index(bundle, source, clean, SEARCH)
    assert len(gallery) == 15 and card["parts"] == 3
    assert all(Path(f).is_file() for f in gallery.metadata["file"])
    assert set(gallery.metadata["path"]) == {r[0] for r in rows}


# ---------------------------------------------------------------------------------------------------- search
def test_a_catalogue_photo_as_query_is_found_at_distance_zero(index, catalogue, bundle, tmp_path):
    gallery, card = index
    q = tmp_path / "q"
    (q / "Caliper").mkdir(parents=True)
    (q / "Caliper" / "same.jpg").write_bytes((catalogue / "Caliper" / "002.jpg").read_bytes())
    table = nodes.identify_query_photos(bundle, gallery, card, queries_in(q), SEARCH)
    row = table.iloc[0]
    assert row["match_1_distance"] == pytest.approx(0.0, abs=1e-4)
    assert row["match_1_path"] == str((catalogue / "Caliper" / "002.jpg").absolute())
    assert row["answer"] == row["predicted_label"] == "Caliper" and row["verdict"] == "known"
    # all three nearest are Caliper photos, and the exact copy (distance 0) decides alone: confidence 1
    assert row["correct"] and row["true_label"] == "Caliper" and row["confidence"] == pytest.approx(1.0, abs=1e-9)
    assert [row[f"match_{r}_label"] for r in (1, 2, 3)] == ["Caliper"] * 3


def test_known_parts_are_named_and_an_absent_part_is_unknown_at_the_threshold(index, bundle, tmp_path):
    gallery, card = index
    q = tmp_path / "q"
    for name, kind in CATALOGUE.items():
        save_jpeg(make_photo(kind, seed=999 + kind), q / name / "fresh.jpg")    # new photos of known parts
    save_jpeg(cross_photo(seed=50), q / "Wishbone" / "x.jpg")                     # absent from the index
    save_jpeg(make_photo(0, seed=7), q / "no folder.jpg")                         # no known answer
    table = nodes.identify_query_photos(bundle, gallery, card, queries_in(q), SEARCH).set_index("query")
    for name in CATALOGUE:
        assert table.loc[f"{name}/fresh.jpg", "answer"] == name, table.loc[f"{name}/fresh.jpg"].to_dict()
    x = table.loc["Wishbone/x.jpg"]
    assert x["verdict"] == UNKNOWN and x["answer"] == UNKNOWN and x["expected_answer"] == UNKNOWN and x["correct"]
    assert x["nearest_distance"] > bundle["unknown_threshold"] == pytest.approx(x["threshold"])
    assert pd.isna(table.loc["no folder.jpg", "true_label"]) and pd.isna(table.loc["no folder.jpg", "correct"])
    # a larger threshold override makes the same query "known" (with the nearest part's name)
    loose = nodes.identify_query_photos(bundle, gallery, card, queries_in(q / "Wishbone"),
                                        {**SEARCH, "threshold": 50.0})
    assert loose.iloc[0]["verdict"] == "known" and loose.iloc[0]["answer"] in CATALOGUE


@pytest.mark.parametrize("mode", ["qe", "k_reciprocal", "pairwise"])
def test_search_with_reranking_names_known_parts_and_rejects_the_absent_one(index, bundle, tmp_path, mode):
    """search.rerank re-orders the top-N; on the separable catalogue every known part keeps its name, the absent
    part stays unknown (the threshold applies to the nearest true distance), an exact copy stays first at 0."""
    gallery, card = index
    q = tmp_path / "q"
    for name, kind in CATALOGUE.items():
        save_jpeg(make_photo(kind, seed=999 + kind), q / name / "fresh.jpg")
    save_jpeg(cross_photo(seed=50), q / "Wishbone" / "x.jpg")
    search = {**SEARCH, "rerank": {"mode": mode, "top_n": 10, "k1": 4, "k2": 2, "pairwise_epochs": 3}}
    table = nodes.identify_query_photos(bundle, gallery, card, queries_in(q), search).set_index("query")
    plain = nodes.identify_query_photos(bundle, gallery, card, queries_in(q), SEARCH).set_index("query")
    for name in CATALOGUE:
        assert table.loc[f"{name}/fresh.jpg", "answer"] == name
        assert table.loc[f"{name}/fresh.jpg", "nearest_distance"] == pytest.approx(
            plain.loc[f"{name}/fresh.jpg", "nearest_distance"], rel=1e-6)
    assert table.loc["Wishbone/x.jpg", "verdict"] == UNKNOWN


def test_hostile_query_folder_is_answered_without_losing_the_good_photos(index, bundle, tmp_path):
    gallery, card = index
    q = tmp_path / "hostile"
    good = save_jpeg(make_photo(1, seed=321), q / "Bracket" / "good.jpg")
    (q / "Bracket" / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    (q / "Bracket" / "text.jpg").write_text("this is text, not a jpeg")
    (q / "Bracket" / "empty.jpg").write_bytes(b"")
    (q / "Caliper").mkdir()
    rgba = make_photo(2, seed=78, mode="RGBA")
    rgba.putalpha(Image.eval(rgba.convert("L"), lambda v: 0 if v > 200 else 255))  # transparent background
    (q / "Caliper" / "alpha.png").write_bytes(png_bytes(rgba))
    table = nodes.identify_query_photos(bundle, gallery, card, queries_in(q), SEARCH).set_index("query")
    assert len(table) == 5
    assert table.loc["Bracket/good.jpg", "answer"] == "Bracket" and pd.isna(table.loc["Bracket/good.jpg", "error"])
    assert table.loc["Caliper/alpha.png", "answer"] == "Caliper"
    assert table.loc["Bracket/empty.jpg", "error"] == "empty file"
    assert "not an image" in table.loc["Bracket/text.jpg", "error"]
    assert table.loc["Bracket/truncated.jpg", "error"]
    for bad in ("Bracket/empty.jpg", "Bracket/text.jpg", "Bracket/truncated.jpg"):
        assert pd.isna(table.loc[bad, "answer"]) and pd.isna(table.loc[bad, "match_1_label"])
    html = nodes.render_search_report(table.reset_index(), queries_in(q), card, SEARCH)
    assert html.count('class="q error"') == 3 and "empty file" in html and "not an image" in html


def test_a_file_that_cannot_be_read_is_an_answer_too(index, bundle, catalogue):
    from partmatch.pipelines.search.datasets import QueryPhoto, QueryPhotos

    def locked() -> bytes:
        raise PermissionError(13, "Permission denied")

    good = catalogue / "Bracket" / "001.jpg"
    photos = QueryPhotos("/q", [QueryPhoto("locked.jpg", "/q/locked.jpg", None, locked),
                                QueryPhoto("good.jpg", str(good), "Bracket", good.read_bytes)])
    table = nodes.identify_query_photos(bundle, *index, photos, {**SEARCH, "batch_size": 1}).set_index("query")
    assert table.loc["locked.jpg", "error"].startswith("cannot read file: PermissionError")
    assert table.loc["good.jpg", "answer"] == "Bracket" and table.loc["good.jpg", "correct"]


def test_single_file_query_and_missing_query_path(index, bundle, catalogue, tmp_path):
    gallery, card = index
    photos = queries_in(catalogue / "Bracket" / "001.jpg")
    assert len(photos) == 1 and photos.photos[0].true_label is None
    table = nodes.identify_query_photos(bundle, gallery, card, photos, SEARCH)
    assert table.iloc[0]["answer"] == "Bracket" and table.iloc[0]["match_1_distance"] == pytest.approx(0, abs=1e-4)
    from kedro.io.core import DatasetError

    with pytest.raises(DatasetError, match="search.query .* does not exist"):
        queries_in(tmp_path / "nowhere")


def test_index_built_with_another_model_is_refused(index, bundle, tmp_path):
    gallery, card = index
    other = {**bundle,
             "state_dict": {k: v + 1 if v.is_floating_point() else v for k, v in bundle["state_dict"].items()}}
    save_jpeg(make_photo(0, seed=1), tmp_path / "q" / "a.jpg")
    with pytest.raises(nodes.IndexMismatchError, match="search_index"):
        nodes.identify_query_photos(other, gallery, card, queries_in(tmp_path / "q"), SEARCH)
    stale = {**card, "vectors": len(gallery) + 1}  # the card of another index version
    with pytest.raises(nodes.IndexMismatchError, match="different versions"):
        nodes.identify_query_photos(bundle, gallery, stale, queries_in(tmp_path / "q"), SEARCH)
    with pytest.raises(nodes.IndexMismatchError, match="different versions"):
        nodes.remove_from_catalogue_index(gallery, stale, {**SEARCH, "remove": "Caliper"})
    same_size = {**card, "ids_digest": "0" * 64}  # another version holding as many photos (remove, then add)
    with pytest.raises(nodes.IndexMismatchError, match="different versions"):
        nodes.identify_query_photos(bundle, gallery, same_size, queries_in(tmp_path / "q"), SEARCH)


def test_html_report_is_self_contained_and_marks_wrong_matches(index, bundle, tmp_path):
    gallery, card = index
    q = tmp_path / "q"
    save_jpeg(make_photo(0, seed=1000), q / "Brake Disc" / "a.jpg")
    save_jpeg(make_photo(0, seed=1001), q / "Bracket" / "mislabelled.jpg")      # truth says Bracket: wrong answer
    (q / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    table = nodes.identify_query_photos(bundle, gallery, card, queries_in(q), SEARCH)
    html = nodes.render_search_report(table, queries_in(q), card, SEARCH)
    assert html.startswith("<!DOCTYPE html>") and "http" not in html.replace("http-equiv", "")
    assert html.count("<img ") == html.count('<img src="data:image/jpeg;base64,') == 2 + 2 * 3  # 2 queries, 3 matches
    assert html.count('class="q known right"') == 1 and html.count('class="q known wrong"') == 1
    assert "✗ wrong" in html and 'figure class="bad"' in html and "could not be read" in html
    assert "Brake Disc" in html and f"{bundle['unknown_threshold']:.3f}" in html


def test_report_renders_without_pipeline_objects():
    results = pd.DataFrame([{"query": "x <script>.jpg", "file": "/nope/x.jpg", "true_label": None,
                             "error": None, "answer": UNKNOWN, "predicted_label": "Gear", "verdict": UNKNOWN,
                             "confidence": 1.0, "nearest_distance": 2.0, "threshold": 1.0, "correct": None,
                             "expected_answer": None, "match_1_label": "Gear", "match_1_distance": 2.0,
                             "match_1_path": "/nope/g.jpg"}])
    html = search_report_html(results, {}, {"model": "m"}, top_k=1,
                              reasons={"/nope/g.jpg": "catalogue photo not found"})
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert "unknown part" in html and "catalogue photo not found" in html


# ---------------------------------------------------------------------------------------------------- add / remove
def test_new_part_line_is_unknown_before_add_and_identified_after_without_retraining(index, bundle, tmp_path):
    gallery, card = index
    weights_before = {k: v.clone() for k, v in bundle["state_dict"].items()}
    q = tmp_path / "q"
    for i in range(3):
        save_jpeg(cross_photo(seed=100 + i), q / "Wishbone" / f"{i}.jpg")
    before = nodes.identify_query_photos(bundle, gallery, card, queries_in(q), SEARCH)
    assert (before["answer"] == UNKNOWN).all()

    new_root = write_new_parts(tmp_path / "new")
    source, clean = cleaned(new_root)
    bigger, new_card = nodes.add_to_catalogue_index(gallery, card, bundle, source, clean,
                                                    {**SEARCH, "add": str(new_root)})
    assert len(bigger) == 15 + 4 and new_card["parts"] == 4 and new_card["photos_per_part"]["Wishbone"] == 4
    assert new_card["history"][-1]["action"] == "add" and new_card["history"][-1]["new_part_names"] == ["Wishbone"]
    assert new_card["model_fingerprint"] == card["model_fingerprint"]
    after = nodes.identify_query_photos(bundle, bigger, new_card, queries_in(q), SEARCH)
    assert (after["answer"] == "Wishbone").all() and after["correct"].all()
    assert all(torch.equal(weights_before[k], v) for k, v in bundle["state_dict"].items())  # the model is untouched


def test_add_embeds_only_new_photos_and_skips_what_is_already_indexed(index, bundle, catalogue, tmp_path, monkeypatch):
    gallery, card = index
    root = write_new_parts(tmp_path / "new", n=2)
    (root / "Brake Disc").mkdir()
    (root / "Brake Disc" / "again.jpg").write_bytes((catalogue / "Brake Disc" / "000.jpg").read_bytes())  # same bytes
    seen = []
    real = Embedder.embed_bytes
    monkeypatch.setattr(Embedder, "embed_bytes", lambda self, blobs: seen.extend(blobs) or real(self, blobs))
    source, clean = cleaned(root)
    params = {**SEARCH, "add": str(root)}
    bigger, new_card = nodes.add_to_catalogue_index(gallery, card, bundle, source, clean, params)
    assert len(seen) == 2 and len(bigger) == 17
    assert new_card["history"][-1]["skipped_already_indexed"] == 1
    again, _ = nodes.add_to_catalogue_index(bigger, new_card, bundle, source, clean, params)  # idempotent
    assert len(again) == 17
    with pytest.raises(ValueError, match="search.add is not set"):  # never the demo photos by accident
        nodes.add_to_catalogue_index(bigger, new_card, bundle, source, clean, SEARCH)


def test_remove_a_part_line(index, bundle, tmp_path):
    gallery, card = index
    smaller, new_card = nodes.remove_from_catalogue_index(gallery, card, {**SEARCH, "remove": "Caliper"})
    assert len(smaller) == 10 and "Caliper" not in set(smaller.labels) and new_card["parts"] == 2
    assert new_card["history"][-1] == {**new_card["history"][-1], "action": "remove", "part_names": ["Caliper"],
                                       "vectors": PER_PART}
    save_jpeg(make_photo(2, seed=999 + 2), tmp_path / "q" / "Caliper" / "fresh.jpg")
    row = nodes.identify_query_photos(bundle, smaller, new_card, queries_in(tmp_path / "q"), SEARCH).iloc[0]
    assert row["expected_answer"] == UNKNOWN  # Caliper is no longer a catalogue part
    with pytest.raises(ValueError, match=r"\['Gear'\] not in the catalogue index"):
        nodes.remove_from_catalogue_index(smaller, new_card, {**SEARCH, "remove": ["Gear"]})
    with pytest.raises(ValueError, match="search.remove is empty"):
        nodes.remove_from_catalogue_index(smaller, new_card, SEARCH)


# ---------------------------------------------------------------------------------------------------- open set
def test_open_set_rejection_and_new_parts_on_the_models_split(bundle):
    blobs, rows = [], []
    parts = {**CATALOGUE, "Wishbone": None}
    for name, kind in parts.items():
        for i in range(6):
            img = cross_photo(seed=200 + i) if kind is None else make_photo(kind, seed=100 * kind + i)
            blobs.append(jpeg_bytes(img))
            rows.append({"label": name, "split": "open" if kind is None else ("train" if i < 4 else "test")})
    emb, _ = Embedder(bundle).embed_bytes(blobs)
    split_index = pd.DataFrame(rows)
    curve, figure, metrics = nodes.measure_open_set_rejection(bundle, emb, split_index, SEARCH)
    assert {"threshold", "fmr", "fnmr"} <= set(curve.columns) and len(figure.axes) == 2
    assert metrics["threshold"] == bundle["unknown_threshold"] and metrics["threshold_source"] == "calibrated"
    assert metrics["known_queries"] == 6 and metrics["unseen_queries"] == 6 and metrics["known_parts"] == 3
    assert metrics["known_top1_accuracy"] == 1.0 and metrics["unknown_rejected_at_threshold"] == 1.0
    assert metrics["fmr_at_threshold"] == 0.0 and metrics["fnmr_at_threshold"] == 0.0
    # every known query is nearer than the 1 % quantile of the unseen ones (they are separated): FNMR 0 there
    assert metrics["fnmr_at_fmr_1pct"] == 0.0
    assert metrics["new_parts_reference_photos"] == 3 and metrics["new_parts_queries"] == 3
    assert metrics["new_parts_unknown_before_adding"] == 1.0 and metrics["new_parts_top1_accuracy"] == 1.0
    assert metrics["known_top1_accuracy_after_adding"] == 1.0
    assert "known_top1_accuracy_reranked" not in metrics  # rerank none: nothing more
    json.dumps(metrics)
    _, _, reranked = nodes.measure_open_set_rejection(bundle, emb, split_index,
                                                      {**SEARCH, "rerank": {"mode": "qe", "top_n": 5}})
    assert reranked["rerank"] == "qe" and reranked["known_top1_accuracy_reranked"] == 1.0
    assert reranked["new_parts_top1_accuracy_reranked"] == 1.0
    assert {k: v for k, v in reranked.items() if k in metrics} == metrics  # the plain numbers stay
    curve, figure, skipped = nodes.measure_open_set_rejection(bundle, emb[:18], split_index.iloc[:18], SEARCH)
    assert curve.empty and "no unseen categories" in skipped["skipped"] and figure.texts  # reported, not a crash
    with pytest.raises(ValueError, match="Re-run kedro run --pipeline=siamese_pretrained"):
        nodes.measure_open_set_rejection(bundle, emb[:5], split_index, SEARCH)


# ---------------------------------------------------------------------------------------------------- datasets / demo
def test_query_dataset_renders_the_demo_queries_when_missing(tmp_path):
    path = tmp_path / "demo_queries"
    photos = QueryPhotosDataset(path=str(path), demo_path=str(path)).load()
    from partmatch.demo import DEMO_QUERIES, NEW_PART

    assert len(photos) == len(DEMO_QUERIES)
    truth = {p.name: p.true_label for p in photos.photos}
    assert truth["Wishbone/query_6.jpg"] == NEW_PART[0] and truth["unreadable.jpg"] is None
    new = NewPartsSourceDataset(path=str(tmp_path / "new"), demo_path=str(tmp_path / "new")).load()
    assert set(new.records["label"]) == {NEW_PART[0]} and len(new.records) == 6
    from kedro.io.core import DatasetError

    with pytest.raises(DatasetError, match="search.add"):
        NewPartsSourceDataset(path=str(tmp_path / "missing")).load()


# ---------------------------------------------------------------------------------------------------- Kedro
@pytest.mark.slow
def test_search_index_then_search_through_a_kedro_session(kedro_project, catalogue, bundle, tmp_path):
    project = kedro_project.path
    model_dir = project / "data/06_models/siamese_pretrained/model.pt/2026-01-01T00.00.00.000Z/model.pt"
    model_dir.parent.mkdir(parents=True)
    torch.save(bundle, model_dir)
    q = tmp_path / "queries"
    save_jpeg(make_photo(1, seed=4242), q / "Bracket" / "mine.jpg")
    save_jpeg(cross_photo(seed=9), q / "Wishbone" / "new.jpg")
    (q / "broken.jpg").write_bytes(b"not a photo")
    params = {"search": {**SEARCH, "catalog": str(catalogue), "query": str(q)}, "ingestion": INGESTION}
    kedro_project(["search_index", "search"], **params)
    results = sorted((project / "data/08_reporting/search/query_results.csv").glob("*/query_results.csv"))
    table = pd.read_csv(results[-1]).set_index("query")
    assert table.loc["Bracket/mine.jpg", "answer"] == "Bracket"
    assert table.loc["Wishbone/new.jpg", "answer"] == UNKNOWN
    assert "not an image" in table.loc["broken.jpg", "error"]
    html = next((project / "data/08_reporting/search/query_report.html").glob("*/query_report.html")).read_text()
    assert html.count("<section") == 3
    idx = next((project / "data/06_models/search/catalogue_index.faissidx").glob("*/catalogue_index.faissidx"))
    assert len(GalleryIndex.from_bytes(idx.read_bytes())) == 15

    # a new part line, then removing it again: new versions of the index, the model file untouched
    model_bytes = model_dir.read_bytes()
    new_root = write_new_parts(tmp_path / "new")
    kedro_project(["search_add"], **{**params, "search": {**params["search"], "add": str(new_root)}})
    kedro_project(["search"], **params)
    table = pd.read_csv(sorted((project / "data/08_reporting/search/query_results.csv").glob("*/*.csv"))[-1])
    assert table.set_index("query").loc["Wishbone/new.jpg", "answer"] == "Wishbone"
    kedro_project(["search_remove"], **{**params, "search": {**params["search"], "remove": "Wishbone"}})
    versions = sorted((project / "data/06_models/search/catalogue_index.faissidx").glob("*/*.faissidx"))
    assert len(versions) == 3 and len(GalleryIndex.from_bytes(versions[-1].read_bytes())) == 15
    assert model_dir.read_bytes() == model_bytes


def test_nothing_built_yet_names_the_command_to_run(tmp_path):
    from kedro.io.core import DatasetError, Version

    from partmatch.pipelines.search.datasets import CatalogueIndexDataset, SearchModelDataset

    with pytest.raises(DatasetError, match="kedro run --pipeline=siamese_triplet"):
        SearchModelDataset(filepath=str(tmp_path / "06_models/siamese_triplet/model.pt"),
                           version=Version(None, None)).load()
    with pytest.raises(DatasetError, match="kedro run --pipeline=search_index"):
        CatalogueIndexDataset(filepath=str(tmp_path / "index.faissidx"), version=Version(None, None)).load()
