"""Networks of the study and their successors: a small CNN trunk, an embedding head and a classifier head.

Every model built by :func:`build_model` remembers how it was built (:func:`model_spec`), so a trained model
is saved as ``{"spec": spec, "state_dict": state_dict, ...}`` with ``torch.save`` and rebuilt with
``torch.load(path, weights_only=True)`` + :func:`model_from_spec` — no pickled classes in the file.
``partmatch.ml.inference.Embedder.from_file`` does that for a saved model and embeds photos with it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("classifier", "embedding")
SPEC_VERSION = 1


class StudyCNN(nn.Module):
    """The study's trunk: conv3x3(pad 1)-ReLU-maxpool2 twice, flattened.

    For 100x100 grayscale input and the default ``channels=(32, 64)`` the output has
    ``feature_dim = 64 * 25 * 25 = 40000`` features.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 100, channels: tuple[int, int] = (32, 64)):
        super().__init__()
        if len(channels) != 2:
            raise ValueError(f"StudyCNN needs exactly two conv widths, got channels={channels!r}")
        if image_size < 4:
            raise ValueError(f"StudyCNN needs image_size >= 4 (two 2x2 poolings), got {image_size}")
        c1, c2 = (int(c) for c in channels)
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.channels = (c1, c2)
        # conv -> ReLU -> maxpool, computed as conv -> maxpool -> ReLU: identical values and gradients
        # (ReLU is monotonic, so max(relu(x)) == relu(max(x))) with 4x fewer ReLU elements (~25% faster
        # training on CPU). Parameter names (features.0 / features.3) are those of the textbook order.
        self.features = nn.Sequential(
            nn.Conv2d(self.in_channels, c1, kernel_size=3, padding=1),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
        )
        side = self.image_size // 2 // 2
        self.feature_dim = c2 * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)


