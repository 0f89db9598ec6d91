"""Export a trained run or mean ensemble as a bundle that runs without TensorFlow.

Each member model becomes a LiteRT (``.tflite``) file whose graph takes the
resized image (float32, [0, 255]) and returns the class probabilities and the
last convolution's feature maps (for heatmaps). The bundle's manifest holds
what ``bundle.Bundle`` needs to reproduce ``predict --run`` exactly, and
``MODEL_CARD.md`` describes the model from the run's own files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from skin_lesion import __version__
from skin_lesion.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, BUNDLE_VERSION_SHAPES, MANIFEST, Bundle, file_sha256
from skin_lesion.card import model_card
from skin_lesion.evaluate import run_frames
from skin_lesion.guard import REJECT_ON_VALIDATION, fit_guard
from skin_lesion.inference import load_run_model
from skin_lesion.info import CLASSES, DataError
from skin_lesion.models import HEAD_PREFIX, last_conv_layer
from skin_lesion.pixels import Size, decode_rgb, hw, size_text
from skin_lesion.refit import calibration_frames, refit_of
from skin_lesion.runs import RunFolder, write_atomic

log = logging.getLogger("skin_lesion")
# How a bundle's user turns a file into the model's input; bundle.py implements it.
RESIZE_RULE = {
    "decode": "RGB; JPEG with libjpeg-turbo's fast integer DCT and fancy upsampling (TensorFlow's decode_jpeg defaults), other formats by Pillow",
    "resize": "bilinear with antialiasing to each member's input_shape, height x width (tf.image.resize antialias=True: triangle kernel, half-pixel centres)",
    "round": "to whole values, clipped to [0, 255], fed as float32",
}


def litert_model(model: keras.Model, image_size: Size) -> bytes:
    """The model as a LiteRT flatbuffer with outputs (probabilities, last conv features), one image a call.

    The converter reads one traced inference function (``training=False``: an
    augmentation layer inside the model passes images through); the module
    passed with it holds the model's TensorFlow variables, which the converter
    folds in as constants. (Writing a SavedModel with ``Model.export`` first
    gave the same outputs at about three times the cost, bench/export.py, and
    traces an in-model augmentation layer in training mode, which LiteRT cannot
    convert.) A mixed-precision model is converted as its float32 copy (``float32_model``)."""
    serving = serving_model(float32_model(model))
    holder = tf.Module()
    holder.tf_variables = [w.value for w in serving.weights]  # the tf.Variables behind Keras 3's own variable objects
    infer = tf.function(lambda image: serving(image, training=False), autograph=False,
                        input_signature=[tf.TensorSpec([1, *hw(image_size), 3], tf.float32, name="image")])
    return tf.lite.TFLiteConverter.from_concrete_functions([infer.get_concrete_function()], holder).convert()


def serving_model(model: keras.Model) -> keras.Model:
    """``model`` with a second output, its last convolution's feature maps (for heatmaps): what a bundle's file computes."""
    features = model.get_layer(last_conv_layer(model)).output
    return keras.Model(model.inputs, [model.output, features], name=f"{model.name}_serving")


def float32_model(model: keras.Model) -> keras.Model:
    """``model`` when every layer computes in float32, else a float32 copy holding its weights.

    A mixed-precision run (the gpu path) computes its convolutions in float16,
    which LiteRT has no kernels for; its weights are float32 either way, so the
    copy scores as the run does up to float16's rounding."""
    config = model.get_config()
    patched = _float32_policies(config)
    if patched == config:
        return model
    copy = model.__class__.from_config(patched)
    copy.set_weights(model.get_weights())
    return copy


def _float32_policies(config):
    """A model config with every layer's dtype policy (``DTypePolicy`` entries, nested models included) set to float32."""
    if isinstance(config, dict):
        if config.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {k: _float32_policies(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_float32_policies(v) for v in config]
    return config


def _head_weights(model: keras.Model) -> dict[str, np.ndarray]:
    """The dense head's kernel and bias: what turns pooled features into class scores (for class activation maps)."""
    kernel, bias = model.get_layer(HEAD_PREFIX + "softmax").get_weights()
    return {"kernel": kernel, "bias": bias}


def _check_exportable(folder: RunFolder) -> dict:
    """The run's manifest, or a one-line error when it cannot be exported yet."""
    if not folder.path.is_dir():
        raise DataError(f"{folder.path}: run folder not found")
    manifest = folder.manifest()
    if manifest.get("kind") == "decision_layer":
        raise DataError(f"{folder.path}: a decision layer scores saved predictions, not images; export a run or a mean ensemble")
    if "temperature" not in manifest:
        raise DataError(f"{folder.path}: not evaluated yet; run `python -m skin_lesion evaluate --run {folder.path}` first (the bundle carries the calibration fitted there)")
    return manifest


def _clear_out(out: Path, sources: list[RunFolder]) -> None:
    """Make way for a bundle at ``out``: remove an earlier bundle there, refuse anything else.

    A run folder also holds a ``manifest.json``, so only a bundle's own format marks a folder
    that export may delete; the run being exported (or one of its members) is never ``out``."""
    target = out.resolve()
    for source in sources:
        here = source.path.resolve()
        if target == here or target in here.parents:
            raise DataError(f"{out}: is the run {source.path} or holds it; choose a new folder for --out, such as bundles/{source.path.name}")
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"{out}: exists and is a file; choose a new folder for --out")
    if any(out.iterdir()) and RunFolder(out).held_kind() != "bundle":  # an earlier export, the only folder export may replace
        raise DataError(f"{out}: exists and is not a bundle (a run folder or other files); choose an empty or new folder for --out")
    shutil.rmtree(out)


