"""EDA: category counts, top-N bar chart, PCA of the top categories, sample grids."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
