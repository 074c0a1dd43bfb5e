"""Typed, validated parameters for every pipeline.

Each top-level key of ``conf/base/parameters_<pipeline>.yml`` has a pydantic model here. The project hook
validates every section before any node runs, so a wrong type or an impossible value fails at once with
the key's dotted name, the value given and the file to fix.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class ParameterError(ValueError):
    """Raised when a parameter has a wrong type or an impossible value."""


def _field_types(annotation: Any) -> set[Any]:
    """The plain types an annotation admits (``int | None`` -> {int, NoneType}; Literal/others as given)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return {t for arg in typing.get_args(annotation) for t in _field_types(arg)}
    return {annotation}


class _Params(BaseModel):
    """Unknown keys are refused; numbers and flags are not interchangeable.

    pydantic's lax mode takes ``true`` as 1 for an int (``min_images_per_class=true`` would mean 1) and ``1``
    as True for a bool; here a bool never passes as a number and a number never passes as a bool. Numbers
    from YAML or ``--params`` (already ints/floats) and numeric strings are unaffected.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_number_mixups(cls, value: Any, info: ValidationInfo) -> Any:
        allowed = _field_types(cls.model_fields[info.field_name].annotation)
        numeric = allowed & {int, float}
        if isinstance(value, bool) and numeric and bool not in allowed:
            kind = "an integer" if int in numeric else "a number"
            raise ValueError(f"must be {kind}, not a boolean")
        if bool in allowed and not isinstance(value, bool) and value is not None and not numeric \
                and isinstance(value, (int, float)):
            raise ValueError("must be true or false, not a number")
        return value


class IngestionParams(_Params):
    min_images_per_class: int = Field(2, ge=1)
    excluded_families: list[str] = Field(
        default_factory=lambda: ["Seal", "Bearing", "Shaft", "Strap", "Hose", "Belt", "Link", "Arm", "Bushing",
                                 "Kit", "Set"]
    )
    compound_min_length: int = Field(5, ge=1)
    always_keep: list[str] = Field(default_factory=list)
    max_file_mb: float = Field(50.0, gt=0)
    max_pixels: int = Field(40_000_000, gt=0)
    min_side: int = Field(8, ge=1)
    max_aspect_ratio: float = Field(100.0, ge=1)
    allow_outside_root: bool = False
    # processes that decode the photos (ingestion + preprocessing): "auto" = every core, 1 = no pool
    workers: int | str = "auto"

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        number = value
        if isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                number = None
        if isinstance(value, bool) or not isinstance(number, int) or number < 1:
            raise ValueError("must be 'auto' (every core) or a whole number of processes >= 1 (1 = no pool)")
        return number


class PreprocessingParams(_Params):
    image_size: int = Field(100, ge=8, le=1024)
    color_mode: Literal["grayscale", "rgb"] = "grayscale"
    background: int = Field(255, ge=0, le=255)
    # image arrays larger than this are memory-mapped files (in memmap_dir, default the system temp folder)
    memory_budget_mb: float = Field(2048.0, ge=0)
    memmap_dir: str | None = None


class SplitParams(_Params):
    seed: int = 42
    train_fraction: float = Field(0.8, gt=0, lt=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    open_set_fraction: float = Field(0.2, ge=0, lt=1)
    open_set_classes: list[str] = Field(default_factory=list)
    open_set_min_images: int = Field(2, ge=2)

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitParams:
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train_fraction + val_fraction + test_fraction must be 1, got {total:g}")
        return self


class EdaParams(_Params):
    top_n: int = Field(30, ge=1)
    table_rows: int = Field(5, ge=1)
    pca_variance_target: float = Field(0.96, gt=0, le=1)
    pca_max_components: int = Field(500, ge=1)
    scree_components: int = Field(30, ge=1)
    n_eigen_images: int = Field(5, ge=1)
    grid_categories: int = Field(12, ge=1)
    samples_per_category: int = Field(6, ge=1)
    seed: int = 0


class RerankParams(_Params):
    """Re-ranking of each query's top-N neighbours (``<model>.rerank`` for evaluation, ``search.rerank`` for the
    search pipelines; same fields as ``partmatch.ml.reranking.RerankConfig``). ``mode: none`` keeps every number."""

    mode: Literal["none", "qe", "k_reciprocal", "pairwise"] = "none"
    top_n: int = Field(100, ge=1, le=10_000)
    qe_n: int = Field(2, ge=1)
    qe_alpha: float = Field(3.0, ge=0)
    k1: int = Field(20, ge=1)
    k2: int = Field(6, ge=1)
    lambda_value: float = Field(0.3, ge=0, le=1)
    pairwise_neighbours: int = Field(20, ge=1)
    pairwise_hidden: int = Field(16, ge=1)
    pairwise_epochs: int = Field(2, ge=1)
    pairwise_lr: float = Field(3e-4, gt=0, lt=1)
    pairwise_batch_size: int = Field(512, ge=1)
    pairwise_max_anchors: int = Field(3000, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _within_top_n(self) -> RerankParams:
        if self.mode == "qe" and self.qe_n > self.top_n:
            raise ValueError(f"qe_n ({self.qe_n}) cannot exceed top_n ({self.top_n}): the query is expanded with "
                             "its nearest candidates")
        if self.mode == "k_reciprocal" and self.k1 > self.top_n:
            raise ValueError(f"k1 ({self.k1}) cannot exceed top_n ({self.top_n}): the k-reciprocal sets are taken "
                             "among the query's top_n candidates")
        if self.mode == "k_reciprocal" and self.top_n > K_RECIPROCAL_MAX_TOP_N:
            raise ValueError(f"top_n ({self.top_n}) above {K_RECIPROCAL_MAX_TOP_N} with k_reciprocal: its cost grows "
                             f"with the cube of top_n (~23 ms per query at 100, ~20 s at 1000); lower top_n")
        return self


K_RECIPROCAL_MAX_TOP_N = 500


# Feature sizes of the registered pretrained backbones (partmatch.ml.backbones), for checks before any work.
_BACKBONE_FEATURES = {"efficientnet_lite0": 1280, "efficientnet_lite1": 1280, "efficientnet_lite2": 1280,
                      "resnet18": 512}


class DistributedParams(_Params):
    """``<model>.distributed``: train on N processes with torch.distributed, launched like ``torchrun``
    (``partmatch.ml.training.distributed``). ``batch_size`` stays the global batch: each process takes its share."""

    nproc_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    rdzv_endpoint: str = "127.0.0.1:29400"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _rank_in_range(self) -> DistributedParams:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank ({self.node_rank}) must be below nnodes ({self.nnodes}): machines are "
                             f"numbered 0 .. nnodes-1")
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"rdzv_endpoint must be host:port of node 0, got {self.rdzv_endpoint!r}")
        if self.nnodes > 1 and host in ("127.0.0.1", "localhost", "::1", "[::1]"):
            raise ValueError(f"with nnodes={self.nnodes} machines, rdzv_endpoint must be an address of node 0 that the "
                             f"other machines reach (e.g. 10.0.0.1:29400), not {self.rdzv_endpoint!r}")
        return self


class TrainingParams(_Params):
    """Hyper-parameters of one model pipeline (``conf/base/parameters_<pipeline>.yml`` under its name)."""

    task: Literal["classifier", "embedding"] = "embedding"
    # The loss: the nested form {parts: [{name, weight, args, miner: {name, args}}]} with `sampler: {name, ...}`
    # (partmatch.ml.losses.registry: LOSSES, MINERS, SAMPLERS), or an old name (cross_entropy, contrastive,
    # triplet, proxy_anchor, contrastive+proxy_anchor, quadruplet) with the old flat keys below, translated once
    # (registry.legacy_spec). After validation `loss` is always the nested form, every argument filled in, and
    # `sampler` the sampler; the flat keys are None.
    loss: dict[str, Any] | str = "contrastive"
    sampler: dict[str, Any] | None = None
    sampling: Literal["random", "semihard", "hard"] | None = None
    margin: float | None = Field(None, gt=0)
    margin2: float | None = Field(None, gt=0)
    proxy_weight: float | None = Field(None, ge=0)
    proxy_lr_multiplier: float | None = Field(None, gt=0)
    embedding_dim: int = Field(64, ge=2, le=4096)
    normalize: bool = False
    head_init: Literal["default", "identity"] = "default"
    flip_tta: bool = False
    preserve_weight: float = Field(0.0, ge=0)
    backbone: str = "study_cnn"
    # backbone: pca (the study's further work): PCA of the normalised pixels fitted on the train split only, kept
    # in the model as plain tensors (mean + components); an MLP head (head_hidden units) embeds the reduced vectors
    pca_components: int = Field(500, ge=1)
    pca_whiten: bool = False
    head_hidden: int = Field(0, ge=0)
    pretrained: bool = False
    weights_path: str | None = None
    train_mode: Literal["frozen", "partial", "full"] = "full"
    trainable_blocks: int = Field(2, ge=0)
    backbone_lr_multiplier: float = Field(0.1, gt=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2)
    m_per_class: int | None = Field(None, ge=2)
    lr: float = Field(5e-4, gt=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    patience: int | None = Field(3, ge=1)
    device: str = "auto"
    seed: int = 42
    amp: bool = True
    # bf16 autocast for CPU training steps (CPUs with AMX / AVX512-BF16): ~2x images/s of the study trunk, the
    # numbers move a little (bench/train_throughput.py); off by default so every configuration keeps its numbers
    cpu_bf16: bool = False
    augment: bool = False
    resume: bool = False
    checkpoint_dir: str | None = None
    max_batches_per_epoch: int | None = Field(None, ge=1)
    progress: bool = True
    distance: Literal["euclidean", "cosine", "manhattan"] = "euclidean"
    threshold_pairs: int = Field(4000, ge=10)
    eval_pairs: int = Field(2000, ge=10)
    eval_batch_size: int = Field(256, ge=1)
    # frozen pretrained features: fp32, bf16, or auto = bf16 only on native-bf16 hardware for the backbones /
    # sizes where bf16 was checked against fp32 (partmatch.ml.backbones.resolve_precision)
    backbone_precision: Literal["auto", "fp32", "bf16"] = "auto"
    distributed: DistributedParams = Field(default_factory=DistributedParams)
    # evaluation: retrieval metrics also after re-ranking (rerank_<mode>_* keys); none = only the plain ones
    rerank: RerankParams = Field(default_factory=RerankParams)
    # interpretability figures (node interpret_embeddings): the 2-D map's method, queries in the neighbour gallery
    embedding_map: Literal["tsne", "pca"] = "tsne"
    gallery_queries: int = Field(8, ge=1, le=40)
    # The model's own input (only the pipelines in OWN_INPUT_MODELS: siamese_pretrained): its pipeline
    # preprocesses the photos of split_index again at this size / colour mode (same rows, so the same splits);
    # null = preprocessing.image_size / preprocessing.color_mode. The study's pipelines keep preprocessing's.
    image_size: int | None = Field(None, ge=8, le=1024)
    color_mode: Literal["grayscale", "rgb"] | None = None

    @field_validator("loss", "sampler", mode="before")
    @classmethod
    def _loss_spec(cls, value: Any, info: ValidationInfo) -> Any:
        from partmatch.ml.losses import registry

        if value is None or isinstance(value, str):
            return value
        try:
            if info.field_name == "loss":
                return registry.validate_loss(value, "loss")
            return registry.validate_sampler(value, "sampler")
        except registry.SpecError as exc:
            raise ValueError(f"@{exc.key}@ {exc.message}") from None

    @model_validator(mode="after")
    def _nested_loss(self) -> TrainingParams:
        """The old flat form translated to the nested one (registry.legacy_spec), in this one place."""
        from partmatch.ml.losses import registry

        flat = {k: getattr(self, k) for k in registry.LEGACY_KEYS}
        given = [k for k, v in flat.items() if v is not None]
        try:
            if isinstance(self.loss, str):
                if self.sampler is not None:
                    raise registry.SpecError("sampler", f"goes with the nested loss form; with loss: {self.loss} "
                                                        "the batches follow m_per_class (or write loss: {parts: ...})")
                loss, sampler = registry.legacy_spec(self.loss, flat)
                loss, sampler = registry.validate_loss(loss, "loss"), registry.validate_sampler(sampler, "sampler")
            else:
                if given:
                    raise registry.SpecError(given[0], "is a key of the old flat loss form (loss: <name>); with loss: "
                                                       "{parts: [...]} put it in loss.parts[i].args (a margin), "
                                                       "loss.parts[i].miner (sampling) or sampler (m)")
                loss = self.loss
                sampler = self.sampler if self.sampler is not None else \
                    registry.validate_sampler(registry.default_sampler(loss), "sampler")
            if registry.SAMPLERS[sampler["name"]].needs_proxies and not registry.has_proxies(loss):
                raise registry.SpecError("sampler.name", f"{sampler['name']!r} chooses categories by their proxies: "
                                                         "add a loss part with name: proxy_anchor")
        except registry.SpecError as exc:
            raise ValueError(f"@{exc.key}@ {exc.message}") from None
        for key, value in {"loss": loss, "sampler": sampler, **dict.fromkeys(registry.LEGACY_KEYS)}.items():
            object.__setattr__(self, key, value)
        return self

    @property
    def loss_name(self) -> str:
        """``triplet``, ``multi_similarity+proxy_anchor``...: the loss in a word, for logs and run parameters."""
        from partmatch.ml.losses import registry

        return registry.describe(self.loss)

    @model_validator(mode="after")
    def _consistent(self) -> TrainingParams:
        from partmatch.ml.losses import registry

        if (self.task == "classifier") != (registry.loss_task(self.loss) == "classifier"):
            raise ValueError("task 'classifier' goes with loss 'cross_entropy' and only with it")
        m = self.sampler["args"].get("m")
        if registry.SAMPLERS[self.sampler["name"]].class_balanced and (m > self.batch_size or self.batch_size % m):
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of the sampler's m ({m}, "
                             "m_per_class in the old form)")
        if self.pretrained and self.backbone == "study_cnn":
            raise ValueError("backbone 'study_cnn' has no pretrained weights; set pretrained: false or pick "
                             "efficientnet_lite0 / efficientnet_lite1 / efficientnet_lite2 / resnet18")
        if self.backbone == "pca" and self.pretrained:
            raise ValueError("backbone 'pca' is fitted on the train split; it has no pretrained weights "
                             "(set pretrained: false)")
        if self.backbone == "pca" and self.backbone_precision == "bf16":
            raise ValueError("backbone 'pca' projects in fp32 (the catalogue's features are fp32, so query photos "
                             "must be too): set backbone_precision: auto or fp32")
        if self.head_hidden and self.task != "embedding":
            raise ValueError("head_hidden (an MLP head) is for embedding models (task: embedding)")
        if self.head_hidden and self.head_init == "identity":
            raise ValueError("head_init 'identity' needs a linear head: set head_hidden: 0")
        if self.head_init == "identity":
            if self.task != "embedding":
                raise ValueError("head_init 'identity' is for embedding models (task: embedding)")
            known = _BACKBONE_FEATURES.get(self.backbone)
            if known is not None and self.embedding_dim != known:
                raise ValueError(f"head_init 'identity' needs embedding_dim == {known} (the {self.backbone} "
                                 f"feature size), got {self.embedding_dim}")
        if self.flip_tta and self.task != "embedding":
            raise ValueError("flip_tta (test-time flip averaging) is for embedding models (task: embedding)")
        if self.preserve_weight > 0 and self.task != "embedding":
            raise ValueError("preserve_weight > 0 (keep the initial features' pairwise similarities) is for embedding "
                             "models (task: embedding); set preserve_weight: 0 for the classifier")
        if self.device not in {"auto", "cpu", "cuda", "mps"} and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        return self


class EvaluateParams(_Params):
    model: str = "siamese_triplet"
    source: str | None = None
    seed: int = 0


class CompareParams(_Params):
    models: list[str] = Field(default_factory=lambda: list(MODEL_PIPELINES))
    chart_metrics: list[str] = Field(default_factory=lambda: ["precision_at_1", "map_at_r", "open_set_precision_at_1",
                                                              "open_set_map_at_r", "pair_accuracy"])


class IndexParams(_Params):
    """How the catalogue index searches (``search.index``; same fields as ``partmatch.ml.retrieval.IndexConfig``)."""

    exact_max: int = Field(50_000, ge=1)
    approximate: Literal["hnsw", "ivf"] = "hnsw"
    hnsw_m: int = Field(32, ge=2, le=256)
    ef_construction: int = Field(80, ge=1)
    ef_search: int = Field(64, ge=1)
    nlist: int | None = Field(None, ge=1)
    nprobe: int = Field(16, ge=1)


class SearchParams(_Params):
    """Catalogue search (pipelines ``search_index``, ``search``, ``search_add``, ``search_remove``, ``search_eval``)."""

    model: str = "siamese_pretrained"
    catalog: str | None = None
    query: str | None = None
    add: str | None = None
    remove: list[str] = Field(default_factory=list)
    top_k: int = Field(5, ge=1, le=100)
    vote_k: int | None = Field(None, ge=1, le=100)
    threshold: float | None = Field(None, gt=0)
    min_photos_per_part: int = Field(1, ge=1)
    device: str = "auto"
    batch_size: int = Field(256, ge=1)
    thumbnail_px: int = Field(112, ge=16, le=512)
    new_part_reference_share: float = Field(0.5, gt=0, lt=1)
    index: IndexParams = Field(default_factory=IndexParams)
    rerank: RerankParams = Field(default_factory=RerankParams)

    @field_validator("remove", mode="before")
    @classmethod
    def _split_labels(cls, value: Any) -> Any:
        """``"A;B"`` (the CLI splits --params at commas, so use ';') or ``"A,B"`` from YAML, or a list."""
        if value is None:
            return []
        if isinstance(value, str):
            return [part.strip() for part in re.split(r"[;,]", value) if part.strip()]
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODEL_PIPELINES:
            raise ValueError(f"must be one of the model pipelines {list(MODEL_PIPELINES)}")
        return value

    @field_validator("vote_k")
    @classmethod
    def _vote_within_top_k(cls, value: int | None, info: ValidationInfo) -> int | None:
        top_k = info.data.get("top_k")
        if value is not None and top_k is not None and value > top_k:
            raise ValueError(f"cannot exceed top_k ({top_k}): the vote is over the top-K matches")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in {"auto", "cpu", "cuda", "mps"} and not value.startswith("cuda:"):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value


MODEL_PIPELINES = ("cnn", "siamese_contrastive", "siamese_triplet", "siamese_pretrained", "multi_objective",
                   "siamese_pca")
# Model pipelines with their own input (TrainingParams.image_size / color_mode): a preprocessing node of their own
OWN_INPUT_MODELS = ("siamese_pretrained",)

SECTIONS: dict[str, type[_Params]] = {
    "ingestion": IngestionParams,
    "preprocessing": PreprocessingParams,
    "split": SplitParams,
    "eda": EdaParams,
    **{name: TrainingParams for name in MODEL_PIPELINES},
    "evaluate": EvaluateParams,
    "compare": CompareParams,
    "search": SearchParams,
}

PARAMETER_FILES: dict[str, str] = {
    "ingestion": "parameters_ingestion.yml",
    "preprocessing": "parameters_preprocessing.yml",
    "split": "parameters_preprocessing.yml",
    "eda": "parameters_eda.yml",
    **{name: f"parameters_{name}.yml" for name in MODEL_PIPELINES},
    "evaluate": "parameters_evaluate.yml",
    "compare": "parameters_compare.yml",
    "search": "parameters_search.yml",
}


def register_section(name: str, model: type[_Params], parameter_file: str) -> None:
    """Register the parameter model of a pipeline section (used by the model pipelines)."""
    SECTIONS[name] = model
    PARAMETER_FILES[name] = parameter_file


def parse(section: str, raw: Any, model: type[_Params] | None = None) -> Any:
    """Validate ``raw`` as the parameters of ``section``; raise ParameterError naming the dotted key."""
    model = model or SECTIONS[section]
    if isinstance(raw, model):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParameterError(
            f"Parameter '{section}' must be a mapping, got {type(raw).__name__}. "
            f"Fix it in conf/base/{PARAMETER_FILES.get(section, 'parameters.yml')}."
        )
    try:
        return model.model_validate(dict(raw))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join([section, *(str(p) for p in err["loc"])]) if err["loc"] else section
            given = f" (got {err['input']!r})" if err["loc"] and "input" in err and err["type"] != "missing" else ""
            nested = re.match(r"(?:Value error, )?@([^@]+)@ (.*)", err["msg"], re.S)
            if nested:  # a loss / sampler specification error (registry.SpecError): its own dotted key
                lines.append(f"  - '{section}.{nested.group(1)}': {nested.group(2)}")
                continue
            fields = _fields_at(model, err["loc"][:-1]) if err["type"] == "extra_forbidden" else []
            hint = (_did_you_mean(err["loc"][-1], fields) or f"; valid keys: {', '.join(fields)}") if fields else ""
            lines.append(f"  - '{key}': {err['msg'].removeprefix('Value error, ')}{given}{hint}")
        raise ParameterError(
            "Invalid parameters:\n" + "\n".join(lines) + "\nFix them in "
            f"conf/base/{PARAMETER_FILES.get(section, 'parameters.yml')} or with --params={section}.KEY=VALUE."
        ) from None


#: Top-level parameters that are not sections: runtime parameters read by the catalog (``${runtime_params:...}``).
SHARED_KEYS: dict[str, str] = {
    "raw_source": "the photos to train on (a folder of category sub-folders or a Kaggle-style CSV)",
}


def _did_you_mean(name: Any, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(candidates), n=1, cutoff=0.6)
    return f": did you mean '{close[0]}'?" if close else ""


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the (nested) parameter model at ``loc`` inside ``model``."""
    for part in loc:
        field = model.model_fields.get(str(part))
        nested = [t for t in _field_types(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)] \
            if field else []
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def unknown_keys(params: dict[str, Any]) -> list[str]:
    """One line per top-level parameter that is neither a section nor a shared key, with the closest valid name."""
    known = [*SECTIONS, *SHARED_KEYS]
    lines = []
    for key in params:
        if key in SECTIONS or key in SHARED_KEYS:
            continue
        hint = _did_you_mean(key, known) or f"; known: {', '.join(sorted(known))}"
        lines.append(f"  - '{key}': unknown parameter section{hint}")
    return lines


