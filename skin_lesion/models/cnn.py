"""The custom CNN, trained from scratch: the paper's own architecture family."""

from __future__ import annotations

import keras
from keras import layers

from skin_lesion.info import CLASSES
from skin_lesion.models.layers import add_head, augment_input

LAST_CONV = "block4_act"  # the layer Grad-CAM explains


def build_cnn(image_size: int = 128, n_classes: int = len(CLASSES), width: int = 32, dropout: float = 0.3, augment: float = 0.0) -> keras.Model:
    """A small VGG-like CNN: four conv blocks (conv-BN-ReLU x2, max-pool, dropout),
    global average pooling and a softmax head. About 1.2M parameters at width 32,
    small enough to train on all of HAM10000 on 2 CPU cores."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 255.0, name="scale")(augment_input(inputs, augment))
    for b, filters in enumerate((width, width * 2, width * 4, width * 8), start=1):
        for c in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{b}_conv{c}")(x)
            x = layers.BatchNormalization(name=f"block{b}_bn{c}")(x)
            x = layers.ReLU(name=f"block{b}_act" if c == 2 else f"block{b}_relu{c}")(x)
        if b < 4:
            x = layers.MaxPooling2D(name=f"block{b}_pool")(x)
            x = layers.Dropout(dropout / 2, name=f"block{b}_drop")(x)
    return add_head(inputs, x, n_classes, dropout, "cnn")
