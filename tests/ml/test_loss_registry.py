"""Losses, miners and samplers by name (partmatch.ml.losses.registry): the nested configuration, its checks
before any work, the old flat keys kept to the weight, the proxy-proxy term, the nearest-proxy sampler,
over-sampling and the three distances."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from partmatch import config
from partmatch.config import ParameterError
from partmatch.ml import workflow
from partmatch.ml.data import NearestProxySampler, ShuffledSampler
from partmatch.ml.losses import ProxyRepulsionLoss, QuadrupletLoss, StudyContrastiveLoss, registry
from partmatch.ml.objectives import build_objective
from tests.conftest import PROJECT_ROOT

FLAT_KEYS = ("loss", *registry.LEGACY_KEYS)

# The study's three models, written by hand in the nested form: the same numbers as their flat parameters.
NESTED = {
    "cnn": {"loss": {"parts": [{"name": "cross_entropy"}]}, "sampler": {"name": "shuffled"}},
    "siamese_contrastive": {"loss": {"parts": [{"name": "contrastive", "weight": 1, "args": {"margin": 1.0}}]},
                            "sampler": {"name": "m_per_class", "m": 4}},
    "siamese_triplet": {"loss": {"parts": [{"name": "triplet", "args": {"margin": 0.2},
                                            "miner": {"name": "semihard", "args": {"margin": 0.2}}}]},
                        "sampler": {"name": "m_per_class", "m": 4}},
}


def _toy_split(n_cls: int = 6, per: int = 10) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(0)
    labels = np.repeat([f"c{i}" for i in range(n_cls)], per)
    images = rng.integers(0, 255, (len(labels), 1, 24, 24), dtype=np.uint8)
    split = np.where(np.arange(len(labels)) % per < 8, "train", "val")
    return images, pd.DataFrame({"label": labels, "split": split})


@pytest.mark.parametrize("model", list(NESTED))
def test_old_flat_and_nested_configs_train_to_the_same_weights(model):
    raw = yaml.safe_load((PROJECT_ROOT / f"conf/base/parameters_{model}.yml").read_text())[model]
    short = {"epochs": 2, "max_batches_per_epoch": 2, "batch_size": 16, "device": "cpu", "progress": False,
             "checkpoint_dir": None, "patience": None, "augment": False}
    flat = config.parse(model, {**raw, **short})
    nested = config.parse(model, {**{k: v for k, v in raw.items() if k not in FLAT_KEYS}, **short, **NESTED[model]})
    assert flat.sampler == nested.sampler and flat.loss_name == nested.loss_name
    images, split = _toy_split()
    weights = [workflow.train(images, split, p, None, {"background": 255})[0]["state_dict"] for p in (flat, nested)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    # and training moved them: the comparison is not between two untouched initialisations
    torch.manual_seed(flat.seed)
    fresh = workflow.build_from_params(flat, 6, 1, 24).state_dict()
    assert any(not torch.equal(fresh[k], weights[0][k]) for k in fresh if fresh[k].is_floating_point())


def _error(raw: dict, section: str = "siamese_triplet") -> str:
    with pytest.raises(ParameterError) as err:
        config.parse(section, raw)
    return str(err.value).splitlines()[1]


def test_bad_names_and_arguments_name_the_dotted_key_and_the_options():
    line = _error({"loss": {"parts": [{"name": "triplet", "args": {"margn": 0.2}}]}})
    assert line.startswith("  - 'siamese_triplet.loss.parts[0].args.margn': unknown argument of loss 'triplet'; "
                           "did you mean 'margin'; valid: ['distance', 'margin']"), line
    line = _error({"loss": {"parts": [{"name": "proxy_anchor"}, {"name": "multi_similarty"}]}})
    assert line.startswith("  - 'siamese_triplet.loss.parts[1].name': unknown loss 'multi_similarty'; did you mean "
                           "'multi_similarity'; valid: ['cross_entropy', 'contrastive'"), line
    line = _error({"loss": {"parts": [{"name": "triplet", "miner": {"name": "semi_hard"}}]}})
    assert "'siamese_triplet.loss.parts[0].miner.name': unknown miner 'semi_hard'; did you mean 'semihard'" in line
    line = _error({"loss": {"parts": [{"name": "contrastive", "miner": {"name": "semihard"}}]}})
    assert "'siamese_triplet.loss.parts[0].miner.name': unknown miner 'semihard' here; valid: ['balanced_pairs']" \
        in line
    line = _error({"loss": {"parts": [{"name": "proxy_anchor", "miner": {"name": "semihard"}}]}})
    assert line.startswith("  - 'siamese_triplet.loss.parts[0].miner': loss 'proxy_anchor' takes no miner")
    line = _error({"loss": {"parts": [{"name": "triplet", "args": {"margin": 0}}]}})
    assert line == "  - 'siamese_triplet.loss.parts[0].args.margin': must be > 0 (got 0.0)"
    line = _error({"loss": {"parts": [{"name": "triplet", "weight": True}]}})
    assert line.startswith("  - 'siamese_triplet.loss.parts[0].weight': must be a number")
    line = _error({"loss": {"parts": [{"name": "triplet"}]}, "sampler": {"name": "m_per_clas", "m": 4}})
    assert "'siamese_triplet.sampler.name': unknown sampler 'm_per_clas'; did you mean 'm_per_class'" in line
    line = _error({"loss": {"parts": [{"name": "triplet"}]}, "sampler": {"name": "m_per_class", "n": 4}})
    assert line.startswith("  - 'siamese_triplet.sampler.n': unknown argument of sampler 'm_per_class'; valid: ['m']")
    line = _error({"loss": {"parts": [{"name": "triplet"}]}, "margin": 0.3})
    assert line.startswith("  - 'siamese_triplet.margin': is a key of the old flat loss form"), line
    line = _error({"loss": {"parts": [{"name": "proxy_repulsion"}]}})
    assert line.startswith("  - 'siamese_triplet.loss.parts[0].name': 'proxy_repulsion' acts on the proxies")
    line = _error({"loss": {"parts": [{"name": "triplet"}]}, "sampler": {"name": "nearest_proxy"}})
    assert line.startswith("  - 'siamese_triplet.sampler.name': 'nearest_proxy' chooses categories by their proxies")
    line = _error({"loss": "tripplet"})
    assert line.startswith("  - 'siamese_triplet.loss': unknown loss 'tripplet'; did you mean 'triplet'"), line
    line = _error({"loss": {"parts": [{"name": "cross_entropy"}]}, "task": "embedding"})
    assert "task 'classifier' goes with loss 'cross_entropy'" in line
    line = _error({"loss": {"parts": [{"name": "triplet"}]}, "sampler": {"name": "m_per_class", "m": 5}})
    assert "batch_size (64) must be a multiple of the sampler's m (5" in line


def test_the_validated_form_is_complete_and_validates_again():
    p = config.parse("siamese_triplet", {"loss": {"parts": [{"name": "multi_similarity",
                                                             "miner": {"name": "multi_similarity"}}]}})
    assert p.loss == {"parts": [{"name": "multi_similarity", "weight": 1.0,
                                 "args": {"distance": "model", "alpha": 2.0, "beta": 50.0, "base": 0.5},
                                 "miner": {"name": "multi_similarity", "args": {"distance": "model", "epsilon": 0.1}}}]}
    assert p.sampler == {"name": "m_per_class", "args": {"m": 4}} and p.m_per_class is None
    assert p.loss_name == "multi_similarity"
    again = config.parse("siamese_triplet", p.model_dump())
    assert again.loss == p.loss and again.sampler == p.sampler


def test_each_part_is_logged_with_its_weight():
    torch.manual_seed(0)
    spec = {"parts": [{"name": "multi_similarity", "weight": 2.0, "miner": {"name": "multi_similarity"}},
                      {"name": "proxy_anchor", "weight": 0.5}, {"name": "proxy_repulsion", "weight": 3.0},
                      {"name": "multi_similarity", "weight": 1.0}]}
    obj = build_objective(spec, None, num_classes=4, embedding_dim=6, distance="cosine")
    emb, labels = torch.randn(16, 6), torch.arange(4).repeat_interleave(4)
    total = obj.loss_from_embeddings(emb, labels)
    assert list(obj.last_terms) == ["multi_similarity", "proxy_anchor", "proxy_repulsion", "multi_similarity_2"]
    expected_pp = 3.0 * ProxyRepulsionLoss()(obj.parts[0 + 2]._owner.proxies)
    torch.testing.assert_close(obj.last_terms["proxy_repulsion"], expected_pp.detach())
    torch.testing.assert_close(obj.last_terms["multi_similarity"], 2.0 * obj.last_terms["multi_similarity_2"])
    torch.testing.assert_close(sum(obj.last_terms.values()), total.detach())
    # the repulsion term's proxies are the proxy part's: optimised once, checkpointed once
    assert [n for n in obj.state_dict() if "proxies" in n] == ["parts.1.criterion.proxies"]
    assert len(obj.extra_parameters()) == 1


# ------------------------------------------------------------------------------------- proxy-proxy term


def test_proxy_repulsion_against_its_formula_by_hand():
    # cos(p1, p2) = 0, cos(p1, p3) = cos(p2, p3) = 1/sqrt2 (p3's length does not matter)
    proxies = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], requires_grad=True)
    s = 1 / math.sqrt(2)
    # margin 0: mean over the 6 ordered pairs of max(0, cos) = 4 s / 6
    assert ProxyRepulsionLoss(0.0)(proxies).item() == pytest.approx(4 * s / 6, rel=1e-6)
    # margin 0.5: only the four 1/sqrt2 pairs exceed it, by s - 0.5 each
    assert ProxyRepulsionLoss(0.5)(proxies).item() == pytest.approx(4 * (s - 0.5) / 6, rel=1e-6)
    # margin -0.5: every pair counts, the orthogonal ones with 0.5
    assert ProxyRepulsionLoss(-0.5)(proxies).item() == pytest.approx((2 * 0.5 + 4 * (s + 0.5)) / 6, rel=1e-6)
    ProxyRepulsionLoss(0.0)(proxies).backward()
    # the gradient pushes p3 away from p1 and p2: it is orthogonal to p3 (normalised) and points to (-1, 1) or (1, -1)
    g3 = proxies.grad[2]
    assert abs(float(g3 @ proxies[2].detach())) < 1e-6 and abs(float(g3.sum())) < 1e-6
    with pytest.raises(ValueError, match="margin"):
        ProxyRepulsionLoss(1.0)


# ----------------------------------------------------------------------------------------------- samplers


def _angles(degrees: list[float]) -> torch.Tensor:
    rad = torch.tensor(degrees) * math.pi / 180
    return torch.stack([torch.cos(rad), torch.sin(rad)], dim=1)


def test_nearest_proxy_batches_hold_each_others_nearest_categories():
    # six categories' proxies at 0, 10, 20, 90, 100, 180 degrees: the 2 nearest of each by cosine are known
    proxies = _angles([0, 10, 20, 90, 100, 180])
    nearest = {0: {0, 1, 2}, 1: {1, 0, 2}, 2: {2, 1, 0}, 3: {3, 4, 2}, 4: {4, 3, 2}, 5: {5, 4, 3}}
    labels = np.repeat(np.arange(6), 5)
    sampler = NearestProxySampler(m=2).bind(lambda: proxies)
    batches = list(sampler.batches(labels, batch_size=6, epoch=0, seed=3))
    assert len(batches) == len(labels) // 6
    anchors = set()
    for b in batches:
        classes, counts = np.unique(labels[b], return_counts=True)
        anchor = int(labels[b[0]])
        anchors.add(anchor)
        assert set(classes.tolist()) == nearest[anchor] and counts.tolist() == [2, 2, 2]
        assert len(set(b.tolist())) == 6   # each category has >= m images: no repeats
    assert len(anchors) > 1
    again = list(sampler.batches(labels, 6, 0, 3))
    assert all(np.array_equal(x, y) for x, y in zip(batches, again, strict=True))
    other = list(sampler.batches(labels, 6, 1, 3))
    assert not all(np.array_equal(x, y) for x, y in zip(batches, other, strict=True))
    # euclidean proxies: the same neighbourhoods here (unit vectors)
    euclid = NearestProxySampler(m=2, distance="euclidean").bind(lambda: proxies)
    assert all(set(labels[b].tolist()) == nearest[int(labels[b[0]])] for b in euclid.batches(labels, 6, 0, 3))


def test_nearest_proxy_sampler_of_a_training_subset_ignores_absent_categories():
    proxies = _angles([0, 10, 20, 90, 100, 180])
    labels = np.repeat([0, 2, 3, 5], 4)   # categories 1 and 4 have no photo here
    for b in NearestProxySampler(m=2).bind(lambda: proxies).batches(labels, 4, 0, 0):
        pair = set(labels[b].tolist())
        assert pair in ({0, 2}, {2, 0}, {3, 2}, {5, 3})


def test_oversampling_tops_small_categories_up():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 1)
    sampler = ShuffledSampler(oversample_to=5)
    idx = np.concatenate(list(sampler.batches(labels, 4, epoch=0, seed=1)))
    # 13 images + 3 repeats of category 1 + 4 of category 2 = 20 = 5 full batches
    assert np.bincount(labels[idx]).tolist() == [10, 5, 5]
    assert set(idx.tolist()) == set(range(13))   # every image at least once
    again = np.concatenate(list(sampler.batches(labels, 4, epoch=0, seed=1)))
    assert np.array_equal(idx, again)
    # without over-sampling: each image once, the trailing batch of one image dropped
    plain = np.concatenate(list(ShuffledSampler().batches(labels, 4, epoch=0, seed=1)))
    assert len(plain) == 12 and len(set(plain.tolist())) == 12


# ---------------------------------------------------------------------------------------------- distances


def test_distances_reach_the_losses_and_miners():
    assert config.parse("siamese_triplet", {"distance": "manhattan"}).distance == "manhattan"
    spec = {"parts": [{"name": "triplet", "miner": {"name": "batch_hard"}}, {"name": "proxy_anchor"}]}
    for distance, (cls, p) in {"euclidean": ("LpDistance", 2), "manhattan": ("LpDistance", 1),
                               "cosine": ("CosineSimilarity", 2)}.items():
        obj = build_objective(spec, None, 4, 8, distance=distance)
        for module in (obj.parts[0].criterion.distance, obj.parts[0].miner.distance, obj.parts[1].criterion.distance):
            assert type(module).__name__ == cls and module.p == p
            assert module.normalize_embeddings == (distance == "cosine")
    # an explicit distance wins over the model's
    pinned = build_objective({"parts": [{"name": "triplet", "args": {"distance": "cosine"}}]}, None, 4, 8,
                             distance="manhattan")
    assert type(pinned.parts[0].criterion.distance).__name__ == "CosineSimilarity"


def test_study_losses_in_each_distance_by_hand():
    a, b = torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    same, diff = torch.tensor([0, 0]), torch.tensor([1, 1])
    # manhattan: D = 7 and 3 -> similar 0.5 D^2; dissimilar with margin 10: 0.5 (10 - D)^2
    assert StudyContrastiveLoss(10, "manhattan")(a, b, same).item() == pytest.approx((24.5 + 4.5) / 2)
    assert StudyContrastiveLoss(10, "manhattan")(a, b, diff).item() == pytest.approx((4.5 + 24.5) / 2)
    # cosine: L2 between unit vectors; the second pair is orthogonal (D = sqrt2); the first has a zero vector
    # (normalised to 0, D = |(0.6, 0.8)| = 1)
    assert StudyContrastiveLoss(2, "cosine")(a, b, same).item() == pytest.approx((0.5 * 1 + 0.5 * 2) / 2, rel=1e-5)
    assert StudyContrastiveLoss(2, "euclidean")(a, b, same).item() == pytest.approx((12.5 + 2.5) / 2)
    # quadruplet, manhattan: d(a,p)^2 = 1, d(a,n1)^2 = 4, d(n1,n2)^2 = 9 -> [1 - 4 + 5]_+ + [1 - 9 + 10]_+ = 4
    q = [torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[3.0, 2.0]])]
    assert QuadrupletLoss(5, 10, "manhattan")(*q).item() == pytest.approx(4.0)
    # euclidean: d^2 = 1, 2, 5 -> [1 - 2 + 5] + [1 - 5 + 10] = 10
    assert QuadrupletLoss(5, 10)(*q).item() == pytest.approx(10.0)
