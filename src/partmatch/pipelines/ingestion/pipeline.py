"""Wiring of the ingestion pipeline."""

from kedro.pipeline import Node, Pipeline

from partmatch.pipelines import grouped

from .nodes import clean_manifest, scan_and_decode, summarise_cleaning


def create_pipeline(**kwargs) -> Pipeline:
    """Scan the raw source, quarantine bad files, clean, and report."""
    return grouped(Pipeline(
        [
            # one decode per photo: verified and preprocessed at once; preprocessing selects the clean rows
            Node(scan_and_decode, ["raw_images", "params:ingestion", "params:preprocessing"],
                 ["raw_manifest", "quarantine", "decoded_images"], name="scan_source"),
            Node(clean_manifest, ["raw_manifest", "quarantine", "params:ingestion"],
                 ["clean_manifest", "dropped_files"], name="clean_manifest"),
            Node(summarise_cleaning, ["raw_manifest", "dropped_files", "clean_manifest", "params:ingestion"],
                 ["cleaning_report", "cleaning_counts", "ingestion_metrics"], name="summarise_cleaning"),
        ],
        tags=["ingestion"],
    ), "ingestion")
