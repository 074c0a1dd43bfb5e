"""Preprocessing: decode once, grayscale, pad to square, resize, seeded splits with a class-disjoint open set."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
