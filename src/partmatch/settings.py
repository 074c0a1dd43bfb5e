"""Project settings (Kedro defaults unless stated)."""

from partmatch.hooks import ModelRunsHook, ParameterValidationHook, ServedModelHook

# Parameters are validated when the context is created: before kedro-mlflow opens a run, before any node.
# ModelRunsHook: one MLflow child run per model pipeline (unprefixed metrics/params, figures, logged model).
# ServedModelHook: pins the served model's files to this run's versions before kedro-mlflow logs it.
HOOKS = (ParameterValidationHook(), ModelRunsHook(), ServedModelHook())

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
}
