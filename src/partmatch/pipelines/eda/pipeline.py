"""Wiring of the EDA pipeline."""

from kedro.pipeline import Node, Pipeline

from partmatch.pipelines import grouped

from .nodes import (
    category_counts,
    pca_top_categories,
    sample_grid,
    top_categories_chart,
)


def create_pipeline(**kwargs) -> Pipeline:
    """Category table, top-N chart, PCA of the top categories and a sample grid."""
    return grouped(Pipeline(
        [
            Node(category_counts, ["split_index", "params:eda"], ["eda_category_counts", "eda_category_table"],
                 name="category_counts"),
            Node(top_categories_chart, ["eda_category_counts", "params:eda"], "eda_top_categories_chart",
                 name="top_categories_chart"),
            Node(pca_top_categories, ["image_array", "split_index", "params:eda"],
                 ["eda_pca_summary", "eda_pca_scree", "eda_pca_cumulative", "eda_eigen_images", "eda_metrics"],
                 name="pca_top_categories"),
            Node(sample_grid, ["image_array", "split_index", "params:eda"], "eda_sample_grid", name="sample_grid"),
        ],
        tags=["eda"],
    ), "eda")
