import math

import pytest
import torch

from partmatch.ml.losses import QuadrupletLoss, StudyContrastiveLoss, pairwise_distances


def _dist(u, v):
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v, strict=True)))


def test_contrastive_loss_matches_the_study_formula_by_hand():
    a = [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, -1.0]]
    b = [[3.0, 4.0], [1.0, 2.0], [0.0, 3.0], [2.5, -1.0]]
    y = [0, 1, 1, 1]  # 0 similar, 1 dissimilar
    m = 2.0
    expected = 0.0
    for u, v, yy in zip(a, b, y, strict=True):
        d = _dist(u, v)
        expected += (1 - yy) * 0.5 * d**2 + yy * 0.5 * max(0.0, m - d) ** 2
    expected /= len(a)
    # by hand: (12.5 + 0.5 + 0 + 0.5 * 1.5**2) / 4
    assert expected == pytest.approx((12.5 + 0.5 + 0.0 + 1.125) / 4)
    got = StudyContrastiveLoss(margin=m)(torch.tensor(a), torch.tensor(b), torch.tensor(y))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_label_convention_is_not_swapped():
    near_a, near_b = torch.zeros(1, 3), torch.full((1, 3), 0.1)
    loss = StudyContrastiveLoss(margin=1.0)
    # a close pair is cheap when labelled similar (y=0) and expensive when labelled dissimilar (y=1)
    d = 0.1 * 3 ** 0.5
    assert loss(near_a, near_b, torch.tensor([0])).item() == pytest.approx(0.5 * d**2, rel=1e-5)        # 0.015
    assert loss(near_a, near_b, torch.tensor([1])).item() == pytest.approx(0.5 * (1 - d) ** 2, rel=1e-5)  # 0.342


def test_contrastive_gradient_finite_for_identical_embeddings():
    a = torch.ones(2, 4, requires_grad=True)
    b = torch.ones(2, 4)
    StudyContrastiveLoss(1.0)(a, b, torch.tensor([0, 1])).backward()
    # d = 0: the similar pair's 0.5 d^2 has gradient a - b = 0, and the clamped distance gives the dissimilar
    # pair's hinge a zero (not NaN) gradient too
    torch.testing.assert_close(a.grad, torch.zeros(2, 4))


def test_contrastive_rejects_bad_margin():
    with pytest.raises(ValueError):
        StudyContrastiveLoss(0.0)


def test_quadruplet_loss_matches_chen_et_al_formula_by_hand():
    a = [[0.0, 0.0], [1.0, 0.0]]
    p = [[1.0, 0.0], [1.0, 0.5]]
    n1 = [[0.0, 1.5], [3.0, 0.0]]
    n2 = [[0.5, 1.5], [3.0, 4.0]]
    a1, a2 = 1.0, 0.5
    expected = 0.0
    for aa, pp, nn1, nn2 in zip(a, p, n1, n2, strict=True):
        d_ap = _dist(aa, pp) ** 2
        expected += max(0.0, d_ap - _dist(aa, nn1) ** 2 + a1) + max(0.0, d_ap - _dist(nn1, nn2) ** 2 + a2)
    expected /= len(a)
    # first quadruplet: [1 - 2.25 + 1]+ + [1 - 0.25 + 0.5]+ = 0 + 1.25 ; second: [0.25 - 4 + 1]+ + [0.25 - 16 + .5]+ = 0
    assert expected == pytest.approx(1.25 / 2)
    t = torch.tensor
    got = QuadrupletLoss(a1, a2)(t(a), t(p), t(n1), t(n2))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_quadruplet_second_term_uses_the_negative_pair_distance():
    a = torch.zeros(1, 2)
    p = torch.zeros(1, 2)
    n1 = torch.tensor([[10.0, 0.0]])  # far from a: first term is 0
    n2 = torch.tensor([[10.0, 0.1]])  # close to n1: second term = 0 - 0.01 + 0.5
    assert QuadrupletLoss(1.0, 0.5)(a, p, n1, n2).item() == pytest.approx(0.49, rel=1e-5)


def test_pairwise_distances_match_cdist():
    torch.manual_seed(0)
    x, y = torch.randn(5, 3), torch.randn(4, 3)
    torch.testing.assert_close(pairwise_distances(x, y), torch.cdist(x, y), atol=1e-5, rtol=1e-5)
    sq = pairwise_distances(x, squared=True)
    torch.testing.assert_close(sq, torch.cdist(x, x) ** 2, atol=1e-5, rtol=1e-5)
    assert torch.all(torch.diagonal(sq) == 0)
