"""``train --bn-statistics training``: a pretrained backbone's frozen
BatchNormalization statistics measured on the run's training images.

The option is a candidate of the external-validity screen (docs/EXPERIMENTS.md);
the study's recipe leaves it off, and test_reference holds that leaving it off
changes nothing. These tests check that the statistics are the training
images' own, that they reach the saved model and survive training, and that a
user's wrong use gets one line.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import cli
from keras import layers

from skin_lesion.bn_statistics import MIN_STATISTICS_IMAGES, batchnorm_layers, estimate_statistics, set_statistics
from skin_lesion.config import TrainConfig
from skin_lesion.data import load_dataset
from skin_lesion.info import DataError
from skin_lesion.models import build_model
from skin_lesion.pipeline import read_image

SIZE = 48


def _small_model() -> keras.Model:
    """Two convolutions, each with a BatchNormalization whose ImageNet-like statistics
    (mean 0, variance 1) are far from what these images give."""
    x = inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Rescaling(1 / 255)(x)
    x = layers.Conv2D(4, 3, name="conv1")(x)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.Activation("relu")(x)
    x = layers.Conv2D(5, 3, name="conv2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(7, activation="softmax")(x))


def _frame(paths) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [p.stem for p in paths], "path": [str(p) for p in paths], "dx": "nv"})


def test_statistics_are_the_images_own_whatever_their_order(lesion_images):
    """On real JPEGs: the first layer's statistics are its input's exact mean and
    variance over the images (its input does not depend on any other layer's
    statistics); a table in another order gives the same figures; ``limit``
    draws that many images; the model itself is not changed."""
    keras.utils.set_random_seed(0)
    model, paths = _small_model(), lesion_images[:70]
    before = [w.copy() for w in model.get_weights()]
    moments = estimate_statistics(model, _frame(paths), SIZE, batch_size=16)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    conv = keras.Model(model.inputs, model.get_layer("conv1").output)
    features = np.asarray(conv(np.stack([read_image(p, SIZE) for p in paths]).astype("float32"))).reshape(-1, 4)
    np.testing.assert_allclose(moments["bn1"][0], features.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(moments["bn1"][1], features.var(0), rtol=1e-3, atol=1e-6)
    shuffled = estimate_statistics(model, _frame(paths).sample(frac=1.0, random_state=3), SIZE, batch_size=16)
    for name in ("bn1", "bn2"):
        np.testing.assert_allclose(shuffled[name][0], moments[name][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(shuffled[name][1], moments[name][1], rtol=1e-4, atol=1e-5)
    fewer = estimate_statistics(model, _frame(paths), SIZE, batch_size=16, limit=40)
    assert not np.allclose(fewer["bn1"][0], moments["bn1"][0], rtol=1e-4)  # 40 of the 70, not all


def test_deeper_statistics_follow_batch_normalised_inputs(lesion_images):
    """The second layer's statistics, computed apart in NumPy: its input is the
    first layer's output with each batch normalised by that batch's own moments
    and the first layer's own scale and offset (precise BN), in the draw and the
    even batches ``estimate_statistics`` documents."""
    keras.utils.set_random_seed(1)
    model = _small_model()
    rng = np.random.default_rng(0)
    for name in ("bn1", "bn2"):
        layer = model.get_layer(name)
        layer.gamma.assign(rng.uniform(0.5, 2.0, layer.gamma.shape).astype("float32"))
        layer.beta.assign(rng.normal(0, 1, layer.beta.shape).astype("float32"))
    frame = _frame(lesion_images[:45])
    moments = estimate_statistics(model, frame, SIZE, batch_size=16, seed=5)
    drawn = frame.sort_values("image_id").sample(n=len(frame), random_state=5)
    images = np.stack([read_image(p, SIZE) for p in drawn["path"]]).astype("float32")
    conv1 = np.asarray(keras.Model(model.inputs, model.get_layer("conv1").output)(images))
    bn1 = model.get_layer("bn1")
    outputs, start = [], 0
    for size in (15, 15, 15):  # 45 images in batches of at most 16, even: 3 of 15
        c = conv1[start:start + size]
        start += size
        normed = (c - c.mean((0, 1, 2))) / np.sqrt(c.var((0, 1, 2)) + bn1.epsilon) * bn1.gamma.numpy() + bn1.beta.numpy()
        outputs.append(np.asarray(model.get_layer("conv2")(np.maximum(normed, 0))))
    second = np.concatenate(outputs).reshape(-1, 5)
    np.testing.assert_allclose(moments["bn2"][0], second.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(moments["bn2"][1], second.var(0), rtol=1e-3, atol=1e-4)


def test_measuring_leaves_the_runs_random_draws_alone(demo_dir):
    """The option changes the statistics and nothing else: after the measurement the
    run's model is built from the same seeds (head weights, dropout) as without it."""
    from skin_lesion.train import _build, training_moments

    cfg = TrainConfig(model="efficientnet_lite0", profile="smoke", bn_statistics="training").resolved()
    meta = load_dataset(demo_dir).meta.head(40)
    keras.utils.set_random_seed(0)
    training_moments(cfg, meta)
    after = _build(cfg)
    keras.utils.set_random_seed(0)
    plain = _build(cfg)
    assert all(np.array_equal(a, b) for a, b in zip(after.get_weights(), plain.get_weights()))
    assert len(after.get_weights()) == len(plain.get_weights())


