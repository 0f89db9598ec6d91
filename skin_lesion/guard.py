"""The out-of-distribution guard: refuse images that are not dermatoscopic pictures of a lesion.

A classifier trained on seven lesion classes gives one of them to any picture
at all (a cat, a face, a blank frame). The guard asks two questions of an
image and refuses it when either answer is "unlike the training images":

- its **features**: the Mahalanobis distance of its pooled features (the
  vector the model's head sees) to the nearest class mean under one shared
  covariance (Lee et al., 2018), shrunk (Ledoit-Wolf) so it is well conditioned
  for a few thousand images of a 1,280-wide feature. It catches photographs,
  text and drawings;
- its **pixels**: the Mahalanobis distance of ten image statistics (colour
  means and spreads, edge and fine-detail energy, saturation) to the nearest
  class's mean, again with one shared covariance. It catches what a
  network's features can miss: blank frames, noise, flat screenshots. Per
  class, so that a rare class with its own colours (vascular lesions are red)
  is measured against its own images rather than against the nevi's.

Both are fitted on the training split; each threshold is set on the
validation split to refuse at most half of ``reject`` of validation images,
so the two together refuse at most ``reject``; the test split is never used.
Scoring is NumPy only, so the bundle's TensorFlow-free predictor carries it:
each precision matrix is stored as its Cholesky factor, which turns every
distance into one matrix-vector product.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REJECT_ON_VALIDATION = 0.02  # the share of validation images the guard may refuse
PIXEL_SIZE = 64  # the pixel statistics are taken of the image resized to this size: colour and texture show there, at a tenth of 224 px's cost
NOT_RECOGNISED = "not recognised as a dermatoscopic image; not scored"
CHECKS = ("features", "pixels")


@dataclass
class Mahalanobis:
    """Class means and a whitening factor of one kind of vector, and the squared distance above which it is refused."""

    means: np.ndarray  # (classes, dims), whitened
    whiten: np.ndarray  # (dims, dims): L with L L^T = precision, so |(x - m) L|^2 is the squared distance
    threshold: float

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean, one per row (the product in
        float32, the precision the bundle stores it in; the sum in float64)."""
        z = (np.atleast_2d(np.asarray(x, dtype=np.float32)) @ self.whiten.astype(np.float32, copy=False)).astype(np.float64)
        return ((z[:, None, :] - self.means[None]) ** 2).sum(-1).min(axis=1)

    @classmethod
    def fit(cls, train: np.ndarray, labels: np.ndarray, validation: np.ndarray, reject: float) -> Mahalanobis:
        """Means per label and a shrunk shared covariance from ``train``; the threshold refuses at most ``reject`` of ``validation``."""
        from sklearn.covariance import LedoitWolf

        train, labels = np.asarray(train, np.float64), np.asarray(labels)
        classes = np.unique(labels)
        means = np.stack([train[labels == c].mean(axis=0) for c in classes])
        covariance = LedoitWolf(assume_centered=True).fit(train - means[np.searchsorted(classes, labels)]).covariance_
        precision = np.linalg.inv(covariance)
        whiten = np.linalg.cholesky((precision + precision.T) / 2)
        fitted = cls(means @ whiten, whiten, np.inf)
        fitted.threshold = threshold_refusing(fitted.distance(validation), reject)
        return fitted


def threshold_refusing(scores: np.ndarray, reject: float) -> float:
    """The smallest threshold that leaves at most ``reject`` of ``scores`` above it (the k-th largest, k = floor(reject n))."""
    ordered = np.sort(np.asarray(scores))[::-1]
    k = int(np.floor(reject * len(ordered)))
    return float(ordered[min(k, len(ordered) - 1)])


