"""One MLflow run per trained model, a child of the `kedro run`'s run, with unprefixed names (real KedroSession)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from partmatch.demo import generate_demo_catalogue
from partmatch.tracking import ModelRuns, flatten

MODELS = ("cnn", "siamese_triplet")
TINY = {"epochs": 2, "max_batches_per_epoch": 2, "progress": False, "threshold_pairs": 200, "eval_pairs": 200,
        "batch_size": 16, "patience": None}


def test_flatten_and_model_runs_write_by_run_id(tmp_path, monkeypatch):
    """ModelRuns writes to the child run by id; MLflow's active run is left alone."""
    import mlflow

    monkeypatch.chdir(tmp_path)  # MLflow's SQLite store creates ./mlruns for its Default experiment
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "e": 2}) == {"a.b": 1, "a.c.d": "x", "e": 2}
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("t", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = client.create_run(exp, run_name="kedro run").info.run_id
    runs = ModelRuns(client, parent, exp, {"raw_source": "/photos"})
    runs.log_params("m", {"lr": 0.01, "head": {"dim": 64}})
    runs.log_params("m", {"lr": 0.01, "loss": "triplet"})          # lr again: not logged twice
    runs.log_metrics("m", {"precision_at_1": 0.5, "device": "cpu", "nan": float("nan"), "flag": True})
    runs.log_history("m", pd.DataFrame({"epoch": [1, 2], "train_loss": [0.9, 0.4]}))
    runs.finish()
    assert mlflow.active_run() is None
    child = client.get_run(runs.run_ids["m"])
    assert child.data.tags["mlflow.parentRunId"] == parent and child.data.tags["model"] == "m"
    assert child.data.params == {"lr": "0.01", "head.dim": "64", "loss": "triplet"}
    assert child.data.tags["device"] == "cpu"
    assert child.data.metrics == {"precision_at_1": 0.5, "train_loss": 0.4}
    assert [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "train_loss")] == [(1, 0.9),
                                                                                                       (2, 0.4)]
    assert child.info.status == "FINISHED"


@pytest.mark.slow
def test_each_model_gets_a_child_run_with_unprefixed_names(kedro_project, tmp_path_factory):
    import mlflow

    catalogue = tmp_path_factory.mktemp("runs") / "tiny catalogue"
    generate_demo_catalogue(catalogue, seed=3, size=64, scale=0.35)
    common = {"raw_source": str(catalogue), "preprocessing": {"image_size": 32}}
    kedro_project(["ingestion", "preprocessing"], **common)
    kedro_project([*MODELS, "compare"], **common, **{m: dict(TINY) for m in MODELS})

    project: Path = kedro_project.path
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("partmatch")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"   # the UI opens on the runs table
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "cnn+siamese_triplet+compare"]
    children = {r.data.tags["model"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(MODELS)

    for model, run in children.items():
        assert run.info.run_name == model and run.info.status == "FINISHED"
        assert run.data.tags["raw_source"] == str(catalogue.resolve())
        metrics, params = run.data.metrics, run.data.params
        assert {"precision_at_1", "map_at_r", "open_set_precision_at_1", "open_set_map_at_r", "pair_accuracy",
                "roc_auc", "train_loss", "epochs"} <= set(metrics), sorted(metrics)
        assert not [k for k in metrics if k.startswith(f"{model}.")]
        assert {"lr", "loss", "backbone", "train_mode", "epochs", "preprocessing.image_size"} <= set(params), \
            sorted(params)
        assert params["epochs"] == "2" and params["preprocessing.image_size"] == "32"
        assert run.data.tags["device"] == "cpu"
        history = client.get_metric_history(run.info.run_id, "train_loss")
        assert sorted(m.step for m in history) == [1, 2]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"metrics.json", "loss_curves.png", "training_history.csv", "embedding_map_chart.png",
                "neighbour_gallery_chart.png", "confused_pairs_chart.png", "per_category_precision_chart.png",
                "per_category_precision_table.csv"} <= artifacts, sorted(artifacts)
        assert {"open_set_nmi", "open_set_ami"} <= set(metrics), sorted(metrics)
        assert ("linear_svm_accuracy" in metrics) == (model != "cnn")  # the classifier's probe is test_accuracy
        # the trained model, logged as the served identification model of this run
        (logged,) = [m for m in client.search_logged_models(experiment_ids=[exp.experiment_id])
                     if m.source_run_id == run.info.run_id]
        assert logged.name == model

    assert children["cnn"].data.params["loss"] != children["siamese_triplet"].data.params["loss"]
    # the parent keeps the data metrics and the compare summary; no model's metrics under a prefix
    assert not [k for k in parent.data.metrics if k.split(".")[0] in MODELS], sorted(parent.data.metrics)
    assert any(k.startswith("compare.") for k in parent.data.metrics)
    # summed pipelines: kedro-mlflow's PipelineML is demoted, so no served model in the parent run itself
    assert not [m for m in client.search_logged_models(experiment_ids=[exp.experiment_id])
                if m.source_run_id == parent.info.run_id]
