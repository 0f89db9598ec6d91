"""The training augmentation: one Keras layer for geometry and colour, and MixUp.

The layer runs in tf.data on the CPU (``pipeline.make_pipeline``) or as a
model's first layer on the accelerator (``augment_on="model"``); the same
draws either way, built on ``keras.ops`` and ``keras.random``. MixUp
(``mixup_batch``) blends whole batches and their labels, in tf.data only.
"""

from __future__ import annotations

import itertools
import math

import keras
import numpy as np
import tensorflow as tf

# RGB -> YIQ: hue is the angle in the IQ plane, so a hue shift is a rotation there.
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], "float32")


@keras.saving.register_keras_serializable(package="skin_lesion")
class LesionAugment(keras.layers.Layer):
    """Random geometry and colour for a batch of training images, in one pass.

    Geometry: flips, a full rotation (lesions have no up or down), zoom from
    0.9x to 1.25x (zooming in is a random crop) and a shift of up to 8% -- all
    composed into one affine transform per image, so each image is resampled
    once (reflected at the borders). Colour: hue rotation (in YIQ), contrast
    and brightness jitter, scaled by ``colour``; above 1 each channel's gain
    also shifts by up to 8% x ``strength`` x (``colour`` - 1) (a camera's or
    lamp's white balance; drawn only then, so ``colour`` = 1 draws as
    before). Chaining Keras' preprocessing layers for the same effects
    resamples each image several times. Built on ``keras.ops`` and
    ``keras.random``.

    Inside a model it runs on the accelerator; TensorFlow's XLA has no kernel
    for the affine resample, so the layer says ``supports_jit = False`` and
    Keras' ``jit_compile="auto"`` then compiles such a model without XLA.
    """

    def __init__(self, strength: float = 1.0, seed: int | None = None, colour: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.strength, self.seed, self.colour = float(strength), seed, float(colour)
        self.supports_jit = False
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _sampler(self, batch_seed):
        """``uniform(n, low, high)`` for one call. Inside a model (no ``batch_seed``)
        train steps run one at a time, so the layer's stateful generator is drawn in
        order; in tf.data the k-th draw is keyed by (``batch_seed``, k), so it does
        not depend on which thread ran first."""
        if batch_seed is None:
            return lambda n, low, high: keras.random.uniform((n,), low, high, seed=self.seed_generator)
        draws = itertools.count(1)

        def uniform(n, low: float, high: float):
            return tf.random.stateless_uniform((n,), tf.random.experimental.stateless_fold_in(batch_seed, next(draws)), low, high)

        return uniform

    def _geometry(self, images, uniform):
        """One affine transform per image: output pixel -> input pixel."""
        ops, s = keras.ops, self.strength
        shape = ops.shape(images)
        n, h, w = shape[0], ops.cast(shape[1], "float32"), ops.cast(shape[2], "float32")
        theta = uniform(n, -math.pi * s, math.pi * s)
        scale = uniform(n, 1 - 0.1 * s, 1 + 0.25 * s)
        fx = ops.where(uniform(n, 0, 1) < 0.5, -1.0, 1.0)
        fy = ops.where(uniform(n, 0, 1) < 0.5, -1.0, 1.0)
        tx, ty = uniform(n, -0.08 * s, 0.08 * s) * w, uniform(n, -0.08 * s, 0.08 * s) * h
        cos, sin = ops.cos(theta) / scale, ops.sin(theta) / scale
        a00, a01, a10, a11 = cos * fx, -sin * fy, sin * fx, cos * fy
        cx, cy = (w - 1) / 2, (h - 1) / 2
        zeros = ops.zeros_like(theta)
        transform = ops.stack([a00, a01, cx + tx - a00 * cx - a01 * cy, a10, a11, cy + ty - a10 * cx - a11 * cy, zeros, zeros], axis=1)
        return ops.image.affine_transform(images, transform, interpolation="bilinear", fill_mode="reflect")

    def _colour(self, x, uniform):
        """Hue rotation, then contrast about each image's mean, then brightness, then (``colour`` > 1) channel gains."""
        ops, s = keras.ops, self.strength * self.colour
        n = ops.shape(x)[0]
        hue = uniform(n, -0.1 * math.pi * s, 0.1 * math.pi * s)
        c, si = ops.cos(hue), ops.sin(hue)
        one, zero = ops.ones_like(c), ops.zeros_like(c)
        rot = ops.stack([ops.stack([one, zero, zero], -1), ops.stack([zero, c, -si], -1), ops.stack([zero, si, c], -1)], 1)
        to_yiq = ops.convert_to_tensor(_RGB2YIQ)
        from_yiq = ops.convert_to_tensor(np.linalg.inv(_RGB2YIQ).astype("float32"))
        x = ops.einsum("bhwc,bdc->bhwd", x, ops.einsum("ij,bjk,kl->bil", from_yiq, rot, to_yiq))
        mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
        contrast = ops.reshape(uniform(n, 1 - 0.15 * s, 1 + 0.15 * s), (-1, 1, 1, 1))
        brightness = ops.reshape(uniform(n, -0.1 * s, 0.1 * s) * 255, (-1, 1, 1, 1))
        x = (x - mean) * contrast + mean + brightness
        if self.colour > 1:
            g = 0.08 * self.strength * (self.colour - 1)
            x = x * ops.reshape(ops.stack([uniform(n, 1 - g, 1 + g) for _ in range(3)], axis=-1), (-1, 1, 1, 3))
        return ops.clip(x, 0, 255)

    def call(self, images, training=True, batch_seed=None):
        """``batch_seed`` (tf.data only): an int64 tensor of shape (2,) that fixes
        this batch's draws, so a pipeline's augmentation depends on the batch's
        position in the stream and not on which thread ran first."""
        if not training or self.strength <= 0:
            return images
        uniform = self._sampler(batch_seed)
        return self._colour(self._geometry(keras.ops.cast(images, self.compute_dtype), uniform), uniform)

    def get_config(self):
        return {**super().get_config(), "strength": self.strength, "seed": self.seed, "colour": self.colour}


def make_augmenter(strength: float = 1.0, seed: int = 0, colour: float = 1.0) -> LesionAugment:
    """The training augmentation (see :class:`LesionAugment`); ``colour`` scales its colour jitter."""
    return LesionAugment(strength, seed=seed, colour=colour, name="augment")


# Keys of MixUp's two draws within a batch's stream (LesionAugment folds in 1, 2, ...).
_MIX_DRAWS = (1_000_001, 1_000_002)


def mixup_batch(images: tf.Tensor, labels: tf.Tensor, alpha: float, batch_seed: tf.Tensor, n_classes: int) -> tuple[tf.Tensor, tf.Tensor]:
    """MixUp (Zhang et al., 2018) on one training batch: each image blended with the
    batch's image in reversed order, by a weight drawn from Beta(``alpha``, ``alpha``)
    for that image, and its label likewise (one-hot mixed into soft targets).

    A regulariser for a model that fits its training images far better than
    validation ones: a blend of two lesions has no confident answer. The draws are
    keyed by ``batch_seed`` (as in ``LesionAugment``), so a pipeline's blends depend
    on the batch's position in the stream only. Returns float32 images in [0, 255]
    and float32 targets of shape (batch, ``n_classes``) that sum to 1.
    """
    images = tf.cast(images, tf.float32)
    n = tf.shape(images)[0]
    g1, g2 = (tf.random.stateless_gamma((n,), tf.random.experimental.stateless_fold_in(batch_seed, k), alpha) for k in _MIX_DRAWS)
    lam = tf.math.divide_no_nan(g1, g1 + g2)  # Beta(alpha, alpha); both draws 0 (tiny alpha) keeps the partner
    onehot = tf.one_hot(tf.cast(tf.reshape(labels, (-1,)), tf.int32), n_classes)
    mixed = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * tf.reverse(images, [0])
    targets = lam[:, None] * onehot + (1 - lam[:, None]) * tf.reverse(onehot, [0])
    return mixed, targets
