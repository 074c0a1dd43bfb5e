import numpy as np
import pytest
import torch

from partmatch.ml.data import class_balanced_batches, epoch_rng, shuffled_batches
from partmatch.ml.losses import registry
from partmatch.ml.models import build_model
from partmatch.ml.objectives import (
    ClassificationObjective,
    ContrastiveObjective,
    MultiObjective,
    ProxyAnchorObjective,
    SimilarityPreservingObjective,
    TripletObjective,
    balanced_pairs,
    build_objective,
    random_quadruplets,
    random_triplets,
    similarity_drift,
)

LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4])


# ------------------------------------------------------------------------------------------ pair mining


def test_balanced_pairs_are_balanced_and_correctly_labelled():
    torch.manual_seed(0)
    i, j, y = balanced_pairs(LABELS)
    n_pos, n_neg = int((y == 0).sum()), int((y == 1).sum())
    same = LABELS[i] == LABELS[j]
    total_pos = 3 + 1 + 6 + 1  # C(3,2) + C(2,2) + C(4,2) + C(2,2)
    assert n_pos == n_neg == total_pos
    assert torch.all(same[y == 0]) and not torch.any(same[y == 1])
    assert torch.all(i < j)
    assert len({(a, b) for a, b in zip(i.tolist(), j.tolist(), strict=True)}) == len(i)  # no duplicates


def test_balanced_pairs_respects_max_pairs_and_is_seeded():
    torch.manual_seed(1)
    first = balanced_pairs(LABELS, max_pairs=6)
    torch.manual_seed(1)
    second = balanced_pairs(LABELS, max_pairs=6)
    assert len(first[0]) == 6 and int(first[2].sum()) == 3
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# --------------------------------------------------------------------------------------- triplet mining


def test_random_triplets_are_valid_and_cover_every_anchor():
    torch.manual_seed(0)
    a, p, n = random_triplets(LABELS)
    # label 4 has a single image: no positive, so that anchor is skipped
    assert a.tolist() == [k for k in range(len(LABELS)) if LABELS[k] != 4]
    assert torch.all(LABELS[a] == LABELS[p]) and torch.all(a != p)
    assert torch.all(LABELS[a] != LABELS[n])


def test_random_triplets_are_uniform_not_hardest():
    seen_pos, seen_neg = set(), set()
    for seed in range(60):
        torch.manual_seed(seed)
        a, p, n = random_triplets(LABELS)
        row = (a == 5).nonzero().item()  # anchor 5 (label 2) has positives 6, 7, 8
        seen_pos.add(p[row].item())
        seen_neg.add(n[row].item())
    assert seen_pos == {6, 7, 8}
    assert seen_neg == {0, 1, 2, 3, 4, 9, 10, 11}   # every image of another label, over 60 seeds


def test_triplet_objective_random_uses_the_random_triplets():
    obj = TripletObjective(margin=0.5, sampling="random")
    emb = torch.randn(len(LABELS), 4)
    torch.manual_seed(3)
    a, p, n = obj.mine(emb, LABELS)
    assert torch.all(LABELS[a] == LABELS[p]) and torch.all(LABELS[a] != LABELS[n]) and torch.all(a != p)


def test_semihard_triplets_satisfy_the_semihard_condition():
    torch.manual_seed(0)
    labels = torch.arange(6).repeat_interleave(4)
    emb = torch.randn(len(labels), 3)  # random embeddings: plenty of easy, hard and semihard triplets
    margin = 0.5
    a, p, n = TripletObjective(margin=margin, sampling="semihard").mine(emb, labels)
    d = torch.cdist(emb, emb)
    # exactly the brute-force set of semihard triplets: d(a,p) < d(a,n) <= d(a,p) + margin
    brute = {(i, j, k) for i in range(24) for j in range(24) for k in range(24)
             if i != j and labels[i] == labels[j] and labels[k] != labels[i] and d[i, j] < d[i, k] <= d[i, j] + margin}
    assert set(zip(a.tolist(), p.tolist(), n.tolist(), strict=True)) == brute and len(a) == len(brute) == 214
    d_ap, d_an = d[a, p], d[a, n]
    assert torch.all(labels[a] == labels[p]) and torch.all(labels[a] != labels[n])
    assert torch.all(d_ap < d_an)
    assert torch.all(d_an < d_ap + margin + 1e-6)
    # and it is a strict subset of all triplets: some valid triplets were rejected
    assert len(a) < 6 * 4 * 3 * 20


