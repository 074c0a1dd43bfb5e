"""Hand-written losses: the study's contrastive loss, the quadruplet loss of Chen et al. (2017) and the
proxy-proxy repulsion term of the multi-objective recipe.

Library losses (triplet margin, proxy anchor, multi-similarity...) come from pytorch-metric-learning; every loss
is registered by name in ``partmatch.ml.losses.registry``.

Distances (``euclidean | cosine | manhattan``) are the units of evaluation and retrieval
(``partmatch.ml.retrieval``): L2, L2 between L2-normalised vectors (``sqrt(2 - 2 cos)``) and L1.
"""

from __future__ import annotations

import torch
from torch import nn

_EPS = 1e-12


def pairwise_distances(x: torch.Tensor, y: torch.Tensor | None = None, squared: bool = False) -> torch.Tensor:
    """Euclidean distance matrix (len(x), len(y)); ``squared`` returns squared distances.

    Uses the ``|x|^2 + |y|^2 - 2 x.y`` expansion clamped at 0; the square root is taken of a value clamped
    at 1e-12 so gradients stay finite for coincident points.
    """
    same = y is None
    x = x.float()
    y = x if same else y.float()
    sq = (x * x).sum(1, keepdim=True) + (y * y).sum(1).unsqueeze(0) - 2.0 * x @ y.t()
    sq = sq.clamp_min(0.0)
    if same:  # exact zeros on the diagonal
        sq = sq * (1.0 - torch.eye(len(x), device=x.device, dtype=sq.dtype))
    return sq if squared else sq.clamp_min(_EPS).sqrt()


def squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise squared Euclidean distance ``|a_i - b_i|^2`` (exact, no expansion)."""
    return (a - b).pow(2).sum(dim=1)


def rowwise_distance(a: torch.Tensor, b: torch.Tensor, distance: str = "euclidean") -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise ``(d, d^2)`` between ``a_i`` and ``b_i`` for a retrieval distance. Euclidean is the exact
    ``|a - b|^2`` and its square root clamped at 1e-12 (finite gradients for coincident points); cosine the same
    on L2-normalised rows; manhattan ``|a - b|_1``."""
    if distance == "manhattan":
        d = (a - b).abs().sum(dim=1)
        return d, d * d
    if distance == "cosine":
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    elif distance != "euclidean":
        raise ValueError(f"distance must be one of ['euclidean', 'cosine', 'manhattan'], got {distance!r}")
    d2 = squared_distance(a, b)
    return d2.clamp_min(_EPS).sqrt(), d2


class StudyContrastiveLoss(nn.Module):
    """The study's contrastive loss, averaged over pairs.

    ``L = (1 - Y) * 1/2 * D^2 + Y * 1/2 * max(0, m - D)^2`` with ``Y = 0`` for a similar pair, ``Y = 1`` for a
    dissimilar pair and ``D`` the distance between the two embeddings (Euclidean in the study;
    ``distance`` also takes cosine or manhattan, see :func:`rowwise_distance`).
    """

    def __init__(self, margin: float = 1.0, distance: str = "euclidean"):
        super().__init__()
        if margin <= 0:
            raise ValueError(f"contrastive margin must be > 0, got {margin}")
        self.margin = float(margin)
        self.distance = distance

    def forward(self, emb_a: torch.Tensor, emb_b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if emb_a.shape != emb_b.shape or emb_a.ndim != 2:
            raise ValueError(f"expected two (P, D) tensors of equal shape, got {tuple(emb_a.shape)}, "
                             f"{tuple(emb_b.shape)}")
        if len(emb_a) == 0:
            return emb_a.sum() * 0.0
        y = y.to(emb_a.dtype)
        d, d2 = rowwise_distance(emb_a, emb_b, self.distance)
        similar = (1.0 - y) * 0.5 * d2
        dissimilar = y * 0.5 * torch.relu(self.margin - d).pow(2)
        return (similar + dissimilar).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}, distance={self.distance}"


class QuadrupletLoss(nn.Module):
    """Quadruplet loss (Chen et al., CVPR 2017, "Beyond triplet loss"), averaged over quadruplets.

    ``L = [d(a,p)^2 - d(a,n1)^2 + alpha1]_+ + [d(a,p)^2 - d(n1,n2)^2 + alpha2]_+`` where ``n1`` has a class
    other than ``a``'s and ``n2`` a class other than both ``a``'s and ``n1``'s; ``d`` is Euclidean (the paper),
    or cosine / manhattan with ``distance``.
    """

    def __init__(self, margin1: float = 1.0, margin2: float = 0.5, distance: str = "euclidean"):
        super().__init__()
        self.margin1 = float(margin1)
        self.margin2 = float(margin2)
        self.distance = distance

    def forward(self, a: torch.Tensor, p: torch.Tensor, n1: torch.Tensor, n2: torch.Tensor) -> torch.Tensor:
        if not (a.shape == p.shape == n1.shape == n2.shape) or a.ndim != 2:
            raise ValueError("a, p, n1, n2 must be (Q, D) tensors of the same shape")
        if len(a) == 0:
            return a.sum() * 0.0
        d_ap = rowwise_distance(a, p, self.distance)[1]
        term1 = torch.relu(d_ap - rowwise_distance(a, n1, self.distance)[1] + self.margin1)
        term2 = torch.relu(d_ap - rowwise_distance(n1, n2, self.distance)[1] + self.margin2)
        return (term1 + term2).mean()

    def extra_repr(self) -> str:
        return f"margin1={self.margin1}, margin2={self.margin2}, distance={self.distance}"


class ProxyRepulsionLoss(nn.Module):
    """Proxy-proxy term of the multi-objective recipe: pushes the proxies of different categories apart.

    ``L = 1 / (C (C - 1)) * sum_{i != j} max(0, cos(p_i, p_j) - margin)``: the mean, over ordered pairs of
    distinct proxies, of how far their cosine similarity exceeds ``margin`` (0: proxies should be at least
    orthogonal; -1 < margin < 1). It takes the proxies of a proxy loss (e.g. Proxy-Anchor's), not the batch.
    """

    def __init__(self, margin: float = 0.0):
        super().__init__()
        if not -1.0 <= margin < 1.0:
            raise ValueError(f"proxy repulsion margin must be in [-1, 1), got {margin}")
        self.margin = float(margin)

    def forward(self, proxies: torch.Tensor) -> torch.Tensor:
        if proxies.ndim != 2 or len(proxies) < 2:
            raise ValueError(f"expected (C >= 2, D) proxies, got {tuple(proxies.shape)}")
        p = torch.nn.functional.normalize(proxies.float(), dim=1)
        cos = p @ p.T
        off = ~torch.eye(len(p), dtype=torch.bool, device=p.device)
        return torch.relu(cos[off] - self.margin).mean()

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
