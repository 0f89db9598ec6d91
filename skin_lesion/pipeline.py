"""tf.data input pipelines: decode, resize, cache, augment, balance, batch, prefetch.

Why this order (the tf.data performance guide): decoding and resizing are
deterministic and costly, so they run once in parallel and are cached;
augmentation is random, so it runs after the cache on every epoch, batched --
in tf.data (``augment`` here) or inside the model on the accelerator
(``augment_on="model"`` in training). Pixels leave the pipeline as uint8 in
[0, 255] (float32 after tf.data augmentation): each model casts and scales its
own input, so one pipeline serves every model and a GPU receives a quarter of
the bytes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from skin_lesion.data import CLASSES, DataError

AUTOTUNE = tf.data.AUTOTUNE
IMBALANCE_METHODS: tuple[str, ...] = ("none", "oversample", "sqrt", "undersample", "class_weight")


def decode_resize(path: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """Read a JPEG/PNG, force 3 channels (grayscale and RGBA converted) and
    resize to ``size`` (height, width); uint8 so the cache stays small."""
    raw = tf.io.read_file(path)
    img = tf.io.decode_image(raw, channels=3, expand_animations=False)
    img = tf.image.resize(img, size, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)


# RGB -> YIQ: hue is the angle in the IQ plane, so a hue shift is a rotation there.
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], "float32")


@keras.saving.register_keras_serializable(package="skin_lesion")
class LesionAugment(keras.layers.Layer):
    """Random geometry and colour for a batch of training images, in one pass.

    Geometry: flips, a full rotation (lesions have no up or down), zoom from
    0.9x to 1.25x (zooming in is a random crop) and a shift of up to 8% -- all
    composed into one affine transform per image, so each image is resampled
    once (reflected at the borders). Colour: hue rotation (in YIQ), contrast
    and brightness jitter. Chaining Keras' preprocessing layers for the same
    effects resamples each image several times. Built on ``keras.ops`` and
    ``keras.random``.

    Inside a model it runs on the accelerator; TensorFlow's XLA has no kernel
    for the affine resample, so the layer says ``supports_jit = False`` and
    Keras' ``jit_compile="auto"`` then compiles such a model without XLA.
    """

    def __init__(self, strength: float = 1.0, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.strength, self.seed = float(strength), seed
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
        """Hue rotation, then contrast about each image's mean, then brightness."""
        ops, s = keras.ops, self.strength
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
        return ops.clip((x - mean) * contrast + mean + brightness, 0, 255)

    def call(self, images, training=True, batch_seed=None):
        """``batch_seed`` (tf.data only): an int64 tensor of shape (2,) that fixes
        this batch's draws, so a pipeline's augmentation depends on the batch's
        position in the stream and not on which thread ran first."""
        if not training or self.strength <= 0:
            return images
        uniform = self._sampler(batch_seed)
        return self._colour(self._geometry(keras.ops.cast(images, self.compute_dtype), uniform), uniform)

    def get_config(self):
        return {**super().get_config(), "strength": self.strength, "seed": self.seed}


def make_augmenter(strength: float = 1.0, seed: int = 0) -> LesionAugment:
    """The training augmentation (see :class:`LesionAugment`)."""
    return LesionAugment(strength, seed=seed, name="augment")


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
    (``sample_from_datasets``), ``sqrt`` mixes them with weights proportional
    to the square root of each class's count (rare images repeat less; the
    model undoes the skew at inference, see ``models.PriorShift``), ``undersample`` keeps a random balanced subset,
    ``class_weight`` returns balanced weights for ``fit``. Evaluation
    pipelines keep the row order and are deterministic; training pipelines
    give the same batches for the same ``seed``, however busy the machine.
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
    if training and augment:
        aug = make_augmenter(float(augment), seed)
        # Each batch's draws are keyed by (seed, its index in the stream): a shared
        # generator handed them out in thread-timing order under parallel calls, so
        # runs under load did not reproduce. (A second iterator over this dataset
        # still reshuffles from state the first advanced; train builds one per phase.)
        ds = ds.enumerate().map(
            lambda i, xy: (aug(xy[0], training=True, batch_seed=tf.stack([tf.constant(seed, tf.int64), i])), xy[1]),
            num_parallel_calls=AUTOTUNE,
        )
    return Pipeline(ds.prefetch(AUTOTUNE), steps, weights, len(frame))


def load_images(paths: list[str], image_size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """Decode a few images (float32, [0, 255]) for prediction or Grad-CAM, outside tf.data."""
    return np.stack([decode_resize(tf.constant(p), tuple(image_size)).numpy().astype("float32") for p in paths])