def test_hard_triplets_take_the_hardest_positive_and_negative():
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(3)
    emb = torch.randn(len(labels), 5)
    a, p, n = TripletObjective(margin=0.2, sampling="hard").mine(emb, labels)
    d = torch.cdist(emb, emb)
    same = labels[:, None] == labels[None, :]
    for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist(), strict=True):
        assert d[ai, pi] == pytest.approx(d[ai][same[ai]].max().item(), abs=1e-5)
        assert d[ai, ni] == pytest.approx(d[ai][~same[ai]].min().item(), abs=1e-5)


def test_unknown_triplet_sampling_is_rejected():
    with pytest.raises(ValueError, match="semihard"):
        TripletObjective(sampling="hardest")


def test_random_quadruplets_are_valid():
    torch.manual_seed(0)
    a, p, n1, n2 = random_quadruplets(LABELS)
    assert a.tolist() == list(range(11))   # every anchor but the single image of label 4 (no positive)
    assert torch.all(LABELS[a] == LABELS[p]) and torch.all(a != p)
    assert torch.all(LABELS[n1] != LABELS[a])
    assert torch.all(LABELS[n2] != LABELS[a]) and torch.all(LABELS[n2] != LABELS[n1])


# ------------------------------------------------------------------------------------------- samplers


def test_class_balanced_batches_have_m_per_class_and_are_reproducible():
    labels = np.repeat(np.arange(10), 7)
    batches = list(class_balanced_batches(labels, batch_size=12, m_per_class=3, rng=epoch_rng(5, 1)))
    assert len(batches) == len(labels) // 12
    for b in batches:
        assert len(b) == 12
        values, counts = np.unique(labels[b], return_counts=True)
        assert len(values) == 4 and np.all(counts == 3)
        assert len(set(b.tolist())) == 12  # each class has >= m images: no repeats
    again = list(class_balanced_batches(labels, 12, 3, epoch_rng(5, 1)))
    assert all(np.array_equal(x, y) for x, y in zip(batches, again, strict=True))
    other = list(class_balanced_batches(labels, 12, 3, epoch_rng(5, 2)))
    assert not all(np.array_equal(x, y) for x, y in zip(batches, other, strict=True))
    # the global numpy RNG neither drives nor is disturbed by the sampler
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    list(class_balanced_batches(labels, 12, 3, 123))
    assert np.array_equal(np.random.get_state()[1], before)


def test_class_balanced_batches_shrink_to_the_available_classes():
    labels = np.repeat(np.arange(3), 5)
    batches = list(class_balanced_batches(labels, batch_size=64, m_per_class=4, rng=0))
    assert batches and all(len(b) == 12 for b in batches)


def test_shuffled_batches_cover_everything_once():
    batches = list(shuffled_batches(23, 5, np.random.default_rng(0)))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert sorted(np.concatenate(batches).tolist()) == list(range(23))
    gen = torch.Generator().manual_seed(0)
    assert sorted(np.concatenate(list(shuffled_batches(7, 3, gen))).tolist()) == list(range(7))


def test_objective_batches_depend_only_on_seed_and_epoch():
    labels = np.repeat(np.arange(8), 6)
    for obj in (ClassificationObjective(), ContrastiveObjective(m_per_class=2)):
        first = [b.tolist() for b in obj.batches(labels, 8, epoch=3, seed=7)]
        assert first == [b.tolist() for b in obj.batches(labels, 8, epoch=3, seed=7)]
        assert first != [b.tolist() for b in obj.batches(labels, 8, epoch=4, seed=7)]


