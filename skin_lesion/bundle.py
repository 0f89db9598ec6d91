"""The exported model bundle, run without TensorFlow: LiteRT, NumPy and Pillow only.

A bundle (``export --run RUN --out DIR``) is a folder a user can hand to a
colleague: one ``.tflite`` file per member model, ``manifest.json`` with
everything ``predict`` needs to reproduce the run's predictions (class order,
input sizes, the resize rule, temperatures, an ensemble's logit adjustment,
the melanoma threshold), the out-of-distribution guard (``guard.py``) and
``MODEL_CARD.md``. This module loads and runs one; it imports neither
TensorFlow nor Keras, so a cold ``predict`` starts in a fraction of a second.
Pixels are decoded and resized as training does by ``pixels.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from skin_lesion.calibration import apply_temperature, decide
from skin_lesion.guard import CHECKS, NOT_RECOGNISED, PIXEL_SIZE, Guard, pixel_statistics, pooled
from skin_lesion.info import CLASS_DESCRIPTIONS, CLASSES, MEL, UserError
from skin_lesion.pixels import Size, decode_rgb, hw, resize_like_training, size_key, size_text

BUNDLE_FORMAT = "skin_lesion.bundle"
BUNDLE_VERSION = 1  # what a bundle of square members is written as: readers from before 4:3 inputs read it
BUNDLE_VERSION_SHAPES = 2  # a bundle with a non-square member: an older reader then says its version is unknown
READ_VERSIONS = (BUNDLE_VERSION, BUNDLE_VERSION_SHAPES)
MANIFEST = "manifest.json"


class BundleError(UserError):
    """A bundle that cannot be used: missing, corrupt, or not matching its manifest."""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (the manifest records one per model file, so a damaged copy is caught)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class BundleMember:
    """One model of a bundle: its LiteRT runner, input size, temperature and head weights (for heatmaps)."""

    name: str
    image_size: Size  # px when square, else (height, width)
    temperature: float
    runner: Any
    head: np.ndarray | None  # (channels + 1, classes): the dense head's kernel and bias


def _read_manifest(folder: Path) -> dict:
    """The bundle's manifest, checked for what ``Bundle`` needs."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder}: bundle folder not found; make one with `python -m skin_lesion export --run RUN --out {folder}`")
    if not path.exists():
        raise BundleError(f"{path}: missing; a bundle is a folder written by `python -m skin_lesion export`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise BundleError(f"{path}: not valid JSON ({e}); export the bundle again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a skin_lesion bundle manifest; export the bundle again")
    if manifest.get("version") not in READ_VERSIONS:
        raise BundleError(f"{path}: bundle format version {manifest.get('version')}, this skin_lesion reads versions {READ_VERSIONS}; "
                          "export it again with this skin_lesion")
    if manifest.get("classes") != list(CLASSES):
        raise BundleError(f"{path}: its classes {manifest.get('classes')} are not {list(CLASSES)}; it was exported for another label set")
    if not manifest.get("members"):
        raise BundleError(f"{path}: lists no member models; export the bundle again")
    return manifest


def _checked_file(folder: Path, entry: dict) -> Path:
    """A file the manifest lists, present and with the SHA-256 the manifest records."""
    path = folder / entry["file"]
    if not path.exists():
        raise BundleError(f"{path}: missing; the bundle's manifest lists it: copy the whole bundle folder")
    if file_sha256(path) != entry["sha256"]:
        raise BundleError(f"{path}: damaged or replaced (its SHA-256 does not match the manifest); copy or export the bundle again")
    return path


def _load_head(folder: Path, entry: dict) -> np.ndarray:
    """The member's dense head (kernel rows, then the bias) for heatmaps, checked like its model
    file (bundles exported before ``head_sha256`` was recorded are checked for presence only)."""
    path = folder / entry["head"]
    if "head_sha256" in entry:
        _checked_file(folder, {"file": entry["head"], "sha256": entry["head_sha256"]})
    elif not path.exists():
        raise BundleError(f"{path}: missing; the bundle's manifest lists it: copy the whole bundle folder")
    try:
        with np.load(path) as f:
            return np.vstack([f["kernel"], f["bias"][None]])
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise BundleError(f"{path}: not the head weights export wrote ({type(e).__name__}); export the bundle again") from e


def member_size(entry: dict) -> Size:
    """A manifest member's input size: ``input_shape`` (height, width) where the export wrote it,
    else a square of ``image_size`` px (bundles from before non-square inputs)."""
    if entry.get("input_shape"):
        return size_key(tuple(entry["input_shape"]))
    return int(entry["image_size"])


def _load_member(folder: Path, entry: dict, threads: int) -> BundleMember:
    """One member's LiteRT interpreter, after checking its file against the manifest."""
    from ai_edge_litert.interpreter import Interpreter

    path = _checked_file(folder, entry)
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        runner = interpreter.get_signature_runner()
    except (ValueError, RuntimeError) as e:
        raise BundleError(f"{path}: not a loadable LiteRT model ({str(e).splitlines()[0][:150]}); export the bundle again") from e
    size = member_size(entry)
    shape = list(interpreter.get_input_details()[0]["shape"])
    if shape != [1, *hw(size), 3]:
        raise BundleError(f"{path}: takes inputs {shape}, but the manifest says {size_text(size)}; the bundle mixes files of two exports")
    head = None
    if entry.get("head"):
        head = _load_head(folder, entry)
    return BundleMember(entry["run"], size, float(entry["temperature"]), runner, head)


@dataclass
class Analysis:
    """What the bundle says about one image: calibrated probabilities, the decided label, the
    melanoma flag, the guard's verdict and (when asked) the heatmap of the decided class."""

    probs: np.ndarray
    label: str
    mel_threshold: float | None
    recognised: bool | None  # None: no guard checked it (the Keras path)
    guard_scores: np.ndarray | None = None  # each check's distance over its threshold: above 1 is refused
    heatmap: np.ndarray | None = field(default=None, repr=False)

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` most probable (class, probability) pairs."""
        order = np.argsort(-self.probs)[:k]
        return [(CLASSES[i], float(self.probs[i])) for i in order]

    @property
    def mel_above_threshold(self) -> bool | None:
        """Whether p(melanoma) reaches the operating threshold chosen on validation (None without one)."""
        return None if self.mel_threshold is None else bool(self.probs[MEL] >= self.mel_threshold)

    def record(self, image: str, show_anyway: bool = False) -> dict:
        """The fields ``predict --json`` prints and the API returns; a refused image has no scores unless ``show_anyway``."""
        out: dict[str, Any] = {"image": image, "recognised": self.recognised}
        if self.guard_scores is not None:
            out["guard_score"] = round(float(self.guard_scores.max()), 3)
            out["guard_checks"] = {name: round(float(v), 3) for name, v in zip(CHECKS, self.guard_scores)}
        if self.recognised is False:
            out["message"] = NOT_RECOGNISED
            if not show_anyway:
                return out
        out.update(
            label=self.label, label_name=CLASS_DESCRIPTIONS[self.label],
            top3=[{"dx": c, "name": CLASS_DESCRIPTIONS[c], "probability": round(p, 4)} for c, p in self.top(3)],
            melanoma_probability=round(float(self.probs[MEL]), 4),
            melanoma_threshold=None if self.mel_threshold is None else round(float(self.mel_threshold), 4),
            melanoma_above_threshold=self.mel_above_threshold,
        )
        return out


class Bundle:
    """A loaded bundle: calibrated probabilities, the decided label, the guard's verdict and heatmaps.

    For a mean ensemble each member scores the image at its own input size,
    the mean of their calibrated probabilities gets the ensemble's temperature,
    and the label comes from its decision rule: exactly what ``predict --run``
    does with the Keras models. Heatmaps and the guard use the features of one
    member (``feature_member``, the one with the largest input).
    """

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder)
        threads = threads or min(4, os.cpu_count() or 1)
        self.members = [_load_member(self.folder, entry, threads) for entry in self.manifest["members"]]
        self.temperature = float(self.manifest.get("temperature", 1.0))
        offset = self.manifest.get("logit_offset")
        self.offset = np.asarray(offset, dtype=float) if offset is not None else None
        self.mel_threshold = self.manifest.get("mel_threshold")
        self.sizes = sorted({m.image_size for m in self.members}, key=hw)
        with_head = [i for i, m in enumerate(self.members) if m.head is not None]
        self.feature_member = max(with_head, key=lambda i: math.prod(hw(self.members[i].image_size))) if with_head else None
        self.guard = _load_guard(self.folder, self.manifest.get("guard"))

    def _run(self, member: BundleMember, image: np.ndarray) -> dict[str, np.ndarray]:
        return member.runner(image=image[None].astype(np.float32))

    def _combine(self, outputs: list[dict[str, np.ndarray]]) -> np.ndarray:
        """The bundle's calibrated probabilities from its members' outputs."""
        calibrated = [apply_temperature(o["output_0"].astype(np.float64), m.temperature) for o, m in zip(outputs, self.members)]
        return apply_temperature(np.mean(calibrated, axis=0), self.temperature)[0]

    def probs_sized(self, images: dict[Size, np.ndarray]) -> np.ndarray:
        """Calibrated probabilities from one preprocessed (height, width, 3) image per input size the members take."""
        return self._combine([self._run(m, images[m.image_size]) for m in self.members])

    def guard_inputs(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What the guard measures of a decoded image: the feature member's pooled features and the
        pixel statistics of the image at ``PIXEL_SIZE``."""
        member = self._feature_member()
        features = pooled(self._run(member, resize_like_training(rgb, member.image_size))["output_1"][0])
        return features, pixel_statistics(resize_like_training(rgb, PIXEL_SIZE))

    def probs_file(self, path: str | os.PathLike) -> np.ndarray:
        """Calibrated class probabilities for one image file (decoded once, resized once per input size)."""
        rgb = decode_rgb(path)
        return self.probs_sized({s: resize_like_training(rgb, s) for s in self.sizes})

    def label(self, probs: np.ndarray) -> str:
        """The decided class: the argmax, or for an ensemble with logit adjustment the adjusted argmax."""
        return CLASSES[int(decide(np.asarray(probs)[None], None, self.offset)[0])]

    def _feature_member(self) -> BundleMember:
        if self.feature_member is None:
            raise BundleError(f"{self.folder}: no member exported its feature maps; export the bundle again")
        return self.members[self.feature_member]

    def analyse(self, rgb: np.ndarray, heatmap: bool = False, class_index: int | None = None) -> Analysis:
        """Everything about one decoded image, each member run once: probabilities, label, the guard's
        verdict and, with ``heatmap``, the class activation map of the decided class (or ``class_index``).

        The map is the head's weights for the class times the feature maps,
        summed over channels, negatives set to zero, scaled to [0, 1]; for a
        head of global pooling then one dense layer this equals Grad-CAM of
        the class's logit up to scale.
        """
        images = {s: resize_like_training(rgb, s) for s in self.sizes}
        outputs = [self._run(m, images[m.image_size]) for m in self.members]
        probs = self._combine(outputs)
        label = self.label(probs)
        result = Analysis(probs, label, self.mel_threshold, recognised=None if self.guard is None else True)
        if self.guard is not None or heatmap:
            member = self._feature_member()
            features = outputs[self.feature_member]["output_1"][0]
            if self.guard is not None:
                small = images[PIXEL_SIZE] if PIXEL_SIZE in images else resize_like_training(rgb, PIXEL_SIZE)
                result.guard_scores = self.guard.scores(pooled(features), pixel_statistics(small))[0]
                result.recognised = bool(result.guard_scores.max() <= 1.0)
            if heatmap:
                c = CLASSES.index(label) if class_index is None else class_index
                cam = np.maximum(features @ member.head[:-1, c], 0)
                result.heatmap = cam / (cam.max() + 1e-8)
        return result

    def analyse_file(self, path: str | os.PathLike, heatmap: bool = False) -> Analysis:
        """``analyse`` for an image file."""
        return self.analyse(decode_rgb(path), heatmap=heatmap)

    def heatmap_file(self, path: str | os.PathLike, class_index: int | None = None) -> np.ndarray:
        """The class activation map in [0, 1] of one image file, for the decided class by default."""
        return self.analyse(decode_rgb(path), heatmap=True, class_index=class_index).heatmap

    def predict_file(self, path: str | os.PathLike, top: int = 3) -> list[tuple[str, float]]:
        """Top ``top`` (class, probability) for one image file."""
        return self.analyse_file(path).top(top)

    def describe(self) -> dict:
        """What the bundle holds, for ``/api/health`` and logs."""
        m = self.manifest
        return dict(
            kind=m.get("kind"), source=m.get("source"), classes=m["classes"], guard=self.guard is not None,
            members=[dict(run=e["run"], model=e.get("model"), image_size=e["image_size"], input_shape=list(hw(member_size(e)))) for e in m["members"]],
            mel_threshold=self.mel_threshold, software=m.get("software"),
        )


def _load_guard(folder: Path, entry: dict | None) -> Guard | None:
    """The bundle's out-of-distribution guard, checked against the manifest (None for a bundle without one)."""
    if not entry:
        return None
    path = _checked_file(folder, entry)
    try:
        return Guard.load(path)
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"{path}: not a readable guard file ({e}); export the bundle again") from e
