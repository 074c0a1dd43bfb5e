"""Training objectives: what a batch is and how its loss is computed, so the training loop stays loss-agnostic.

An objective decides (1) how an epoch is cut into batches (``batches``, from its sampler), (2) the loss of a
batch given the model (``loss``, which embeds the batch and calls ``loss_from_embeddings``) and (3) extra
trainable parameters such as proxies (``extra_parameters``). Objectives are ``nn.Module`` s, so their state (e.g.
proxies) moves with ``.to(device)`` and is saved with ``state_dict()``. After every loss call
``objective.last_terms`` maps each part's name to its weighted term (a detached scalar), for per-part logs.

:func:`build_objective` builds the objective of a loss specification (``partmatch.ml.losses.registry``): a
weighted sum of registered losses, each with its miner, and a registered sampler.

Randomness inside a batch (pair / triplet / quadruplet sampling) uses torch's global CPU generator, which the
training loop seeds and checkpoints, so training is reproducible and resumable on every device. In a distributed
step (``partmatch.ml.training.distributed``) the model sees this process's slice of the batch and ``labels`` are the
whole batch's: what the model computed is gathered (``gather_batch``) before any loss or mining, so every process
computes the single-process loss of the whole batch (same random pairs / triplets: same seeded generator).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from partmatch.ml.data import class_balanced_batches, epoch_rng, shuffled_batches
from partmatch.ml.losses import registry
from partmatch.ml.losses.handwritten import ProxyRepulsionLoss, QuadrupletLoss, StudyContrastiveLoss
from partmatch.ml.training.distributed import gather_batch

TRIPLET_SAMPLINGS = ("random", "semihard", "hard")


@runtime_checkable
class Objective(Protocol):
    task: str  # "classifier" | "embedding"

    def batches(self, labels: np.ndarray, batch_size: int, epoch: int, seed: int) -> Iterator[np.ndarray]: ...

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...

    def extra_parameters(self) -> list[dict]: ...


def _fp32(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast: metric losses and mining run in float32 even inside a mixed-precision step."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # device type without autocast support
        return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ mining


def _random_choice(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of a boolean (R, B) mask, a uniformly random True column; and whether the row has one."""
    scores = torch.rand(mask.shape).masked_fill_(~mask, -1.0)
    return scores.argmax(dim=1), mask.any(dim=1)


