"""4:3 inputs (``train --aspect 4:3``): HAM10000's frames resized without being
squeezed into a square, from the config to the exported bundle.

A candidate of the external-validity screen (docs/EXPERIMENTS.md); the study
keeps square inputs, and that leaving the option unset changes nothing is held
by test_reference (the smoke study, byte for byte).
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import cli

from skin_lesion import pipeline, pixels
from skin_lesion.config import TrainConfig, input_size
from skin_lesion.inference import dihedral_views, tta_views
from skin_lesion.info import DataError


def test_input_size_of_each_aspect():
    """Square inputs keep their one number (old runs and bundles key sizes that way); 4:3 is (height, width)."""
    assert input_size(224, "1:1") == 224 and input_size(224, "4:3") == (168, 224) and input_size(160, "4:3") == (120, 160)
    assert TrainConfig(aspect="4:3", image_size=64).input_size == (48, 64)
    assert TrainConfig(model="cnn").input_size == 128
    with pytest.raises(DataError, match="unknown aspect '3:2'"):
        TrainConfig(aspect="3:2").resolved()
    assert pixels.hw(64) == (64, 64) and pixels.hw([48, 64]) == (48, 64)
    assert pixels.size_key((64, 64)) == 64 and pixels.size_key([48, 64]) == (48, 64)
    assert pixels.size_text(224) == "224 px" and pixels.size_text((168, 224)) == "168x224 px"


def test_non_square_resize_matches_training(lesion_images):
    """The bundle's TensorFlow-free resize gives training's pixels for a 4:3 input too (at most
    one level apart), and keeps the frame's proportions: nothing is squeezed."""
    worst = 0.0
    for path in lesion_images[:20]:
        ours, training = pixels.read_image(path, (48, 64)), pipeline.read_image(path, (48, 64))
        assert ours.shape == training.shape == (48, 64, 3)
        worst = max(worst, float(np.abs(ours - training).max()))
    assert worst <= 1.0


def test_non_square_views_keep_the_frame():
    """A quarter turn would make a 4:3 batch 3:4: non-square frames get the four views that
    keep their shape, all different, starting as the square views do."""
    x = tf.random.uniform((2, 6, 8, 3), seed=1)
    views = dihedral_views(x, 8)
    assert len(views) == 4 and all(tuple(v.shape) == (2, 6, 8, 3) for v in views)
    assert len({v.numpy().tobytes() for v in views}) == 4
    np.testing.assert_array_equal(views[1].numpy(), x.numpy()[:, :, ::-1])  # the square order's second view: a left-right flip
    np.testing.assert_array_equal(views[3].numpy(), x.numpy()[:, ::-1, ::-1])  # a half turn
    square = tf.random.uniform((2, 8, 8, 3), seed=2)
    assert [v.numpy().tobytes() for v in dihedral_views(square, 2)] == [square.numpy().tobytes(), square.numpy()[:, :, ::-1].tobytes()]
    assert (tta_views((6, 8), 8), tta_views((6, 8), 2), tta_views(8, 8)) == (4, 2, 8)


def test_cli_trains_evaluates_and_exports_4_3(demo_dir, lesion_images, tmp_path):
    """Through the command line as a user runs it: the run's model takes 48x64 frames, its
    evaluation records the views it used, a resized copy keeps the aspect, and the
    exported LiteRT bundle (no TensorFlow) scores real images as the Keras run does."""
    from skin_lesion.bundle import Bundle
    from skin_lesion.inference import Predictor

    run = tmp_path / "r43"
    res = cli("train", "--profile", "smoke", "--tta", "8", "--model", "efficientnet_lite0", "--epochs", "1", "--aspect", "4:3",
              "--data", str(demo_dir), "--run", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "config.json").read_text())["aspect"] == "4:3"
    assert keras.models.load_model(run / "model.keras").input_shape == (None, 48, 64, 3)
    assert json.loads((run / "metrics.json").read_text())["tta_views"] == 4
    assert json.loads((run / "manifest.json").read_text())["input_shape"] == [48, 64]

    res = cli("evaluate", "--run", str(run), "--image-size", "96", "--out", str(tmp_path / "r43_96"), "--tta", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert keras.models.load_model(tmp_path / "r43_96" / "model.keras").input_shape == (None, 72, 96, 3)
    assert json.loads((tmp_path / "r43_96" / "manifest.json").read_text())["input_shape"] == [72, 96]
    res = cli("evaluate", "--run", str(run), "--image-size", "40", "--out", str(tmp_path / "r43_40"))
    assert res.returncode != 0 and "30x40 px" in res.stderr and "at least 32 px each way" in res.stderr

    res = cli("export", "--run", str(run), "--out", str(tmp_path / "bundle"))
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["members"][0]["input_shape"] == [48, 64] and manifest["guard"]["input_shape"] == [48, 64]
    assert manifest["version"] == 2  # a reader from before 4:3 inputs says so, rather than misreading the shape
    assert "48x64 px" in (tmp_path / "bundle" / "MODEL_CARD.md").read_text()
    bundle, keras_path = Bundle(tmp_path / "bundle"), Predictor(run)
    assert bundle.sizes == keras_path.sizes == [(48, 64)]
    images = np.stack([pipeline.read_image(p, (48, 64)) for p in lesion_images[:40]])
    expected = keras_path.probs(images)
    with pytest.raises(ValueError, match=r"takes a batch of 48x64 RGB images"):  # a square batch for a 4:3 model: one line, not a tracing error
        keras_path.probs(images[:, :, :48])
    got = np.stack([bundle.probs_sized({(48, 64): image}) for image in images])
    assert np.abs(got - expected).max() <= 1e-4
    analysis = bundle.analyse_file(lesion_images[0], heatmap=True)
    assert analysis.heatmap.shape == (2, 2) and analysis.recognised is not None  # 48x64 / 32 = 1.5x2, padded to 2x2
    np.testing.assert_allclose(bundle.probs_file(lesion_images[0]), keras_path.probs_file(lesion_images[0]), atol=1e-4)
