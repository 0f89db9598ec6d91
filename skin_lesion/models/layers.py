"""Layers shared by every classifier: the head, input preprocessing, the prior shift.

They are named, registered layers (no Lambda), so saved models load in Keras'
safe mode, which refuses arbitrary code.
"""

from __future__ import annotations

import keras
from keras import layers

from skin_lesion.augment import make_augmenter

HEAD_PREFIX = "head_"  # layers whose names start with it always train (the new classifier head)


def augment_input(inputs, strength: float):
    """With ``strength`` > 0, the training augmentation as the model's first layer:
    it then runs on the accelerator inside the train step (and is a no-op at
    inference), so the input pipeline only decodes, caches and batches."""
    return make_augmenter(strength)(inputs) if strength else inputs


def add_head(inputs, features, n_classes: int, dropout: float, name: str) -> keras.Model:
    """Pooling, dropout and a float32 softmax (kept float32 under mixed precision)."""
    x = layers.GlobalAveragePooling2D(name=HEAD_PREFIX + "pool")(features)
    x = layers.Dropout(dropout, name=HEAD_PREFIX + "dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name=HEAD_PREFIX + "softmax")(x)
    return keras.Model(inputs, outputs, name=name)


@keras.saving.register_keras_serializable(package="skin_lesion")
class CaffePreprocess(layers.Layer):
    """Caffe-style input ResNet50's ImageNet weights expect: RGB->BGR, minus the ImageNet mean."""

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