@dataclass
class Guard:
    """The two checks (``features`` and ``pixels``); an image is recognised when both distances are within their thresholds."""

    features: Mahalanobis
    pixels: Mahalanobis
    reject_on_validation: float  # the share of validation images refused by either check, as measured

    def scores(self, features: np.ndarray, statistics: np.ndarray) -> np.ndarray:
        """Each check's distance over its threshold, (n, 2): above 1 is refused."""
        return np.stack([self.features.distance(features) / self.features.threshold,
                         self.pixels.distance(statistics) / self.pixels.threshold], axis=1)

    def score(self, features: np.ndarray, statistics: np.ndarray) -> np.ndarray:
        """The larger of the two relative distances, one per image: above 1 is refused."""
        return self.scores(features, statistics).max(axis=1)

    def recognised(self, features: np.ndarray, statistics: np.ndarray) -> np.ndarray:
        """Whether each image passes both checks (True: score it)."""
        return self.score(features, statistics) <= 1.0

    def save(self, path: str | os.PathLike) -> Path:
        """Write the guard as a ``.npz`` file (what the bundle carries)."""
        arrays = {"reject_on_validation": np.float64(self.reject_on_validation)}
        for name in CHECKS:
            check: Mahalanobis = getattr(self, name)
            arrays.update({f"{name}_means": check.means.astype(np.float32), f"{name}_whiten": check.whiten.astype(np.float32),
                           f"{name}_threshold": np.float64(check.threshold)})
        np.savez(path, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Guard:
        """Read a guard written by ``save``."""
        with np.load(path) as f:
            checks = {name: Mahalanobis(f[f"{name}_means"].astype(np.float64), f[f"{name}_whiten"], float(f[f"{name}_threshold"]))
                      for name in CHECKS}
            return cls(**checks, reject_on_validation=float(f["reject_on_validation"]))


def pooled(feature_maps: np.ndarray) -> np.ndarray:
    """Global average of (..., height, width, channels) feature maps: the head's input."""
    return np.asarray(feature_maps, dtype=np.float64).mean(axis=(-3, -2))


def pixel_statistics(image: np.ndarray) -> np.ndarray:
    """Ten statistics of a (height, width, 3) image in [0, 255], on a log scale: the mean and spread of
    each colour, edge energy, fine-detail energy (a Laplacian), and the mean and spread of saturation.

    Channels first and contiguous, so every reduction runs over one long axis
    (reducing over a trailing axis of 3 is several times slower in NumPy)."""
    channels = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1), dtype=np.float64) / 255
    flat = channels.reshape(3, -1)
    grey = (channels[0] + channels[1] + channels[2]) / 3
    edges = np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()
    laplacian = np.abs(4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]).mean()
    saturation = np.maximum(np.maximum(flat[0], flat[1]), flat[2]) - np.minimum(np.minimum(flat[0], flat[1]), flat[2])
    stats = np.concatenate([flat.mean(axis=1), flat.std(axis=1), [edges, laplacian, saturation.mean(), saturation.std()]])
    return np.log(stats + 1e-3)


def fit_guard(train_features: np.ndarray, train_labels: np.ndarray, train_statistics: np.ndarray,
              val_features: np.ndarray, val_statistics: np.ndarray, reject: float = REJECT_ON_VALIDATION) -> Guard:
    """Both checks fitted on the training split, each thresholded to refuse at most ``reject / 2`` of validation."""
    features = Mahalanobis.fit(train_features, train_labels, val_features, reject / 2)
    pixels = Mahalanobis.fit(train_statistics, train_labels, val_statistics, reject / 2)
    guard = Guard(features, pixels, 0.0)
    guard.reject_on_validation = float((~guard.recognised(val_features, val_statistics)).mean())
    return guard


def foreign_images(folder: str | os.PathLike) -> dict[str, Path]:
    """Images that are not dermatoscopic, available offline, written into ``folder``: the guard's test set.

    scikit-image's and matplotlib's sample pictures (photos of people, animals,
    objects and the sky, text, microscopy, a retina) and generated frames
    (blank, noise, text, a chart-like screenshot). Returns name -> file.
    """
    import matplotlib
    import skimage.data
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pictures = {name: getattr(skimage.data, name)() for name in SKIMAGE_SAMPLES}
    samples = Path(matplotlib.get_data_path()) / "sample_data"
    pictures.update({Path(f).stem.lower(): np.asarray(Image.open(samples / f)) for f in MATPLOTLIB_SAMPLES})
    rng = np.random.default_rng(0)
    pictures["blank_white"] = np.full((450, 600, 3), 255, np.uint8)
    pictures["blank_black"] = np.zeros((450, 600, 3), np.uint8)
    pictures["blank_grey"] = np.full((450, 600, 3), 128, np.uint8)
    pictures["noise_uniform"] = rng.integers(0, 256, (450, 600, 3), dtype=np.uint8)
    pictures["noise_gaussian"] = np.clip(rng.normal(128, 40, (450, 600, 3)), 0, 255).astype(np.uint8)
    text = Image.new("RGB", (600, 450), "white")
    draw = ImageDraw.Draw(text)
    for row in range(18):
        draw.text((20, 12 + 24 * row), "The quick brown fox jumps over the lazy dog. 0123456789 " * 2, fill="black")
    pictures["text_page"] = np.asarray(text)
    screen = Image.new("RGB", (800, 500), (240, 242, 245))
    draw = ImageDraw.Draw(screen)
    draw.rectangle((0, 0, 800, 40), fill=(47, 111, 178))
    for i, height in enumerate((120, 260, 180, 330, 90, 210)):
        draw.rectangle((80 + 110 * i, 450 - height, 160 + 110 * i, 450), fill=(221, 132, 82))
    draw.text((20, 12), "Dashboard - quarterly figures", fill="white")
    pictures["screenshot_chart"] = np.asarray(screen)
    out = {}
    for name, pixels in pictures.items():
        path = folder / f"{name}.png"
        Image.fromarray(pixels).save(path)
        out[name] = path
    return out


SKIMAGE_SAMPLES = ("astronaut", "camera", "chelsea", "coffee", "coins", "horse", "hubble_deep_field",
                   "immunohistochemistry", "moon", "page", "rocket", "text", "clock", "checkerboard", "retina", "colorwheel", "brick", "gravel")
MATPLOTLIB_SAMPLES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")