class PCAProjection(nn.Module):
    """A fixed linear "backbone": the flattened (normalised) image minus the training mean, projected on
    ``components`` principal axes -- the study's further work (PCA inputs to an MLP embedding).

    The projection is two plain tensors (buffers, saved in the model's ``state_dict``): ``mean`` ``(D,)`` and
    ``components`` ``(k, D)``, with ``D = in_channels * image_size ** 2``; :meth:`fit` sets them from training
    images (sklearn's PCA, seeded). Untrained it is all zeros. Nothing in it is learnt by gradient descent.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 100, components: int = 500):
        super().__init__()
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        dim = self.in_channels * self.image_size * self.image_size
        if not 1 <= int(components) <= dim:
            raise ValueError(f"backbone 'pca' needs 1 <= components <= {dim} (the pixels of a "
                             f"{self.in_channels}x{self.image_size}x{self.image_size} image), got {components}")
        self.feature_dim = int(components)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("components", torch.zeros(self.feature_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.flatten(x, 1).float() - self.mean) @ self.components.T

    def fit(self, x: Any, seed: int = 0, whiten: bool = False) -> Any:
        """Fit on the rows of ``x`` ``(n, D)`` (normalised pixels, flattened), return the explained-variance
        ratio of each kept component. ``whiten`` scales each axis to unit variance on ``x``."""
        import numpy as np
        from sklearn.decomposition import PCA

        x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
        if x.shape[1] != self.mean.numel():
            raise ValueError(f"PCA fit on rows of {x.shape[1]} values, but the projection takes {self.mean.numel()}")
        if len(x) < self.feature_dim:
            raise ValueError(f"PCA with {self.feature_dim} components needs at least as many images, got {len(x)}")
        pca = PCA(n_components=self.feature_dim, svd_solver="auto", random_state=int(seed)).fit(x)
        comps = pca.components_.astype(np.float64)
        if whiten:
            comps = comps / np.sqrt(np.maximum(pca.explained_variance_, 1e-12))[:, None]
        with torch.no_grad():
            self.mean.copy_(torch.from_numpy(pca.mean_.astype(np.float32)))
            self.components.copy_(torch.from_numpy(comps.astype(np.float32)))
        return pca.explained_variance_ratio_

    def extra_repr(self) -> str:
        return f"in={self.mean.numel()}, components={self.feature_dim}"


def mlp_head(feature_dim: int, out_dim: int, hidden: int = 0) -> nn.Module:
    """``Linear(feature_dim, out_dim)``, or with ``hidden > 0`` the MLP ``Linear -> ReLU -> Linear`` through
    ``hidden`` units."""
    if hidden <= 0:
        return nn.Linear(feature_dim, out_dim)
    return nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class EmbeddingNet(nn.Module):
    """backbone -> Linear(feature_dim, embedding_dim) -> optional L2 normalisation.

    ``head_hidden > 0`` makes the head an MLP (:func:`mlp_head`), e.g. the embedding on PCA inputs.

    ``normalize=False`` (default) keeps raw Euclidean embeddings, as in the study, so that contrastive and
    triplet margins keep their meaning; ``normalize=True`` puts embeddings on the unit sphere.

    ``head_init="identity"`` (needs ``embedding_dim == feature_dim``) starts the head as the identity, so an
    untrained model embeds exactly like its (pretrained) backbone's features and training only moves it away
    from them as far as the loss asks — the way to improve ImageNet features without forgetting what makes
    them work on categories never trained on.

    ``flip_tta=True`` makes :meth:`embed` (what retrieval and evaluation use) average the embeddings of the
    image and of its horizontal mirror (:func:`combine_views`); ``forward`` (what training uses) is unchanged.
    """

    task = "embedding"

    def __init__(self, backbone: nn.Module, feature_dim: int, embedding_dim: int, normalize: bool = False,
                 head_init: str = "default", flip_tta: bool = False, head_hidden: int = 0):
        super().__init__()
        self.flip_tta = bool(flip_tta)
        self.backbone = backbone
        self.feature_dim = int(feature_dim)
        self.embedding_dim = int(embedding_dim)
        self.normalize = bool(normalize)
        self.head = mlp_head(self.feature_dim, self.embedding_dim, int(head_hidden))
        if head_init == "identity":
            if head_hidden:
                raise ValueError("head_init 'identity' is for a linear head (head_hidden: 0)")
            if self.embedding_dim != self.feature_dim:
                raise ValueError(f"head_init 'identity' needs embedding_dim == the backbone's feature size "
                                 f"({self.feature_dim}), got embedding_dim={self.embedding_dim}")
            with torch.no_grad():
                self.head.weight.copy_(torch.eye(self.feature_dim))
                self.head.bias.zero_()
        elif head_init != "default":
            raise ValueError(f"Unknown head_init {head_init!r}; valid: ['default', 'identity']")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.backbone(x))
        if self.normalize:
            z = F.normalize(z, p=2, dim=1)
        return z

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        z = self.forward(x)
        if self.flip_tta:
            z = combine_views(z, self.forward(torch.flip(x, dims=[-1])), self.normalize)
        return z


def combine_views(z: torch.Tensor, z_mirror: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Test-time flip averaging: the mean of an image's and its mirror's embeddings, put back on the unit
    sphere when the model normalises (for unit vectors that is the direction of their sum)."""
    mean = (z + z_mirror) / 2
    return F.normalize(mean, p=2, dim=1) if normalize else mean


class Classifier(nn.Module):
    """backbone -> Linear(feature_dim, num_classes) -> log-softmax.

    ``embed(x)`` returns the penultimate features (the flattened backbone output) for retrieval evaluation.
    """

    task = "classifier"

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.head(self.backbone(x)), dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def _build_backbone(
    backbone: str, in_channels: int, image_size: int, backbone_kwargs: dict[str, Any]
) -> tuple[nn.Module, int]:
    kwargs = dict(backbone_kwargs)
    if backbone == "study_cnn":
        if kwargs.pop("pretrained", False):
            raise ValueError("backbone 'study_cnn' has no pretrained weights; set pretrained=false")
        if kwargs.pop("weights_path", None) is not None:
            raise ValueError("backbone 'study_cnn' does not take weights_path")
        unknown = set(kwargs) - {"channels"}
        if unknown:
            raise ValueError(f"Unknown option(s) for backbone 'study_cnn': {sorted(unknown)}; valid: ['channels']")
        trunk = StudyCNN(in_channels, image_size, tuple(kwargs.get("channels", (32, 64))))
        return trunk, trunk.feature_dim
    if backbone == "pca":
        if kwargs.pop("pretrained", False) or kwargs.pop("weights_path", None) is not None:
            raise ValueError("backbone 'pca' is fitted on the training images, it has no pretrained weights")
        unknown = set(kwargs) - {"components"}
        if unknown:
            raise ValueError(f"Unknown option(s) for backbone 'pca': {sorted(unknown)}; valid: ['components']")
        pca = PCAProjection(in_channels, image_size, int(kwargs.get("components", 500)))
        return pca, pca.feature_dim
    # Other backbones live in a registry written separately; import lazily so the study path never needs it.
    from partmatch.ml import backbones  # noqa: PLC0415

    return backbones.build_backbone(
        backbone,
        in_channels=in_channels,
        image_size=image_size,
        pretrained=kwargs.pop("pretrained", False),
        weights_path=kwargs.pop("weights_path", None),
        **kwargs,
    )


