"""Using a trained model: loading it safely, test-time augmentation, the
``Predictor`` that scores single images, and scoring at another input size.

A model file is loaded in Keras' safe mode (no pickle, no code) and every way
it can fail to load is one line naming the file and the fix.
"""

from __future__ import annotations

import logging
import os
import weakref
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from skin_lesion.augment import LesionAugment
from skin_lesion.calibration import apply_temperature, decide
from skin_lesion.config import TrainConfig, input_size
from skin_lesion.info import CLASSES, DataError
from skin_lesion.losses import SmoothedSparseCrossentropy
from skin_lesion.models import CaffePreprocess, PriorShift
from skin_lesion.pipeline import make_pipeline, read_image
from skin_lesion.pixels import Size, hw, size_text
from skin_lesion.runs import RunFolder

log = logging.getLogger("skin_lesion")
# The package's own layers and loss that saved models name; nothing else is loaded (safe mode).
CUSTOM_OBJECTS = {cls.__name__: cls for cls in (LesionAugment, CaffePreprocess, PriorShift, SmoothedSparseCrossentropy)}


# --------------------------------------------------------------------------- loading


class ModelFileError(DataError):
    """A model file that cannot be loaded: missing, truncated, unsafe, or not the run's model."""


def load_model_file(path: str | os.PathLike) -> keras.Model:
    """A ``.keras`` file loaded in safe mode, or a ModelFileError saying why not."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: model file not found; train the run first (`python -m skin_lesion train --run {path.parent}`)")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            broken = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise ModelFileError(f"{path}: not a complete .keras file (truncated or not a zip: {e}); copy or train it again") from e
    if broken or not {"config.json", "model.weights.h5"} <= names:
        raise ModelFileError(f"{path}: not a complete .keras file ({'damaged member ' + broken if broken else 'no config or weights inside'}); copy or train it again")
    try:
        return keras.models.load_model(path, custom_objects=CUSTOM_OBJECTS, safe_mode=True, compile=False)
    except ValueError as e:
        if "safe_mode" in str(e) or "Lambda" in str(e):
            raise ModelFileError(f"{path}: the file contains Python code (a lambda); not loaded, as safe mode refuses code in model files") from e
        raise ModelFileError(f"{path}: Keras {keras.__version__} cannot load it ({str(e).splitlines()[0][:160]}); was it saved by another Keras version?") from e
    except (TypeError, KeyError, AttributeError, OSError) as e:
        raise ModelFileError(f"{path}: Keras {keras.__version__} cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:150]}); saved by another Keras version?") from e


def check_model_matches(model: keras.Model, cfg: TrainConfig, path: Path) -> None:
    """A ModelFileError when the model does not take the config's input size or give one score per class."""
    shape = tuple(model.input_shape[1:]) if not isinstance(model.input_shape, list) else None
    if shape != (*hw(cfg.input_size), 3):
        raise ModelFileError(f"{path}: the model takes inputs {shape}, but config.json says {size_text(cfg.input_size)}; the run folder mixes files of two runs")
    if model.output_shape[-1] != len(CLASSES):
        raise ModelFileError(f"{path}: the model gives {model.output_shape[-1]} scores, not one per class ({len(CLASSES)}); it is not a skin_lesion classifier")


def load_run_model(run: str | os.PathLike) -> tuple[keras.Model, TrainConfig]:
    """The run's best model (safe mode: no pickle, no arbitrary code) and its config, checked against each other."""
    run = RunFolder(run)
    if not run.path.is_dir():
        raise DataError(f"{run.path}: run folder not found; pass --run a folder written by train (or ensemble)")
    cfg = run.config()
    model = load_model_file(run.model_file)
    check_model_matches(model, cfg, run.model_file)
    return model, cfg


# --------------------------------------------------------------------------- test-time augmentation


FRAME_VIEWS = 4  # the flips and the half turn: all the views that keep a non-square frame's shape
SQUARE_VIEWS = 8  # the four rotations of a square, each also flipped


def dihedral_views(x: tf.Tensor, n: int) -> list[tf.Tensor]:
    """The first ``n`` of the 8 flips/rotations of a batch: lesions have no up or down.

    A quarter turn would make a 4:3 frame 3:4, so a batch of non-square
    frames has only the four views that keep its shape (itself, the two
    flips, a half turn), in the order the square views give them for n <= 2."""
    if x.shape[1] != x.shape[2]:
        flipped = tf.image.flip_left_right(x)
        return [x, flipped, tf.image.flip_up_down(x), tf.image.flip_up_down(flipped)][: max(1, min(n, FRAME_VIEWS))]
    views = []
    for k in range(4):
        r = tf.image.rot90(x, k)
        views += [r, tf.image.flip_left_right(r)]
    return views[: max(1, n)]


def tta_views(image_size: Size, tta: int) -> int:
    """How many of ``tta`` views a model of input ``image_size`` gets: 1 to 8 for a square, at most 4 for a non-square frame."""
    height, width = hw(image_size)
    return max(1, min(tta, SQUARE_VIEWS if height == width else FRAME_VIEWS))


