"""End to end through a real KedroSession on a tiny generated catalogue: versioned outputs and MLflow runs."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from partmatch.demo import generate_demo_catalogue

MODELS = ("cnn", "siamese_contrastive", "siamese_triplet", "siamese_pretrained")
TINY = {"epochs": 1, "max_batches_per_epoch": 3, "progress": False, "threshold_pairs": 200, "eval_pairs": 200,
        "batch_size": 16}
EXPECTED_KEYS = {"precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "r_precision",
                 "map_at_r", "knn_accuracy", "pair_accuracy", "roc_auc", "epochs", "train_images_per_second",
                 "device"} | {f"open_set_{k}" for k in ("precision_at_1", "recall_at_1", "r_precision", "map_at_r",
                                                        "knn_accuracy", "pair_accuracy", "roc_auc")}


def latest(project: Path, relpath: str) -> Path:
    """The newest version of a versioned dataset file, asserting it exists."""
    versions = sorted((project / "data" / relpath).glob("*/" + Path(relpath).name))
    assert versions, f"no version of {relpath} was written"
    return versions[-1]


def mlflow_runs(project: Path) -> pd.DataFrame:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("partmatch")
    assert exp is not None, "experiment 'partmatch' was not created"
    return pd.DataFrame([{"name": r.info.run_name, "metrics": r.data.metrics, "params": r.data.params,
                          "tags": r.data.tags, "id": r.info.run_id} for r in client.search_runs([exp.experiment_id])])


@pytest.fixture(scope="module")
def tiny_catalogue(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "tiny catalogue"   # a space in the path, as users have
    generate_demo_catalogue(root, seed=3, size=64, scale=0.35)
    return root


@pytest.mark.slow
def test_data_pipelines_end_to_end(kedro_project, tiny_catalogue):
    kedro_project(["ingestion", "preprocessing", "eda"], raw_source=str(tiny_catalogue),
                  preprocessing={"image_size": 48})
    project = kedro_project.path
    counts = json.loads(latest(project, "08_reporting/ingestion/cleaning_counts.json").read_text())
    assert counts["quarantined"] == 1                     # the truncated photo
    assert counts["duplicates_dropped"] == 2              # both copies of the photo filed under two categories
    assert counts["excluded_family_categories"] == 11
    assert counts["categories_after"] < counts["categories_before"]
    index = pd.read_parquet(latest(project, "05_model_input/split_index.parquet"))
    import numpy as np

    images = np.load(latest(project, "04_feature/image_array.npy"))
    assert images.shape == (len(index), 1, 48, 48) and images.dtype == np.uint8
    assert set(index["split"]) <= {"train", "val", "test", "open", "excluded"} and (index["split"] == "open").any()
    assert not set(index.loc[index["split"] == "open", "label"]) & set(index.loc[index["split"] == "train", "label"])
    for fig in ("top_categories", "pca_scree", "pca_cumulative_variance", "pca_eigen_images", "sample_grid"):
        assert latest(project, f"08_reporting/eda/{fig}.png").stat().st_size > 5000
    assert "Bottom 5" in latest(project, "08_reporting/eda/category_table.md").read_text()
    runs = mlflow_runs(project)
    assert len(runs) == 1
    metrics = runs["metrics"][0]
    assert metrics["ingestion.images_after"] == counts["images_after"]
    assert metrics["split.open_images"] == (index["split"] == "open").sum()
    assert "eda.pca_components_for_target" in metrics


@pytest.mark.slow
@pytest.mark.timeout(600)   # four models, compare, evaluate and a resumed run: ~40 s on a quiet machine
def test_model_pipelines_compare_evaluate_and_resume(kedro_project, tiny_catalogue, tmp_path):
    params = {m: dict(TINY) for m in MODELS}
    kedro_project(["ingestion", "preprocessing"], raw_source=str(tiny_catalogue), preprocessing={"image_size": 32})
    kedro_project([*MODELS, "compare"], raw_source=str(tiny_catalogue), preprocessing={"image_size": 32}, **params)
    project = kedro_project.path
    for model in MODELS:
        metrics = json.loads(latest(project, f"08_reporting/{model}/metrics.json").read_text())
        assert EXPECTED_KEYS <= set(metrics), f"{model}: missing {EXPECTED_KEYS - set(metrics)}"
        assert metrics["epochs"] == 1 and metrics["device"] == "cpu"
        bundle = torch.load(latest(project, f"06_models/{model}/model.pt"), weights_only=True)
        assert bundle["threshold"] is not None and bundle["classes"]
        for fig in ("pair_distance_histogram", "threshold_curves", "loss_curves"):
            assert latest(project, f"08_reporting/{model}/{fig}.png").exists()
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
    generate_demo_catalogue(other, seed=11, size=64, scale=0.3)
    kedro_project("evaluate", raw_source=str(tiny_catalogue), evaluate={"model": "siamese_triplet", "source": str(other)})
    ev = json.loads(latest(project, "08_reporting/evaluate/metrics.json").read_text())
    assert {"open_set_precision_at_1", "open_set_map_at_r", "open_set_pair_accuracy"} <= set(ev)
    assert ev["model"] == "siamese_triplet" and ev["open_set_categories"] >= 2

    # resume: a 2-epoch run continues from the 1-epoch checkpoint instead of starting again
    kedro_project("cnn", raw_source=str(tiny_catalogue), preprocessing={"image_size": 32},
                  cnn={**TINY, "epochs": 2, "resume": True, "patience": None})
    summary = json.loads(latest(project, "07_model_output/cnn/training_summary.json").read_text())
    assert summary["resumed_from_epoch"] == 1 and summary["epochs_run"] == 2
