"""Project-level contracts: metadata, registered pipelines, catalog versioning, the graph kedro-viz reads."""

import tomllib

import pytest
import yaml

from tests.conftest import PROJECT_ROOT

DATA_PIPELINES = {"ingestion", "preprocessing", "eda"}


def test_kedro_yml_agrees_with_pyproject():
    tool = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["kedro"]
    meta = yaml.safe_load((PROJECT_ROOT / ".kedro.yml").read_text())
    for key in ("package_name", "project_name", "kedro_init_version", "source_dir"):
        assert meta[key] == tool[key], key
    import kedro

    assert kedro.__version__.startswith(tool["kedro_init_version"].rsplit(".", 1)[0])


def test_top_level_layout_and_telemetry_off():
    for name in ("conf", "src", "data", "notebooks", "tests", "pyproject.toml", "README.md", ".kedro.yml"):
        assert (PROJECT_ROOT / name).exists(), name
    assert yaml.safe_load((PROJECT_ROOT / ".telemetry").read_text()) == {"consent": False}
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "make run" in readme[:1500] and "make test" in readme[:1500]



def test_ci_runs_every_test_and_make_test_only_the_quick_ones():
    """CI (.ci/run) runs the whole suite, slow tests included; `make test` leaves out only the slow mark."""
    ci = [line for line in (PROJECT_ROOT / ".ci" / "run").read_text().splitlines() if line and line[0] != "#"]
    assert ci[-1] == "make test-all"
    recipes = {}
    target = None
    for line in (PROJECT_ROOT / "Makefile").read_text().splitlines():
        if line and not line[0].isspace() and ":" in line and not line.startswith((".", "#")) and "=" not in line:
            target = line.split(":", 1)[0]
        elif line.startswith("\t") and target:
            recipes.setdefault(target, []).append(line.strip())
    assert recipes["test"] == ['$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)']
    assert recipes["test-slow"] == ["$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)"]
    assert recipes["test-all"] == ["$(BIN)/python -m pytest $(PYTEST_ARGS)"]
    opts = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert opts["timeout"] == 120 and "--strict-markers" in opts["addopts"]


def test_mlflow_config_uses_sqlite_and_experiment():
    cfg = yaml.safe_load((PROJECT_ROOT / "conf" / "base" / "mlflow.yml").read_text())
    # MLFLOW_TRACKING_URI when set, else the project's SQLite file (tests/test_tracking_faults.py resolves it)
    assert cfg["server"]["mlflow_tracking_uri"] == "${oc.env:MLFLOW_TRACKING_URI,'sqlite:///mlflow.db'}"
    assert cfg["tracking"]["experiment"]["name"] == "partmatch"


@pytest.fixture(scope="module")
def viz_data():
    from kedro_viz.integrations.kedro.data_loader import load_data

    catalog, pipelines, _ = load_data(PROJECT_ROOT)
    return catalog, pipelines


def test_pipelines_registered_under_their_names(viz_data):
    _, pipelines = viz_data
    assert DATA_PIPELINES <= set(pipelines)
    default_nodes = {n.name for n in pipelines["__default__"].nodes}
    assert {"cnn", "siamese_contrastive", "siamese_triplet", "compare", "evaluate"} <= set(pipelines)
    for name in DATA_PIPELINES | {"cnn", "siamese_contrastive", "siamese_triplet", "compare"}:
        assert {n.name for n in pipelines[name].nodes} <= default_nodes


def test_graph_is_complete_and_layered(viz_data):
    """Every dataset a pipeline reads is produced by a node of the default pipeline or declared in the catalog."""
    catalog, pipelines = viz_data
    conf = catalog_entries()
    produced = set(pipelines["__default__"].all_outputs())
    for name, pipe in pipelines.items():
        for ds in pipe.all_inputs() | pipe.all_outputs():
            if ds.startswith("params:") or ds == "parameters":
                continue
            declared = ds in conf or catalog.config_resolver.match_dataset_pattern(ds) is not None
            assert declared or ds in produced, f"{name}: dataset '{ds}' is neither declared nor produced"
            assert declared, f"{name}: dataset '{ds}' matches no catalog entry or factory (it would be a MemoryDataset)"
    for ds, entry in conf.items():
        assert entry.get("metadata", {}).get("kedro-viz", {}).get("layer"), f"{ds} has no kedro-viz layer"


def catalog_entries() -> dict:
    """Every entry of conf/base/catalog*.yml (Kedro reads them all)."""
    entries: dict = {}
    for path in sorted((PROJECT_ROOT / "conf" / "base").glob("catalog*.yml")):
        entries.update({k: v for k, v in yaml.safe_load(path.read_text()).items() if not k.startswith("_")})
    return entries


def test_every_file_artifact_is_versioned():
    conf = catalog_entries()
    for name, entry in conf.items():
        inner = entry.get("dataset", entry)
        if "filepath" in inner:
            assert inner.get("versioned") is True, f"{name} is not versioned"
            layer = inner["filepath"].split("/")[1]
            assert layer[:2].isdigit() and layer[2] == "_", f"{name} is outside the data layers"


def test_invalid_parameter_fails_before_any_work(kedro_project, photo_folder):
    from partmatch.config import ParameterError

    with pytest.raises(ParameterError, match=r"'preprocessing\.image_size'.*got -5"):
        kedro_project("ingestion", raw_source=str(photo_folder), **{"preprocessing": {"image_size": -5}})
    assert not list((kedro_project.path / "data").rglob("*.parquet"))   # nothing was written