def kept_function(model: keras.Model, key: tuple, build: Callable[[weakref.ref], Any]) -> Any:
    """The compiled function ``build(owner)`` makes for ``model`` under ``key``: made
    once and kept on the model (outside Keras' attribute tracking), so later calls
    reuse its traces. ``owner`` is a weak reference to the model, through which the
    function reaches it: keeping the function on the model adds no reference cycle."""
    kept = getattr(model, "_kept_functions", {})
    if key not in kept:
        kept = {**kept, key: build(weakref.ref(model))}
        object.__setattr__(model, "_kept_functions", kept)
    return kept[key]


def tta_function(model: keras.Model, tta: int, image_size: Size):
    """One compiled function: a batch in, probabilities averaged over ``tta`` dihedral views out.

    Its batch dimension is left open, so it is traced once for any number of
    images (a set's last, partial batch costs no second trace) for inputs of
    the model's ``image_size``. It is kept with the model (``kept_function``),
    so scoring the validation and then the test images traces it once (a few
    seconds on 2 cores)."""
    return kept_function(model, ("tta", tta, hw(image_size)), lambda owner: _tta_call(owner, tta, image_size))


def _tta_call(owner: weakref.ref, tta: int, image_size: Size):
    """``tta_function``'s function for the model ``owner`` refers to, traced per input dtype."""

    def probs(x):
        model = owner()
        return tf.reduce_mean(tf.stack([model(v, training=False) for v in dihedral_views(x, tta)]), axis=0)

    traced: dict[tf.DType, Any] = {}  # one trace per input dtype (the pipeline's uint8, a caller's float32)

    def call(x):
        dtype = tf.as_dtype(x.dtype)
        if dtype not in traced:
            traced[dtype] = tf.function(probs, input_signature=[tf.TensorSpec((None, *hw(image_size), 3), dtype)])
        return traced[dtype](x)

    call.functions = traced  # the compiled functions, by input dtype
    return call


def predict_probs(model: keras.Model, frame: pd.DataFrame, image_size: Size, batch_size: int = 32, tta: int = 1) -> np.ndarray:
    """Class probabilities for rows of ``frame`` in order, averaged over ``tta`` dihedral views;
    ``image_size`` is the model's input (px, or (height, width))."""
    pipe = make_pipeline(frame, hw(image_size), batch_size, cache=False)  # one pass: a cache would only cost memory
    fn = tta_function(model, tta, image_size)
    return np.concatenate([fn(x).numpy() for x, _ in pipe.dataset]).astype("float64")


def _check_resize_out(out: RunFolder, run: RunFolder) -> None:
    """Refuse an ``--out`` that holds anything but an earlier resized copy of ``run``: its model would be replaced."""
    if not out.path.exists() or not any(out.path.iterdir()):
        return
    source = out.config().extra.get("resized_from") if out.config_file.exists() else None
    if source is None or (out.path / source).resolve() != run.path.resolve():
        raise DataError(f"{out.path}: already holds files that are not a resized copy of {run.path}; choose a new folder for --out")


def resize_run(run: str | os.PathLike, image_size: int, out: str | os.PathLike) -> Path:
    """Copy a run into ``out`` with its model taking ``image_size`` px wide inputs of the
    run's own aspect (the same weights: the backbones end in global pooling, so any size fits).

    Scoring a model at another size than it was trained at (test-time
    resolution, as in FixRes) is then a run like any other: ``evaluate``,
    ``ensemble`` and ``predict`` take the copy. Its ``config.json`` records the
    new size and ``extra.resized_from``; ``split.csv`` is the run's own."""
    run, out = RunFolder(run), Path(out)
    if out.resolve() == run.path.resolve():
        raise DataError(f"{out}: resizing a run needs another folder than the run itself; pass --out")
    _check_resize_out(RunFolder(out), run)
    model, cfg = load_run_model(run)
    size = input_size(image_size, cfg.aspect)
    if min(hw(size)) < 32:  # the backbones downsample 32-fold
        raise DataError(f"--image-size {image_size}: too small ({size_text(size)}); the models need at least 32 px each way")
    inp = keras.Input((*hw(size), 3), name="image")
    try:
        sized = keras.models.clone_model(model, input_tensors=[inp] if isinstance(model.input, list) else inp)
        sized.set_weights(model.get_weights())
    except ValueError as e:
        raise DataError(f"{run.model_file}: this model cannot take {size_text(size)} inputs ({e})") from e
    extra = {**cfg.extra, "resized_from": os.path.relpath(run.path.resolve(), out.resolve())}
    target = run.derive(out, image_size=image_size, extra=extra).model_file  # config first: an interrupted copy can be redone here
    partial = target.with_name("partial-" + target.name)  # Keras wants the .keras suffix; renamed once whole
    sized.save(partial)
    os.replace(partial, target)
    return out


