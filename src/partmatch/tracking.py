"""MLflow helpers: metric shapes for kedro-mlflow datasets, and one child MLflow run per trained model.

Why child runs: kedro-mlflow opens ONE run per ``kedro run``; logging every model into it gives prefixed names
(``siamese_triplet.precision_at_1``) that the runs table cannot put side by side. :class:`ModelRuns` gives each
model pipeline its own run, a child of the ``kedro run``'s run (tag ``mlflow.parentRunId``), with unprefixed
metric and parameter names, tagged with the model and the data source. It writes through ``MlflowClient`` with
explicit run ids only, so the run kedro-mlflow keeps active is never switched.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

import pandas as pd

MAX_PARAM_LENGTH = 6000
MAX_TABLE_ROWS = 100_000
# MLflow 3's UI opens an experiment on the GenAI overview unless this experiment tag says it holds model
# training runs; with it, the experiment opens on the runs table (as #/experiments/<id>/runs does).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def mark_model_training_experiment(client, experiment_id: str) -> None:
    """Tag the experiment as model training for MLflow's UI, unless someone already chose its kind."""
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


def as_mlflow_metrics(values: Mapping[str, float], step: int = 0) -> dict[str, dict[str, float]]:
    """Turn ``{name: number}`` into kedro-mlflow's ``{name: {"value": v, "step": s}}``, skipping non-numbers."""
    out = {}
    for key, value in values.items():
        if _is_number(value):
            out[key] = {"value": float(value), "step": step}
    return out


def _is_number(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, int | float)
            and math.isfinite(float(value)))


def flatten(values: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out


class ModelRuns:
    """The child runs of one ``kedro run``: created lazily, one per model name, written by run id."""

    def __init__(self, client, parent_run_id: str, experiment_id: str, tags: Mapping[str, str]) -> None:
        self.client = client
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.tags = dict(tags)
        self.run_ids: dict[str, str] = {}
        self._params: dict[str, set[str]] = {}

    def run_id(self, model: str) -> str:
        """The child run of ``model``, created on first use."""
        if model not in self.run_ids:
            run = self.client.create_run(
                self.experiment_id, run_name=model,
                tags={**self.tags, "mlflow.parentRunId": self.parent_run_id, "model": model})
            self.run_ids[model] = run.info.run_id
            self._params[model] = set()
        return self.run_ids[model]

    def log_params(self, model: str, params: Mapping[str, Any]) -> None:
        """Log flattened params once each (a key already logged for this model is left as it is)."""
        from mlflow.entities import Param

        run_id = self.run_id(model)
        new = {k: v for k, v in flatten(params).items() if k not in self._params[model]}
        if new:
            self.client.log_batch(run_id, params=[Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in new.items()])
            self._params[model].update(new)

    def log_metrics(self, model: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log the numeric values of a flat dict as metrics; strings (e.g. the ``device`` used) become tags."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        numbers = [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
        texts = [RunTag(k, v[:MAX_PARAM_LENGTH]) for k, v in metrics.items() if isinstance(v, str)]
        if numbers or texts:
            self.client.log_batch(self.run_id(model), metrics=numbers, tags=texts)

    def log_history(self, model: str, history: pd.DataFrame, step_column: str = "epoch") -> None:
        """Log every numeric column of a per-epoch table as a metric history (step = epoch)."""
        from mlflow.entities import Metric

        if step_column not in history.columns:
            return
        now = int(time.time() * 1000)
        points = [Metric(col, float(value), now, int(step))
                  for col in history.columns if col != step_column
                  for step, value in zip(history[step_column], history[col], strict=True) if _is_number(value)]
        for start in range(0, len(points), 1000):  # MLflow accepts at most 1000 metrics per batch
            self.client.log_batch(self.run_id(model), metrics=points[start:start + 1000])

    def log_output(self, model: str, name: str, value: Any) -> bool:
        """Log a figure (PNG), a table (CSV), a JSON-able dict or a text as an artifact of the model's run."""
        from matplotlib.figure import Figure

        run_id = self.run_id(model)
        if isinstance(value, Figure):
            self.client.log_figure(run_id, value, f"{name}.png")
        elif isinstance(value, pd.DataFrame) and len(value) <= MAX_TABLE_ROWS:
            self.client.log_text(run_id, value.to_csv(index=False), f"{name}.csv")
        elif isinstance(value, dict):
            try:
                text = json.dumps(value, indent=2, default=_no_default)
            except TypeError:
                return False  # e.g. the model bundle (tensors): the logged MLflow model holds it
            self.client.log_text(run_id, text, f"{name}.json")
        elif isinstance(value, str):
            self.client.log_text(run_id, value, f"{name}.md" if value.lstrip().startswith("#") else f"{name}.txt")
        else:
            return False
        return True

    def finish(self, status: str = "FINISHED") -> None:
        """Mark every child run terminated (FINISHED or FAILED)."""
        for run_id in self.run_ids.values():
            self.client.set_terminated(run_id, status)


def _no_default(value: Any) -> Any:
    raise TypeError(f"not JSON: {type(value).__name__}")
