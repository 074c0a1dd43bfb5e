"""The served model's inference pipeline: photo bytes -> part name, confidence, top-K catalogue matches."""

from .pipeline import create_pipeline, create_template

__all__ = ["create_pipeline", "create_template"]
