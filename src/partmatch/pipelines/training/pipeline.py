"""One modular training/evaluation pipeline, instantiated under a namespace per model."""

from kedro.pipeline import Node, Pipeline

from partmatch.config import MODEL_PIPELINES

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
# models whose pipeline caches frozen pretrained-backbone features (train_mode: frozen): only these show the
# cache node and the backbone_features dataset
FEATURE_CACHING_MODELS = ("siamese_pretrained", "multi_objective")


def create_pipeline(cached_features: bool = False, **kwargs) -> Pipeline:
    """The template: (cache frozen features) -> train -> embed every image once -> calibrate the pair threshold
    -> evaluate, and interpretability figures; the embeddings also become the gallery index the served model
    searches."""
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
    """The template under namespace ``name``; hyper-parameters come from ``params:<name>``."""
    return Pipeline(
        create_pipeline(cached_features=name in FEATURE_CACHING_MODELS),
        namespace=name,
        inputs=SHARED_INPUTS,
        parameters={"params:model": f"params:{name}", "params:preprocessing": "params:preprocessing",
                    "params:search.index": "params:search.index"},
        tags=["training", name],
    )


def create_all_model_pipelines(names: tuple[str, ...] = MODEL_PIPELINES) -> dict[str, Pipeline]:
    """One namespaced pipeline per model name."""
    return {name: create_model_pipeline(name) for name in names}
