"""Project pipelines."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from partmatch.pipelines import compare, eda, evaluate, ingestion, preprocessing, training


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines by name; ``__default__`` runs them end to end."""
    pipelines = {
        "ingestion": ingestion.create_pipeline(),
        "preprocessing": preprocessing.create_pipeline(),
        "eda": eda.create_pipeline(),
        **training.create_all_model_pipelines(),
        "compare": compare.create_pipeline(),
        "evaluate": evaluate.create_pipeline(),
    }
    pipelines["data"] = pipelines["ingestion"] + pipelines["preprocessing"]
    pipelines["models"] = sum((pipelines[name] for name in training.MODEL_PIPELINES), Pipeline([]))
    pipelines["__default__"] = pipelines["data"] + pipelines["eda"] + pipelines["models"] + pipelines["compare"]
    return pipelines
