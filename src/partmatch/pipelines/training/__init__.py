"""The modular training/evaluation pipeline, reused under one Kedro namespace per model."""

from partmatch.config import MODEL_PIPELINES

from .pipeline import create_all_model_pipelines, create_model_pipeline, create_pipeline

__all__ = ["MODEL_PIPELINES", "create_all_model_pipelines", "create_model_pipeline", "create_pipeline"]
