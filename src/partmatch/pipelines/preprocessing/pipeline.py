"""Wiring of the preprocessing pipeline."""

from kedro.pipeline import Node, Pipeline

from partmatch.pipelines import grouped

from .nodes import preprocess_images, split_images


def create_pipeline(**kwargs) -> Pipeline:
    """Select the clean rows of ingestion's decoded uint8 array (decoding only what does not fit), then split into train/val/test and the open set."""
    return grouped(Pipeline(
        [
            Node(preprocess_images, ["raw_images", "clean_manifest", "params:preprocessing", "decoded_images",
                                     "params:ingestion"],
                 ["image_array", "image_index"], name="preprocess_images"),
            Node(split_images, ["image_index", "params:split"], ["split_index", "split_summary", "split_metrics"],
                 name="split_images"),
        ],
        tags=["preprocessing"],
    ), "preprocessing")