# ------------------------------------------------------------------------------------ objective losses


def _spec(name: str) -> tuple[dict, dict | None]:
    """A registered loss alone; proxy_repulsion acts on proxy_anchor's proxies, so it comes with them."""
    parts = [{"name": name}] if name != "proxy_repulsion" else [{"name": "proxy_anchor"}, {"name": name}]
    return {"parts": parts}, None


@pytest.mark.parametrize("name", [*registry.LEGACY_LOSSES, *registry.LOSSES])
def test_every_objective_gives_a_finite_differentiable_loss(name):
    torch.manual_seed(0)
    task = "classifier" if name == "cross_entropy" else "embedding"
    model = build_model(task, num_classes=4, embedding_dim=8, in_channels=1, image_size=16, channels=(2, 4))
    if name in registry.LEGACY_LOSSES:
        obj = build_objective(name, {}, num_classes=4, embedding_dim=8)
    else:
        obj = build_objective(*_spec(name), num_classes=4, embedding_dim=8)
    assert obj.task == task
    labels = torch.arange(4).repeat_interleave(4)
    loss = obj.loss(model, torch.randn(16, 1, 16, 16), labels)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # each part's weighted term is logged, and they add up to the loss
    assert list(obj.last_terms) == obj.names
    torch.testing.assert_close(sum(obj.last_terms.values()), loss.detach())
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    if name == "proxy_repulsion":
        return
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the loss reaches every layer: each weight tensor, the first convolution's included, gets a gradient
    assert [n for n, p in model.named_parameters() if p.ndim > 1 and not p.grad.abs().sum() > 0] == []


def test_proxy_anchor_has_its_own_param_group():
    obj = ProxyAnchorObjective(num_classes=5, embedding_dim=8, proxy_lr_multiplier=100)
    (group,) = obj.extra_parameters()
    assert group["lr_multiplier"] == 100
    assert group["params"][0].shape == (5, 8)
    assert "criterion.proxies" in obj.state_dict()


def test_multi_objective_is_the_weighted_sum():
    torch.manual_seed(0)
    spec = {"parts": [{"name": "contrastive", "args": {"margin": 2.0}},
                      {"name": "proxy_anchor", "weight": 0.25, "args": {"alpha": 16}}]}
    multi = build_objective(spec, None, num_classes=4, embedding_dim=6)
    assert isinstance(multi, MultiObjective) and multi.weights == [1.0, 0.25]
    assert multi.names == ["contrastive", "proxy_anchor"]
    assert len(multi.extra_parameters()) == 1
    emb, labels = torch.randn(16, 6), torch.arange(4).repeat_interleave(4)
    torch.manual_seed(1)
    total = multi.loss_from_embeddings(emb, labels)
    torch.manual_seed(1)
    first = multi.parts[0].loss_from_embeddings(emb, labels)
    second = 0.25 * multi.parts[1].loss_from_embeddings(emb, labels)
    torch.testing.assert_close(total, first + second)
    torch.testing.assert_close(multi.last_terms["contrastive"], first)
    torch.testing.assert_close(multi.last_terms["proxy_anchor"], second)


def test_build_objective_rejects_unknown_names_and_params():
    with pytest.raises(ValueError) as err:
        build_objective("arcface", {}, 3, 8)
    for name in registry.LEGACY_LOSSES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="margn.*did you mean 'margin'"):
        build_objective("contrastive", {"margn": 1.0}, 3, 8)
    with pytest.raises(ValueError, match=r"loss.parts\[0\].args.margn.*did you mean 'margin'"):
        build_objective({"parts": [{"name": "triplet", "args": {"margn": 1.0}}]}, None, 3, 8)
    with pytest.raises(ValueError, match=r"loss.parts\[1\].miner.name.*'semihard'"):
        build_objective({"parts": [{"name": "proxy_anchor"}, {"name": "triplet", "miner": {"name": "semihardd"}}]},
                        None, 3, 8)
    trip = build_objective("triplet", {"margin": 0.3, "sampling": "semihard", "m_per_class": 2}, 3, 8)
    assert trip.spec["loss"]["parts"][0]["miner"] == {"name": "semihard",
                                                      "args": {"margin": 0.3, "distance": "euclidean"}}
    assert trip.parts[0].criterion.margin == 0.3 and trip.sampler.m == 2


