import sys
import types

import pytest
import torch
from torch import nn

from partmatch.ml.models import (
    Classifier,
    EmbeddingNet,
    StudyCNN,
    build_model,
    model_from_spec,
    model_spec,
)


def test_study_cnn_feature_dim_for_100px_grayscale():
    trunk = StudyCNN(in_channels=1, image_size=100)
    assert trunk.feature_dim == 64 * 25 * 25
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 32, (3, 3)), (32, 64, (3, 3))]
    assert trunk(torch.zeros(2, 1, 100, 100)).shape == (2, 64 * 25 * 25)


def test_embedding_and_classifier_shapes_grayscale_100():
    x = torch.randn(3, 1, 100, 100)
    emb = build_model("embedding", num_classes=7, embedding_dim=128, in_channels=1, image_size=100)
    assert isinstance(emb, EmbeddingNet)
    assert emb(x).shape == (3, 128)
    assert torch.equal(emb.embed(x), emb(x))
    clf = build_model("classifier", num_classes=7, embedding_dim=128, in_channels=1, image_size=100)
    assert isinstance(clf, Classifier)
    out = clf(x)
    assert out.shape == (3, 7)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(3))  # log-softmax
    assert clf.embed(x).shape == (3, 64 * 25 * 25)


def test_three_channel_input_and_odd_size():
    m = build_model("embedding", 5, 16, in_channels=3, image_size=33, channels=(8, 16))
    assert m.backbone.feature_dim == 16 * 8 * 8
    assert m(torch.randn(2, 3, 33, 33)).shape == (2, 16)


def test_normalize_option_gives_unit_vectors():
    m = build_model("embedding", 5, 16, 1, 32, normalize=True)
    z = m(torch.randn(4, 1, 32, 32))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    assert not build_model("embedding", 5, 16, 1, 32).normalize  # study default: raw Euclidean


def _plain_types_only(value):
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_types_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_types_only(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


@pytest.mark.parametrize("task", ["classifier", "embedding"])
def test_spec_round_trip_through_weights_only_load(tmp_path, task):
    torch.manual_seed(0)
    model = build_model(task, 4, 8, in_channels=3, image_size=32, channels=(4, 8), normalize=True)
    spec = model_spec(model)
    assert _plain_types_only(spec)
    path = tmp_path / "model.pt"
    torch.save({"spec": spec, "state_dict": model.state_dict()}, path)
    payload = torch.load(path, weights_only=True)
    again = model_from_spec(payload["spec"], payload["state_dict"])
    x = torch.randn(2, 3, 32, 32)
    model.eval(), again.eval()
    assert torch.equal(model(x), again(x))
    assert model_spec(again) == spec


def test_unknown_task_and_bad_study_options():
    with pytest.raises(ValueError, match="task"):
        build_model("regression", 3, 8, 1, 32)
    with pytest.raises(ValueError, match="pretrained"):
        build_model("embedding", 3, 8, 1, 32, pretrained=True)
    with pytest.raises(ValueError, match="channels"):
        build_model("embedding", 3, 8, 1, 32, depth=5)
    with pytest.raises(ValueError, match="model_spec"):
        model_spec(nn.Linear(2, 2))


def test_other_backbones_come_from_the_registry_lazily(monkeypatch):
    calls = []

    def build_backbone(name, in_channels, image_size, pretrained, weights_path, **kwargs):
        calls.append((name, in_channels, image_size, pretrained, weights_path, kwargs))
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 12)), 12

    fake = types.ModuleType("partmatch.ml.backbones")
    fake.build_backbone = build_backbone
    monkeypatch.setitem(sys.modules, "partmatch.ml.backbones", fake)
    import partmatch.ml as ml_pkg

    monkeypatch.setattr(ml_pkg, "backbones", fake, raising=False)
    model = build_model("embedding", 3, 6, 3, 16, backbone="tiny", pretrained=True, weights_path="/w.pt")
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 6)
    assert calls[-1] == ("tiny", 3, 16, True, "/w.pt", {})
    # rebuilding from a spec with saved weights does not fetch pretrained weights again
    again = model_from_spec(model_spec(model), model.state_dict())
    assert calls[-1][3:5] == (False, None)
    assert model_spec(again)["backbone_kwargs"]["pretrained"] is True


def test_identity_head_init():
    trunk = nn.Flatten()
    net = EmbeddingNet(trunk, feature_dim=12, embedding_dim=12, head_init="identity")
    x = torch.randn(5, 3, 2, 2)
    torch.testing.assert_close(net(x), x.flatten(1))
    with pytest.raises(ValueError, match="needs embedding_dim == the backbone's feature size \\(12\\)"):
        EmbeddingNet(trunk, feature_dim=12, embedding_dim=8, head_init="identity")
    with pytest.raises(ValueError, match="Unknown head_init"):
        EmbeddingNet(trunk, feature_dim=12, embedding_dim=12, head_init="zeros")


def test_flip_tta_embeds_an_image_and_its_mirror_identically():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 20, 20)
    for normalize in (True, False):
        model = build_model("embedding", 2, 8, 1, 20, normalize=normalize, flip_tta=True).eval()
        plain = build_model("embedding", 2, 8, 1, 20, normalize=normalize).eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            z, z_mirror = model.embed(x), model.embed(torch.flip(x, dims=[-1]))
            expected = (plain(x) + plain(torch.flip(x, dims=[-1]))) / 2
            if normalize:
                expected = torch.nn.functional.normalize(expected, dim=1)
            torch.testing.assert_close(z, z_mirror)               # mirror-invariant by construction
            torch.testing.assert_close(z, expected)
            torch.testing.assert_close(model(x), plain(x))         # training forward is untouched
            assert not torch.allclose(plain.embed(x), plain.embed(torch.flip(x, dims=[-1])))
    assert model_from_spec(model_spec(model), model.state_dict()).flip_tta is True
    with pytest.raises(ValueError, match="flip_tta is for embedding models"):
        build_model("classifier", 2, 8, 1, 20, flip_tta=True)
