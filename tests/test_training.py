"""Training helpers on their own: weight averaging, exact and resumable; the smoothed loss;
the one validation pass per epoch; the training phases."""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf

from skin_lesion.callbacks import BalancedAccuracy, EpochSeconds, WeightAverage
from skin_lesion.config import TrainConfig
from skin_lesion.losses import SmoothedSparseCrossentropy, make_loss
from skin_lesion.runs import RunFolder
from skin_lesion.train import compile_model, phases


def _tiny_model() -> keras.Model:
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))


def test_weight_average_is_the_mean_of_the_last_epochs_and_survives_a_restart(tmp_path):
    model = _tiny_model()
    val = tf.data.Dataset.from_tensor_slices(np.eye(3, dtype="float32")).batch(3)
    labels = np.array([0, 1, 0])
    states = [[np.full_like(w, k) for w in model.get_weights()] for k in (1.0, 2.0, 6.0, 10.0)]

    def epoch(callback, index):
        model.set_weights(states[index])
        logs = {}
        callback.set_model(model)
        callback.on_epoch_end(index, logs)
        return logs

    first = WeightAverage(RunFolder(tmp_path), first=1, end=4, val_dataset=val, val_labels=labels)
    epoch(first, 0)  # before the window: ignored
    epoch(first, 1)
    assert not (tmp_path / "average").exists()
    # A new process (a resumed run) carries on from the saved mean.
    second = WeightAverage(RunFolder(tmp_path), first=1, end=4, val_dataset=val, val_labels=labels)
    epoch(second, 2)
    logs = epoch(second, 3)
    assert 0.0 <= logs["val_balanced_accuracy_average"] <= 1.0
    saved = keras.models.load_model(tmp_path / "average" / "model.keras")
    for w in saved.get_weights():
        np.testing.assert_allclose(w, (2.0 + 6.0 + 10.0) / 3)
    for w in model.get_weights():  # the live model keeps its own last weights for the checkpoint
        np.testing.assert_allclose(w, 10.0)


def test_smoothed_loss_is_cross_entropy_against_smoothed_targets():
    labels = np.array([0, 3, 6, 2])
    probs = np.random.default_rng(0).dirichlet(np.ones(7), size=4).astype("float32")
    eps = 0.1
    targets = np.eye(7)[labels] * (1 - eps) + eps / 7
    expected = np.mean(-(targets * np.log(probs)).sum(1))
    np.testing.assert_allclose(float(SmoothedSparseCrossentropy(eps)(labels, probs)), expected, rtol=1e-5)
    # Smoothing rewards a less confident prediction of the right class than plain cross-entropy does.
    sure, unsure = np.array([[0.999] + [0.001 / 6] * 6], "float32"), np.array([[0.9] + [0.1 / 6] * 6], "float32")
    first = np.array([0])
    smoothed, plain = SmoothedSparseCrossentropy(eps), keras.losses.SparseCategoricalCrossentropy()
    assert float(smoothed(first, unsure)) < float(smoothed(first, sure))
    assert float(plain(first, sure)) < float(plain(first, unsure))
    assert make_loss(0.0) == "sparse_categorical_crossentropy"  # off: the exact loss of runs before the option


def test_one_validation_pass_gives_what_evaluate_gives():
    """``fit`` runs without ``validation_data``; the callback's single pass must
    report the loss and accuracy Keras' own pass would have, for each loss (MixUp's categorical one too)
    (for a model this unsure the probabilities' clipping changes nothing)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)).astype("float32")
    labels = rng.integers(0, 2, size=40)
    val = tf.data.Dataset.from_tensor_slices(x).batch(16)  # a ragged last batch, as validation has
    for smoothing, soft in ((0.0, False), (0.1, False), (0.1, True)):  # soft: MixUp's categorical loss
        model = _tiny_model()
        compile_model(model, 1e-3, smoothing, soft_targets=soft)
        logs = {}
        callback = BalancedAccuracy(val, labels)
        callback.set_model(model)
        callback.on_epoch_end(0, logs)
        targets = np.eye(2, dtype="float32")[labels] if soft else labels
        loss, accuracy = model.evaluate(tf.data.Dataset.from_tensor_slices((x, targets)).batch(16), verbose=0)
        np.testing.assert_allclose(logs["val_loss"], loss, rtol=1e-5)
        np.testing.assert_allclose(logs["val_accuracy"], accuracy, rtol=1e-6)
        pred = model.predict(x, verbose=0).argmax(1)
        assert logs["val_balanced_accuracy"] == np.mean([np.mean(pred[labels == c] == c) for c in (0, 1)])


def test_epoch_seconds_times_the_epoch_to_its_end():
    timer, logs = EpochSeconds(), {}
    timer.on_epoch_begin(0)
    time.sleep(0.2)
    timer.on_epoch_end(0, logs)
    assert 0.2 <= logs["epoch_seconds"] < 5


def test_phases_protect_a_pretrained_backbone_and_train_a_scratch_model_whole():
    lite = phases(TrainConfig(model="efficientnet_lite0", profile="cpu").resolved())
    assert [(p.name, p.start, p.end, p.lr, p.unfreeze_from) for p in lite] == [
        ("head", 0, 2, 1e-3, None), ("finetune", 2, 12, 3e-4, "block8_expand_conv")]
    cnn = phases(TrainConfig(model="cnn", profile="cpu").resolved())
    assert [(p.name, p.start, p.end, p.lr, p.unfreeze_from) for p in cnn] == [("finetune", 0, 10, 1e-3, "all")]
    scratch = phases(TrainConfig(model="efficientnet_lite0", profile="smoke", weights="none").resolved())
    assert [(p.name, p.start, p.end) for p in scratch] == [("finetune", 0, 2)]
