"""Project pipelines."""

from __future__ import annotations

from kedro.pipeline import Pipeline
from kedro_mlflow.pipeline import pipeline_ml_factory

from partmatch import serving
from partmatch.pipelines import compare, eda, evaluate, ingestion, preprocessing, search, training
from partmatch.pipelines import serving as serving_pipeline


def served_model_pipeline(model: str, training_pipeline: Pipeline) -> Pipeline:
    """``training_pipeline`` that ends with its identification model logged in the MLflow run (kedro-mlflow).

    Only a run of this pipeline ALONE logs it (``kedro run --pipeline=<model>``): kedro-mlflow's PipelineML
    becomes a plain Pipeline when added to another one (``__default__``, ``models``, ``--pipelines a,b``).
    The model's own child run gets the same model in every case (partmatch.hooks.ModelRunsHook).
    """
    return pipeline_ml_factory(training=training_pipeline, inference=serving_pipeline.create_pipeline(model),
                               input_name=serving.input_name(model), log_model_kwargs=serving.log_model_kwargs(model))


def register_pipelines() -> dict[str, Pipeline]:
    """Register the project's pipelines by name; ``__default__`` runs them end to end."""
    model_pipelines = training.create_all_model_pipelines()
    pipelines = {
        "ingestion": ingestion.create_pipeline(),
        "preprocessing": preprocessing.create_pipeline(),
        "eda": eda.create_pipeline(),
        **{name: served_model_pipeline(name, p) for name, p in model_pipelines.items()},
        "compare": compare.create_pipeline(),
        "evaluate": evaluate.create_pipeline(),
        **search.create_pipelines(),  # search_index, search, search_add, search_remove, search_eval
    }
    pipelines["data"] = pipelines["ingestion"] + pipelines["preprocessing"]
    # Summed from the plain model pipelines: a sum of PipelineML objects is a plain Pipeline anyway.
    pipelines["models"] = sum(model_pipelines.values(), Pipeline([]))
    # The default run ends with the demo catalogue indexed and searched: the search_index + search nodes wired to
    # the recommended model's outputs of the same run, so they wait for that model's training.
    pipelines["__default__"] = (pipelines["data"] + pipelines["eda"] + pipelines["models"] + pipelines["compare"]
                                + search.create_demo_pipeline())
    return pipelines
