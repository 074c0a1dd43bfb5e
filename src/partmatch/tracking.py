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
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
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


# ------------------------------------------------------------------------------ runs whose process is gone

#: Tags every ``kedro run``'s MLflow run (and its child runs) carries, so a later run can tell a dead run from a
#: live one: the process id, the host it runs on, the process's start time (tells a reused pid apart) and the
#: Kedro save version (the folder name of every dataset version the run writes).
PID_TAG = "partmatch.pid"
HOST_TAG = "partmatch.host"
PROCESS_START_TAG = "partmatch.process_start"
SAVE_VERSION_TAG = "partmatch.save_version"
LEFT_VERSIONS_TAG = "partmatch.left_versions"
MAX_TAG_LENGTH = 5000


def process_start(pid: int) -> str:
    """The process's start time in clock ticks after boot (Linux ``/proc``), else "" where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return ""
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    return fields[19] if len(fields) > 19 else ""


def process_tags(pid: int | None = None) -> dict[str, str]:
    """The tags naming this process: pid, host and start time."""
    pid = os.getpid() if pid is None else pid
    return {PID_TAG: str(pid), HOST_TAG: socket.gethostname(), PROCESS_START_TAG: process_start(pid)}


def process_alive(pid: int, started: str = "") -> bool:
    """Whether process ``pid`` of this host still runs and is the one that started at ``started`` (when known).
    A zombie (killed, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        if stat[stat.rfind(")") + 2:].split()[0] in ("Z", "X"):
            return False
    except (OSError, IndexError):
        pass
    now = process_start(pid)
    return not (started and now and now != started)


def run_is_dead(tags: Mapping[str, str], host: str | None = None) -> bool:
    """A run whose tags name a process of this host that is gone. Runs of another host, or without the tags
    (older runs, other tools), are never called dead: nothing here can tell."""
    pid = tags.get(PID_TAG, "")
    if not pid.isdigit() or tags.get(HOST_TAG) != (host or socket.gethostname()):
        return False
    return not process_alive(int(pid), tags.get(PROCESS_START_TAG, ""))


def versions_left(data_dir: str | os.PathLike, save_version: str) -> list[str]:
    """Every dataset version folder named ``save_version`` below ``data_dir``, after deleting the temporary
    files of saves the run did not finish (and the folders they leave empty): what the run really left."""
    from partmatch.datasets import remove_empty_folders
    from partmatch.tempfiles import parse_temp_name

    root = Path(data_dir)
    if not save_version or not root.is_dir():
        return []
    left = []
    for folder in sorted(p for p in root.rglob(save_version) if p.is_dir()):
        for file in list(folder.iterdir()):
            if file.is_file() and parse_temp_name(file.name) is not None:
                file.unlink(missing_ok=True)
        remove_empty_folders(str(folder), str(folder))
        if folder.exists():
            left.append(str(folder.relative_to(root.parent)))
    return left


def mark_dead_runs(client, experiment_id: str, data_dir: str | os.PathLike, current_run_id: str | None = None,
                   logger=None) -> dict[str, list[str]]:
    """End as KILLED every RUNNING run of the experiment whose process (on this host) is gone, tagging it with
    the dataset versions it left; return ``{run_id: versions}``. Live runs and other hosts' runs are untouched."""
    import mlflow.entities

    killed: dict[str, list[str]] = {}
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        if run.info.run_id == current_run_id or not run_is_dead(run.data.tags, host):
            continue
        left = versions_left(data_dir, run.data.tags.get(SAVE_VERSION_TAG, ""))
        if left:
            text = ", ".join(left)
            client.set_tag(run.info.run_id, LEFT_VERSIONS_TAG,
                           text if len(text) <= MAX_TAG_LENGTH else text[:MAX_TAG_LENGTH - 3] + "...")
        client.set_terminated(run.info.run_id, mlflow.entities.RunStatus.to_string(mlflow.entities.RunStatus.KILLED))
        killed[run.info.run_id] = left
        if logger is not None:
            logger.warning(
                "MLflow run %s ('%s', pid %s) was still RUNNING but its process is gone (killed): marked KILLED.%s",
                run.info.run_id, run.info.run_name, run.data.tags.get(PID_TAG),
                (" It left these dataset versions, complete but from a run that never finished (a later run loads "
                 "them as the latest; resume=true continues from them): " + ", ".join(left)) if left else "")
    return killed