def test_similarity_drift_against_its_formula_by_hand():
    # cosine similarities: embeddings (1,0),(0,1) -> off-diagonal 0; reference (1,0),(1,1)/sqrt2 -> 1/sqrt2
    z = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    r = torch.tensor([[5.0, 0.0], [1.0, 1.0]])
    # the 2x2 difference matrix is [[0, -1/sqrt2], [-1/sqrt2, 0]]: mean of squares = 2 * (1/2) / 4 = 0.25
    torch.testing.assert_close(similarity_drift(z, r), torch.tensor(0.25))
    assert similarity_drift(3 * r, r).item() == pytest.approx(0.0, abs=1e-7)   # scale does not matter


def test_similarity_preserving_objective_adds_the_weighted_drift():
    torch.manual_seed(0)
    inner = TripletObjective(margin=0.2, sampling="random", m_per_class=2)
    head = torch.nn.Linear(6, 6)
    x, y = torch.randn(8, 6), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    wrapped = SimilarityPreservingObjective(inner, weight=4.0)
    labels = np.repeat(np.arange(4), 4)
    assert wrapped.m_per_class == 2
    assert [b.tolist() for b in wrapped.batches(labels, 8, 0, 1)] == [b.tolist() for b in inner.batches(labels, 8, 0, 1)]
    torch.manual_seed(1)
    total = wrapped.loss(head, x, y)
    terms = dict(wrapped.last_terms)
    torch.manual_seed(1)
    expected = inner.loss(head, x, y) + 4.0 * similarity_drift(head(x), x)
    torch.testing.assert_close(total, expected)
    # the penalty is logged as its own term beside the loss's
    assert list(terms) == ["preserve"]   # a bare objective (not built from a spec) has no named parts
    torch.testing.assert_close(terms["preserve"], (4.0 * similarity_drift(head(x), x)).detach())
    total.backward()
    # its gradient is the gradient of that sum
    (expected_grad,) = torch.autograd.grad(expected, head.weight)
    torch.testing.assert_close(head.weight.grad, expected_grad)
    with pytest.raises(ValueError, match=">= 0"):
        SimilarityPreservingObjective(inner, weight=-1.0)
    with pytest.raises(ValueError, match="embedding objective"):
        SimilarityPreservingObjective(ClassificationObjective(), weight=1.0)


def test_similarity_preservation_against_a_frozen_reference_network():
    """reference=module: the penalty compares with a frozen copy of the initial trunk, which neither learns nor
    leaves eval mode (BatchNorm statistics included) while the model trains."""
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU())
    model = torch.nn.Sequential(trunk, torch.nn.Linear(5, 3))
    import copy

    reference = copy.deepcopy(trunk)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    objective = SimilarityPreservingObjective(TripletObjective(margin=0.2, sampling="random", m_per_class=2), 2.0,
                                              reference).train()
    x, y = torch.randn(8, 6), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(1)
    loss = objective.loss(model, x, y)
    loss.backward()
    opt.step()
    objective.train()
    assert not reference.training and all(not q.requires_grad for q in reference.parameters())
    assert not any(k.startswith("reference") for k in objective.state_dict())   # rebuilt, never checkpointed
    objective.to(torch.float64)
    assert reference[0].weight.dtype == torch.float64                           # but moved with the objective
    objective.to(torch.float32)
    for k, v in reference.state_dict().items():
        assert torch.equal(v, before[k]), f"reference {k} changed"
    with torch.no_grad():
        ref = reference(x)
    torch.manual_seed(1)
    again = objective.loss(model, x, y)
    torch.manual_seed(1)
    expected = objective.inner.loss(model, x, y) + 2.0 * similarity_drift(model(x), ref)
    torch.testing.assert_close(again, expected)
