"""Compare node: one table and one chart over the latest metrics of every model."""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from partmatch import config
from partmatch.ml import plots
from partmatch.tracking import as_mlflow_metrics

logger = logging.getLogger(__name__)

STUDY = {"cnn": {"test_accuracy": 0.5080}, "siamese_contrastive": {"pair_accuracy": 0.7024},
         "siamese_triplet": {"pair_accuracy": 0.4036}}
COLUMNS = ["test_accuracy", "pair_accuracy", "roc_auc", "precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4",
           "recall_at_8", "r_precision", "map_at_r", "knn_accuracy", "linear_svm_accuracy", "nmi", "ami",
           "open_set_precision_at_1", "open_set_map_at_r", "open_set_r_precision", "open_set_recall_at_4",
           "open_set_pair_accuracy", "open_set_nmi", "open_set_ami", "epochs", "train_images_per_second", "device"]


# the training options each row shows (from the model's parameters: `params:<model>` as `<model>__params`)
OPTION_COLUMNS = ["backbone", "loss", "augment"]
PARAMS_SUFFIX = "__params"


def _options(model: str, params: dict | None) -> dict[str, str | None]:
    """The row's ``backbone``, ``loss`` (in a word: ``triplet``, ``multi_similarity+proxy_anchor``...) and
    ``augment`` from the model's parameters; None each when they are not given."""
    if params is None:
        return dict.fromkeys(OPTION_COLUMNS)
    p = config.parse(model, params, config.TrainingParams)
    return {"backbone": p.backbone, "loss": p.loss_name, "augment": str(p.augment).lower()}


def compare_models(params: dict[str, Any], **inputs: dict | None) -> tuple[pd.DataFrame, str, Figure, dict]:
    """Build the comparison table (CSV + markdown with the study's numbers) and a grouped bar chart. Keyword
    inputs: each model's metrics under its name and, optionally, its parameters under ``<model>__params``
    (their ``backbone``, ``loss`` and ``augment`` become columns)."""
    p = config.parse("compare", params)
    settings = {k[: -len(PARAMS_SUFFIX)]: v for k, v in inputs.items() if k.endswith(PARAMS_SUFFIX)}
    metrics = {k: v for k, v in inputs.items() if not k.endswith(PARAMS_SUFFIX)}
    rows = {}
    for name in p.models:
        m = metrics.get(name)
        if m is None:
            logger.warning("compare: no metrics for '%s' yet (run `kedro run --pipeline=%s`); left out.", name, name)
            continue
        rows[name] = {**_options(name, settings.get(name)), **{c: m.get(c) for c in COLUMNS}}
    if not rows:
        raise ValueError(f"compare: none of {p.models} has been trained yet; run `kedro run` first.")
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    lines = ["# Model comparison", "",
             "Closed set: test queries against the train gallery. Open set: unseen categories, leave-one-out. "
             "Pair accuracy at the threshold chosen on training pairs.", "",
             "| model | study | " + " | ".join(OPTION_COLUMNS + COLUMNS) + " |",
             "|---|---|" + "---|" * len(OPTION_COLUMNS) + "---:|" * len(COLUMNS)]
    for name, row in table.iterrows():
        study = ", ".join(f"{k} {100 * v:.2f} %" for k, v in STUDY.get(name, {}).items()) or "-"
        cells = ["-" if v is None or (isinstance(v, float) and pd.isna(v)) else f"{v:.4f}" if isinstance(v, float)
                 else str(v) for v in row]
        lines.append(f"| {name} | {study} | " + " | ".join(cells) + " |")
    chart_cols = [c for c in p.chart_metrics if c in table and table[c].notna().any()]
    fig = plots.comparison_bar_chart(table[chart_cols].astype(float), chart_cols)
    flat = {f"{name}.{c}": v for name, row in table[chart_cols].iterrows() for c, v in row.items()}
    return table.reset_index(), "\n".join(lines) + "\n", fig, as_mlflow_metrics(flat)
