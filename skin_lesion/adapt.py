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

ADAPT_BATCH = 32  # the cpu profile's training batch; evaluate passes the run's own


class FolderStatistics(layers.BatchNormalization):
    """A BatchNormalization that normalises each batch with its own moments, as
    in training, and pools them into the folder's mean and variance, which then
    replace the layer's moving statistics. Pooled by Chan's parallel update
    (counts, means and sums of squared deviations: no difference of large
    numbers), in float32 under any dtype policy (a float16 count would
    overflow at one batch)."""

    def build(self, input_shape):
        super().build(input_shape)
        channels = (input_shape[self.axis],)
        kept = dict(initializer="zeros", trainable=False, dtype="float32", autocast=False)
        self.seen = self.add_weight(shape=(), name="seen", **kept)
        self.folder_mean = self.add_weight(shape=channels, name="folder_mean", **kept)
        self.squared_deviations = self.add_weight(shape=channels, name="squared_deviations", **kept)

    def call(self, inputs, training=None, mask=None):
        x = ops.cast(inputs, "float32")
        axis = self.axis % len(x.shape)
        mean, variance = ops.moments(x, axes=[i for i in range(len(x.shape)) if i != axis])
        count = ops.cast(ops.size(x), "float32") / x.shape[axis]
        before, pooled = ops.convert_to_tensor(self.seen), ops.convert_to_tensor(self.folder_mean)
        total = before + count
        delta = mean - pooled
        self.squared_deviations.assign_add(variance * count + delta * delta * before * count / total)
        self.folder_mean.assign(pooled + delta * count / total)
        self.seen.assign(total)
        out = ops.batch_normalization(x, mean, variance, axis=axis, offset=ops.cast(self.beta, "float32") if self.center else None,
                                      scale=ops.cast(self.gamma, "float32") if self.scale else None, epsilon=self.epsilon)
        return ops.cast(out, self.compute_dtype)

    def folder_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """The folder's mean and (population) variance per channel."""
        return self.folder_mean.numpy(), self.squared_deviations.numpy() / float(self.seen.numpy())


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


def even_batches(frame: pd.DataFrame, image_size: Size, batch_size: int):
    """The images of ``frame``, in its order, decoded as scoring decodes them, in
    batches of at most ``batch_size`` that differ in size by one at most: a last
    batch of a few images would be normalised with its own few images' moments."""
    n_batches = -(-len(frame) // batch_size)
    sizes = np.diff(np.linspace(0, len(frame), n_batches + 1).round().astype(int))
    images = iter(make_pipeline(frame, hw(image_size), batch_size, cache=False).dataset.unbatch().map(lambda x, y: x))
    for size in sizes:
        yield np.stack([next(images).numpy() for _ in range(size)])


def adapt_batchnorm(model: keras.Model, frame: pd.DataFrame, image_size: Size, batch_size: int = ADAPT_BATCH, seed: int = 0) -> dict:
    """Replace ``model``'s BatchNormalization statistics, in place, with those of
    the images listed in ``frame`` (column ``path``), read by the decoder every
    scoring path shares, one view each, in batches of ``batch_size`` (the
    run's training batch: each layer then normalises batches as in training).

    The rows are put in one order (by path) and shuffled with ``seed``, so that
    a folder sorted by class does not give batches of one class and the same
    folder listed in any order gives the same statistics. Returns what was
    done, for the metrics file.
    """
    check_enough_images(len(frame))
    targets = batchnorm_layers(model)
    if not targets:
        raise DataError(f"--adapt-bn: the model {model.name} has no BatchNormalization layer to adapt; score it without --adapt-bn")
    statistics, swapped = _statistics_model(model)
    step = tf.function(lambda x: statistics(x, training=False), input_signature=[tf.TensorSpec((None, *hw(image_size), 3), tf.uint8)])
    for x in even_batches(frame.sort_values("path").sample(frac=1.0, random_state=seed), image_size, batch_size):
        step(x)
    shift = []
    for layer in targets:
        mean, variance = swapped[layer.name].folder_moments()
        if not (np.isfinite(mean).all() and np.isfinite(variance).all()):
            raise DataError(f"--adapt-bn: the folder's statistics at layer {layer.name} are not finite; score it without --adapt-bn")
        shift.append(float(np.mean(np.abs(mean - layer.moving_mean.numpy()) / np.sqrt(layer.moving_variance.numpy() + layer.epsilon))))
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
    log.info("adapted %d BatchNormalization layers to %d images (mean shift %.2f training sd)", len(targets), len(frame), float(np.mean(shift)))
    return {"images": int(len(frame)), "layers": len(targets), "batch_size": batch_size, "seed": seed,
            "mean_shift_in_sd": round(float(np.mean(shift)), 4)}
