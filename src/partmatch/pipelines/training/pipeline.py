"""One modular training/evaluation pipeline, instantiated under a namespace per model."""

from kedro.pipeline import Node, Pipeline

from partmatch.config import MODEL_PIPELINES, OWN_INPUT_MODELS
from partmatch.pipelines.preprocessing.nodes import preprocess_for_model

from .nodes import (
    cache_backbone_features,
    calibrate_threshold,
    embed_cached_features,
    embed_images,
    evaluate_model,
    index_gallery,
    interpret_embeddings,
    train_model,
    train_model_on_features,
)

SHARED_INPUTS = {"image_array", "split_index"}
# what a model with its own input (config.OWN_INPUT_MODELS) preprocesses again, at its image_size / color_mode:
# the photos of split_index (same rows, same splits), reusing ingestion's decoded pixels where the parameters match
OWN_INPUT_SOURCES = {"raw_images", "clean_manifest", "decoded_images", "split_index"}
# models whose pipeline caches frozen pretrained-backbone features (train_mode: frozen): only these show the
# cache node and the backbone_features dataset
FEATURE_CACHING_MODELS = ("siamese_pretrained", "multi_objective")


def create_pipeline(cached_features: bool = False, own_input: bool = False, **kwargs) -> Pipeline:
    """The template: (the model's own input) -> (cache frozen features) -> train -> embed every image once ->
    calibrate the pair threshold -> evaluate, and interpretability figures; the embeddings also become the
    gallery index the served model searches. With ``own_input`` the images are the photos of ``split_index``
    preprocessed at the model's ``image_size`` / ``color_mode`` (``<model>.image_array``), not the study's shared
    ``image_array``."""
    own = [Node(preprocess_for_model, ["raw_images", "clean_manifest", "split_index", "params:preprocessing",
                                       "params:model", "decoded_images", "params:ingestion"], "image_array",
                name="preprocess_model_input", tags=["preprocessing"])] if own_input else []
    if cached_features:
        head = [
            Node(cache_backbone_features, ["image_array", "params:model"], "backbone_features",
                 name="cache_backbone_features"),
            Node(train_model_on_features, ["image_array", "backbone_features", "split_index", "params:model",
                                           "params:preprocessing"],
                 ["uncalibrated_model", "training_history", "training_summary"], name="train_model"),
            Node(embed_cached_features, ["uncalibrated_model", "image_array", "backbone_features", "params:model"],
                 "embeddings", name="embed_images"),
        ]
    else:
        head = [
            Node(train_model, ["image_array", "split_index", "params:model", "params:preprocessing"],
                 ["uncalibrated_model", "training_history", "training_summary"], name="train_model"),
            Node(embed_images, ["uncalibrated_model", "image_array", "params:model"], "embeddings",
                 name="embed_images"),
        ]
    return Pipeline(
        [
            *own,
            *head,
            Node(calibrate_threshold, ["uncalibrated_model", "embeddings", "split_index", "params:model"],
                 ["model", "threshold_sweep", "pair_distance_histogram", "threshold_curves"],
                 name="calibrate_threshold"),
            Node(evaluate_model, ["model", "embeddings", "split_index", "training_history", "training_summary",
                                  "params:model"],
                 ["metrics", "loss_curves"], name="evaluate_model"),
            Node(interpret_embeddings, ["model", "embeddings", "split_index", "image_array", "params:model"],
                 ["embedding_map_chart", "neighbour_gallery_chart", "confused_pairs_chart",
                  "per_category_precision_chart", "confused_pairs_table", "per_category_precision_table"],
                 name="interpret_embeddings"),
            Node(index_gallery, ["model", "embeddings", "split_index", "params:search.index"], "gallery_index",
                 name="index_gallery"),
        ]
    )


def create_model_pipeline(name: str) -> Pipeline:
    """The template under namespace ``name``; hyper-parameters come from ``params:<name>``. A model of
    ``config.OWN_INPUT_MODELS`` preprocesses its own ``<name>.image_array`` (from ingestion's outputs and
    ``split_index``); the others share the study's ``image_array``."""
    own_input = name in OWN_INPUT_MODELS
    return Pipeline(
        create_pipeline(cached_features=name in FEATURE_CACHING_MODELS, own_input=own_input),
        namespace=name,
        inputs=OWN_INPUT_SOURCES if own_input else SHARED_INPUTS,
        parameters={"params:model": f"params:{name}", "params:preprocessing": "params:preprocessing",
                    "params:search.index": "params:search.index",
                    **({"params:ingestion": "params:ingestion"} if own_input else {})},
        tags=["training", name],
    )


def create_all_model_pipelines(names: tuple[str, ...] = MODEL_PIPELINES) -> dict[str, Pipeline]:
    """One namespaced pipeline per model name."""
    return {name: create_model_pipeline(name) for name in names}
