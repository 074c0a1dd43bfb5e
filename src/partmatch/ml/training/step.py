"""One training step's module: the model and the objective together, so that wrapping it in
DistributedDataParallel synchronises the objective's own parameters (proxies) with the model's weights."""

from __future__ import annotations

import torch
from torch import nn


class TrainStep(nn.Module):
    """``forward(images, labels) -> loss``: ``objective.loss(model, images, labels)``.

    In a distributed step ``images`` are this rank's slice of the global batch and ``labels`` the whole global
    batch's labels; the objective gathers what the model computed (``distributed.gather_batch``) before the loss.
    """

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        if not isinstance(objective, nn.Module):
            raise TypeError(f"an objective must be an nn.Module (its parameters train with the model), got "
                            f"{type(objective).__name__}")
        self.model = model
        self.objective = objective

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.objective.loss(self.model, images, labels)
