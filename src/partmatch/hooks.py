"""Project hooks: parameter validation, one MLflow child run per model, the served model's pinned files."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from partmatch import config

logger = logging.getLogger(__name__)


class ParameterValidationHook:
    """Validate every parameter section as soon as the context exists, before any run or node starts.

    ``tryfirst``: ahead of kedro-mlflow's ``after_context_created`` (which contacts the tracking store), so a
    typo fails at once even when the tracking server is slow or down.
    """

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        """Fail fast with the key's dotted name when a parameter has a wrong type or an impossible value."""
        config.validate_all(context.params)
        logger.debug("Parameters validated: %s", sorted(config.SECTIONS))


class TrackingStoreError(RuntimeError):
    """The MLflow tracking store cannot be used (unreachable server)."""


#: Seconds to wait for the tracking server to answer before the run is refused.
TRACKING_PROBE_TIMEOUT_S = 5.0


def tracking_uri(context) -> str | None:
    """The tracking URI kedro-mlflow will use: ``server.mlflow_tracking_uri`` of mlflow.yml (conf/local over
    ``MLFLOW_TRACKING_URI`` over ``sqlite:///mlflow.db``, see conf/base/mlflow.yml), made absolute like
    kedro-mlflow does."""
    from kedro.config import MissingConfigException
    from kedro_mlflow.config.kedro_mlflow_config import _validate_uri

    patterns = context.config_loader.config_patterns
    patterns.setdefault("mlflow", ["mlflow*", "mlflow*/**", "**/mlflow*"])
    try:
        conf = context.config_loader["mlflow"] or {}
    except MissingConfigException:
        conf = {}
    uri = (conf.get("server") or {}).get("mlflow_tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    return _validate_uri(project_path=context.project_path, uri=uri) if uri else None


def check_tracking_server(uri: str, timeout: float = TRACKING_PROBE_TIMEOUT_S) -> None:
    """Raise TrackingStoreError naming ``uri`` when an http(s) tracking server does not answer in ``timeout`` s.

    Any HTTP answer (even 401/404) counts as reachable; only a refused connection, an unknown host or silence
    fails. Without this, MLflow retries for ~250 s before the first call fails.
    """
    if not uri.lower().startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with contextlib.closing(urllib.request.urlopen(url, timeout=timeout)):  # noqa: S310 - http(s) only
            return
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, socket.timeout, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingStoreError(
            f"MLflow tracking server {uri} is unreachable ({reason}). Start it (e.g. `mlflow server --host "
            f"127.0.0.1 --port PORT`) or point server.mlflow_tracking_uri in conf/local/mlflow.yml or the "
            f"MLFLOW_TRACKING_URI environment variable at a reachable one."
        ) from None


class TrackingStoreHook:
    """Before kedro-mlflow touches the tracking store (``tryfirst``, after the parameter check):

    - an http(s) tracking server that does not answer within seconds stops the run at once, naming the URI;
    - a SQLite store is created under a file lock, so two first runs at once on a fresh project do not race
      in MLflow's table set-up (``duplicate column name``, alembic ``Online migration expected to match one
      row``).
    """

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        import mlflow

        if mlflow.active_run() is not None:  # kedro-mlflow then keeps the active run's store
            return
        uri = tracking_uri(context)
        if uri is None:
            return
        check_tracking_server(uri)
        if uri.startswith("sqlite:///"):
            initialise_sqlite_store(uri)


def initialise_sqlite_store(uri: str) -> None:
    """Create MLflow's tables of the SQLite store at ``uri`` while holding an exclusive lock beside the file."""
    path = Path(uri[len("sqlite:///"):])
    if str(path) in ("", ":memory:"):
        return
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; MLflow's own set-up as before
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    from mlflow.tracking._tracking_service.utils import _get_store

    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _get_store(uri)  # creates and migrates the tables when missing (and caches the store per URI)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _model_of(node) -> str | None:
    """The model pipeline a node belongs to (its top namespace, when that is a model name)."""
    namespace = getattr(node, "namespace", None)
    top = namespace.split(".")[0] if namespace else None
    return top if top in config.MODEL_PIPELINES else None


def _short(dataset: str, model: str) -> str:
    return dataset[len(model) + 1:] if dataset.startswith(model + ".") else dataset


class ModelRunsHook:
    """Each model pipeline of a ``kedro run`` gets its own MLflow run, a child of kedro-mlflow's run.

    In the child run, with unprefixed names: the model's parameters (every field of ``params:<model>`` with
    its resolved value: ``lr``, ``loss``, ``backbone``, ``train_mode``...; other parameters a model node reads
    keep their section name, e.g. ``preprocessing.image_size``), its metrics (``<model>.metrics``:
    ``precision_at_1``, ``open_set_map_at_r``...; text values such as ``device`` as tags), the per-epoch
    history (``<model>.training_history``: ``train_loss``... by epoch), its figures and reports as artifacts,
    and, when the run ends, the trained model logged as the served identification model (MLflow Models,
    registrable). Tags: ``model``, ``raw_source``,
    ``mlflow.parentRunId``. The parent run keeps the data pipelines' metrics and the ``compare`` summary.

    The experiment is tagged ``mlflow.experimentKind: custom_model_development`` (unless it has a kind), so
    MLflow 3's UI opens it on the runs table instead of the GenAI overview.

    kedro-mlflow's hooks run before these (pluggy calls plugin hooks, registered later, first), so the parent
    run is open in ``before_pipeline_run``; nothing here changes MLflow's active run.
    """

    def __init__(self) -> None:
        self.runs = None

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        import mlflow
        from mlflow.entities import RunTag

        from partmatch.tracking import (
            SAVE_VERSION_TAG,
            ModelRuns,
            mark_dead_runs,
            mark_model_training_experiment,
            process_tags,
        )

        self.runs = None
        active = mlflow.active_run()
        if active is None:  # kedro-mlflow is off for this pipeline: nothing to nest under
            return
        client = mlflow.MlflowClient()
        mark_model_training_experiment(client, active.info.experiment_id)
        # who runs it (pid, host, process start) and the folder name of its dataset versions: a later run can then
        # end this one as KILLED if its process dies without closing it (SIGKILL, power loss)
        process = process_tags()
        client.log_batch(active.info.run_id, tags=[
            RunTag(k, v) for k, v in {**process, SAVE_VERSION_TAG: str(run_params.get("run_id") or "")}.items()])
        project = Path(run_params.get("project_path") or Path.cwd())
        try:
            mark_dead_runs(client, active.info.experiment_id, project / "data", active.info.run_id, logger)
        except Exception as exc:  # noqa: BLE001 - tidying other runs' records never stops this run
            logger.warning("Could not check for killed MLflow runs (%s); this run goes on.", exc)
        tags = {"raw_source": self._raw_source(run_params, catalog), **process}
        if run_params.get("pipeline_names"):
            tags["kedro_pipelines"] = ",".join(run_params["pipeline_names"])
        self.runs = ModelRuns(client, active.info.run_id, active.info.experiment_id, tags)

    @staticmethod
    def _raw_source(run_params: dict[str, Any], catalog) -> str:
        try:
            path = catalog["raw_images"]._describe()["path"]
        except Exception:  # noqa: BLE001 - a catalog without the raw source: fall back on the runtime parameter
            path = (run_params.get("runtime_params") or {}).get("raw_source", "")
        return str(Path(path).resolve()) if path else "unknown"

    @hook_impl
    def before_node_run(self, node, inputs: dict[str, Any]) -> None:
        model = _model_of(node)
        if self.runs is None or model is None:
            return
        params = {}
        for name, value in inputs.items():
            if name == f"params:{model}" and isinstance(value, dict):
                # every field with its resolved value, so all models' runs have the same columns to compare
                parsed = config.parse(model, value)
                params.update(parsed.model_dump())
                if hasattr(parsed, "loss_name"):  # the loss in a word; its parts and sampler as loss_spec.* / sampler.*
                    params["loss_spec"] = {f"part{i}": part for i, part in enumerate(params["loss"]["parts"])}
                    params["loss"] = parsed.loss_name
            elif name.startswith("params:"):
                params[name[len("params:"):]] = value
        self.runs.run_id(model)
        if params:
            self.runs.log_params(model, params)

    @hook_impl
    def after_node_run(self, node, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        model = _model_of(node)
        if self.runs is None or model is None:
            return
        for name, value in outputs.items():
            short = _short(name, model)
            if short == "metrics" and isinstance(value, dict):
                self.runs.log_metrics(model, value)
            elif short == "training_history" and hasattr(value, "columns"):
                self.runs.log_history(model, value)
            self.runs.log_output(model, short, value)

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if self.runs is None:
            return
        from partmatch import serving

        status = "FAILED"
        try:
            for model, run_id in self.runs.run_ids.items():
                if not {f"{model}.{serving.MODEL_FILE}", f"{model}.{serving.INDEX_FILE}"} <= pipeline.all_outputs():
                    continue  # this run did not train the model (e.g. only its evaluation was re-run)
                info = serving.log_identification_model(model, catalog, run_id)
                logger.info("Model '%s' logged in its MLflow run %s: %s", model, run_id, info.model_uri)
            status = "FINISHED"
        finally:
            self.runs.finish(status)
            self.runs = None

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline, catalog) -> None:
        if self.runs is not None:
            self.runs.finish("FAILED")
            self.runs = None


class AtomicSavesHook:
    """Every file dataset of the run writes each version under a temporary name and renames it when complete
    (:func:`partmatch.datasets.make_saves_atomic`): a save cut short (killed process, full disk, read-only
    folder) never becomes the latest version a later run loads, and a failed save names the dataset and path.

    kedro-datasets' CSV, Parquet, JSON, text and matplotlib datasets write in place; the project's own binary
    datasets (arrays, models, indexes) are atomic by themselves. The datasets are taken from the run's catalog
    before the runner starts, so the runner saves through these same instances.

    And a dataset this run saved is loaded by this run in the version it saved: Kedro loads the newest version on
    disk, which, with two ``kedro run`` at once on one project, can be the other run's (found by running two at
    once: one run's threshold calibration loaded the other run's embeddings).
    """

    def __init__(self) -> None:
        self.datasets: dict[str, Any] = {}

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        from partmatch.datasets import make_saves_atomic

        self.datasets = {}
        for name in sorted(pipeline.datasets()):
            if name.startswith("params:") or name == "parameters":
                continue
            try:
                dataset = catalog.get(name)
            except Exception as exc:  # noqa: BLE001 - a name the catalog cannot build is the runner's to report
                logger.debug("Dataset %s not materialised for atomic saves: %s", name, exc)
                dataset = None
            if dataset is not None:
                make_saves_atomic(dataset, name)
                self.datasets[name] = dataset

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        from kedro.io.core import AbstractVersionedDataset, Version

        dataset = self.datasets.get(dataset_name)
        version = getattr(dataset, "_version", None)
        if not isinstance(dataset, AbstractVersionedDataset) or not isinstance(version, Version):
            return
        saved = dataset.resolve_save_version()
        if saved and version.load is None:  # --load-versions given by the user stays as it is
            dataset._version = Version(saved, version.save)
            dataset._clear_version_cache()


class ServedModelHook:
    """Before kedro-mlflow logs a ``pipeline_ml_factory`` model, pin its inputs to this run's file versions.

    kedro-mlflow copies each inference input's ``_filepath`` into the model; for a versioned dataset that is the
    folder of every version on disk. ``tryfirst`` makes this run ahead of kedro-mlflow's ``after_pipeline_run``.
    """

    @hook_impl(tryfirst=True)
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        from kedro_mlflow.pipeline.pipeline_ml import PipelineML

        from partmatch import serving

        if isinstance(pipeline, PipelineML):
            serving.pin_served_inputs(set(pipeline.inference.inputs()), catalog)


class DecodingPoolHook:
    """Stops ingestion's decoding workers when a run ends or fails: ``scan_and_decode`` leaves them up for the
    run's ``preprocess_images``, which is not always part of the run (``--pipeline ingestion``, ``--to-nodes``, an
    error in between); in a notebook or test process they would otherwise outlive it, forked from old state."""

    @hook_impl
    def after_pipeline_run(self) -> None:
        from partmatch.pipelines.ingestion.decoding import shutdown_pool

        shutdown_pool()

    @hook_impl
    def on_pipeline_error(self) -> None:
        from partmatch.pipelines.ingestion.decoding import shutdown_pool

        shutdown_pool()
