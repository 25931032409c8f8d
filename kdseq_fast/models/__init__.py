"""Model zoo: the CIFAR architectures used throughout the distillation literature, plus any
torchvision model (``"tv:<name>"``) for ImageNet-style data.

    model = get_model("resnet8x4", num_classes=100)          # logits only from forward(x)
    model = get_model("tv:resnet18", num_classes=1000, image_size=224)

Names follow RepDistiller (``resnet32x4``, ``wrn_40_2``, ``vgg13``, ``MobileNetV2``,
``ShuffleV1``...); lookup is exact first, then case-insensitive (``mobilenetv2`` works). Module
names match RepDistiller's so their published checkpoints load with
:func:`kdseq_fast.checkpoint_io.load_model_weights`. Every CIFAR model ends in adaptive average
pooling, so 28, 32 and 64 px inputs all work.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .mobilenetv2 import mobile_full, mobile_half
from .resnet import (ResNet50, resnet8, resnet8x4, resnet14, resnet20, resnet32, resnet32x4,
                     resnet44, resnet56, resnet110)
from .shufflenet import ShuffleV1, ShuffleV2
from .vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from .wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

__all__ = ["get_model", "list_models", "count_parameters", "MODEL_REGISTRY", "TORCHVISION_PREFIX"]

TORCHVISION_PREFIX = "tv:"

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet8, "resnet14": resnet14, "resnet20": resnet20, "resnet32": resnet32,
    "resnet44": resnet44, "resnet56": resnet56, "resnet110": resnet110,
    "resnet8x4": resnet8x4, "resnet32x4": resnet32x4,
    "wrn_16_1": wrn_16_1, "wrn_16_2": wrn_16_2, "wrn_40_1": wrn_40_1, "wrn_40_2": wrn_40_2,
    "vgg8": vgg8, "vgg11": vgg11, "vgg13": vgg13, "vgg16": vgg16, "vgg19": vgg19,
    "MobileNetV2": mobile_half, "mobile_half": mobile_half, "mobile_full": mobile_full,
    "ShuffleV1": ShuffleV1, "ShuffleV2": ShuffleV2,
    "ResNet50": ResNet50,
}

# Extra spellings people use for the same nets (RepDistiller's vgg*_bn function names, etc.).
_ALIASES = {f"vgg{d}_bn": f"vgg{d}" for d in (8, 11, 13, 16, 19)}
_ALIASES.update({"mobilenet_v2": "MobileNetV2", "shufflenet_v1": "ShuffleV1",
                 "shufflenet_v2": "ShuffleV2"})
_LOWER = {name.lower(): name for name in list(MODEL_REGISTRY) + list(_ALIASES)}

# Smallest input each family accepts: three (ResNet/WRN/Shuffle) to five (MobileNetV2, VGG)
# halvings must leave at least one pixel.
_MIN_SIZE = 8


def list_models(include_torchvision: bool = False) -> list[str]:
    """Canonical zoo names (plus ``tv:<name>`` for every torchvision classification model)."""
    names = list(MODEL_REGISTRY)
    if include_torchvision:
        import torchvision
        names += [TORCHVISION_PREFIX + n for n in torchvision.models.list_models(
            module=torchvision.models)]
    return names


def _resolve(name: str) -> str:
    if name in MODEL_REGISTRY:
        return name
    key = _LOWER.get(name.lower())
    if key is None:
        raise ValueError(f"unknown model name {name!r}; valid names: {', '.join(MODEL_REGISTRY)}; "
                         f"or '{TORCHVISION_PREFIX}<name>' for a torchvision model "
                         f"(e.g. {TORCHVISION_PREFIX}resnet18)")
    return _ALIASES.get(key, key)


def get_model(name: str, num_classes: int = 100, *, image_size: int = 32,
              in_channels: int = 3) -> nn.Module:
    """Build a freshly initialised model; ``forward(x)`` returns logits ``[B, num_classes]``.

    ``image_size`` is the input side length the model will see; CIFAR models accept any size
    >= 8 (global pooling is adaptive), torchvision models are built for it with ``weights=None``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    for arg, value, lo in (("num_classes", num_classes, 1), ("image_size", image_size, _MIN_SIZE),
                           ("in_channels", in_channels, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg} must be an int, got {type(value).__name__} {value!r}")
        if value < lo:
            raise ValueError(f"{arg} must be >= {lo}, got {value}")
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(name[len(TORCHVISION_PREFIX):], num_classes, image_size,
                                  in_channels)
    model = MODEL_REGISTRY[_resolve(name)](num_classes=num_classes, in_channels=in_channels,
                                           image_size=image_size)
    model.arch_name = _resolve(name)
    return model


def _torchvision_model(name: str, num_classes: int, image_size: int, in_channels: int) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ValueError(f"unknown torchvision model {name!r}; valid names: {', '.join(available)}")
    if in_channels != 3:
        raise ValueError(f"in_channels={in_channels} is not supported for torchvision models "
                         f"(they are built for 3-channel input)")
    kwargs = {}
    # Vision transformers bake the input size into their position embeddings (MaxViT into its
    # partitions); Swin's windows take any size.
    if name.startswith("vit_"):
        kwargs["image_size"] = image_size
    elif name.startswith("maxvit"):
        kwargs["input_size"] = (image_size, image_size)
    _check_input_size(name, image_size, num_classes, kwargs)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    model.arch_name = TORCHVISION_PREFIX + name
    return model


def _check_input_size(name: str, image_size: int, num_classes: int, kwargs: dict) -> None:
    """A model that cannot take ``image_size``-px inputs (AlexNet below 63 px, a ViT whose patch
    size does not divide it, ...) is refused now, not at a run's first batch: the model is built
    and run on the meta device (shapes only, no memory, milliseconds)."""
    import torchvision

    try:  # the generator is forked: the probe must not move the model's own initialisation
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            probe = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        probe.eval()(torch.empty(2, 3, image_size, image_size, device="meta"))
    except NotImplementedError:
        # A constructor that reads tensor values (RegNet's widths) or an op without a meta
        # kernel: no verdict here.
        return
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise ValueError(f"torchvision model {name!r} cannot take {image_size}-px inputs "
                         f"(image_size={image_size}; {str(exc).strip()}); use a larger image size "
                         "(data.image_size) or another model") from None


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