def export_bundle(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the bundle of a run or a mean ensemble into ``out``; returns ``out``."""
    folder, out = RunFolder(run), Path(out)
    manifest = _check_exportable(folder)
    ensemble = bool(folder.members())
    members = folder.members() or [folder]
    _clear_out(out, [folder, *members])
    out.mkdir(parents=True)
    entries = []
    for i, member in enumerate(members):
        model, cfg = load_run_model(member.path)
        tflite = out / f"member{i}.tflite"
        tflite.write_bytes(litert_model(model, cfg.input_size))
        head = out / f"member{i}_head.npz"
        np.savez(head, **_head_weights(model))
        entries.append(dict(
            run=member.label, model=cfg.model, file=tflite.name, sha256=file_sha256(tflite), image_size=cfg.image_size,
            input_shape=list(hw(cfg.input_size)),
            temperature=float(member.manifest().get("temperature", 1.0)), head=head.name, head_sha256=file_sha256(head), config=asdict(cfg),
        ))
        log.info("Exported %s (%s, %s) -> %s", member.path, cfg.model, size_text(cfg.input_size), tflite)
    version = BUNDLE_VERSION if all(h == w for h, w in (e["input_shape"] for e in entries)) else BUNDLE_VERSION_SHAPES
    bundle = dict(
        format=BUNDLE_FORMAT, version=version, kind="mean_ensemble" if ensemble else "run", source=str(folder.path),
        classes=list(CLASSES), members=entries,
        # a single run's temperature is its member's; an ensemble's applies to the mean of its calibrated members
        temperature=float(manifest["temperature"]) if ensemble else 1.0,
        logit_offset=manifest.get("logit_offset") if ensemble else None,
        mel_threshold=manifest.get("mel_threshold"), preprocessing=RESIZE_RULE, tta_views=1,
        software=dict(skin_lesion=__version__, tensorflow=tf.__version__, keras=keras.__version__),
    )
    # written twice: the guard is fitted by loading the bundle itself, which needs its manifest
    write_atomic(out / MANIFEST, json.dumps(bundle, indent=2))
    bundle["guard"] = fit_bundle_guard(out, members[0])
    write_atomic(out / MANIFEST, json.dumps(bundle, indent=2))
    write_atomic(out / "MODEL_CARD.md", model_card(folder, bundle))
    return out


def fit_bundle_guard(out: Path, run: RunFolder, reject: float = REJECT_ON_VALIDATION) -> dict:
    """Fit the out-of-distribution guard of the bundle in ``out`` on the run's training split and set its
    threshold on the validation split; writes ``guard.npz`` and returns the manifest's entry for it.

    Features come from the bundle itself (its TensorFlow-free decoder and LiteRT model), so the
    guard measures exactly what ``predict`` computes; the test split is not read."""
    meta, _ = run_frames(run.path)
    bundle = Bundle(out)
    size = bundle.members[bundle.feature_member].image_size

    def measured(rows) -> tuple[np.ndarray, np.ndarray]:
        features, statistics = zip(*(bundle.guard_inputs(decode_rgb(p)) for p in rows["path"]))
        return np.stack(features), np.stack(statistics)

    train, validation = meta[meta["split"] == "train"], meta[meta["split"] == "val"]
    if validation.empty and refit_of(run):  # a full refit kept no validation: the threshold goes on the images it added (see docs)
        validation, _ = calibration_frames(run.path, meta)
        train = train[~train["image_id"].isin(set(validation["image_id"]))]
    if train.empty or validation.empty:
        raise DataError(f"{run.split_file}: the guard needs training and validation images; export a run trained with a validation split")
    log.info("Fitting the out-of-distribution guard on %d training and %d validation images (%s)", len(train), len(validation), size_text(size))
    (train_features, train_statistics), (val_features, val_statistics) = measured(train), measured(validation)
    guard = fit_guard(train_features, train["dx"].to_numpy(), train_statistics, val_features, val_statistics, reject)
    path = guard.save(out / "guard.npz")
    return dict(
        file=path.name, sha256=file_sha256(path), member=bundle.feature_member, image_size=hw(size)[1], input_shape=list(hw(size)),
        checks=dict(features="Mahalanobis distance of the pooled last-convolution features to the nearest class mean (shared Ledoit-Wolf covariance)",
                    pixels="Mahalanobis distance of ten colour, edge and detail statistics of the resized image to the nearest class mean (shared Ledoit-Wolf covariance)"),
        thresholds=dict(features=guard.features.threshold, pixels=guard.pixels.threshold),
        fitted_on=dict(train=len(train), validation=len(validation)),
        reject_on_validation=guard.reject_on_validation, reject_target=reject,
    )
