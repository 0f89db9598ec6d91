"""The training loss: sparse cross-entropy, optionally against smoothed targets; categorical for MixUp's soft targets."""

from __future__ import annotations

import keras

from skin_lesion.config import check_label_smoothing


@keras.saving.register_keras_serializable(package="skin_lesion")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy against smoothed targets, (1 - eps) one-hot + eps / K, for
    integer labels (Szegedy et al., 2016).

    The pipeline yields class ids, and Keras' sparse cross-entropy has no
    smoothing, so the ids are one-hot encoded here. Smoothing stops the
    softmax from chasing certainty on the few rare-class images a model sees
    again and again; calibration is refitted on validation afterwards anyway.
    """

    def __init__(self, label_smoothing: float = 0.1, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        n_classes = keras.ops.shape(y_pred)[-1]
        onehot = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), n_classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(onehot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def make_loss(label_smoothing: float = 0.0, soft_targets: bool = False) -> str | keras.losses.Loss:
    """The training loss: plain sparse cross-entropy, or its smoothed form for ``label_smoothing`` > 0;
    with ``soft_targets`` (MixUp's blended labels, a row of target probabilities per image) categorical
    cross-entropy, smoothed likewise."""
    check_label_smoothing(label_smoothing)
    if soft_targets:
        return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    if label_smoothing:
        return SmoothedSparseCrossentropy(label_smoothing)
    return "sparse_categorical_crossentropy"
