"""The served model: one MLflow pyfunc = the `serving` inference pipeline + the files it reads.

A model pipeline (``kedro run --pipeline=<model>``) is registered with kedro-mlflow's ``pipeline_ml_factory``:
at the end of the run kedro-mlflow wraps the inference pipeline of :mod:`partmatch.pipelines.serving` in a
``KedroPipelineModel`` and logs it in the run, with the training outputs it reads (``<model>.model``,
``<model>.gallery_index``) as artifacts. :class:`partmatch.hooks.ModelRunsHook` logs the same model in each
model's own MLflow run, through :func:`log_identification_model`. What this module adds to kedro-mlflow:

* :func:`signature` — the request contract: a binary ``image`` column (MLflow base64-decodes it), an optional
  ``name`` column, and the per-request parameters ``top_k`` / ``threshold`` with their defaults
  (:data:`REQUEST_PARAMS`, the single source of those defaults; no parameters YAML holds them).
* :class:`ServedFile` — what the served model's catalog holds for ``<model>.model`` and
  ``<model>.gallery_index``. kedro-mlflow copies a dataset's ``_filepath`` into the model; for a versioned
  dataset that is the folder of *every* version ever written, so :func:`pin_served_inputs` swaps in a
  ``ServedFile`` on the exact version this run used. Loaded once per server process, it hands the nodes a
  ready :class:`~partmatch.ml.inference.Embedder` / :class:`~partmatch.ml.retrieval.GalleryIndex` wrapped in
  :class:`Shared`, which ``KedroPipelineModel``'s per-request ``deepcopy`` of its catalog does not copy (the
  network is built once, the index is never duplicated per request).
* :class:`BadRequest` — an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``: MLflow's scoring server
  answers it with HTTP 400 and its message (any other exception becomes a 400 with a generic message).
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io import AbstractDataset, DataCatalog, MemoryDataset
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
NAME_COLUMN = "name"
#: Per-request parameters and their defaults. A negative ``threshold`` (the default) means the model's calibrated
#: threshold (not None: kedro-mlflow stores each parameter in a Kedro dataset, which refuses None).
CALIBRATED = -1.0
REQUEST_PARAMS: dict[str, tuple[str, Any]] = {"top_k": ("long", 5), "threshold": ("double", CALIBRATED)}
MODEL_FILE = "model"            # <model>.model -> an Embedder
INDEX_FILE = "gallery_index"    # <model>.gallery_index -> a GalleryIndex
# What the served model needs installed (partmatch itself too: serve with --env-manager local in its venv).
REQUIREMENTS = ("torch", "torchvision", "timm", "kedro", "kedro-mlflow", "kedro-datasets", "mlflow", "faiss-cpu",
                "numpy", "pandas", "pillow", "pydantic")


class BadRequest(MlflowException):
    """A request the served model cannot answer: MLflow's scoring server returns HTTP 400 with this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class Shared:
    """A value that ``KedroPipelineModel.predict``'s deepcopy of its catalog hands over as is (not copied)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict) -> Shared:
        return self

    def __repr__(self) -> str:
        return f"Shared({type(self.value).__name__})"


def unwrap(value: Any) -> Any:
    """The value inside a :class:`Shared`, or ``value`` itself."""
    return value.value if isinstance(value, Shared) else value


class ServedFile(AbstractDataset[Any, None]):
    """One file of the served model, read-only: ``kind`` "model" loads an Embedder, "gallery_index" a GalleryIndex.

    kedro-mlflow reads ``_filepath`` when it logs the model and rewrites it to the downloaded copy when the model
    is loaded; the loaded object is wrapped in :class:`Shared` so each request reuses it.
    """

    def __init__(self, *, filepath: str | PurePosixPath, kind: str) -> None:
        if kind not in (MODEL_FILE, INDEX_FILE):
            raise ValueError(f"ServedFile kind must be '{MODEL_FILE}' or '{INDEX_FILE}', got '{kind}'")
        self._filepath = PurePosixPath(Path(filepath).as_posix())
        self._kind = kind

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "kind": self._kind}

    def load(self) -> Shared:
        path = Path(str(self._filepath))
        if self._kind == MODEL_FILE:
            from partmatch.ml.inference import Embedder

            return Shared(Embedder.from_file(path))
        from partmatch.ml.retrieval import GalleryIndex

        return Shared(GalleryIndex.load(path))

    def save(self, data: Any) -> None:
        raise NotImplementedError(f"ServedFile {self._filepath} is read-only")

    def _exists(self) -> bool:
        return Path(str(self._filepath)).is_file()


def signature() -> ModelSignature:
    """Input: ``image`` (binary, base64 in JSON) and optional ``name``; params ``top_k`` and ``threshold``."""
    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN), ColSpec("string", NAME_COLUMN, required=False)]),
        params=ParamSchema([ParamSpec(name, dtype, default) for name, (dtype, default) in REQUEST_PARAMS.items()]),
    )


def pip_requirements() -> list[str]:
    """The installed versions of what the served model imports (no slow inference of requirements by MLflow)."""
    out = []
    for dist in REQUIREMENTS:
        try:
            out.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(dist)
    return out


def log_model_kwargs(model: str) -> dict[str, Any]:
    """``mlflow.pyfunc.log_model`` arguments of the served model of ``model`` (MLflow 3: ``name``)."""
    return {"name": model, "signature": signature(), "pip_requirements": pip_requirements()}


def input_name(model: str) -> str:
    """The dataset a request fills: ``<model>.query_images``."""
    return f"{model}.query_images"


def _resolved_file(dataset: AbstractDataset) -> Path:
    """The file a (possibly versioned) file dataset loads now: the exact version, not the versions folder."""
    if isinstance(dataset, ServedFile):
        return Path(str(dataset._filepath))
    path = None
    version = getattr(dataset, "_version", None)
    if version is not None and version.save is not None:
        # the version this run saved (the latest on disk may be another, concurrent run's)
        saved = Path(str(dataset._get_versioned_path(version.save)))
        path = saved if saved.is_file() else None
    if path is None:
        get_load_path = getattr(dataset, "_get_load_path", None)
        path = get_load_path() if callable(get_load_path) else getattr(dataset, "_filepath", None)
    if path is None:
        raise ValueError(f"{type(dataset).__name__} has no file path: the served model needs file datasets")
    path = Path(str(path)).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"served model input {path} does not exist: run the model pipeline first")
    return path


def served_catalog(model: str, catalog: DataCatalog) -> DataCatalog:
    """A catalog with what the served model of ``model`` reads, pinned to the versions ``catalog`` loads now."""
    served = DataCatalog()
    served[input_name(model)] = MemoryDataset()
    served[f"{model}.{MODEL_FILE}"] = ServedFile(filepath=_resolved_file(catalog[f"{model}.{MODEL_FILE}"]),
                                                 kind=MODEL_FILE)
    served[f"{model}.{INDEX_FILE}"] = ServedFile(filepath=_resolved_file(catalog[f"{model}.{INDEX_FILE}"]),
                                                 kind=INDEX_FILE)
    for name, (_, default) in REQUEST_PARAMS.items():
        served[f"params:{name}"] = MemoryDataset(default)
    return served


class _NoReplacingWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Replacing dataset")


def pin_served_inputs(inference_inputs: set[str], catalog: DataCatalog) -> None:
    """Before kedro-mlflow logs a PipelineML: pin its file inputs to one version and give it the request params."""
    replaced = {}
    for name in inference_inputs:
        if name.endswith((f".{MODEL_FILE}", f".{INDEX_FILE}")):
            kind = MODEL_FILE if name.endswith(f".{MODEL_FILE}") else INDEX_FILE
            replaced[name] = ServedFile(filepath=_resolved_file(catalog[name]), kind=kind)
            logger.info("Served model: '%s' is %s", name, replaced[name]._filepath)
        elif name.startswith("params:") and name[len("params:"):] in REQUEST_PARAMS:
            replaced[name] = MemoryDataset(REQUEST_PARAMS[name[len("params:"):]][1])
    quiet = _NoReplacingWarning()  # Kedro warns on every replaced entry; these replacements are the point
    catalog_logger = logging.getLogger("kedro.io.data_catalog")
    catalog_logger.addFilter(quiet)
    try:
        for name, dataset in replaced.items():
            catalog[name] = dataset
    finally:
        catalog_logger.removeFilter(quiet)


def log_identification_model(model: str, catalog: DataCatalog, run_id: str):
    """Log the served model of ``model`` (the ``serving`` inference pipeline) in run ``run_id``; its ModelInfo."""
    import tempfile

    import mlflow
    from kedro_mlflow.mlflow import KedroPipelineModel

    from partmatch.pipelines import serving as serving_pipeline

    served = served_catalog(model, catalog)
    kpm = KedroPipelineModel(pipeline=serving_pipeline.create_pipeline(model), catalog=served,
                             input_name=input_name(model))
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    # Created here so that it belongs to the run's experiment: Model.log(run_id=...) of a run that is not the
    # active one would file it under the current experiment (Default when none is set).
    logged = client.create_logged_model(experiment_id=run.info.experiment_id, name=model, source_run_id=run_id,
                                        params={k: v for k, v in run.data.params.items()})
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = kpm.extract_pipeline_artifacts(parameters_saving_folder=Path(tmp))
        return mlflow.models.Model.log(artifact_path=None, flavor=mlflow.pyfunc, run_id=run_id,
                                       model_id=logged.model_id, python_model=kpm, artifacts=artifacts,
                                       **log_model_kwargs(model))


def latest_model_uri(model: str, tracking_uri: str | None = None, experiment: str = "partmatch") -> str:
    """``models:/<id>`` of the newest identification model logged for ``model`` (what ``mlflow models serve -m``
    takes). ``tracking_uri``: default ``MLFLOW_TRACKING_URI``, else the project's ``sqlite:///mlflow.db``."""
    import os

    import mlflow

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    found = (client.search_logged_models(experiment_ids=[exp.experiment_id], filter_string=f"name = '{model}'",
                                         order_by=[{"field_name": "creation_timestamp", "ascending": False}],
                                         max_results=50) if exp is not None else [])
    # READY only: a model whose logging failed half-way stays PENDING and cannot be served
    found = [m for m in found if str(getattr(m.status, "value", m.status)) == "READY"]
    if not found:
        raise LookupError(f"no logged model '{model}' in experiment '{experiment}' of {uri}: train it first with "
                          f"`kedro run --pipeline={model}` (run from the project folder, or set MLFLOW_TRACKING_URI)")
    return f"models:/{found[0].model_id}"


if __name__ == "__main__":  # python -m partmatch.serving MODEL -> the URI to serve
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m partmatch.serving MODEL   (prints models:/<id> of its newest logged model)")
    try:
        print(latest_model_uri(sys.argv[1]))
    except LookupError as err:
        sys.exit(str(err))