def balanced_pairs(
    labels: torch.Tensor, max_pairs: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online balanced pairs from a batch: equally many positive and negative pairs, sampled without
    replacement from all ``i < j`` pairs of the batch.

    Returns CPU tensors ``(i, j, y)`` with ``y = 0`` for a similar (same label) and ``y = 1`` for a dissimilar
    pair. Without ``max_pairs`` every positive pair is used (or every negative one if there are fewer).
    """
    lab = labels.detach().reshape(-1).cpu()
    iu = torch.triu_indices(len(lab), len(lab), offset=1)
    same = lab[iu[0]] == lab[iu[1]]
    pos, neg = iu[:, same], iu[:, ~same]
    k = min(pos.shape[1], neg.shape[1])
    if max_pairs is not None:
        k = min(k, int(max_pairs) // 2)
    pos = pos[:, torch.randperm(pos.shape[1])[:k]]
    neg = neg[:, torch.randperm(neg.shape[1])[:k]]
    i = torch.cat([pos[0], neg[0]])
    j = torch.cat([pos[1], neg[1]])
    y = torch.cat([torch.zeros(k, dtype=torch.int64), torch.ones(k, dtype=torch.int64)])
    return i, j, y


def random_triplets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The study's sampling: for every anchor one uniformly random positive (not itself) and one uniformly
    random negative. Anchors without a positive or a negative in the batch are skipped. CPU tensors."""
    lab = labels.detach().reshape(-1).cpu()
    same = lab.unsqueeze(0) == lab.unsqueeze(1)
    pos_mask = same & ~torch.eye(len(lab), dtype=torch.bool)
    p, has_p = _random_choice(pos_mask)
    n, has_n = _random_choice(~same)
    a = torch.nonzero(has_p & has_n).flatten()
    return a, p[a], n[a]


def random_quadruplets(
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every anchor a random positive, a random negative ``n1`` and a random ``n2`` whose class differs
    from both the anchor's and ``n1``'s. Anchors lacking any of them are skipped. CPU tensors."""
    lab = labels.detach().reshape(-1).cpu()
    same = lab.unsqueeze(0) == lab.unsqueeze(1)
    p, has_p = _random_choice(same & ~torch.eye(len(lab), dtype=torch.bool))
    n1, has_n1 = _random_choice(~same)
    n2_mask = ~same & (lab.unsqueeze(0) != lab[n1].unsqueeze(1))
    n2, has_n2 = _random_choice(n2_mask)
    a = torch.nonzero(has_p & has_n1 & has_n2).flatten()
    return a, p[a], n1[a], n2[a]


# ------------------------------------------------------------------------------------------- objectives


def pml_distance(distance: str):
    """The pytorch-metric-learning distance of a retrieval distance: euclidean = ``LpDistance(p=2)``, manhattan =
    ``LpDistance(p=1)`` (both on the raw embeddings: the model normalises them when it should), cosine =
    ``CosineSimilarity`` (a similarity: PML's losses and miners invert their comparisons for it)."""
    from pytorch_metric_learning import distances  # noqa: PLC0415

    if distance == "euclidean":
        return distances.LpDistance(p=2, power=1, normalize_embeddings=False)
    if distance == "manhattan":
        return distances.LpDistance(p=1, power=1, normalize_embeddings=False)
    if distance == "cosine":
        return distances.CosineSimilarity()
    raise ValueError(f"distance must be one of {list(registry.DISTANCES)}, got {distance!r}")


class BaseObjective(nn.Module):
    """Shared plumbing. Embedding objectives implement ``loss_from_embeddings``.

    Batches come from ``sampler`` (``partmatch.ml.data``: shuffled, m_per_class, nearest_proxy) when one is set;
    otherwise from ``m_per_class`` (class-balanced) or plain shuffled batches when it is ``None``.
    """

    task = "embedding"
    #: images per class in a class-balanced batch; ``None`` means plain shuffled batches.
    m_per_class: int | None = None
    sampler: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.last_terms: dict[str, torch.Tensor] = {}

    def batches(self, labels: np.ndarray, batch_size: int, epoch: int, seed: int) -> Iterator[np.ndarray]:
        if self.sampler is not None:
            return self.sampler.batches(labels, batch_size, epoch, seed)
        rng = epoch_rng(seed, epoch)
        if self.m_per_class is None:
            # a trailing batch of one image would break BatchNorm backbones and gives no pairs: drop it
            return (b for b in shuffled_batches(len(labels), batch_size, rng) if len(b) > 1)
        return class_balanced_batches(labels, batch_size, self.m_per_class, rng)

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings = model(images)
        with _fp32(embeddings.device):
            return self.loss_from_embeddings(gather_batch(embeddings.float()), labels)

    def loss_from_embeddings(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not compute a loss from embeddings")

    def extra_parameters(self) -> list[dict]:
        return []


class ClassificationObjective(BaseObjective):
    """The study's classifier: NLL of the model's log-softmax output, shuffled batches."""

    task = "classifier"

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_probs = model(images)
        with _fp32(log_probs.device):
            return F.nll_loss(gather_batch(log_probs.float()), labels)


class ContrastiveObjective(BaseObjective):
    """Siamese contrastive training with the study's loss on balanced online pairs of a class-balanced batch.

    Both "branches" are the same network applied to the batch once; pairs index the batch embeddings.
    """

    def __init__(self, margin: float = 1.0, pairs_per_batch: int | None = None, m_per_class: int = 4,
                 distance: str = "euclidean"):
        super().__init__()
        self.criterion = StudyContrastiveLoss(margin, distance=distance)
        self.pairs_per_batch = pairs_per_batch
        self.m_per_class = int(m_per_class)

    def mine(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return balanced_pairs(labels, self.pairs_per_batch)

    def loss_from_embeddings(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        i, j, y = (t.to(embeddings.device, non_blocking=True) for t in self.mine(labels))
        return self.criterion(embeddings[i], embeddings[j], y)


class RandomTripletMiner:
    """The study's triplet sampling as a miner: :func:`random_triplets`, on the embeddings' device."""

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(embeddings.device, non_blocking=True) for t in random_triplets(labels))


class MetricLossObjective(BaseObjective):
    """A pytorch-metric-learning loss on the batch embeddings, on the tuples of ``miner`` (a PML miner or
    :class:`RandomTripletMiner`) or, without one, on every pair / triplet of the batch."""

    def __init__(self, criterion: nn.Module, miner: Any = None, m_per_class: int | None = 4):
        super().__init__()
        self.criterion = criterion
        self.miner = miner
        self.m_per_class = None if m_per_class is None else int(m_per_class)

    def mine(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        return None if self.miner is None else self.miner(embeddings, labels)

    def loss_from_embeddings(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.criterion(embeddings, labels, indices_tuple=self.mine(embeddings, labels))


class TripletObjective(MetricLossObjective):
    """Triplet margin loss (PML ``TripletMarginLoss``, mean over triplets) on a class-balanced batch.

    ``sampling``: ``random`` (the study: one random positive and negative per anchor), ``semihard`` (PML
    ``TripletMarginMiner(type_of_triplets="semihard")``: d(a,p) < d(a,n) <= d(a,p) + margin) or ``hard``
    (PML ``BatchHardMiner``: hardest positive and negative per anchor). Distances are Euclidean on the raw
    embeddings unless ``normalize_embeddings`` (the model may already normalise them) or ``distance``.
    """

    def __init__(self, margin: float = 1.0, sampling: str = "random", m_per_class: int = 4,
                 normalize_embeddings: bool = False, distance: str = "euclidean"):
        from pytorch_metric_learning import distances, losses, miners, reducers  # noqa: PLC0415

        if sampling not in TRIPLET_SAMPLINGS:
            raise ValueError(f"Unknown triplet sampling {sampling!r}; valid: {list(TRIPLET_SAMPLINGS)}")
        dist = distances.LpDistance(p=2, power=1, normalize_embeddings=True) \
            if normalize_embeddings and distance == "euclidean" else pml_distance(distance)
        criterion = losses.TripletMarginLoss(margin=float(margin), distance=dist, reducer=reducers.MeanReducer())
        miner = {"semihard": lambda: miners.TripletMarginMiner(margin=float(margin), type_of_triplets="semihard",
                                                                distance=dist),
                 "hard": lambda: miners.BatchHardMiner(distance=dist),
                 "random": RandomTripletMiner}[sampling]()
        super().__init__(criterion, miner, m_per_class)
        self.sampling = sampling
        self.margin = float(margin)


class QuadrupletObjective(BaseObjective):
    """Quadruplet loss (Chen et al. 2017) on online random quadruplets of a class-balanced batch."""

    def __init__(self, margin1: float = 1.0, margin2: float = 0.5, m_per_class: int = 4, distance: str = "euclidean"):
        super().__init__()
        self.criterion = QuadrupletLoss(margin1, margin2, distance=distance)
        self.m_per_class = int(m_per_class)

    def mine(self, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return random_quadruplets(labels)

    def loss_from_embeddings(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a, p, n1, n2 = (t.to(embeddings.device, non_blocking=True) for t in self.mine(labels))
        return self.criterion(embeddings[a], embeddings[p], embeddings[n1], embeddings[n2])


class ProxyAnchorObjective(BaseObjective):
    """PML ``ProxyAnchorLoss``; the proxies are an extra optimiser group with ``lr * proxy_lr_multiplier``.

    Labels must be ``0 .. num_classes - 1``. Batches are shuffled unless ``m_per_class`` is given. ``distance``:
    cosine (the paper's similarity, PML's default), euclidean or manhattan.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        margin: float = 0.1,
        alpha: float = 32,
        proxy_lr_multiplier: float = 100,
        m_per_class: int | None = None,
        distance: str = "cosine",
    ):
        super().__init__()
        from pytorch_metric_learning import losses  # noqa: PLC0415

        self.criterion = losses.ProxyAnchorLoss(int(num_classes), int(embedding_dim), margin=margin, alpha=alpha,
                                                distance=pml_distance(distance))
        self.num_classes = int(num_classes)
        self.proxy_lr_multiplier = float(proxy_lr_multiplier)
        self.m_per_class = None if m_per_class is None else int(m_per_class)

    @property
    def proxies(self) -> torch.Tensor:
        return self.criterion.proxies

    def loss_from_embeddings(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.criterion(embeddings, labels)

    def extra_parameters(self) -> list[dict]:
        return [{"params": [self.criterion.proxies], "lr_multiplier": self.proxy_lr_multiplier,
                 "name": "proxies"}]


class ProxyRepulsionObjective(BaseObjective):
    """The proxy-proxy term (:class:`ProxyRepulsionLoss`) on the proxies of another part (``bind``); the batch
    plays no part. The proxies stay registered (and checkpointed, and optimised) with their owner only."""

    def __init__(self, margin: float = 0.0):
        super().__init__()
        self.criterion = ProxyRepulsionLoss(margin)
        object.__setattr__(self, "_owner", None)

    def bind(self, owner: ProxyAnchorObjective) -> ProxyRepulsionObjective:
        object.__setattr__(self, "_owner", owner)
        return self

    def loss_from_embeddings(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self._owner is None:
            raise ValueError("proxy_repulsion needs the proxies of a proxy_anchor part (bind)")
        return self.criterion(self._owner.proxies)


class MultiObjective(BaseObjective):
    """Weighted sum of objectives computed on ONE forward pass: the objective of a loss specification.

    ``components``: ``(objective, weight)`` pairs; ``names`` their log names (default the class names); batches
    come from ``sampler`` or, without one, from the first component. ``last_terms`` holds each weighted term.
    A single classification component (cross_entropy) is the classifier objective.
    """

    def __init__(self, components: Sequence[tuple[BaseObjective, float]], names: Sequence[str] | None = None,
                 sampler: Any = None):
        super().__init__()
        if not components:
            raise ValueError("MultiObjective needs at least one (objective, weight)")
        objectives = [c for c, _ in components]
        tasks = {o.task for o in objectives}
        if tasks != {"embedding"} and not (tasks == {"classifier"} and len(objectives) == 1):
            raise ValueError("MultiObjective combines embedding objectives only (or is one classifier objective)")
        self.task = objectives[0].task
        self.parts = nn.ModuleList(objectives)
        self.weights = [float(w) for _, w in components]
        self.names = list(names) if names is not None else [type(o).__name__ for o in objectives]
        if len(self.names) != len(objectives) or len(set(self.names)) != len(self.names):
            raise ValueError(f"need one unique name per component, got {self.names}")
        self.m_per_class = objectives[0].m_per_class
        self.sampler = sampler if sampler is not None else objectives[0].sampler
        if sampler is None and objectives[0].sampler is None:
            self.batches = objectives[0].batches  # the first component's batches

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task == "classifier":
            term = self.weights[0] * self.parts[0].loss(model, images, labels)
            self.last_terms = {self.names[0]: term.detach()}
            return term
        return super().loss(model, images, labels)

    def loss_from_embeddings(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        total, terms = None, {}
        for name, part, weight in zip(self.names, self.parts, self.weights, strict=True):
            term = weight * part.loss_from_embeddings(embeddings, labels)
            terms[name] = term.detach()
            total = term if total is None else total + term
        self.last_terms = terms
        return total

    def extra_parameters(self) -> list[dict]:
        return [group for part in self.parts for group in part.extra_parameters()]


def similarity_drift(embeddings: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the batch's cosine-similarity matrices of ``embeddings`` and
    ``reference`` (``(B, D)`` and ``(B, D')``): how far training has moved the pairwise geometry of the
    reference features (similarity-preserving regularisation, Tung & Mori 2019, on cosine similarities)."""
    z = F.normalize(embeddings.flatten(1).float(), p=2, dim=1)
    r = F.normalize(reference.flatten(1).float(), p=2, dim=1)
    return ((z @ z.T - r @ r.T) ** 2).mean()


class SimilarityPreservingObjective(BaseObjective):
    """An embedding objective plus ``weight * similarity_drift(embeddings, reference features)``.

    The reference features are what the model started from, so the loss may reshape the space for the
    training categories while the penalty keeps the pairwise similarities that carry over to categories never
    trained on:

    * ``reference=None``: the inputs themselves, for a head trained on cached frozen-backbone features (the
      inputs *are* the pretrained features);
    * ``reference=module``: a frozen copy of the backbone as it was before training (ImageNet weights, or the
      study trunk's initial weights), run on each batch without gradients and always in eval mode. It is not
      a submodule: ``.to(device)`` moves it, but ``state_dict()`` (checkpoints) leaves it out, since
      ``workflow.make_objective`` rebuilds it identically and checkpoints stay loadable whatever the weight.

    Batches come from the wrapped objective.
    """

    def __init__(self, inner: BaseObjective, weight: float, reference: nn.Module | None = None):
        super().__init__()
        if inner.task != "embedding":
            raise ValueError("SimilarityPreservingObjective wraps an embedding objective")
        if weight < 0:
            raise ValueError(f"similarity-preserving weight must be >= 0, got {weight}")
        self.inner = inner
        self.weight = float(weight)
        self.m_per_class = inner.m_per_class
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()  # a reference, not a learner: BatchNorm statistics stay as they were
        object.__setattr__(self, "_reference", reference)  # not registered: out of state_dict / checkpoints

    @property
    def reference(self) -> nn.Module | None:
        return self._reference

    def _apply(self, fn, recurse: bool = True):  # .to(device) / .float() also move the reference
        super()._apply(fn, recurse)
        if self._reference is not None:
            self._reference._apply(fn)
        return self

    def batches(self, labels: np.ndarray, batch_size: int, epoch: int, seed: int) -> Iterator[np.ndarray]:
        return self.inner.batches(labels, batch_size, epoch, seed)

    def reference_features(self, inputs: torch.Tensor) -> torch.Tensor:
        if self._reference is None:
            return inputs
        with torch.no_grad():
            return self._reference(inputs)

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        reference = gather_batch(self.reference_features(images).float())
        embeddings = model(images)
        with _fp32(embeddings.device):
            embeddings = gather_batch(embeddings.float())
            inner = self.inner.loss_from_embeddings(embeddings, labels)  # first: the autograd order of old runs
            preserve = self.weight * similarity_drift(embeddings, reference)
            total = inner + preserve
            self.last_terms = {**self.inner.last_terms, "preserve": preserve.detach()}
            return total

    def extra_parameters(self) -> list[dict]:
        return self.inner.extra_parameters()


# ---------------------------------------------------------------------------------------------- factory


def _build_part(spec: dict[str, Any], num_classes: int, embedding_dim: int, distance: str) -> BaseObjective:
    entry = registry.LOSSES[spec["name"]]
    args = dict(spec["args"])
    if "distance" in args:
        args["distance"] = registry.resolve_distance(args["distance"], distance)
    part = entry.build(num_classes, embedding_dim, **args) if entry.proxies else entry.build(**args)
    miner_spec = spec.get("miner")
    if miner_spec is not None:
        margs = dict(miner_spec["args"])
        if "distance" in margs:
            margs["distance"] = registry.resolve_distance(margs["distance"], distance)
        miner = registry.MINERS[miner_spec["name"]].build(**margs)
        if miner is not None:
            part.miner = miner
    return part


def build_objective(
    loss: str | dict[str, Any],
    params: dict[str, Any] | None = None,
    num_classes: int = 2,
    embedding_dim: int = 64,
    sampler: str | dict[str, Any] | None = None,
    distance: str = "euclidean",
) -> MultiObjective:
    """The objective of a loss specification: the weighted parts, their miners and the sampler.

    ``loss`` is the nested form (``{"parts": [{"name", "weight", "args", "miner"}]}``, see
    ``partmatch.ml.losses.registry``) with ``sampler`` (``{"name": "m_per_class", "m": 4}``; default
    ``registry.default_sampler``), or an old loss name (``"triplet"``, ``"contrastive+proxy_anchor"``...) with
    the old flat keys in ``params`` (``margin``, ``sampling``, ``margin2``, ``proxy_weight``,
    ``proxy_lr_multiplier``, ``m_per_class``), translated by ``registry.legacy_spec``. ``distance`` is the
    model's: parts and miners whose ``distance`` is ``model`` use it. Names and arguments are checked
    (``registry.SpecError`` names the dotted key and the valid options).
    """
    if isinstance(loss, str):
        flat = dict(params or {})
        unknown = sorted(set(flat) - set(registry.LEGACY_KEYS))
        if unknown:
            raise registry.SpecError(unknown[0], f"unknown key of the old loss form{registry.did_you_mean(unknown[0], registry.LEGACY_KEYS)}; "
                                                 f"valid: {list(registry.LEGACY_KEYS)}")
        if sampler is not None:
            raise ValueError("an old loss name comes with m_per_class, not a sampler")
        loss, sampler = registry.legacy_spec(loss, flat)
    elif params:
        raise ValueError("the nested loss form takes its arguments in loss.parts[i].args, not params")
    spec = registry.validate_loss(loss)
    sampler_spec = registry.validate_sampler(sampler if sampler is not None else registry.default_sampler(spec))
    names = registry.part_names(spec)
    parts = [_build_part(p, num_classes, embedding_dim, distance) for p in spec["parts"]]
    owner = next((p for p in parts if isinstance(p, ProxyAnchorObjective)), None)
    for part in parts:
        if isinstance(part, ProxyRepulsionObjective):
            part.bind(owner)
    s_entry = registry.SAMPLERS[sampler_spec["name"]]
    s_args = dict(sampler_spec["args"])
    if "distance" in s_args:
        s_args["distance"] = registry.resolve_distance(s_args["distance"], distance)
    batch_sampler = s_entry.build(**s_args)
    if s_entry.needs_proxies:
        if owner is None:
            raise registry.SpecError("sampler.name", f"{sampler_spec['name']!r} chooses categories by their proxies: "
                                                     "add a loss part with name: proxy_anchor")
        batch_sampler.bind(lambda: owner.proxies)
    objective = MultiObjective([(p, s["weight"]) for p, s in zip(parts, spec["parts"], strict=True)], names,
                               sampler=batch_sampler)
    objective.spec = {"loss": spec, "sampler": sampler_spec}
    return objective
