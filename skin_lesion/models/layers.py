"""Layers shared by every classifier: the head, input preprocessing, the prior shift.

They are named, registered layers (no Lambda), so saved models load in Keras'
safe mode, which refuses arbitrary code.
"""

from __future__ import annotations

import keras
from keras import layers

from skin_lesion.augment import make_augmenter
from skin_lesion.config import COLOUR_CONSTANCY

HEAD_PREFIX = "head_"  # layers whose names start with it always train (the new classifier head)


def augment_input(inputs, strength: float, colour_constancy: str = "none", colour: float = 1.0):
    """The model's input stage, before its own scaling.

    With ``strength`` > 0, the training augmentation as the model's first layer:
    it then runs on the accelerator inside the train step (and is a no-op at
    inference), so the input pipeline only decodes, caches and batches
    (``colour`` scales its colour jitter). With ``colour_constancy``
    ``shades_of_gray``, a :class:`ShadesOfGray` layer follows: inside the model
    it reaches every path that scores an image (evaluation, ``predict``, the
    exported bundle, the web page) with no second implementation to drift."""
    if colour_constancy not in COLOUR_CONSTANCY:
        raise ValueError(f"unknown colour_constancy {colour_constancy!r}; choose one of {', '.join(COLOUR_CONSTANCY)}")
    x = make_augmenter(strength, colour=colour)(inputs) if strength else inputs
    return ShadesOfGray(name="colour_constancy")(x) if colour_constancy == "shades_of_gray" else x


@keras.saving.register_keras_serializable(package="skin_lesion")
class ShadesOfGray(layers.Layer):
    """Shades of Gray colour constancy (Finlayson and Trezzi, 2004), per image.

    The illuminant is estimated per channel as the Minkowski p-norm mean of
    its pixels, e_c = mean(I_c^p)^(1/p), and each channel is divided by it,
    scaled so that a grey illuminant leaves the image unchanged
    (I_c * |e| / (sqrt(3) e_c)); p = 6 as in the ISIC 2017-2018 work of
    Barata et al. and Matsunaga et al. A per-channel gain (a camera's or a
    lamp's white balance) cancels out up to one overall brightness factor
    (|e| changes with it). Computed in float32 on [0, 1], whatever the
    precision policy (in float16, x^6 of dark pixels rounds to zero),
    clipped back to [0, 255].
    """

    def __init__(self, p: float = 6.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.p = float(p)

    def call(self, x):
        ops = keras.ops
        x = ops.cast(x, "float32") / 255.0
        illuminant = ops.power(ops.mean(ops.power(x, self.p), axis=(1, 2), keepdims=True) + 1e-12, 1.0 / self.p)
        norm = ops.sqrt(ops.sum(ops.square(illuminant), axis=-1, keepdims=True))
        return ops.clip(x * norm / (illuminant * 3.0**0.5), 0.0, 1.0) * 255.0

    def get_config(self):
        return {**super().get_config(), "p": self.p}


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
