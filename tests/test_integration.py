"""End to end through a real KedroSession on a tiny generated catalogue: versioned outputs and MLflow runs."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from partmatch.cleaning import matched_family
from partmatch.config import IngestionParams
from partmatch.demo import DEMO_CATEGORIES, generate_demo_catalogue
from partmatch.splits import closed_set_counts
from tests.conftest import experiment_runs, latest

MODELS = ("cnn", "siamese_contrastive", "siamese_triplet", "siamese_pretrained", "multi_objective", "siamese_pca")
TINY = {"epochs": 1, "max_batches_per_epoch": 3, "progress": False, "threshold_pairs": 200, "eval_pairs": 200,
        "batch_size": 16}
EXPECTED_KEYS = {"precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "r_precision",
                 "map_at_r", "knn_accuracy", "pair_accuracy", "roc_auc", "epochs", "train_images_per_second",
                 "device"} | {f"open_set_{k}" for k in ("precision_at_1", "recall_at_1", "r_precision", "map_at_r",
                                                        "knn_accuracy", "pair_accuracy", "roc_auc")}


def mlflow_runs(project: Path) -> pd.DataFrame:
    return pd.DataFrame([{"name": r.info.run_name, "metrics": r.data.metrics, "params": r.data.params,
                          "tags": r.data.tags, "id": r.info.run_id} for r in experiment_runs(project)])


def expected_kept(summary: dict) -> dict[str, int]:
    """Photos per category that ingestion must keep of a generated demo catalogue, from its summary alone: the
    truncated photo quarantined, both copies of the photo filed under two categories dropped, the excluded families
    and the categories left with fewer than min_images_per_class (2) photos removed."""
    left = dict(summary["per_category"])
    for path in [summary["truncated"], *summary["duplicate"]]:
        left[Path(path).parent.name] -= 1
    families = IngestionParams().excluded_families
    return {c: n for c, n in left.items() if matched_family(c, families) is None and n >= 2}


def assert_png_picture(path: Path) -> None:
    """A whole PNG with something drawn on it."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.load()
        assert len(img.convert("RGB").getcolors(1 << 16) or range(1 << 16)) > 2, f"{path} is blank"


@pytest.mark.slow
def test_data_pipelines_end_to_end(kedro_project, tiny_demo):
    tiny_catalogue, summary = tiny_demo
    kedro_project(["ingestion", "preprocessing", "eda"], raw_source=str(tiny_catalogue),
                  preprocessing={"image_size": 48})
    project = kedro_project.path
    counts = json.loads(latest(project, "08_reporting/ingestion/cleaning_counts.json").read_text())
    assert counts["quarantined"] == 1                     # the truncated photo
    assert counts["duplicates_dropped"] == 2              # both copies of the photo filed under two categories
    assert counts["excluded_family_categories"] == 11
    kept = expected_kept(summary)
    assert counts["categories_before"] == summary["categories"] == len(DEMO_CATEGORIES)
    assert (counts["categories_after"], counts["images_after"]) == (len(kept), sum(kept.values()))
    index = pd.read_parquet(latest(project, "05_model_input/split_index.parquet"))
    import numpy as np

    images = np.load(latest(project, "04_feature/image_array.npy"))
    assert images.shape == (len(index), 1, 48, 48) and images.dtype == np.uint8
    assert index["label"].value_counts().to_dict() == kept
    # the split: round(20 %) of the categories unseen (all their photos), every other one cut 8:1:1 as
    # closed_set_counts says (the demo has no identical pixels under two categories: nothing excluded)
    open_labels = set(index.loc[index["split"] == "open", "label"])
    assert len(open_labels) == round(0.2 * len(kept)) and "excluded" not in set(index["split"])
    for label, rows in index.groupby("label"):
        got = tuple(int((rows["split"] == s).sum()) for s in ("train", "val", "test", "open"))
        want = (0, 0, 0, kept[label]) if label in open_labels else (*closed_set_counts(kept[label], 0.1, 0.1), 0)
        assert got == want, label
    for fig in ("top_categories", "pca_scree", "pca_cumulative_variance", "pca_eigen_images", "sample_grid"):
        assert_png_picture(latest(project, f"08_reporting/eda/{fig}.png"))
    assert "Bottom 5" in latest(project, "08_reporting/eda/category_table.md").read_text()
    runs = mlflow_runs(project)
    assert len(runs) == 1
    metrics = runs["metrics"][0]
    assert metrics["ingestion.images_after"] == counts["images_after"]
    assert metrics["split.open_images"] == (index["split"] == "open").sum()
    pca = json.loads(latest(project, "08_reporting/eda/pca_summary.json").read_text())
    assert metrics["eda.pca_components_for_target"] == pca["components_for_target"]


