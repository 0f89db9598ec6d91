"""tf.data input pipelines: decode, resize, cache, augment, balance, batch, prefetch.

Why this order (the tf.data performance guide): decoding and resizing are
deterministic and costly, so they run once in parallel and are cached;
augmentation is random and cheap, so it runs after the cache on every epoch,
batched. Pixels leave the pipeline as float32 in [0, 255]: each model scales
its own input, so one pipeline serves every model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from skin_lesion.data import CLASSES, DataError

AUTOTUNE = tf.data.AUTOTUNE
IMBALANCE_METHODS: tuple[str, ...] = ("none", "oversample", "undersample", "class_weight")


def decode_resize(path: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """Read a JPEG/PNG, force 3 channels (grayscale and RGBA converted) and
    resize to ``size`` (height, width); uint8 so the cache stays small."""
    raw = tf.io.read_file(path)
    img = tf.io.decode_image(raw, channels=3, expand_animations=False)
    img = tf.image.resize(img, size, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)


def make_augmenter(size: tuple[int, int], strength: float = 1.0, seed: int = 0) -> keras.Sequential:
    """Random geometry and colour for training batches (Keras preprocessing layers).

    Lesions have no up or down, so flips both ways and full rotations are safe;
    crop-and-zoom imitates framing; colour jitter imitates different scopes.
    """
    h, w = size
    s = strength
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal_and_vertical", seed=seed),
            keras.layers.RandomRotation(0.5 * s, fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomZoom((-0.2 * s, 0.1 * s), fill_mode="reflect", seed=seed + 2),
            keras.layers.RandomCrop(max(8, int(h * (1 - 0.1 * s))), max(8, int(w * (1 - 0.1 * s))), seed=seed + 3),
            keras.layers.Resizing(h, w),
            keras.layers.RandomBrightness(0.15 * s, value_range=(0, 255), seed=seed + 4),
            keras.layers.RandomContrast(0.15 * s, seed=seed + 5),
            keras.layers.RandomHue(0.03 * s, value_range=(0, 255), seed=seed + 6),
        ],
        name="augment",
    )


def label_ids(dx: pd.Series) -> np.ndarray:
    """Class names to integer ids in CLASSES order; unknown labels are a DataError."""
    lookup = {c: i for i, c in enumerate(CLASSES)}
    unknown = sorted(set(dx) - set(lookup))
    if unknown:
        raise DataError(f"unknown dx label(s) {unknown}; allowed: {', '.join(CLASSES)}")
    return dx.map(lookup).to_numpy(dtype=np.int32)


def class_weights(labels: np.ndarray) -> dict[int, float]:
    """Balanced class weights (scikit-learn): n / (k * count) per present class."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    return {int(c): float(w) for c, w in zip(present, weights)}


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
    size: int


def make_pipeline(
    frame: pd.DataFrame,
    image_size: tuple[int, int] = (224, 224),
    batch_size: int = 32,
    training: bool = False,
    imbalance: str = "none",
    augment: bool | float = True,
    cache: str | bool = True,
    seed: int = 0,
) -> Pipeline:
    """Build the pipeline for rows of ``frame`` (columns ``path``, ``dx``).

    Training pipelines shuffle, augment and apply ``imbalance``:
    ``oversample`` mixes one repeated dataset per class with equal weights
    (``sample_from_datasets``), ``undersample`` keeps a random balanced subset,
    ``class_weight`` returns balanced weights for ``fit``. Evaluation
    pipelines keep the row order and are deterministic.
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

    if training and imbalance == "oversample":
        parts = []
        for c in np.unique(labels):
            sel = labels == c
            file_cache = f"{cache}_{c}" if isinstance(cache, str) and cache else cache
            parts.append(_image_ds([p for p, s in zip(paths, sel) if s], labels[sel], size, file_cache).shuffle(int(sel.sum()), seed=seed + int(c)).repeat())
        ds = tf.data.Dataset.sample_from_datasets(parts, weights=[1 / len(parts)] * len(parts), seed=seed)
    else:
        ds = _image_ds(paths, labels, size, cache)
        if training:
            ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True).repeat()

    ds = ds.batch(batch_size, drop_remainder=False)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=AUTOTUNE)
    if training and augment:
        aug = make_augmenter(size, float(augment), seed)
        ds = ds.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=AUTOTUNE)
    return Pipeline(ds.prefetch(AUTOTUNE), steps, weights, len(frame))


def load_images(paths: list[str], image_size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """Decode a few images (float32, [0, 255]) for prediction or Grad-CAM, outside tf.data."""
    return np.stack([decode_resize(tf.constant(p), tuple(image_size)).numpy().astype("float32") for p in paths])
