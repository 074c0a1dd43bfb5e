"""The project's pipelines, one package each (``nodes.py`` + ``pipeline.py``)."""

from kedro.pipeline import Pipeline


def grouped(pipeline: Pipeline, namespace: str) -> Pipeline:
    """``pipeline`` under a Kedro namespace that renames only its nodes (``<namespace>.<node>``): every dataset and
    parameter keeps its name. kedro-viz then collapses the pipeline into one group, and lists each of its
    parameters once (root-level parameters appear twice in kedro-viz 12, kedro-org/kedro-viz#2080)."""
    params = {name for name in pipeline.inputs() if name.startswith("params:")}
    return Pipeline(pipeline, namespace=namespace, inputs=pipeline.inputs() - params,
                    outputs=pipeline.all_outputs(), parameters=params)
