"""Compare every trained model: the study's Table 5.1 extended with retrieval metrics."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
