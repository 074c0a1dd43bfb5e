"""Wiring of the search pipelines (namespace ``search``).

* ``search_index``  -- clean a catalogue source like training data (the ingestion nodes) and index every photo.
* ``search``        -- identify every photo under ``search.query``: CSV + HTML report.
* ``search_add``    -- add the photos under ``search.add`` to the latest index (only they are embedded).
* ``search_remove`` -- drop the part lines named in ``search.remove`` from the latest index.
* ``search_eval``   -- open-set rejection measured on the model's own split, then new parts without retraining.

The model is ``search.model`` (``data/06_models/<search.model>/model.pt``). For ``kedro run`` (the default
pipeline), :func:`create_demo_pipeline` wires the same nodes to the recommended model's outputs of the same
run (``siamese_pretrained.model`` / ``.embeddings``), so the search waits for that model to be trained.
"""

from kedro.pipeline import Node, Pipeline

from partmatch.pipelines.ingestion.nodes import clean_manifest, scan_source

from .nodes import (
    add_to_catalogue_index,
    build_catalogue_index,
    catalogue_cleaning_rules,
    identify_query_photos,
    index_catalogue,
    measure_open_set_rejection,
    remove_from_catalogue_index,
    render_search_report,
)

RECOMMENDED_MODEL = "siamese_pretrained"
_PARAMS = {"params:ingestion": "params:ingestion", "params:search": "params:search"}
_INDEX_OUT = ["catalogue_index", "catalogue_index_card"]


def _namespaced(nodes: list[Node], inputs: dict[str, str] | set[str] | None = None) -> Pipeline:
    base = Pipeline(nodes)
    parameters = {name: target for name, target in _PARAMS.items() if name in base.inputs()}
    return Pipeline(base, namespace="search", inputs=inputs, parameters=parameters, tags=["search"])


def _cleaning_rules() -> Node:
    return Node(catalogue_cleaning_rules, ["params:ingestion", "params:search"], "catalogue_cleaning_rules",
                name="catalogue_cleaning_rules")


def _index_nodes(reuse_model_embeddings: bool = False) -> list[Node]:
    """Clean the catalogue like training data, then index it. With ``reuse_model_embeddings`` (the default run,
    where the catalogue is the model's own training source) the photos the model's run embedded reuse those
    vectors and only the others go through the network."""
    if reuse_model_embeddings:
        index = Node(index_catalogue, ["model", "model_embeddings", "split_index", "catalogue_photos",
                                       "catalogue_clean_manifest", "params:search"], _INDEX_OUT,
                     name="build_catalogue_index")
    else:
        index = Node(build_catalogue_index, ["model", "catalogue_photos", "catalogue_clean_manifest",
                                             "params:search"], _INDEX_OUT, name="build_catalogue_index")
    return [
        _cleaning_rules(),
        Node(scan_source, ["catalogue_photos", "catalogue_cleaning_rules"],
             ["catalogue_raw_manifest", "catalogue_quarantine"], name="scan_catalogue"),
        Node(clean_manifest, ["catalogue_raw_manifest", "catalogue_quarantine", "catalogue_cleaning_rules"],
             ["catalogue_clean_manifest", "catalogue_dropped_files"], name="clean_catalogue"),
        index,
    ]


def _search_nodes() -> list[Node]:
    return [
        Node(identify_query_photos, ["model", "catalogue_index", "catalogue_index_card", "query_photos",
                                     "params:search"], "query_results", name="identify_query_photos"),
        Node(render_search_report, ["query_results", "query_photos", "catalogue_index_card", "params:search"],
             "query_report", name="render_search_report"),
    ]


def _eval_nodes() -> list[Node]:
    return [
        Node(measure_open_set_rejection, ["model", "model_embeddings", "split_index", "params:search"],
             ["open_set_rejection_curve", "open_set_rejection_plot", "open_set_rejection_metrics"],
             name="measure_open_set_rejection"),
    ]


def create_index_pipeline(**kwargs) -> Pipeline:
    """``search_index``: clean ``search.catalog`` (default: the training source) and index it with ``search.model``."""
    return _namespaced(_index_nodes())


def create_search_pipeline(**kwargs) -> Pipeline:
    """``search``: identify the photos under ``search.query`` against the latest index; CSV + HTML report."""
    return _namespaced(_search_nodes())


def create_add_pipeline(**kwargs) -> Pipeline:
    """``search_add``: embed only the photos under ``search.add`` and save the enlarged index as a new version."""
    return _namespaced([
        _cleaning_rules(),
        Node(scan_source, ["new_part_photos", "catalogue_cleaning_rules"],
             ["new_parts_raw_manifest", "new_parts_quarantine"], name="scan_new_parts"),
        Node(clean_manifest, ["new_parts_raw_manifest", "new_parts_quarantine", "catalogue_cleaning_rules"],
             ["new_parts_clean_manifest", "new_parts_dropped_files"], name="clean_new_parts"),
        Node(add_to_catalogue_index, ["previous_catalogue_index", "previous_catalogue_index_card", "model",
                                      "new_part_photos", "new_parts_clean_manifest", "params:search"],
             _INDEX_OUT, name="add_to_catalogue_index"),
    ])


def create_remove_pipeline(**kwargs) -> Pipeline:
    """``search_remove``: drop the part lines ``search.remove`` from the latest index; a new version."""
    return _namespaced([
        Node(remove_from_catalogue_index, ["previous_catalogue_index", "previous_catalogue_index_card",
                                           "params:search"], _INDEX_OUT, name="remove_from_catalogue_index"),
    ])


def create_eval_pipeline(**kwargs) -> Pipeline:
    """``search_eval``: open-set rejection (FMR/FNMR curve, numbers) and new parts without retraining."""
    return _namespaced(_eval_nodes(), inputs={"split_index"})


def create_demo_pipeline(model: str = RECOMMENDED_MODEL) -> Pipeline:
    """For ``__default__``: index + search + open-set numbers on the outputs of ``model``'s pipeline in the same
    run (``<model>.model``, ``<model>.embeddings``), so they run after it."""
    return _namespaced(_index_nodes(reuse_model_embeddings=True) + _search_nodes() + _eval_nodes(),
                       inputs={"model": f"{model}.model", "model_embeddings": f"{model}.embeddings",
                               "split_index": "split_index"})


def create_pipelines() -> dict[str, Pipeline]:
    """Every registered search pipeline by name."""
    return {"search_index": create_index_pipeline(), "search": create_search_pipeline(),
            "search_add": create_add_pipeline(), "search_remove": create_remove_pipeline(),
            "search_eval": create_eval_pipeline()}
