"""The custom CNN, trained from scratch: the paper's own architecture family."""

from __future__ import annotations

import keras
from keras import layers

from skin_lesion.info import CLASSES
from skin_lesion.models.layers import add_head, augment_input
from skin_lesion.pixels import Size, hw

LAST_CONV = "block4_act"  # the layer Grad-CAM explains
BN_MOMENTUM = 0.99  # Keras' default
FORGET_STEPS = 10  # the moving statistics' memory, in units of 1 / (1 - momentum), that training must span


def bn_momentum_for(training_steps: int | None) -> float:
    """The BatchNormalization momentum for a CNN trained from scratch for ``training_steps`` steps.

    Inference uses the moving mean and variance, which start at 0 and 1 and
    keep ``momentum ** steps`` of those starting values. With Keras' 0.99 a
    short training (the demo set: about 160 steps) leaves a fifth of them,
    far from the real activations' statistics, and every image then gets the
    same class although the network has learned (in training mode it
    separates the classes). The momentum is lowered only as far as needed for
    training to span ``FORGET_STEPS`` memories; from 1,000 steps on (every
    run on HAM10000) it stays 0.99, and under ``FORGET_STEPS`` steps it is 0
    (the last batch's statistics).
    """
    if not training_steps:
        return BN_MOMENTUM
    return max(0.0, min(BN_MOMENTUM, 1 - FORGET_STEPS / training_steps))


def build_cnn(image_size: Size = 128, n_classes: int = len(CLASSES), width: int = 32, dropout: float = 0.3, augment: float = 0.0,
              bn_momentum: float = BN_MOMENTUM, colour_constancy: str = "none", colour_augment: float = 1.0) -> keras.Model:
    """A small VGG-like CNN: four conv blocks (conv-BN-ReLU x2, max-pool, dropout),
    global average pooling and a softmax head. About 1.2M parameters at width 32,
    small enough to train on all of HAM10000 on 2 CPU cores. ``bn_momentum``:
    see ``bn_momentum_for``; ``colour_constancy`` and ``colour_augment``: see ``layers.augment_input``."""
    inputs = keras.Input((*hw(image_size), 3), name="image")
    x = layers.Rescaling(1 / 255.0, name="scale")(augment_input(inputs, augment, colour_constancy, colour_augment))
    for b, filters in enumerate((width, width * 2, width * 4, width * 8), start=1):
        for c in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{b}_conv{c}")(x)
            x = layers.BatchNormalization(momentum=bn_momentum, name=f"block{b}_bn{c}")(x)
            x = layers.ReLU(name=f"block{b}_act" if c == 2 else f"block{b}_relu{c}")(x)
        if b < 4:
            x = layers.MaxPooling2D(name=f"block{b}_pool")(x)
            x = layers.Dropout(dropout / 2, name=f"block{b}_drop")(x)
    return add_head(inputs, x, n_classes, dropout, "cnn")
