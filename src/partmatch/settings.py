"""Project settings (Kedro defaults unless stated)."""

from omegaconf.resolvers import oc

from partmatch.hooks import (
    AtomicSavesHook,
    DecodingPoolHook,
    ModelRunsHook,
    ParameterValidationHook,
    ServedModelHook,
    TrackingStoreHook,
)
from partmatch.lineage import LineageHook

# Parameters are validated when the context is created: before kedro-mlflow opens a run, before any node.
# TrackingStoreHook then (both `tryfirst`; pluggy calls the later-registered first, hence this order) refuses an
# unreachable tracking server within seconds and creates a fresh SQLite store under a file lock.
# ModelRunsHook: one MLflow child run per model pipeline (unprefixed metrics/params, figures, logged model).
# ServedModelHook: pins the served model's files to this run's versions before kedro-mlflow logs it.
# AtomicSavesHook: every dataset version is written under a temporary name and renamed when complete.
# DecodingPoolHook: ingestion's decoding workers end with the run (also when it fails).
# LineageHook: a node whose versioned inputs were derived from different versions of a dataset does not run.
HOOKS = (TrackingStoreHook(), ParameterValidationHook(), ModelRunsHook(), ServedModelHook(), LineageHook(),
         AtomicSavesHook(), DecodingPoolHook())

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # ${oc.env:...} everywhere, not only in credentials: mlflow.yml reads MLFLOW_TRACKING_URI.
    "custom_resolvers": {"oc.env": oc.env},
}
