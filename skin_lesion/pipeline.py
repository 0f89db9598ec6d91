"""tf.data input pipelines, class-imbalance sampling, and the one image decoder.

``decode_resize`` is how pixels enter every TensorFlow path: training,
evaluation, Grad-CAM and ``predict --run`` all read images through it
(``read_image`` for single files), so a model sees the same pixels wherever it
runs; the TensorFlow-free bundle decodes with ``pixels.decode_rgb``, which
matches it within one level (tested).

Why this order (the tf.data performance guide): decoding and resizing are
deterministic and costly, so they run once in parallel and are cached;
augmentation is random, so it runs after the cache on every epoch, batched --
in tf.data (``augment`` here) or inside the model on the accelerator
(``augment_on="model"`` in training). Pixels leave the pipeline as uint8 in
[0, 255] (float32 after tf.data augmentation or MixUp): each model casts and scales its
own input, so one pipeline serves every model and a GPU receives a quarter of
the bytes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import tensorflow as tf

from skin_lesion.augment import make_augmenter, mixup_batch
from skin_lesion.config import IMBALANCE_METHODS
from skin_lesion.data import label_ids
from skin_lesion.info import CLASSES, DataError, ImageError
from skin_lesion.pixels import Size, hw

AUTOTUNE = tf.data.AUTOTUNE
__all__ = ["AUTOTUNE", "ImageError", "Pipeline", "class_weights", "decode_resize", "load_images", "make_pipeline", "read_image", "sampling_prior", "undersample"]


def decode_resize(path: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """Read a JPEG/PNG, force 3 channels (grayscale and RGBA converted) and
    resize to ``size`` (height, width); uint8 so the cache stays small."""
    raw = tf.io.read_file(path)
    img = tf.io.decode_image(raw, channels=3, expand_animations=False)
    img = tf.image.resize(img, size, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)


def read_image(path: str | os.PathLike, image_size: Size) -> np.ndarray:
    """One image file as a float32 (height, width, 3) array in [0, 255] for a model taking
    ``image_size`` (px, or (height, width)), decoded and resized exactly as the training
    pipeline does; an unreadable file is an ImageError."""
    path = str(path)
    if not os.path.isfile(path):
        raise ImageError(f"{path}: file not found")
    try:
        return decode_resize(tf.constant(path), hw(image_size)).numpy().astype("float32")
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}); pass a JPEG or PNG file") from e


def load_images(paths: list[str], image_size: Size) -> np.ndarray:
    """A few image files as one float32 batch in [0, 255], for prediction or Grad-CAM outside tf.data."""
    return np.stack([read_image(p, image_size) for p in paths])


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Balanced class weights (scikit-learn): n / (k * count) per present class."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    return {int(c): float(w) for c, w in zip(present, weights)}


def sampling_prior(labels: np.ndarray, imbalance: str, n_classes: int = len(CLASSES)) -> np.ndarray | None:
    """How often a training pipeline draws each class, for the methods that the model
    must undo at inference (``sqrt``: probability proportional to the square root of
    the class count); ``None`` for the others, whose batches are balanced already or
    whose loss is weighted."""
    if imbalance != "sqrt":
        return None
    counts = np.bincount(labels, minlength=n_classes).astype("float64")
    root = np.sqrt(counts)
    return root / root.sum()


def undersample(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Randomly drop majority-class rows down to the smallest class (imbalanced-learn)."""
    from imblearn.under_sampling import RandomUnderSampler

    rus = RandomUnderSampler(random_state=seed)
    idx, _ = rus.fit_resample(np.arange(len(frame)).reshape(-1, 1), frame["dx"].to_numpy())
    return frame.iloc[np.sort(idx.ravel())]


def _image_ds(paths: list[str], labels: np.ndarray, size: tuple[int, int], cache: str | bool) -> tf.data.Dataset:
    """(image uint8, label) pairs, decoded in parallel and cached (memory or file)."""
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    ds = ds.map(lambda p, y: (decode_resize(p, size), y), num_parallel_calls=AUTOTUNE, deterministic=True)
    if cache is True:
        ds = ds.cache()
    elif cache:
        ds = ds.cache(str(cache))
    return ds


