"""cpu_heap_reuse (issue 11): CPU training and inference keep freed memory for reuse instead of page-faulting
fresh mmap'd blocks every step. A pure allocation strategy: the trained weights and embeddings are bitwise the
same with and without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from partmatch.ml.training import device as engine
from partmatch.ml.training import loop
from partmatch.ml.training import cpu_heap_reuse, fit
from partmatch.ml.inference import _run_batches
from partmatch.ml.objectives import build_objective
from tests.ml.test_engine import config, small_model, toy_images

pytestmark = pytest.mark.skipif(engine._glibc() is None, reason="glibc only (elsewhere a no-op)")


def _train(fn) -> dict[str, torch.Tensor]:
    model = small_model("classifier")
    objective = build_objective("cross_entropy", {}, num_classes=4, embedding_dim=4)
    fn(model, objective, toy_images(), None, config(epochs=2))
    return model.state_dict()


def test_fit_runs_inside_the_heap_context_and_trains_bitwise_identically(monkeypatch):
    depths = []
    real = cpu_heap_reuse

    def spy(enabled=True):
        depths.append(enabled)
        return real(enabled)

    monkeypatch.setattr(loop, "cpu_heap_reuse", spy)
    with_heap = _train(fit)
    assert depths == [True]  # fit on the CPU asked for it, once
    without = _train(fit.__wrapped__)  # the undecorated loop: glibc's default allocation
    assert sorted(with_heap) == sorted(without)
    for k in with_heap:
        assert torch.equal(with_heap[k], without[k]), k
    assert engine._heap_depth == 0


def test_nested_contexts_act_once_and_restore_on_error():
    with cpu_heap_reuse():
        assert engine._heap_depth == 1
        with cpu_heap_reuse():
            assert engine._heap_depth == 2
        assert engine._heap_depth == 1
    assert engine._heap_depth == 0
    with pytest.raises(RuntimeError, match="boom"), cpu_heap_reuse():
        raise RuntimeError("boom")
    assert engine._heap_depth == 0
    with cpu_heap_reuse(enabled=False):
        assert engine._heap_depth == 0


def test_embeddings_are_identical_inside_and_outside_the_context():
    model = small_model("embedding").eval()
    images = toy_images().images.numpy()
    a = _run_batches(model, images, model, 16, "cpu", (0.5,), (0.5,), None)
    with cpu_heap_reuse():
        b = _run_batches(model, images, model, 16, "cpu", (0.5,), (0.5,), None)
    np.testing.assert_array_equal(a, b)
