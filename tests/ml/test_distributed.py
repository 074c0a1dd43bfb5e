"""Training on several processes (issue 12): torch.distributed on the CPU (gloo), two processes with half the global
batch each against one process with the whole batch, on the same seeded data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from partmatch.config import TrainingParams
from partmatch.ml import workflow
from partmatch.ml.training import DistributedTrainingError, distributed
from tests.ml.test_workflow import TINY, toy

PREPROCESSING = {"image_size": 32, "color_mode": "grayscale"}
TWO = {"nproc_per_node": 2, "timeout_s": 60}


def _train(overrides: dict, processes: int, tmp_path=None, **extra):
    images, index = toy()
    p = TrainingParams(**{**TINY, "epochs": 2, "batch_size": 16, "m_per_class": 4, **overrides,
                          "distributed": {**TWO, "nproc_per_node": processes}, **extra})
    return workflow.train(images, index, p, str(tmp_path) if tmp_path else None, PREPROCESSING)


def _assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> float:
    assert sorted(a) == sorted(b)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst <= atol, f"largest parameter difference {worst:.3g}"
    return worst


# Equality holds where the gradient is not mathematically zero. A Euclidean pair loss on raw embeddings does not
# change when every embedding moves by the same vector, so the gradient of the embedding layer's bias is exactly 0
# in exact arithmetic and ~1e-9 float noise in practice; Adam's first steps are ~lr * sign(gradient), so that noise
# becomes steps of the learning rate's size that differ between any two summation orders (measured: 4e-4 with
# normalize: false). With L2-normalised embeddings (the pipelines' pretrained setting) every gradient carries
# signal, and the two runs agree to ~2e-7.
CASES = {
    "contrastive_random_pairs": {"loss": "contrastive", "normalize": True},  # the study's random balanced pairs
    "triplet_semihard_miner": {"loss": "triplet", "sampling": "semihard", "normalize": True, "margin": 0.2},
    "proxy_anchor": {"loss": "proxy_anchor", "normalize": True},      # proxies inside the DDP module
}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_with_half_batches_train_the_weights_of_one_process_with_the_whole_batch(case):
    one, history_one, summary_one = _train(CASES[case], 1)
    two, history_two, summary_two = _train(CASES[case], 2)
    assert summary_one["world_size"] == 1 and summary_two["world_size"] == 2
    # the study trunk has no BatchNorm: every parameter must agree (float sums in another order: ~1e-7)
    _assert_same_weights(one["state_dict"], two["state_dict"])
    assert [h["epoch"] for h in history_two] == [1, 2]
    for a, b in zip(history_one, history_two, strict=True):       # the same global loss and validation score
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["val_score"] == pytest.approx(a["val_score"], abs=1e-9)
