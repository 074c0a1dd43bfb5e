"""Project pipelines."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from partmatch.pipelines import eda, ingestion, preprocessing


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines by name; ``__default__`` runs them end to end."""
    pipelines = {
        "ingestion": ingestion.create_pipeline(),
        "preprocessing": preprocessing.create_pipeline(),
        "eda": eda.create_pipeline(),
    }
    pipelines["data"] = pipelines["ingestion"] + pipelines["preprocessing"]
    pipelines["__default__"] = pipelines["data"] + pipelines["eda"]
    return pipelines