def validate_all(params: dict[str, Any]) -> dict[str, Any]:
    """Validate every registered section present in ``params``; collect all problems into one error.

    A top-level key that is no section nor shared key (``--params=spilt.seed=7``) is an error too: it would
    otherwise be ignored silently.
    """
    problems, parsed = [], {}
    unknown = unknown_keys(params)
    if unknown:
        problems.append("Unknown parameters:\n" + "\n".join(unknown) + "\nFix them in conf/base/parameters*.yml, "
                        "conf/local/ or --params.")
    for section in SECTIONS:
        if section not in params:
            continue
        try:
            parsed[section] = parse(section, params[section])
        except ParameterError as exc:
            problems.append(str(exc))
    for section in MODEL_PIPELINES:
        p = parsed.get(section)
        if section in OWN_INPUT_MODELS or p is None:
            continue
        own = [key for key in ("image_size", "color_mode") if getattr(p, key) is not None]
        if own:
            problems.append("Invalid parameters:\n" + "\n".join(
                f"  - '{section}.{key}': only {', '.join(OWN_INPUT_MODELS)} has its own input; {section} trains on "
                f"image_array (set preprocessing.{key} instead)" for key in own)
                + f"\nFix them in conf/base/{PARAMETER_FILES[section]}.")
    if problems:
        raise ParameterError("\n".join(problems))
    return parsed