@pytest.mark.slow
@pytest.mark.timeout(600)   # four models, compare, evaluate and a resumed run: ~40 s on a quiet machine
def test_model_pipelines_compare_evaluate_and_resume(kedro_project, tiny_catalogue, tmp_path):
    params = {m: dict(TINY) for m in MODELS}
    kedro_project(["ingestion", "preprocessing"], raw_source=str(tiny_catalogue), preprocessing={"image_size": 32})
    kedro_project([*MODELS, "compare"], raw_source=str(tiny_catalogue), preprocessing={"image_size": 32}, **params)
    project = kedro_project.path
    index = pd.read_parquet(latest(project, "05_model_input/split_index.parquet"))
    train_classes = sorted(set(index.loc[index["split"] == "train", "label"]))
    for model in MODELS:
        metrics = json.loads(latest(project, f"08_reporting/{model}/metrics.json").read_text())
        assert EXPECTED_KEYS <= set(metrics), f"{model}: missing {EXPECTED_KEYS - set(metrics)}"
        assert metrics["epochs"] == 1 and metrics["device"] == "cpu"
        bundle = torch.load(latest(project, f"06_models/{model}/model.pt"), weights_only=True)
        assert bundle["classes"] == train_classes                       # every category it trained on, no other
        assert bundle["threshold"] == pytest.approx(metrics["threshold"])   # the threshold it was scored with
        for fig in ("pair_distance_histogram", "threshold_curves", "loss_curves", "embedding_map",
                    "neighbour_gallery", "confused_pairs", "per_category_precision"):
            assert latest(project, f"08_reporting/{model}/{fig}.png").exists()
        assert {"nmi", "ami", "open_set_nmi", "open_set_ami"} <= set(metrics)
        assert ("linear_svm_accuracy" in metrics) == (model != "cnn")  # the classifier's probe is test_accuracy
    assert "test_accuracy" in json.loads(latest(project, "08_reporting/cnn/metrics.json").read_text())
    table = pd.read_csv(latest(project, "08_reporting/compare/comparison.csv"))
    assert list(table["model"]) == list(MODELS)
    assert "| siamese_contrastive | pair_accuracy 70.24 %" in latest(project, "08_reporting/compare/comparison.md").read_text()

    import mlflow

    runs = mlflow_runs(project)
    parent = runs[runs["name"] == "+".join([*MODELS, "compare"])].iloc[0]
    children = runs[runs["tags"].map(lambda t: t.get("mlflow.parentRunId")) == parent["id"]]
    assert sorted(children["name"]) == sorted(MODELS)            # one child run per model
    assert not [k for k in parent["metrics"] if k.split(".")[0] in MODELS]   # no prefixed model metrics left
    model_run = children[children["name"] == "siamese_triplet"].iloc[0]
    assert {"open_set_precision_at_1", "train_loss"} <= set(model_run["metrics"])
    assert model_run["params"]["loss"] == "triplet" and model_run["tags"]["model"] == "siamese_triplet"
    assert model_run["tags"]["raw_source"] == str(tiny_catalogue.resolve())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    assert "loss_curves.png" in {a.path for a in client.list_artifacts(model_run["id"])}
    # the trained model: logged in the child run as the identification model (model.pt is one of its artifacts)
    local = mlflow.artifacts.download_artifacts(f"runs:/{model_run['id']}/siamese_triplet", dst_path=str(tmp_path),
                                                tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    assert "state_dict" in torch.load(Path(local) / "artifacts" / "model.pt", weights_only=True)

    # evaluate: another source, no training, every category unseen
    other = tmp_path / "other source"
    other_kept = expected_kept(generate_demo_catalogue(other, seed=11, size=64, scale=0.3))
    kedro_project("evaluate", raw_source=str(tiny_catalogue), evaluate={"model": "siamese_triplet", "source": str(other)})
    ev = json.loads(latest(project, "08_reporting/evaluate/metrics.json").read_text())
    assert {"open_set_precision_at_1", "open_set_map_at_r", "open_set_pair_accuracy"} <= set(ev)
    # every category of the other source that survives cleaning is scored, with all its photos
    assert ev["model"] == "siamese_triplet"
    assert (ev["open_set_categories"], ev["open_set_images"]) == (len(other_kept), sum(other_kept.values()))

    # resume: a 2-epoch run continues from the 1-epoch checkpoint instead of starting again
    kedro_project("cnn", raw_source=str(tiny_catalogue), preprocessing={"image_size": 32},
                  cnn={**TINY, "epochs": 2, "resume": True, "patience": None})
    summary = json.loads(latest(project, "07_model_output/cnn/training_summary.json").read_text())
    assert summary["resumed_from_epoch"] == 1 and summary["epochs_run"] == 2
