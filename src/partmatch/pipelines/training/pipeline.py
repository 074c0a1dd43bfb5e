"""One modular training/evaluation pipeline, instantiated under a namespace per model."""

from kedro.pipeline import Node, Pipeline

from partmatch.config import MODEL_PIPELINES

from .nodes import cache_backbone_features, calibrate_threshold, evaluate_model, train_model

SHARED_INPUTS = {"image_array", "split_index"}


def create_pipeline(**kwargs) -> Pipeline:
    """The template: (cache frozen features) -> train -> calibrate the pair threshold -> evaluate."""
    return Pipeline(
        [
            Node(cache_backbone_features, ["image_array", "params:model"], "backbone_features",
                 name="cache_backbone_features"),
            Node(train_model, ["image_array", "backbone_features", "split_index", "params:model",
                               "params:preprocessing"],
                 ["trained_model", "training_history", "training_summary"], name="train_model"),
            Node(calibrate_threshold, ["trained_model", "image_array", "split_index", "params:model"],
                 ["model", "threshold_curve", "pair_distance_histogram", "threshold_curves"],
                 name="calibrate_threshold"),
            Node(evaluate_model, ["model", "image_array", "split_index", "training_history", "training_summary",
                                  "params:model"],
                 ["metrics", "mlflow_metrics", "loss_curves"], name="evaluate_model"),
        ]
    )


def create_model_pipeline(name: str) -> Pipeline:
    """The template under namespace ``name``; hyper-parameters come from ``params:<name>``."""
    return Pipeline(
        create_pipeline(),
        namespace=name,
        inputs=SHARED_INPUTS,
        parameters={"params:model": f"params:{name}", "params:preprocessing": "params:preprocessing"},
        tags=["training", name],
    )


def create_all_model_pipelines(names: tuple[str, ...] = MODEL_PIPELINES) -> dict[str, Pipeline]:
    """One namespaced pipeline per model name."""
    return {name: create_model_pipeline(name) for name in names}
