"""Losses, miners and batch samplers by name (the pytorch-metric-learning / open-metric-learning way).

A model's loss is a list of weighted *parts*, each a registered loss with its arguments and, for pair / triplet
losses, a registered miner; batches come from a registered sampler::

    loss:
      parts:
        - {name: multi_similarity, weight: 1, args: {alpha: 2}, miner: {name: multi_similarity, args: {epsilon: 0.1}}}
        - {name: proxy_anchor, weight: 1, args: {margin: 0.1, lr_multiplier: 100}}
    sampler: {name: m_per_class, m: 4}

This module imports no torch: ``partmatch.config`` validates names and arguments with it before any work
(:func:`validate_loss`, :func:`validate_sampler`); the constructors import the libraries when called
(``partmatch.ml.objectives.build_objective``). Every loss and miner takes a ``distance`` argument, ``model``
by default: the model's own ``distance`` (``euclidean | cosine | manhattan``), the one evaluation, the
threshold and the search index use.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

DISTANCES = ("euclidean", "cosine", "manhattan")
_DISTANCE_ARG = ("model", *DISTANCES)


@dataclass(frozen=True)
class Arg:
    """One argument: its type (``float``, ``int``, ``bool``, ``str``), default, allowed values / bounds."""

    kind: type
    default: Any
    choices: tuple | None = None
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    optional: bool = False  # None allowed

    def check(self, value: Any) -> Any:
        """The value, converted (int -> float); ValueError with the reason when it does not fit."""
        if value is None:
            if self.optional:
                return None
            raise ValueError("must not be empty")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false (got {value!r})")
        elif self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    (self.kind is int and not float(value).is_integer()):
                raise ValueError(f"must be {'an integer' if self.kind is int else 'a number'} (got {value!r})")
            value = self.kind(value)
            for bound, ok, word in ((self.gt, lambda v, b: v > b, ">"), (self.ge, lambda v, b: v >= b, ">="),
                                    (self.lt, lambda v, b: v < b, "<")):
                if bound is not None and not ok(value, bound):
                    raise ValueError(f"must be {word} {bound:g} (got {value!r})")
        elif self.kind is str and not isinstance(value, str):
            raise ValueError(f"must be a string (got {value!r})")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"must be one of {list(self.choices)} (got {value!r}){did_you_mean(value, self.choices)}")
        return value


@dataclass(frozen=True)
class Entry:
    """A registered loss, miner or sampler.

    ``build(**args)`` constructs it (libraries imported there); ``args`` are its accepted arguments. Losses add
    ``miners`` (the miners they accept; ``()`` = none, e.g. proxy losses), ``default_miner`` and ``proxies``
    (it owns proxies, at their own learning rate) / ``needs_proxies`` (it uses another part's proxies);
    samplers add ``needs_proxies`` too.
    """

    name: str
    build: Callable[..., Any]
    args: Mapping[str, Arg]
    doc: str
    task: str = "embedding"
    miners: tuple[str, ...] = ()
    default_miner: str | None = None
    proxies: bool = False
    needs_proxies: bool = False
    class_balanced: bool = False  # a sampler whose batches hold m images of each of their classes


def did_you_mean(name: Any, candidates) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'" if close else ""


def _distance(**extra: Any) -> dict[str, Arg]:
    return {"distance": Arg(str, "model", choices=_DISTANCE_ARG), **extra}


# --------------------------------------------------------------------------------------- constructors
# Each imports what it needs when called: this module stays importable without torch.


def _cross_entropy():
    from partmatch.ml.objectives import ClassificationObjective

    return ClassificationObjective()


def _contrastive(margin: float, distance: str, pairs_per_batch: int | None):
    from partmatch.ml.objectives import ContrastiveObjective

    return ContrastiveObjective(margin=margin, pairs_per_batch=pairs_per_batch, distance=distance)


def _quadruplet(margin1: float, margin2: float, distance: str):
    from partmatch.ml.objectives import QuadrupletObjective

    return QuadrupletObjective(margin1=margin1, margin2=margin2, distance=distance)


def _pml(loss_name: str):
    def build(distance: str, **kwargs: Any):
        from pytorch_metric_learning import losses, reducers

        from partmatch.ml.objectives import MetricLossObjective, pml_distance

        cls = getattr(losses, loss_name)
        extra = {"reducer": reducers.MeanReducer()} if loss_name == "TripletMarginLoss" else {}
        return MetricLossObjective(cls(distance=pml_distance(distance), **kwargs, **extra))

    return build


def _proxy_anchor(num_classes: int, embedding_dim: int, margin: float, alpha: float, lr_multiplier: float,
                  distance: str):
    from partmatch.ml.objectives import ProxyAnchorObjective

    return ProxyAnchorObjective(num_classes, embedding_dim, margin=margin, alpha=alpha,
                                proxy_lr_multiplier=lr_multiplier, distance=distance)


def _proxy_repulsion(margin: float):
    from partmatch.ml.objectives import ProxyRepulsionObjective

    return ProxyRepulsionObjective(margin=margin)


def _pml_miner(miner_name: str):
    def build(distance: str, **kwargs: Any):
        from pytorch_metric_learning import miners

        from partmatch.ml.objectives import pml_distance

        return getattr(miners, miner_name)(distance=pml_distance(distance), **kwargs)

    return build


def _semihard(margin: float, distance: str):
    return _pml_miner("TripletMarginMiner")(distance, margin=margin, type_of_triplets="semihard")


def _hard(margin: float, distance: str):
    return _pml_miner("TripletMarginMiner")(distance, margin=margin, type_of_triplets="hard")


def _random_triplets(distance: str):  # the study's: distance plays no part in a random draw
    from partmatch.ml.objectives import RandomTripletMiner

    return RandomTripletMiner()


def _own_miner(distance: str):
    return None  # the loss mines its own tuples (balanced pairs, random quadruplets)


def _shuffled(oversample_to: int | None):
    from partmatch.ml.data import ShuffledSampler

    return ShuffledSampler(oversample_to=oversample_to)


def _m_per_class(m: int):
    from partmatch.ml.data import MPerClassSampler

    return MPerClassSampler(m=m)


def _nearest_proxy(m: int, explore: float, distance: str):
    from partmatch.ml.data import NearestProxySampler

    return NearestProxySampler(m=m, explore=explore, distance=distance)


# ------------------------------------------------------------------------------------------ registries

_TRIPLET_MINERS = ("random", "semihard", "hard", "batch_hard", "multi_similarity")
_PAIR_MINERS = ("multi_similarity", "random", "semihard", "hard", "batch_hard")

LOSSES: dict[str, Entry] = {e.name: e for e in (
    Entry("cross_entropy", lambda: _cross_entropy(), {},
          "the study's classifier: NLL of the log-softmax output", task="classifier"),
    Entry("contrastive", _contrastive,
          _distance(margin=Arg(float, 1.0, gt=0), pairs_per_batch=Arg(int, None, ge=2, optional=True)),
          "the study's contrastive loss (1-Y)/2 D^2 + Y/2 max(0, m - D)^2 on balanced online pairs",
          miners=("balanced_pairs",), default_miner="balanced_pairs"),
    Entry("pml_contrastive", _pml("ContrastiveLoss"),
          _distance(pos_margin=Arg(float, 0.0), neg_margin=Arg(float, 1.0)),
          "pytorch-metric-learning ContrastiveLoss (all pairs of the batch, or the miner's)",
          miners=_PAIR_MINERS),
    Entry("triplet", _pml("TripletMarginLoss"), _distance(margin=Arg(float, 1.0, gt=0)),
          "triplet margin loss (PML TripletMarginLoss, mean over the mined triplets)",
          miners=_TRIPLET_MINERS, default_miner="random"),
    Entry("quadruplet", _quadruplet,
          _distance(margin1=Arg(float, 1.0, gt=0), margin2=Arg(float, 0.5, gt=0)),
          "quadruplet loss (Chen et al. 2017) on random quadruplets", miners=("random_quadruplets",),
          default_miner="random_quadruplets"),
    Entry("multi_similarity", _pml("MultiSimilarityLoss"),
          _distance(alpha=Arg(float, 2.0, gt=0), beta=Arg(float, 50.0, gt=0), base=Arg(float, 0.5)),
          "multi-similarity loss (Wang et al. 2019, PML MultiSimilarityLoss)", miners=_PAIR_MINERS,
          default_miner=None),
    Entry("proxy_anchor", _proxy_anchor,
          _distance(margin=Arg(float, 0.1, ge=0), alpha=Arg(float, 32.0, gt=0), lr_multiplier=Arg(float, 100.0, gt=0)),
          "Proxy-Anchor (Kim et al. 2020, PML ProxyAnchorLoss); proxies train at lr x lr_multiplier",
          proxies=True),
    Entry("proxy_repulsion", _proxy_repulsion, {"margin": Arg(float, 0.0, ge=-1, lt=1)},
          "proxy-proxy term: mean max(0, cos(p_i, p_j) - margin) over distinct proxies of the proxy part",
          needs_proxies=True),
)}

MINERS: dict[str, Entry] = {e.name: e for e in (
    Entry("random", _random_triplets, _distance(), "the study's: one random positive and negative per anchor"),
    Entry("semihard", _semihard, _distance(margin=Arg(float, 0.2, gt=0)),
          "PML TripletMarginMiner semihard: d(a,p) < d(a,n) <= d(a,p) + margin"),
    Entry("hard", _hard, _distance(margin=Arg(float, 0.2, gt=0)),
          "PML TripletMarginMiner hard: d(a,n) <= d(a,p) + margin"),
    Entry("batch_hard", _pml_miner("BatchHardMiner"), _distance(),
          "PML BatchHardMiner: the hardest positive and negative of each anchor"),
    Entry("multi_similarity", _pml_miner("MultiSimilarityMiner"), _distance(epsilon=Arg(float, 0.1, ge=0)),
          "PML MultiSimilarityMiner: pairs that violate the hardest opposite pair by epsilon"),
    Entry("balanced_pairs", _own_miner, _distance(),
          "the study's: equally many random positive and negative pairs (contrastive only)"),
    Entry("random_quadruplets", _own_miner, _distance(), "random quadruplets (quadruplet only)"),
)}

SAMPLERS: dict[str, Entry] = {e.name: e for e in (
    Entry("shuffled", _shuffled, {"oversample_to": Arg(int, None, ge=1, optional=True)},
          "a random permutation cut into batches; oversample_to: N repeats the images of categories with fewer "
          "than N so each has N per epoch (over-sampling of small categories)"),
    Entry("m_per_class", _m_per_class, {"m": Arg(int, 4, ge=2)},
          "class-balanced batches of batch_size / m categories with m images each (PML MPerClassSampler)",
          class_balanced=True),
    Entry("nearest_proxy", _nearest_proxy,
          {"m": Arg(int, 4, ge=2), "explore": Arg(float, 0.0, ge=0, lt=1), "distance": Arg(str, "cosine",
                                                                                          choices=_DISTANCE_ARG)},
          "class-balanced batches whose categories are a random category and its nearest categories by proxy "
          "(hard negatives together); explore: share of each batch's categories drawn at random instead",
          class_balanced=True, needs_proxies=True),
)}


# ------------------------------------------------------------------------------------------ validation


class SpecError(ValueError):
    """A loss / miner / sampler specification error; ``key`` is the dotted key under the model's section."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def _mapping(value: Any, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(key, f"must be a mapping, got {type(value).__name__} {value!r}")
    return dict(value)


def _named(value: Any, key: str, registry: dict[str, Entry], kind: str, allowed: tuple[str, ...] | None = None,
           flat_args: bool = False) -> dict[str, Any]:
    """``{name, args}`` checked against ``registry``: known name, known arguments of the right type."""
    if isinstance(value, str):
        value = {"name": value}
    raw = _mapping(value, key)
    valid = list(allowed if allowed is not None else registry)
    name = raw.pop("name", None)
    if name is None:
        raise SpecError(f"{key}.name", f"missing: the {kind} to use; valid: {valid}")
    if name not in valid:
        extra = "" if name not in registry else " here"
        raise SpecError(f"{key}.name", f"unknown {kind} {name!r}{extra}{did_you_mean(name, valid)}; valid: {valid}")
    entry = registry[name]
    if flat_args:  # sampler: {name: m_per_class, m: 4}
        args = raw
    else:
        args = _mapping(raw.pop("args", None), f"{key}.args")
        if raw:
            bad = sorted(raw)[0]
            raise SpecError(f"{key}.{bad}", f"unknown key{did_you_mean(bad, ['name', 'args'])}; valid: ['name', 'args']")
    out = {}
    args_key = key if flat_args else f"{key}.args"
    for arg, given in args.items():
        if arg not in entry.args:
            raise SpecError(f"{args_key}.{arg}", f"unknown argument of {kind} {name!r}"
                                                 f"{did_you_mean(arg, entry.args)}; valid: {sorted(entry.args)}")
        try:
            out[arg] = entry.args[arg].check(given)
        except ValueError as exc:
            raise SpecError(f"{args_key}.{arg}", str(exc)) from None
    return {"name": name, "args": {a: out.get(a, spec.default) for a, spec in entry.args.items()}}


def validate_sampler(value: Any, key: str = "sampler") -> dict[str, Any]:
    """``{"name", "args"}`` with every argument filled in, or SpecError naming the dotted key."""
    if isinstance(value, Mapping) and isinstance(value.get("args"), Mapping):  # the filled-in form, again
        value = {**{k: v for k, v in value.items() if k != "args"}, **value["args"]}
    return _named(value, key, SAMPLERS, "sampler", flat_args=True)


def validate_loss(value: Any, key: str = "loss") -> dict[str, Any]:
    """``{"parts": [{"name", "weight", "args", "miner": {"name", "args"} | None}]}`` with every argument filled
    in, or SpecError naming the dotted key (``loss.parts[0].args.margn``) and the valid options."""
    raw = _mapping(value, key)
    parts = raw.pop("parts", None)
    if raw:
        bad = sorted(raw)[0]
        raise SpecError(f"{key}.{bad}", f"unknown key{did_you_mean(bad, ['parts'])}; valid: ['parts']")
    if not isinstance(parts, list) or not parts:
        raise SpecError(f"{key}.parts", "must be a non-empty list of {name, weight, args, miner} mappings; "
                                        f"valid names: {list(LOSSES)}")
    out = []
    for i, part in enumerate(parts):
        pkey = f"{key}.parts[{i}]"
        part = _mapping(part, pkey)
        weight, miner = part.pop("weight", 1.0), part.pop("miner", None)
        spec = _named(part, pkey, LOSSES, "loss")
        entry = LOSSES[spec["name"]]
        try:
            spec["weight"] = Arg(float, 1.0, ge=0).check(weight)
        except ValueError as exc:
            raise SpecError(f"{pkey}.weight", str(exc)) from None
        if miner is not None and not entry.miners:
            raise SpecError(f"{pkey}.miner", f"loss {spec['name']!r} takes no miner (its terms are not mined)")
        if miner is None and entry.default_miner is not None:
            miner = entry.default_miner
        spec["miner"] = None if miner is None else _named(miner, f"{pkey}.miner", MINERS, "miner", entry.miners)
        out.append(spec)
    tasks = {LOSSES[p["name"]].task for p in out}
    if "classifier" in tasks and len(out) > 1:
        raise SpecError(f"{key}.parts", "cross_entropy (the classifier) cannot be combined with other losses")
    owners = [i for i, p in enumerate(out) if LOSSES[p["name"]].proxies]
    if len(owners) > 1:
        raise SpecError(f"{key}.parts[{owners[1]}]", "one proxy loss per model (the proxy terms and the "
                                                      "nearest_proxy sampler share its proxies)")
    for i, p in enumerate(out):
        if LOSSES[p["name"]].needs_proxies and not owners:
            raise SpecError(f"{key}.parts[{i}].name", f"{p['name']!r} acts on the proxies of a proxy loss: add a "
                                                      "part with name: proxy_anchor")
    return {"parts": out}


def loss_task(loss: Mapping[str, Any]) -> str:
    """``classifier`` or ``embedding``: the task a validated loss trains."""
    return LOSSES[loss["parts"][0]["name"]].task


def has_proxies(loss: Mapping[str, Any]) -> bool:
    return any(LOSSES[p["name"]].proxies for p in loss["parts"])


def describe(loss: Mapping[str, Any]) -> str:
    """A short name for logs and run parameters: ``triplet`` or ``multi_similarity+proxy_anchor``."""
    return "+".join(p["name"] for p in loss["parts"])


def part_names(loss: Mapping[str, Any]) -> list[str]:
    """One unique name per part (the loss name; ``_2``, ``_3``... for repeats): the ``train_loss_<name>`` logs."""
    seen: dict[str, int] = {}
    names = []
    for p in loss["parts"]:
        seen[p["name"]] = seen.get(p["name"], 0) + 1
        names.append(p["name"] if seen[p["name"]] == 1 else f"{p['name']}_{seen[p['name']]}")
    return names


def resolve_distance(value: str, model_distance: str) -> str:
    return model_distance if value == "model" else value


# ------------------------------------------------------------------------------ the old flat parameters

LEGACY_LOSSES = ("cross_entropy", "contrastive", "triplet", "proxy_anchor", "contrastive+proxy_anchor", "quadruplet")
LEGACY_KEYS = ("sampling", "margin", "margin2", "proxy_weight", "proxy_lr_multiplier", "m_per_class")
_LEGACY_DEFAULTS = {"sampling": "semihard", "margin": 1.0, "margin2": 0.5, "proxy_weight": 1.0,
                    "proxy_lr_multiplier": 100.0, "m_per_class": 4}
_SAMPLING_MINERS = {"random": "random", "semihard": "semihard", "hard": "batch_hard"}


def legacy_spec(loss: str, flat: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """THE translation of the old flat keys (``loss: triplet``, ``sampling``, ``margin``, ``margin2``,
    ``proxy_weight``, ``proxy_lr_multiplier``, ``m_per_class``) to ``(loss, sampler)`` in the nested form,
    unvalidated. It reproduces the old objectives exactly: one ``margin`` for every part, the study's losses in
    Euclidean geometry whatever the model's ``distance``, Proxy-Anchor on cosine similarity with its library
    defaults, batches of ``m_per_class`` per category but plain shuffled ones for ``proxy_anchor`` alone."""
    if loss not in LEGACY_LOSSES:
        raise SpecError("loss", f"unknown loss {loss!r}{did_you_mean(loss, LEGACY_LOSSES + tuple(LOSSES))}; valid: "
                                f"a name of the old form {list(LEGACY_LOSSES)} or a mapping {{parts: [...]}} with "
                                f"part names {list(LOSSES)}")
    v = {k: (flat.get(k) if flat.get(k) is not None else d) for k, d in _LEGACY_DEFAULTS.items()}
    parts_of = {
        "cross_entropy": lambda: {"name": "cross_entropy"},
        "contrastive": lambda: {"name": "contrastive", "args": {"margin": v["margin"], "distance": "euclidean"}},
        "triplet": lambda: {"name": "triplet", "args": {"margin": v["margin"], "distance": "euclidean"},
                            "miner": {"name": _SAMPLING_MINERS[v["sampling"]],
                                      "args": {"distance": "euclidean",
                                               **({"margin": v["margin"]} if v["sampling"] == "semihard" else {})}}},
        "quadruplet": lambda: {"name": "quadruplet", "args": {"margin1": v["margin"], "margin2": v["margin2"],
                                                              "distance": "euclidean"}},
        "proxy_anchor": lambda: {"name": "proxy_anchor", "weight": v["proxy_weight"] if "+" in loss else 1.0,
                                 "args": {"lr_multiplier": v["proxy_lr_multiplier"], "distance": "cosine"}},
    }
    parts = [parts_of[name]() for name in loss.split("+")]
    if loss == "cross_entropy" or loss == "proxy_anchor":
        sampler = {"name": "shuffled"}
    else:
        sampler = {"name": "m_per_class", "m": v["m_per_class"]}
    return {"parts": parts}, sampler


def default_sampler(loss: Mapping[str, Any]) -> dict[str, Any]:
    """The sampler of a nested loss without ``sampler``: shuffled for the classifier, else 4 per category."""
    return {"name": "shuffled"} if loss_task(loss) == "classifier" else {"name": "m_per_class", "m": 4}
