"""Training on several processes (issue 12): torch.distributed on the CPU (gloo), two processes with half the global
batch each against one process with the whole batch, on the same seeded data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from partmatch.config import TrainingParams
from partmatch.ml import workflow
from partmatch.ml.training import DistributedTrainingError, Hook, distributed
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


# ------------------------------------------------------------------------------- resume, and a rank that dies


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_distributed_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(tmp_path):
    case = {**CASES["proxy_anchor"], "patience": None}
    whole, history_whole, _ = _train({**case, "epochs": 3}, 2, tmp_path / "whole")
    _train({**case, "epochs": 2}, 2, tmp_path / "cut")                      # stopped after epoch 2...
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["best.pt", "last.pt"]   # rank 0's files only
    resumed, history, summary = _train({**case, "epochs": 3}, 2, tmp_path / "cut", resume=True)   # ...and resumed
    assert summary["resumed_from_epoch"] == 2 and [h["epoch"] for h in history] == [1, 2, 3]
    for k in whole["state_dict"]:
        assert torch.equal(whole["state_dict"][k], resumed["state_dict"][k]), k
    assert [h["train_loss"] for h in history] == [h["train_loss"] for h in history_whole]


class _Fail(Hook):
    """Rank ``rank`` fails after epoch 1 while the others go on into epoch 2's collectives."""

    def __init__(self, rank: int, hard: bool):
        self.rank, self.hard = rank, hard

    def on_epoch_end(self, trainer, record, improved):
        if distributed.rank() == self.rank:
            if self.hard:
                import os

                os._exit(3)                                   # killed: no Python error to report
            raise ValueError(f"rank {self.rank} lost its data")


def _fit_with_fault(fault: _Fail) -> dict:
    """One process of a distributed fit (study trunk, contrastive) with ``fault`` as an extra hook."""
    from partmatch.ml.data import InMemoryImages
    from partmatch.ml.objectives import build_objective
    from partmatch.ml.training import TrainConfig, fit
    from tests.ml.test_engine import small_model, toy_images

    model = small_model()
    fit(model, build_objective("contrastive", {}, 4, 8), toy_images(), None,
        TrainConfig(epochs=3, batch_size=16, device="cpu", progress=False, patience=None), hooks=[fault])
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.timeout(120)          # a hang (rank 0 waiting for rank 1 forever) fails here
@pytest.mark.parametrize("hard", [False, True], ids=["exception", "killed"])
def test_a_rank_that_dies_fails_the_whole_run_with_that_rank_s_error(hard):
    config = distributed.DistributedConfig(nproc_per_node=2, timeout_s=30)
    with pytest.raises(DistributedTrainingError) as failure:
        distributed.launch(_fit_with_fault, _Fail(rank=1, hard=hard), config, torch.device("cpu"))
    message = str(failure.value)
    assert message.startswith("Distributed training failed on rank 1 (local rank 1")
    if hard:
        assert "exit code 3" in message and "no Python error" in message
    else:
        assert "ValueError: rank 1 lost its data" in message and "test_distributed.py" in message


def test_distributed_parameters_are_checked_before_any_work():
    from partmatch.config import ParameterError, parse

    base = {**TINY, "batch_size": 16, "m_per_class": 4}
    for bad, words in [({"nproc_per_node": 0}, "nproc_per_node"), ({"nnodes": 2, "node_rank": 2}, "node_rank (2)"),
                       ({"backend": "mpi"}, "backend"), ({"rdzv_endpoint": "node0"}, "host:port"),
                       ({"nprocs": 2}, "valid keys: nproc_per_node, nnodes"),
                       ({"nproc_per_nod": 2}, "did you mean 'nproc_per_node'")]:
        with pytest.raises(ParameterError, match=words.replace("(", r"\(").replace(")", r"\)")):
            parse("siamese_triplet", {**base, "distributed": bad})
    assert distributed.DistributedConfig(nproc_per_node=2, nnodes=3).world_size == 6
    assert distributed.resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert distributed.resolve_backend("auto", torch.device("cuda")) == "nccl"
    with pytest.raises(ValueError, match="nccl' needs CUDA"):
        distributed.resolve_backend("nccl", torch.device("cpu"))


def test_a_shard_splits_a_global_batch_in_rank_order():
    batch = np.arange(10, 21)                                   # 11 images over 3 ranks: 4 + 4 + 3
    parts = [distributed.Shard(len(batch), r, 3).local(batch) for r in range(3)]
    assert [p.tolist() for p in parts] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 20]]
    assert distributed.gather_batch(torch.ones(2)) is not None and not distributed.is_active()