def test_set_statistics_replaces_the_moving_statistics_only(lesion_images):
    keras.utils.set_random_seed(0)
    model = _small_model()
    moments = estimate_statistics(model, _frame(lesion_images[:40]), SIZE, batch_size=20)
    kept = {w.path: w.numpy().copy() for w in model.weights if "moving" not in w.path}
    shift = set_statistics(model, moments)
    assert shift > 0.1
    for layer in batchnorm_layers(model):
        np.testing.assert_array_equal(layer.moving_mean.numpy(), moments[layer.name][0])
        np.testing.assert_array_equal(layer.moving_variance.numpy(), moments[layer.name][1])
    assert all(np.array_equal(kept[w.path], w.numpy()) for w in model.weights if "moving" not in w.path)


def test_a_pretrained_run_keeps_its_training_images_statistics(demo_dir, tmp_path):
    """Through the command line: the run's config records the option, and its saved
    model (trained with its BatchNormalization frozen, as every pretrained run is)
    holds exactly the statistics its training images give, not ImageNet's."""
    run = tmp_path / "bn"
    res = cli("train", "--profile", "smoke", "--model", "efficientnet_lite0", "--epochs", "2", "--average-last", "0", "--no-eval",
              "--bn-statistics", "training", "--data", str(demo_dir), "--run", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    config = TrainConfig.load(run / "config.json")
    assert config.bn_statistics == "training"
    split = pd.read_csv(run / "split.csv")
    meta = load_dataset(demo_dir).meta
    train_part = meta[meta["image_id"].isin(split.loc[split["split"] == "train", "image_id"])]
    imagenet = build_model("efficientnet_lite0", config.input_size)
    expected = estimate_statistics(imagenet, train_part, config.input_size, config.batch_size, seed=config.seed)
    last = json.loads((run / "state.json").read_text())["checkpoint"]
    assert last.endswith("002.keras")  # the fine-tuning phase's, whichever epoch model.keras kept
    for path in (run / "model.keras", run / last):
        norms = batchnorm_layers(keras.models.load_model(path))
        assert len(norms) == 49
        for layer in norms:
            np.testing.assert_allclose(layer.moving_mean.numpy(), expected[layer.name][0], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(layer.moving_variance.numpy(), expected[layer.name][1], rtol=1e-4, atol=1e-5)
    first = imagenet.get_layer(norms[0].name)  # the last file read's first layer
    assert np.abs(norms[0].moving_mean.numpy() - first.moving_mean.numpy()).max() > 0.1


def test_wrong_uses_are_one_line(demo_dir, lesion_images, tmp_path):
    with pytest.raises(DataError, match="trains its own: drop the option"):
        TrainConfig(model="cnn", bn_statistics="training").resolved()
    with pytest.raises(DataError, match="trains its own"):
        TrainConfig(model="efficientnet_lite0", weights="none", bn_statistics="training").resolved()
    with pytest.raises(DataError, match="unknown bn_statistics"):
        TrainConfig(bn_statistics="test").resolved()
    with pytest.raises(DataError, match=f"needs at least {MIN_STATISTICS_IMAGES}"):
        estimate_statistics(_small_model(), _frame(lesion_images[:5]), SIZE, batch_size=4)
    res = cli("train", "--profile", "smoke", "--model", "cnn", "--bn-statistics", "training", "--data", str(demo_dir), "--run", str(tmp_path / "r"))
    assert res.returncode == 2 and "trains its own" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "r" / "config.json").exists()
    assert json.loads(TrainConfig().to_json())["bn_statistics"] == "pretrained"
