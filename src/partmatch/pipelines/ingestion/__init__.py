"""Ingestion & cleaning: manifest, quarantine, duplicates, rare categories, excluded keyword families."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
