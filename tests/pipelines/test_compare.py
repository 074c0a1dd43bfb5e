"""Compare node: the study's table extended with retrieval metrics, from whatever models have metrics."""

import logging

import pandas as pd
import pytest

from partmatch.config import ParameterError
from partmatch.pipelines.compare.nodes import compare_models

PARAMS = {"models": ["cnn", "siamese_contrastive", "siamese_triplet"],
          "chart_metrics": ["precision_at_1", "open_set_precision_at_1", "test_accuracy"]}


def metrics(p1: float, **extra) -> dict:
    return {"precision_at_1": p1, "open_set_precision_at_1": p1 - 0.1, "map_at_r": 0.2, "epochs": 10,
            "device": "cpu", **extra}


def test_table_has_every_trained_model_and_the_study_numbers(caplog):
    with caplog.at_level(logging.WARNING):
        table, markdown, figure, mlflow = compare_models(
            PARAMS, cnn=metrics(0.5, test_accuracy=0.51), siamese_contrastive=None, siamese_triplet=metrics(0.6))
    assert list(table["model"]) == ["cnn", "siamese_triplet"]
    assert table.set_index("model").loc["siamese_triplet", "precision_at_1"] == 0.6
    assert pd.isna(table.set_index("model").loc["siamese_triplet", "test_accuracy"])
    assert "siamese_contrastive" in caplog.text and "kedro run --pipeline=siamese_contrastive" in caplog.text
    rows = {line.split("|")[1].strip(): line for line in markdown.splitlines() if line.startswith("| ")}
    assert "test_accuracy 50.80 %" in rows["cnn"] and "pair_accuracy 40.36 %" in rows["siamese_triplet"]
    assert "0.5100" in rows["cnn"]
    assert mlflow["siamese_triplet.precision_at_1"] == {"value": 0.6, "step": 0}
    assert "siamese_triplet.test_accuracy" not in mlflow  # NaN is not a metric
    # one bar per model and charted metric (NaN drawn empty and marked n/a), one legend entry per model
    ax = figure.axes[0]
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.5, 0.4, 0.51, 0.6, 0.5, 0.0])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cnn", "siamese_triplet"]
    assert [t.get_text() for t in ax.texts][-3:] == ["0.600", "0.500", "n/a"]


def test_no_trained_model_is_a_clear_error():
    with pytest.raises(ValueError, match="run `kedro run` first"):
        compare_models(PARAMS, cnn=None)


def test_unknown_parameter_fails():
    with pytest.raises(ParameterError, match=r"compare\."):
        compare_models({**PARAMS, "colour": "red"}, cnn=metrics(0.5))


def test_each_rows_loss_augmentation_and_backbone_come_from_its_parameters():
    table, markdown, *_ = compare_models(
        PARAMS, cnn=metrics(0.5), siamese_triplet=metrics(0.6, nmi=0.75),
        siamese_triplet__params={"backbone": "study_cnn", "loss": "quadruplet", "augment": True})
    rows = table.set_index("model")
    assert rows.loc["siamese_triplet", ["backbone", "loss", "augment"]].tolist() == ["study_cnn", "quadruplet", "true"]
    assert rows.loc["cnn", ["backbone", "loss", "augment"]].isna().all()  # no parameters given: unknown
    line = next(x for x in markdown.splitlines() if x.startswith("| siamese_triplet "))
    assert "| study_cnn | quadruplet | true |" in line and "| 0.7500 |" in line
    # a loss of several parts is named by its parts
    parts = {"parts": [{"name": "multi_similarity"}, {"name": "proxy_anchor"}]}
    table = compare_models({**PARAMS, "models": ["cnn"]}, cnn=metrics(0.5),
                           cnn__params={"loss": parts, "backbone": "efficientnet_lite0", "pretrained": True})[0]
    assert table.loc[0, "loss"] == "multi_similarity+proxy_anchor" and table.loc[0, "augment"] == "false"


def test_the_compare_pipeline_reads_every_models_parameters():
    from partmatch.config import MODEL_PIPELINES
    from partmatch.pipelines.compare import create_pipeline

    (node,) = create_pipeline().nodes
    assert {f"params:{m}" for m in MODEL_PIPELINES} <= set(node.inputs)
