"""Wiring of the served model: decode -> preprocess -> embed -> search -> vote/reject, one namespace per model."""

from kedro.pipeline import Node, Pipeline

from .nodes import (
    embed_photos,
    identify_photos,
    preprocess_photos,
    read_request,
    search_catalogue,
)


def create_template() -> Pipeline:
    """The inference template; ``query_images`` is the request, ``model`` / ``gallery_index`` come from training."""
    return Pipeline(
        [
            Node(read_request, "query_images", "query_table", name="read_request"),
            Node(preprocess_photos, ["query_table", "model"], ["query_pixels", "query_errors"],
                 name="preprocess_photos"),
            Node(embed_photos, ["query_pixels", "model"], "query_embeddings", name="embed_photos"),
            Node(search_catalogue, ["query_embeddings", "gallery_index", "params:top_k"], "query_neighbours",
                 name="search_catalogue"),
            Node(identify_photos, ["query_table", "query_errors", "query_neighbours", "model", "params:top_k",
                                   "params:threshold"], "identifications", name="identify_photos"),
        ]
    )


def create_pipeline(model: str) -> Pipeline:
    """The inference pipeline of ``model``: reads ``<model>.query_images``, ``<model>.model``,
    ``<model>.gallery_index`` and the per-request ``params:top_k`` / ``params:threshold``; writes
    ``<model>.identifications`` (one row per photo)."""
    return Pipeline(create_template(), namespace=model, parameters={"params:top_k", "params:threshold"},
                    tags=["serving", model])
