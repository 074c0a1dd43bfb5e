"""Project settings (Kedro defaults unless stated)."""

from partmatch.hooks import ParameterValidationHook

# Parameters are validated when the context is created: before kedro-mlflow opens a run, before any node.
HOOKS = (ParameterValidationHook(),)

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
}