@dataclass
class Pipeline:
    """A batched dataset plus what ``fit`` needs alongside it."""

    dataset: tf.data.Dataset
    steps: int
    class_weight: dict[int, float] | None


def make_pipeline(
    frame: pd.DataFrame,
    image_size: tuple[int, int] = (224, 224),
    batch_size: int = 32,
    training: bool = False,
    imbalance: str = "none",
    augment: bool | float = True,
    cache: str | bool = True,
    seed: int = 0,
    colour_augment: float = 1.0,
    mixup: float = 0.0,
) -> Pipeline:
    """Build the pipeline for rows of ``frame`` (columns ``path``, ``dx``).

    Training pipelines shuffle, augment and apply ``imbalance``:
    ``oversample`` mixes one repeated dataset per class with equal weights
    (``sample_from_datasets``), ``sqrt`` mixes them with weights proportional
    to the square root of each class's count (rare images repeat less; the
    model undoes the skew at inference, see ``models.layers.PriorShift``), ``undersample`` keeps a random balanced subset,
    ``class_weight`` returns balanced weights for ``fit``. Evaluation
    pipelines keep the row order and are deterministic; training pipelines
    give the same batches for the same ``seed``, however busy the machine.
    ``colour_augment`` scales the augmentation's colour jitter (``augment.LesionAugment``).
    ``mixup`` > 0 blends each training batch's images and labels (``augment.mixup_batch``,
    Beta(``mixup``, ``mixup``) weights): its labels are then soft targets of shape (batch, 7).
    """
    if imbalance not in IMBALANCE_METHODS:
        raise DataError(f"unknown imbalance method {imbalance!r}; choose one of {', '.join(IMBALANCE_METHODS)}")
    if frame.empty:
        raise DataError("no images to build a pipeline from (empty split)")
    size = tuple(image_size)
    if training and imbalance == "undersample":
        frame = undersample(frame, seed)
    labels = label_ids(frame["dx"])
    paths = frame["path"].tolist()
    steps = math.ceil(len(frame) / batch_size)
    weights = class_weights(labels) if training and imbalance == "class_weight" else None

    if training and imbalance in ("oversample", "sqrt"):
        parts = []
        for c in np.unique(labels):
            sel = labels == c
            file_cache = f"{cache}_{c}" if isinstance(cache, str) and cache else cache
            parts.append(_image_ds([p for p, s in zip(paths, sel) if s], labels[sel], size, file_cache).shuffle(int(sel.sum()), seed=seed + int(c)).repeat())
        prior = sampling_prior(labels, imbalance)
        mix = [float(prior[c]) for c in np.unique(labels)] if prior is not None else [1 / len(parts)] * len(parts)
        ds = tf.data.Dataset.sample_from_datasets(parts, weights=mix, seed=seed)
    else:
        ds = _image_ds(paths, labels, size, cache)
        if training:
            ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True).repeat()

    ds = ds.batch(batch_size, drop_remainder=False)
    if training and (augment or mixup > 0):
        aug = make_augmenter(float(augment), seed, colour=colour_augment) if augment else None

        def transform(i, xy):
            """Augment batch ``i``, then blend it (MixUp): each image is transformed on its own first."""
            # Each batch's draws are keyed by (seed, its index in the stream): a shared
            # generator handed them out in thread-timing order under parallel calls, so
            # runs under load did not reproduce. (A second iterator over this dataset
            # still reshuffles from state the first advanced; train builds one per phase.)
            batch_seed = tf.stack([tf.constant(seed, tf.int64), i])
            x, y = xy
            if aug is not None:
                x = aug(x, training=True, batch_seed=batch_seed)
            return mixup_batch(x, y, float(mixup), batch_seed, len(CLASSES)) if mixup > 0 else (x, y)

        ds = ds.enumerate().map(transform, num_parallel_calls=AUTOTUNE)
    return Pipeline(ds.prefetch(AUTOTUNE), steps, weights)
