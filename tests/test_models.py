"""Models: the offline EfficientNet-Lite0 conversion, safe weight reading, ResNet50
offline behaviour, safe-mode saving, and Grad-CAM reaching the last convolution."""

from __future__ import annotations

import os
import pickle

import keras
import numpy as np
import pytest

from skin_lesion import models
from skin_lesion.explain import make_gradcam_heatmap, overlay
from skin_lesion.torchfile import LEGACY_MAGIC, UnsafePickleError, load_legacy_state_dict

# ImageNet-1k class ids: the cats (tabby, tiger, Persian, Siamese, Egyptian) and the
# coffee classes (coffee mug, espresso, cup).
CATS = {281, 282, 283, 284, 285}
COFFEE = {504, 967, 968}


@pytest.fixture(scope="module")
def lite0_imagenet():
    return models.build_lite0_imagenet(224)


@pytest.mark.parametrize("name, expected", [("chelsea", CATS), ("coffee", COFFEE)])
def test_converted_lite0_ranks_the_right_imagenet_class_first(lite0_imagenet, name, expected):
    import skimage.data

    img = getattr(skimage.data, name)().astype("float32")
    x = keras.ops.convert_to_numpy(keras.ops.image.resize(img[None], (224, 224)))
    logits = lite0_imagenet.predict(x, verbose=0)[0]
    assert int(np.argmax(logits)) in expected


def test_lite0_state_dict_reads_without_torch():
    sd = load_legacy_state_dict(models.lite0_weights_path())
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3) and sd["_fc.weight"].shape == (1000, 1280)
    assert sd["_bn0.running_var"].dtype == np.float32 and (sd["_bn0.running_var"] >= 0).all()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_weights_reader_refuses_arbitrary_pickle_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    with evil.open("wb") as f:
        for obj in (LEGACY_MAGIC, 1001, {"little_endian": True}, {"w": _Evil()}, []):
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|refusing"):
        load_legacy_state_dict(evil)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_resnet50_imagenet_offline_fails_with_the_alternatives(monkeypatch):
    """The download is the network: it is the one thing mocked, to fail as offline."""
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(models.WeightsError) as err:
        models.build_resnet50(64, weights="imagenet")
    msg = str(err.value)
    assert "efficientnet_lite0" in msg and "--weights none" in msg and "--weights PATH" in msg


def test_resnet50_local_weights_file_and_safe_mode_round_trip(tmp_path):
    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
    path = tmp_path / "resnet50_notop.weights.h5"
    base.save_weights(path)
    model = models.build_resnet50(64, weights=str(path))
    np.testing.assert_allclose(model.get_layer("conv1_conv").get_weights()[0], base.get_layer("conv1_conv").get_weights()[0])
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
    with pytest.raises(models.WeightsError, match="not found"):
        models.build_resnet50(64, weights=str(tmp_path / "missing.h5"))


def test_prior_shift_undoes_the_training_mix_at_inference_only(tmp_path):
    prior = np.array([0.05, 0.1, 0.15, 0.05, 0.2, 0.4, 0.05])
    model = models.build_model("cnn", 32, prior=prior)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    trained = keras.Model(model.inputs, model.get_layer("head_softmax").output)(x, training=False)
    shifted = model(x, training=False)
    expected = np.asarray(trained) / prior
    np.testing.assert_allclose(np.asarray(shifted), expected / expected.sum(1, keepdims=True), rtol=1e-4)
    layer = model.get_layer("head_prior_shift")
    np.testing.assert_allclose(np.asarray(layer(trained, training=True)), np.asarray(trained))  # the loss sees the drawn mix
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(again.predict(x, verbose=0), np.asarray(shifted), rtol=1e-4, atol=1e-6)


def test_fine_tuning_freezes_backbone_and_batchnorm():
    model = models.build_model("efficientnet_lite0", 64, weights="none")
    head_only = models.set_backbone_trainable(model, None)
    assert head_only == 2  # the softmax kernel and bias
    top = models.set_backbone_trainable(model, "block11_expand_conv")
    assert top > head_only
    assert not model.get_layer("block12_project_bn").trainable and model.get_layer("block12_project_conv").trainable
    assert not model.get_layer("block3_project_conv").trainable


@pytest.mark.parametrize("name", ["cnn", "efficientnet_lite0"])
def test_gradcam_reaches_the_last_convolution(name):
    model = models.build_model(name, 64, weights="none")
    layer = models.last_conv_layer(model)
    assert layer == models.LAST_CONV[name] and len(model.get_layer(layer).output.shape) == 4
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    heat = make_gradcam_heatmap(x, model)
    assert heat.shape[0] == 2 and heat.ndim == 3 and 0 <= heat.min() and heat.max() <= 1 + 1e-6
    assert overlay(x[0], heat[0]).shape == (64, 64, 3)
