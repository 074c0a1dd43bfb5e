"""Lineage of versioned datasets: inputs of one node derived from different versions refuse to meet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from partmatch.demo import generate_demo_catalogue
from partmatch.lineage import LineageError, content_digest, find_conflict


def _record(name, version, lineage, digest=None):
    return {"dataset": name, "version": version, "digest": digest, "lineage": lineage}


def test_find_conflict_names_both_inputs_their_versions_and_the_shared_ancestor():
    image_array = _record("image_array", "B", {"image_index": {"version": "B", "digest": "x"}})
    split_index = _record("split_index", "A", {"image_index": {"version": "A", "digest": "y"}})
    message = find_conflict({"image_array": image_array, "split_index": split_index})
    assert message == ("'image_array' (version B) was derived from image_index version B, but 'split_index' "
                       "(version A) from image_index version A: they come from different runs and do not belong "
                       "together")


def test_same_content_under_another_version_is_no_conflict_and_an_input_is_its_own_ancestor():
    a = _record("image_array", "B", {}, digest="same")
    b = _record("split_index", "A", {"image_array": {"version": "A", "digest": "same"}})
    assert find_conflict({"image_array": a, "split_index": b}) is None
    b["lineage"]["image_array"]["digest"] = "other"
    assert find_conflict({"image_array": a, "split_index": b}) == (
        "'split_index' (version A) was derived from image_array version A, but image_array version B was loaded: "
        "they come from different runs and do not belong together")


def test_content_digest_is_exact_for_arrays_frames_and_json():
    x = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert content_digest(x) == content_digest(x.copy())
    assert content_digest(x) != content_digest(x.reshape(4, 3))          # same bytes, other shape
    y = x.copy()
    y[2, 3] = 0
    assert content_digest(x) != content_digest(y)
    df = pd.DataFrame({"path": ["a", "b"], "label": ["p", "q"]})
    assert content_digest(df) == content_digest(df.copy())
    assert content_digest(df) != content_digest(df.iloc[::-1])
    assert content_digest({"b": 1, "a": [1, 2]}) == content_digest({"a": [1, 2], "b": 1})
    assert content_digest(object()) is None


def _versions(project: Path, relpath: str) -> list[str]:
    return sorted(p.name for p in (project / "data" / relpath).iterdir())


def _preprocess_only(project: Path, source: Path, image_size: int) -> None:
    """Only the preprocess_images node: new image_array / image_index versions, the split left as it was."""
    import mlflow
    from kedro.framework.session import KedroSession

    try:
        with KedroSession.create(project_path=project, runtime_params={
                "raw_source": str(source), "preprocessing": {"image_size": image_size}}) as session:
            session.run(pipeline_names=["preprocessing"], node_names=["preprocessing.preprocess_images"])
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()


@pytest.mark.slow
def test_training_refuses_an_image_array_from_another_run_than_its_split_index(kedro_project, tmp_path):
    source = tmp_path / "catalogue"
    generate_demo_catalogue(source, seed=5, size=48, scale=0.25)
    project = kedro_project.path
    kedro_project(["ingestion", "preprocessing"], raw_source=str(source), preprocessing={"image_size": 32})
    (first,) = _versions(project, "04_feature/image_array.npy")
    # preprocessing alone again, at another size: a new image_array / image_index, but split_index is still the
    # first run's
    _preprocess_only(project, source, 24)
    second = next(v for v in _versions(project, "04_feature/image_array.npy") if v != first)
    (split_version,) = _versions(project, "05_model_input/split_index.parquet")
    assert json.loads((project / "data/lineage/split_index" / f"{split_version}.json").read_text())[
        "lineage"]["image_array"]["version"] == first

    with pytest.raises(LineageError) as err:
        kedro_project(["siamese_contrastive"], raw_source=str(source),
                      siamese_contrastive={"epochs": 1})
    assert str(err.value).startswith(
        f"Node 'siamese_contrastive.train_model': 'split_index' (version {split_version}) was derived from "
        f"image_array version {first}, but image_array version {second} was loaded: they come from different runs")
    assert "--load-versions" in str(err.value)
    assert not (project / "data/06_models/siamese_contrastive").exists()   # nothing was trained

    # the same pixels saved again under a new version are the same content: no conflict
    _preprocess_only(project, source, 32)
    third = next(v for v in _versions(project, "04_feature/image_array.npy") if v not in (first, second))
    records = {name: json.loads((project / "data/lineage" / name / f"{v}.json").read_text())
               for name, v in (("image_array", third), ("split_index", split_version))}
    assert records["image_array"]["digest"] == records["split_index"]["lineage"]["image_array"]["digest"]
    assert find_conflict(records) is None


def test_content_digest_of_content_it_cannot_hash_is_none_not_an_error():
    circular: dict = {}
    circular["self"] = circular
    assert content_digest(pd.DataFrame({"cell": [[1, 2], [3]]})) is None
    assert content_digest(circular) is None


def test_a_record_is_written_only_for_a_version_that_was_saved(tmp_path):
    from types import SimpleNamespace

    from partmatch.lineage import LineageHook

    hook = LineageHook()
    hook.after_context_created(SimpleNamespace(project_path=tmp_path))

    class Catalog:
        def get(self, name):
            from kedro.io import Version

            from partmatch.datasets import NpyDataset
            return NpyDataset(filepath=str(tmp_path / f"{name}.npy"), version=Version(None, "V1"))

    node = SimpleNamespace(name="n", inputs=[], outputs=["saved", "failed"])
    hook.after_node_run(node, Catalog(), {"saved": np.zeros(3), "failed": np.ones(3)})
    assert not (tmp_path / "data/lineage").exists()          # Kedro saves after this hook: nothing yet
    hook.after_dataset_saved("saved")
    record = json.loads((tmp_path / "data/lineage/saved/V1.json").read_text())
    assert record["lineage"]["failed"]["version"] == "V1" and record["digest"] == content_digest(np.zeros(3))
    hook.on_node_error(node)                                  # saving 'failed' raised: no record for it
    hook.after_dataset_saved("failed")
    assert not (tmp_path / "data/lineage/failed").exists()
