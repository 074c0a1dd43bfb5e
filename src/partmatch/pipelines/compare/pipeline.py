"""Wiring of the compare pipeline."""

from kedro.pipeline import Node, Pipeline

from partmatch.config import MODEL_PIPELINES
from partmatch.pipelines import grouped

from .nodes import PARAMS_SUFFIX, compare_models


def create_pipeline(models: tuple[str, ...] = MODEL_PIPELINES, **kwargs) -> Pipeline:
    """Read the latest ``<model>.metrics`` of every model and write the comparison."""
    return grouped(Pipeline(
        [
            Node(compare_models, {"params": "params:compare", **{m: f"{m}.metrics" for m in models},
                                  **{f"{m}{PARAMS_SUFFIX}": f"params:{m}" for m in models}},
                 ["comparison_table", "comparison_markdown", "comparison_chart", "comparison_mlflow_metrics"],
                 name="compare_models"),
        ],
        tags=["compare"],
    ), "compare")