# --------------------------------------------------------------------------- the predictor


@dataclass
class Member:
    """One model of a predictor: its run, input size, fitted temperature, the model and its compiled TTA function."""

    run: RunFolder
    image_size: Size  # px when square, else (height, width)
    temperature: float
    model: keras.Model  # held here: its TTA function reaches it only through a weak reference
    fn: Any


def top_classes(probs: np.ndarray, top: int = 3) -> list[tuple[str, float]]:
    """The ``top`` most probable (class, probability) pairs of one image's probabilities."""
    order = np.argsort(-probs)[:top]
    return [(CLASSES[i], float(probs[i])) for i in order]


class Predictor:
    """Scores single images fast: each model behind one compiled function, with
    its run's fitted temperature applied when the run has been evaluated.

    ``run`` is a run folder, or a mean ensemble's folder (``ensemble``): then
    every member scores the image at its own input size, and the mean of their
    calibrated probabilities gets the ensemble's temperature, exactly as
    ``ensemble.mean_runs`` scored the test split. What to do comes from each
    folder's ``manifest.json``.
    """

    def __init__(self, run: str | os.PathLike, tta: int = 1):
        folder = RunFolder(run)
        manifest = folder.manifest()
        if manifest.get("kind") == "decision_layer":
            raise DataError(f"{folder.path}: a decision layer scores saved predictions, not images; predict with a run or a mean ensemble")
        runs = folder.members() or [folder]
        for member in folder.members():  # a plain run's missing model is load_model_file's one line
            if not member.has_model():
                raise DataError(f"{member.model_file}: missing; the ensemble {folder.path} lists this member: move the runs tree as a whole or rerun `ensemble`")
        self.members = []
        for member in runs:
            model, cfg = load_run_model(member)
            self.members.append(Member(member, cfg.input_size, float(member.manifest().get("temperature", 1.0)), model, tta_function(model, tta, cfg.input_size)))
        ensemble = len(folder.members()) > 0
        # a mean ensemble's own temperature goes on the mean of its members' calibrated probabilities;
        # its logit adjustment, if it has one, moves only the decided label (``label``)
        self.temperature = float(manifest.get("temperature", 1.0)) if ensemble else 1.0
        offset = manifest.get("logit_offset") if ensemble else None
        self.offset = np.asarray(offset, dtype=float) if offset is not None else None
        self.sizes = sorted({m.image_size for m in self.members}, key=hw)
        self.mel_threshold = manifest.get("mel_threshold")
        self._all_members = self._one_graph()

    def _one_graph(self):
        """Every member behind one compiled function, one input per size: TensorFlow
        then runs the members side by side, where calling them one after another
        leaves cores idle."""
        fns = [(m.fn, self.sizes.index(m.image_size)) for m in self.members]

        def all_members(*inputs):
            return [fn(inputs[i]) for fn, i in fns]

        return tf.function(all_members, reduce_retracing=True)

    def _mean(self, batches: dict[Size, np.ndarray]) -> np.ndarray:
        """Mean of the members' calibrated probabilities, each fed the batch at its input size."""
        outs = self._all_members(*[tf.convert_to_tensor(batches[s], tf.float32) for s in self.sizes])
        out = [apply_temperature(o.numpy(), m.temperature) for o, m in zip(outs, self.members)]
        return apply_temperature(np.mean(out, axis=0), self.temperature)

    def probs_sized(self, batches: dict[Size, np.ndarray]) -> np.ndarray:
        """Calibrated probabilities for a batch of preprocessed images given at every input size the members take."""
        return self._mean(batches)

    def probs(self, images: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities for a batch of (height, width, 3) images at the
        members' one input size (an ensemble whose members differ in size takes files: ``probs_file``)."""
        if len(self.sizes) > 1:
            raise ValueError("this ensemble's members take different input sizes; score files with probs_file")
        expected = hw(self.sizes[0])
        if np.ndim(images) != 4 or tuple(np.shape(images)[1:]) != (*expected, 3):
            raise ValueError(f"images of shape {np.shape(images)}: this model takes a batch of {expected[0]}x{expected[1]} RGB images, (n, {expected[0]}, {expected[1]}, 3)")
        return self._mean({self.sizes[0]: images})

    def probs_file(self, path: str | os.PathLike) -> np.ndarray:
        """Calibrated class probabilities for one image file (read once per input size)."""
        return self._mean({size: read_image(path, size)[None] for size in self.sizes})[0]

    def label(self, probs: np.ndarray) -> str:
        """The decided class for one image's probabilities: the argmax, or for an
        ensemble with a logit adjustment the argmax of log p + its offset."""
        return CLASSES[int(decide(np.asarray(probs)[None], None, self.offset)[0])]

    def predict_file(self, path: str | os.PathLike, top: int = 3) -> list[tuple[str, float]]:
        """Top ``top`` (class, probability) for one image file."""
        return top_classes(self.probs_file(path), top)
