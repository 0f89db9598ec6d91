"""Input pipeline: decoding real JPEG/PNG files, augmentation, imbalance handling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from skin_lesion import data
from skin_lesion.augment import mixup_batch
from skin_lesion.data import label_ids
from skin_lesion.info import CLASSES, DataError
from skin_lesion.pipeline import class_weights, load_images, make_pipeline, sampling_prior, undersample


@pytest.fixture(scope="module")
def meta(demo_dir) -> pd.DataFrame:
    return data.load_dataset(demo_dir).meta


def test_eval_pipeline_is_ordered_deterministic_and_sized(meta):
    frame = meta.head(20)
    pipe = make_pipeline(frame, (48, 48), batch_size=8)
    first = [(x.numpy(), y.numpy()) for x, y in pipe.dataset]
    second = [(x.numpy(), y.numpy()) for x, y in pipe.dataset]
    assert pipe.steps == 3 and first[0][0].shape == (8, 48, 48, 3) and first[0][0].dtype == np.uint8
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, second))
    assert np.array_equal(np.concatenate([y for _, y in first]), label_ids(frame["dx"]))
    assert 0 <= first[0][0].min() and first[0][0].max() <= 255


def test_training_augmentation_changes_images_but_not_shapes(meta):
    frame = meta.head(16)
    plain = next(iter(make_pipeline(frame, (48, 48), 16, training=True, augment=False, seed=1).dataset))[0].numpy()
    aug = next(iter(make_pipeline(frame, (48, 48), 16, training=True, augment=1.0, seed=1).dataset))[0].numpy()
    assert aug.shape == plain.shape and aug.dtype == np.float32 and not np.allclose(aug, plain)


def test_augmented_training_batches_do_not_depend_on_thread_timing(meta):
    """Augmentation once drew from one shared seeded generator: tf.data handed its
    draws to batches in thread-timing order (parallel calls, and how far the
    pipeline ran ahead before the next phase's iterator), so runs trained beside
    other work did not reproduce. Each batch's draws now depend on its seed and
    position only. (A second iterator over one dataset still reshuffles from
    state the first advanced as far as it ran ahead, so ``train`` builds a
    fresh pipeline for each phase.)"""
    frame = meta.head(64)

    def batches(pipe, n=80):
        return [x.numpy() for x, _ in pipe.dataset.take(n)]  # a fast consumer: the map runs as far ahead as it may

    def build(seed=3):  # MixUp rides along: its blends are keyed the same way
        return make_pipeline(frame, (48, 48), 4, training=True, imbalance="oversample", augment=1.0, seed=seed, mixup=0.4)

    for _ in range(3):
        first, second = batches(build()), batches(build())
        assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.allclose(first[0], first[1])  # batches still differ from each other
    assert not np.allclose(batches(build(seed=4), 1)[0], first[0])  # and with the seed


def test_mixup_blends_pairs_of_images_and_their_labels_reproducibly(meta):
    """MixUp after augmentation: each image is a weighted blend of itself and the batch's
    image in reversed order, and its soft target blends their one-hot labels by the same
    weight; the weights are drawn per image and repeat for the same seed."""
    frame = meta.head(64)

    def first_batch(mixup, seed=2):
        x, y = next(iter(make_pipeline(frame, (32, 32), 16, training=True, imbalance="oversample", augment=False, seed=seed, mixup=mixup).dataset))
        return x.numpy(), y.numpy()

    plain, labels = first_batch(0.0)
    mixed, targets = first_batch(0.4)
    assert labels.shape == (16,) and targets.shape == (16, len(CLASSES)) and mixed.dtype == np.float32
    np.testing.assert_allclose(targets.sum(1), 1, rtol=1e-6)
    onehot = np.eye(len(CLASSES))[labels]
    partner = slice(None, None, -1)
    weights = []
    for i in np.flatnonzero(labels != labels[partner]):  # a blend of two classes tells its weight
        lam = targets[i, labels[i]]
        np.testing.assert_allclose(targets[i], lam * onehot[i] + (1 - lam) * onehot[partner][i], atol=1e-6)
        np.testing.assert_allclose(mixed[i], lam * plain[i] + (1 - lam) * plain[partner][i], atol=1e-3)
        weights.append(lam)
    assert len(weights) >= 4 and np.ptp(weights) > 0.1  # drawn per image, not one weight for all
    again, again_targets = first_batch(0.4)
    assert np.array_equal(again, mixed) and np.array_equal(again_targets, targets)
    # The weights follow the pipeline's seed and the batch's position, and only them.
    images, ids = tf.zeros((8, 4, 4, 3), tf.uint8), tf.range(8) % len(CLASSES)

    def weights_for(seed, position):
        return mixup_batch(images, ids, 0.4, tf.constant([seed, position], tf.int64), len(CLASSES))[1].numpy()

    assert np.array_equal(weights_for(2, 0), weights_for(2, 0))
    assert not np.array_equal(weights_for(2, 0), weights_for(2, 1)) and not np.array_equal(weights_for(2, 0), weights_for(3, 0))


def test_augmentation_inside_a_model_trains_randomly_and_predicts_deterministically(meta):
    """augment_on=model: the layer is active in the train step only, and tells Keras
    it cannot be XLA-compiled (so jit_compile="auto" falls back on a GPU)."""
    import keras
    from keras.src.trainers.trainer import model_supports_jit

    from skin_lesion.models import build_model

    model = build_model("cnn", 48, augment=1.0)
    plain = build_model("cnn", 48)
    assert model.get_layer("augment") is not None and not model_supports_jit(model) and model_supports_jit(plain)
    x = next(iter(make_pipeline(meta.head(8), (48, 48), 8).dataset))[0]
    assert x.dtype == "uint8"
    aug = model.get_layer("augment")
    assert not np.allclose(aug(x, training=True), keras.ops.cast(x, "float32"))
    assert np.array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))


def test_grayscale_and_rgba_pngs_decode_to_rgb(meta, tmp_path):
    src = Image.open(meta["path"].iloc[0])
    src.convert("L").save(tmp_path / "g.png")
    src.convert("RGBA").save(tmp_path / "a.png")
    frame = pd.DataFrame({"path": [str(tmp_path / "g.png"), str(tmp_path / "a.png")], "dx": ["nv", "mel"]})
    x, _ = next(iter(make_pipeline(frame, (32, 40), 2).dataset))
    assert x.shape == (2, 32, 40, 3)


def test_load_images_batches_the_pixels_the_pipeline_gives(meta):
    """``load_images`` (Grad-CAM, notebooks) reads through the one decoder (see test_decoder.py)."""
    paths = meta["path"].head(3).tolist()
    x, _ = next(iter(make_pipeline(pd.DataFrame({"path": paths, "dx": ["nv"] * 3}), (40, 40), 3).dataset))
    batch = load_images(paths, 40)
    assert batch.shape == (3, 40, 40, 3) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch, x.numpy().astype("float32"))


def test_oversampling_balances_1000_examples(meta):
    train = meta[meta["dx"].isin(CLASSES)]
    pipe = make_pipeline(train, (32, 32), batch_size=100, training=True, imbalance="oversample", augment=False, seed=0)
    labels = np.concatenate([y.numpy() for _, y in pipe.dataset.take(10)])
    assert len(labels) == 1000
    shares = np.bincount(labels, minlength=len(CLASSES)) / 1000
    natural = train["dx"].value_counts(normalize=True)
    assert natural.max() > 0.5  # the data itself is imbalanced ...
    assert np.abs(shares - 1 / len(CLASSES)).max() < 0.05  # ... the oversampled stream is not


def test_sqrt_sampling_draws_classes_by_the_root_of_their_counts(meta):
    train = meta[meta["dx"].isin(CLASSES)]
    labels = label_ids(train["dx"])
    prior = sampling_prior(labels, "sqrt")
    counts = np.bincount(labels, minlength=len(CLASSES))
    np.testing.assert_allclose(prior, np.sqrt(counts) / np.sqrt(counts).sum())
    assert sampling_prior(labels, "oversample") is None and sampling_prior(labels, "none") is None
    pipe = make_pipeline(train, (32, 32), batch_size=100, training=True, imbalance="sqrt", augment=False, seed=0)
    drawn = np.concatenate([y.numpy() for _, y in pipe.dataset.take(30)])
    shares = np.bincount(drawn, minlength=len(CLASSES)) / len(drawn)
    natural = counts / counts.sum()
    nv = CLASSES.index("nv")
    assert natural[nv] > prior[nv] > 1 / len(CLASSES)  # between the natural and the balanced mix
    assert np.abs(shares - prior).max() < 0.04


def test_undersampling_and_class_weights(meta):
    under = undersample(meta, seed=0)
    counts = under["dx"].value_counts()
    assert counts.nunique() == 1 and counts.iloc[0] == meta["dx"].value_counts().min()
    weights = class_weights(label_ids(meta["dx"]))
    nv, df = CLASSES.index("nv"), CLASSES.index("df")
    assert weights[df] > weights[nv]
    counts = meta["dx"].value_counts()
    assert weights[nv] == pytest.approx(len(meta) / (len(CLASSES) * counts["nv"]))


def test_unknown_method_and_labels_are_user_errors(meta):
    with pytest.raises(DataError, match="unknown imbalance method"):
        make_pipeline(meta.head(4), imbalance="smote-ish")
    with pytest.raises(DataError, match="unknown dx"):
        label_ids(pd.Series(["nv", "freckle"]))
    with pytest.raises(DataError, match="empty split"):
        make_pipeline(meta.head(0))
