"""Batch-normalisation statistics re-estimated on the folder being scored (AdaBN).

Every classifier here normalises its features with BatchNormalization layers
whose means and variances were measured on the training images. Images from
another clinic (another dermatoscope, lamp, white balance) shift those
features. AdaBN (Li et al., 2016, "Revisiting batch normalization for
practical domain adaptation") replaces each layer's statistics with the
ones the scored folder gives, keeping every learnt weight. It reads the
folder's pixels, never its labels; it does change what the model says about
each image with the company it keeps, so it is an option for scoring a whole
folder from one source, not for a single image.
"""

from __future__ import annotations

import logging

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from keras import layers, ops

from skin_lesion.info import MIN_ADAPT_IMAGES, DataError
from skin_lesion.pipeline import make_pipeline
from skin_lesion.pixels import Size, hw

log = logging.getLogger("skin_lesion")

__all__ = ["ADAPT_BATCH", "FolderStatistics", "adapt_batchnorm", "batchnorm_layers", "check_enough_images"]

ADAPT_BATCH = 32  # the training batch size: each layer normalises a batch as it did in training


class FolderStatistics(layers.BatchNormalization):
    """A BatchNormalization that normalises each batch with its own moments, as
    in training, and adds them up so that the folder's totals can replace the
    layer's moving statistics. The sums are of features minus the training mean
    (a shift that keeps float32 sums of squares precise)."""

    def build(self, input_shape):
        super().build(input_shape)
        channels = (input_shape[self.axis],)
        self.seen = self.add_weight(shape=(), initializer="zeros", trainable=False, name="seen")
        self.shifted_sum = self.add_weight(shape=channels, initializer="zeros", trainable=False, name="shifted_sum")
        self.shifted_squares = self.add_weight(shape=channels, initializer="zeros", trainable=False, name="shifted_squares")

    def call(self, inputs, training=None, mask=None):
        x = ops.cast(inputs, "float32")
        axis = self.axis % len(x.shape)
        reduce = [i for i in range(len(x.shape)) if i != axis]
        mean, variance = ops.moments(x, axes=reduce)
        count = ops.cast(ops.prod(ops.take(ops.shape(x), reduce)), "float32")
        shift = mean - self.moving_mean
        self.seen.assign_add(count)
        self.shifted_sum.assign_add(count * shift)
        self.shifted_squares.assign_add(count * (variance + shift * shift))
        out = ops.batch_normalization(x, mean, variance, axis=axis, offset=self.beta if self.center else None,
                                      scale=self.gamma if self.scale else None, epsilon=self.epsilon)
        return ops.cast(out, self.compute_dtype)

    def folder_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """The folder's mean and variance per channel, from the sums."""
        n = float(self.seen.numpy())
        shift = self.shifted_sum.numpy() / n
        variance = np.maximum(self.shifted_squares.numpy() / n - shift * shift, 0.0)
        return self.moving_mean.numpy() + shift, variance


def batchnorm_layers(model: keras.Model) -> list[layers.BatchNormalization]:
    """The model's BatchNormalization layers (the classifiers are flat functional models)."""
    return [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]


def _statistics_model(model: keras.Model) -> tuple[keras.Model, dict[str, FolderStatistics]]:
    """The same graph with each BatchNormalization swapped for a FolderStatistics
    holding the layer's own weights; every other layer is shared, not copied."""
    swapped: dict[str, FolderStatistics] = {}

    def swap(layer):
        if not isinstance(layer, layers.BatchNormalization):
            return layer
        twin = FolderStatistics.from_config(layer.get_config())
        twin.build(layer.input.shape)
        for mine, theirs in zip((twin.gamma, twin.beta, twin.moving_mean, twin.moving_variance),
                                (layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance)):
            if mine is not None:
                mine.assign(theirs)
        swapped[layer.name] = twin
        return twin

    return keras.models.clone_model(model, clone_function=swap), swapped


def check_enough_images(n: int) -> None:
    """A DataError when ``n`` images are too few to estimate a folder's statistics from."""
    if n < MIN_ADAPT_IMAGES:
        raise DataError(f"--adapt-bn: {n} image(s) to estimate the statistics from; it needs at least {MIN_ADAPT_IMAGES} from one source")


def adapt_batchnorm(model: keras.Model, frame: pd.DataFrame, image_size: Size, seed: int = 0) -> dict:
    """Replace ``model``'s BatchNormalization statistics, in place, with those of
    the images listed in ``frame`` (column ``path``), read by the decoder every
    scoring path shares, one view each.

    The rows are put in one order (by path) and shuffled with ``seed``, so that
    a folder sorted by class does not give batches of one class and the same
    folder listed in any order gives the same statistics. Returns what was
    done, for the metrics file.
    """
    check_enough_images(len(frame))
    targets = batchnorm_layers(model)
    if not targets:
        raise DataError(f"--adapt-bn: the model {model.name} has no BatchNormalization layer to adapt")
    statistics, swapped = _statistics_model(model)
    step = tf.function(lambda x: statistics(x, training=False))
    shuffled = frame.sort_values("path").sample(frac=1.0, random_state=seed)
    pipe = make_pipeline(shuffled, hw(image_size), ADAPT_BATCH, cache=False)
    for x, _ in pipe.dataset:
        step(x)
    shift = []
    for layer in targets:
        mean, variance = swapped[layer.name].folder_moments()
        shift.append(float(np.mean(np.abs(mean - layer.moving_mean.numpy()) / np.sqrt(layer.moving_variance.numpy() + layer.epsilon))))
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
    log.info("adapted %d BatchNormalization layers to %d images (mean shift %.2f training sd)", len(targets), len(frame), float(np.mean(shift)))
    return {"images": int(len(frame)), "layers": len(targets), "batch_size": ADAPT_BATCH, "seed": seed,
            "mean_shift_in_sd": round(float(np.mean(shift)), 4)}
