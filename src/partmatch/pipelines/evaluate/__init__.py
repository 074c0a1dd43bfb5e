"""Score an already trained model on another image source, every category unseen."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