def _plain(value: Any, where: str) -> Any:
    """Return ``value`` as plain python types (tuples become lists) or raise naming the offending key."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"model spec value {where} must be a plain python type, got {type(value).__name__}")


def build_model(
    task: str,
    num_classes: int,
    embedding_dim: int,
    in_channels: int,
    image_size: int,
    backbone: str = "study_cnn",
    normalize: bool = False,
    head_init: str = "default",
    flip_tta: bool = False,
    head_hidden: int = 0,
    **backbone_kwargs: Any,
) -> nn.Module:
    """Build a ``Classifier`` (task="classifier") or an ``EmbeddingNet`` (task="embedding").

    ``backbone="study_cnn"`` is the study's trunk (option ``channels``); any other name is passed to
    ``partmatch.ml.backbones.build_backbone(name, in_channels, image_size, pretrained, weights_path, ...)``,
    except ``backbone="pca"`` (:class:`PCAProjection`, option ``components``; fit it before use).
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; valid tasks: {list(TASKS)}")
    trunk, feature_dim = _build_backbone(backbone, int(in_channels), int(image_size), backbone_kwargs)
    if task == "classifier":
        if flip_tta:
            raise ValueError("flip_tta is for embedding models (task='embedding')")
        if head_hidden:
            raise ValueError("head_hidden (an MLP head) is for embedding models (task='embedding')")
        if int(num_classes) < 2:
            raise ValueError(f"a classifier needs num_classes >= 2, got {num_classes}")
        model: nn.Module = Classifier(trunk, feature_dim, int(num_classes))
    else:
        if int(embedding_dim) < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        model = EmbeddingNet(trunk, feature_dim, int(embedding_dim), normalize=normalize, head_init=head_init,
                             flip_tta=flip_tta, head_hidden=int(head_hidden))
    model._partmatch_spec = _plain(  # type: ignore[assignment]
        {
            "version": SPEC_VERSION,
            "task": task,
            "num_classes": int(num_classes),
            "embedding_dim": int(embedding_dim),
            "in_channels": int(in_channels),
            "image_size": int(image_size),
            "backbone": str(backbone),
            "normalize": bool(normalize),
            "head_init": str(head_init),
            **({"flip_tta": True} if flip_tta else {}),  # only when on: specs without it load in older code
            **({"head_hidden": int(head_hidden)} if head_hidden else {}),  # likewise
            "backbone_kwargs": dict(backbone_kwargs),
        },
        "spec",
    )
    return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The plain-python recipe of a model built by :func:`build_model` (safe for ``weights_only`` loading)."""
    spec = getattr(model, "_partmatch_spec", None)
    if spec is None:
        raise ValueError("model_spec() needs a model created by partmatch.ml.models.build_model")
    return copy.deepcopy(spec)


def model_from_spec(spec: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Rebuild a model from :func:`model_spec` output and (optionally) load its weights strictly.

    Pretrained weights are not fetched again: the saved ``state_dict`` already holds the trained values.
    """
    original = _plain(dict(spec), "spec")
    spec = dict(spec)
    version = spec.pop("version", SPEC_VERSION)
    if version != SPEC_VERSION:
        raise ValueError(f"unsupported model spec version {version} (this code reads version {SPEC_VERSION})")
    backbone_kwargs = dict(spec.pop("backbone_kwargs", {}) or {})
    if state_dict is not None and spec.get("backbone", "study_cnn") != "study_cnn":
        backbone_kwargs["pretrained"] = False
        backbone_kwargs["weights_path"] = None
    model = build_model(**spec, **backbone_kwargs)
    model._partmatch_spec = original  # type: ignore[assignment]  # keep the recipe (e.g. pretrained=True)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model
