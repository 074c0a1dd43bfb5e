"""Catalogue search with a trained model: index, identify photos, add / remove part lines, open-set rejection."""

from .pipeline import (
    create_add_pipeline,
    create_demo_pipeline,
    create_eval_pipeline,
    create_index_pipeline,
    create_pipelines,
    create_remove_pipeline,
    create_search_pipeline,
)

__all__ = ["create_add_pipeline", "create_demo_pipeline", "create_eval_pipeline", "create_index_pipeline",
           "create_pipelines", "create_remove_pipeline", "create_search_pipeline"]
