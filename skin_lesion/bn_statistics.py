"""A pretrained backbone's BatchNormalization statistics re-estimated on the training images.

The pretrained members train with every BatchNormalization layer frozen (small
fine-tuning batches would give noisy statistics), so each layer normalises
with the mean and variance ImageNet's photographs gave, and the head learns
on features normalised for another kind of picture. ``train --bn-statistics
training`` replaces those statistics, once, before the first epoch, with the
ones the run's own training images give (as a "precise BN" pass does); the
layers then stay frozen as before, and every learnt weight is untouched.

The statistics are measured as "precise BN" measures them: each layer
normalises each batch by that batch's own moments, as a BatchNormalization
layer in training mode does, and the batches' moments are pooled into one
mean and variance per channel. A deeper layer's input is then close to, not
exactly, what it is once every layer normalises with the pooled statistics.
They come from the training part's own class mix, whatever mix the
training batches are drawn with.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from keras import layers, ops

from skin_lesion.info import DataError
from skin_lesion.pipeline import make_pipeline
from skin_lesion.pixels import Size, hw

log = logging.getLogger("skin_lesion")

__all__ = ["STATISTICS_IMAGES", "PooledStatistics", "batchnorm_layers", "estimate_statistics", "set_statistics"]

# How many training images the statistics come from: enough that a channel's
# mean is known to a few hundredths of its sd, for 79-84 s at 160 px on 2 cores
# with a second run beside it (model building included). Fewer when the
# training part is smaller.
STATISTICS_IMAGES = 2048
MIN_STATISTICS_IMAGES = 32  # one training batch: fewer would give a layer's variance from a handful of images

Moments = dict[str, tuple[np.ndarray, np.ndarray]]


class PooledStatistics(layers.BatchNormalization):
    """A BatchNormalization that normalises each batch with its own moments, as
    in training, and pools them into running totals: Chan's parallel update
    (counts, means and sums of squared deviations, no difference of large
    numbers), in float32 under any dtype policy (a float16 count would
    overflow at one batch)."""

    def build(self, input_shape):
        super().build(input_shape)
        channels = (input_shape[self.axis],)
        kept = dict(initializer="zeros", trainable=False, dtype="float32", autocast=False)
        self.seen = self.add_weight(shape=(), name="seen", **kept)
        self.pooled_mean = self.add_weight(shape=channels, name="pooled_mean", **kept)
        self.squared_deviations = self.add_weight(shape=channels, name="squared_deviations", **kept)

    def call(self, inputs, training=None, mask=None):
        x = ops.cast(inputs, "float32")
        axis = self.axis % len(x.shape)
        mean, variance = ops.moments(x, axes=[i for i in range(len(x.shape)) if i != axis])
        count = ops.cast(ops.size(x), "float32") / x.shape[axis]
        before, pooled = ops.convert_to_tensor(self.seen), ops.convert_to_tensor(self.pooled_mean)
        total = before + count
        delta = mean - pooled
        self.squared_deviations.assign_add(variance * count + delta * delta * before * count / total)
        self.pooled_mean.assign(pooled + delta * count / total)
        self.seen.assign(total)
        offset = ops.cast(self.beta, "float32") if self.center else None
        scale = ops.cast(self.gamma, "float32") if self.scale else None
        out = ops.batch_normalization(x, mean, variance, axis=axis, offset=offset, scale=scale, epsilon=self.epsilon)
        return ops.cast(out, self.compute_dtype)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """The pooled mean and (population) variance per channel."""
        return self.pooled_mean.numpy(), self.squared_deviations.numpy() / float(self.seen.numpy())


def batchnorm_layers(model: keras.Model) -> list[layers.BatchNormalization]:
    """The model's BatchNormalization layers (the classifiers are flat functional models)."""
    return [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]


def _statistics_model(model: keras.Model) -> tuple[keras.Model, dict[str, PooledStatistics]]:
    """The same graph with each BatchNormalization swapped for a PooledStatistics
    holding the layer's own scale and offset; every other layer is shared, not copied."""
    swapped: dict[str, PooledStatistics] = {}

    def swap(layer):
        if not isinstance(layer, layers.BatchNormalization):
            return layer
        twin = PooledStatistics.from_config(layer.get_config())
        twin.build(layer.input.shape)
        for mine, theirs in zip((twin.gamma, twin.beta), (layer.gamma, layer.beta)):
            if mine is not None:
                mine.assign(theirs)
        swapped[layer.name] = twin
        return twin

    return keras.models.clone_model(model, clone_function=swap), swapped


def _even_batches(frame: pd.DataFrame, image_size: Size, batch_size: int):
    """The images of ``frame``, in its order, decoded as scoring decodes them, in
    batches of at most ``batch_size`` that differ in size by one at most: a last
    batch of a few images would be normalised with its own few images' moments."""
    n_batches = -(-len(frame) // batch_size)
    sizes = np.diff(np.linspace(0, len(frame), n_batches + 1).round().astype(int))
    images = iter(make_pipeline(frame, hw(image_size), batch_size, cache=False).dataset.unbatch().map(lambda x, y: x))
    for size in sizes:
        yield np.stack([next(images).numpy() for _ in range(size)])


def estimate_statistics(model: keras.Model, frame: pd.DataFrame, image_size: Size, batch_size: int,
                        seed: int = 0, limit: int = STATISTICS_IMAGES) -> Moments:
    """Each BatchNormalization layer's mean and variance on up to ``limit`` images of
    ``frame`` (columns ``image_id``, ``path``), drawn with ``seed`` from the rows put
    in one order (so a table in any order gives the same statistics, and a table
    sorted by class does not give batches of one class), one unaugmented view
    each, in even batches of about ``batch_size`` (the run's training batch).
    ``model`` is not changed."""
    if len(frame) < MIN_STATISTICS_IMAGES:
        raise DataError(f"--bn-statistics training: {len(frame)} training image(s) to measure the statistics on; it needs at least {MIN_STATISTICS_IMAGES}")
    if not batchnorm_layers(model):
        raise DataError(f"--bn-statistics training: the model {model.name} has no BatchNormalization layer; train it without the option")
    ordered = frame.sort_values("image_id")
    drawn = ordered.sample(n=min(limit, len(ordered)), random_state=seed)
    statistics, swapped = _statistics_model(model)
    step = tf.function(lambda x: statistics(x, training=False), input_signature=[tf.TensorSpec((None, *hw(image_size), 3), tf.uint8)])
    for x in _even_batches(drawn, image_size, batch_size):
        step(x)
    out: Moments = {}
    for name, layer in swapped.items():
        mean, variance = layer.moments()
        if not (np.isfinite(mean).all() and np.isfinite(variance).all()):
            raise DataError(f"--bn-statistics training: the statistics at layer {name} are not finite; train without the option")
        out[name] = (mean, variance)
    log.info("BatchNormalization statistics of %d layers measured on %d images", len(out), len(drawn))
    return out


def set_statistics(model: keras.Model, moments: Moments) -> float:
    """Give ``model``'s BatchNormalization layers the ``moments`` (by layer name), in
    place. Returns the mean shift, in the old statistics' standard deviations, for the log."""
    shifts = []
    for layer in batchnorm_layers(model):
        mean, variance = moments[layer.name]
        old_sd = np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
        shifts.append(float(np.mean(np.abs(mean - layer.moving_mean.numpy()) / old_sd)))
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
    return float(np.mean(shifts)) if shifts else 0.0
