"""Colour options of a run: Shades of Gray colour constancy inside the model, and
the augmentation's colour strength, from the layer to the exported bundle.

Both are candidates of the external-validity screen (docs/EXPERIMENTS.md); the
study's recipe does not use them, so these tests check that they do what they
say wherever a run's images are scored. That leaving them off changes nothing
is held by test_reference (the smoke study, byte for byte).
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import cli

from skin_lesion.augment import make_augmenter
from skin_lesion.config import TrainConfig
from skin_lesion.info import DataError
from skin_lesion.models import ShadesOfGray, build_model
from skin_lesion.pipeline import read_image

CAST = np.array([1.0, 0.8, 0.6], "float32")  # a warm lamp: less green, much less blue


def test_shades_of_gray_removes_a_colour_cast_up_to_brightness(lesion_images):
    """On real lesion photographs: the same image under a colour cast comes out
    as the uncast one times a single brightness factor, and a grey image passes unchanged."""
    images = np.stack([read_image(p, 64) for p in lesion_images[:8]])
    layer = ShadesOfGray()
    plain, cast = np.asarray(layer(images)), np.asarray(layer(images * CAST))
    assert np.abs(plain - images).max() > 5  # it does change real images
    unclipped = (plain > 1) & (plain < 254) & (cast < 254)
    ratio = cast[unclipped] / plain[unclipped]
    per_image = [np.ptp(cast[i][unclipped[i]] / plain[i][unclipped[i]]) for i in range(len(images))]
    assert max(per_image) < 0.02, per_image  # one factor per image, whatever the channel
    assert 0.5 < ratio.min() and ratio.max() < 1.0
    grey = np.full((1, 16, 16, 3), 120.0, "float32")
    np.testing.assert_allclose(np.asarray(layer(grey)), grey, atol=1e-3)


def test_shades_of_gray_stays_float32_under_mixed_precision(lesion_images, tmp_path):
    """x^6 of dark pixels rounds to zero in float16: the layer computes in float32 whatever the policy, and saves and loads in safe mode."""
    images = np.stack([read_image(p, 64) for p in lesion_images[:2]])
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("efficientnet_lite0", 64, weights="none", colour_constancy="shades_of_gray")
        assert model.get_layer("colour_constancy").compute_dtype == "float32"
        probs = model.predict(images, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(probs).all()
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    assert again.get_layer("colour_constancy").p == 6.0


@pytest.mark.parametrize("in_model", [False, True])
def test_colour_strength_tints_grey_only_above_one(in_model):
    """A grey image stays grey under hue, contrast and brightness jitter; only the channel
    gains of ``colour`` > 1 tint it, in tf.data (keyed draws) and inside a model (the
    layer's own generator). That ``colour`` = 1 draws what the augmentation drew before
    the option existed is held by test_reference (the smoke study, byte for byte)."""
    grey = np.full((4, 24, 24, 3), 128.0, "float32")
    seed = None if in_model else tf.constant([3, 7], tf.int64)
    default = np.asarray(make_augmenter(1.0, 0)(grey, training=True, batch_seed=seed))
    strong = np.asarray(make_augmenter(1.0, 0, colour=2.0)(grey, training=True, batch_seed=seed))
    assert np.ptp(default, axis=-1).max() < 0.01  # still grey
    assert np.ptp(strong, axis=-1).max() > 1  # tinted
    assert np.ptp(strong.mean(axis=(1, 2, 3))) > np.ptp(default.mean(axis=(1, 2, 3)))  # brightness jitter doubled


def test_unknown_colour_options_are_user_errors():
    with pytest.raises(DataError, match="unknown colour_constancy 'grey_world'"):
        TrainConfig(colour_constancy="grey_world").resolved()
    for bad in (-1, 6, float("nan")):
        with pytest.raises(DataError, match=r"colour_augment must be in \[0, 5\]"):
            TrainConfig(colour_augment=bad).resolved()
        with pytest.raises(DataError, match=r"augment must be in \[0, 5\] \(0 = off\)"):
            TrainConfig(augment=bad).resolved()
    with pytest.raises(DataError, match=r"augment x colour_augment = 6, must be at most 5"):
        TrainConfig(augment=2, colour_augment=3).resolved()
    assert TrainConfig(augment=1.5, colour_augment=0.6667).resolved().augment == 1.5  # the geometric screen's options


def test_a_colour_constant_run_trains_exports_and_the_bundle_agrees(demo_dir, lesion_images, tmp_path):
    """Through the command line as a user runs it: the options reach the run's
    config and model, and the exported LiteRT bundle (no TensorFlow) scores real
    images as the Keras run does, the colour step included and the augmentation
    inside the model (``--augment-on model``) passing images through. MixUp rides
    along: its blends of uint8 frames reach the in-model augmentation as float32."""
    from skin_lesion.bundle import Bundle
    from skin_lesion.inference import Predictor

    run = tmp_path / "sog"
    res = cli("train", "--profile", "smoke", "--tta", "2", "--model", "cnn", "--epochs", "1", "--colour-constancy", "shades_of_gray",
              "--colour-augment", "2", "--augment-on", "model", "--mixup", "0.4", "--data", str(demo_dir), "--run", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert (config["colour_constancy"], config["colour_augment"], config["mixup"]) == ("shades_of_gray", 2.0, 0.4)
    model = keras.models.load_model(run / "model.keras")
    assert type(model.loss).__name__ == "CategoricalCrossentropy"  # MixUp's soft targets (blended before the in-model augmentation)
    # the augmentation inside the model: the bundle's file carries it, switched off
    assert model.get_layer("colour_constancy") is not None and model.get_layer("augment").colour == 2.0
    res = cli("export", "--run", str(run), "--out", str(tmp_path / "bundle"))
    assert res.returncode == 0, res.stderr[-3000:]
    bundle, keras_path = Bundle(tmp_path / "bundle"), Predictor(run)
    images = {64: np.stack([read_image(p, 64) for p in lesion_images[:40]])}
    expected = keras_path.probs_sized(images)
    got = np.stack([bundle.probs_sized({64: images[64][i]}) for i in range(len(images[64]))])
    assert np.abs(got - expected).max() <= 1e-4
