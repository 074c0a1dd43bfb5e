"""Wiring of the evaluate pipeline: ingestion and preprocessing nodes reused on `evaluate.source`."""

from kedro.pipeline import Node, Pipeline

from partmatch.pipelines.ingestion.nodes import clean_manifest, scan_and_decode
from partmatch.pipelines.preprocessing.nodes import preprocess_images

from .nodes import evaluate_source, model_preprocessing


def create_pipeline(**kwargs) -> Pipeline:
    """Clean and preprocess another source exactly like training data, then score the chosen model on it."""
    base = Pipeline(
        [
            Node(model_preprocessing, ["model", "params:preprocessing"], "preprocessing_params",
                 name="model_preprocessing"),
            # one decode per photo, with the model's preprocessing (as the ingestion pipeline does)
            Node(scan_and_decode, ["raw_images", "params:ingestion", "preprocessing_params"],
                 ["raw_manifest", "quarantine", "decoded_images"], name="scan_source"),
            Node(clean_manifest, ["raw_manifest", "quarantine", "params:ingestion"], ["clean_manifest", "dropped_files"],
                 name="clean_manifest"),
            Node(preprocess_images, ["raw_images", "clean_manifest", "preprocessing_params", "decoded_images",
                                     "params:ingestion"], ["image_array", "image_index"], name="preprocess_images"),
            Node(evaluate_source, ["model", "image_array", "image_index", "params:evaluate"],
                 ["metrics", "mlflow_metrics"], name="evaluate_source"),
        ]
    )
    return Pipeline(base, namespace="evaluate",
                    parameters={"params:ingestion": "params:ingestion", "params:preprocessing": "params:preprocessing",
                                "params:evaluate": "params:evaluate"},
                    tags=["evaluate"])
