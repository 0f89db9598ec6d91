"""AdaBN (``evaluate --adapt-bn``): batch-normalisation statistics re-estimated
on the folder being scored, on real JPEG files and a real Keras model.

The library tests build an untrained CNN (no training needed to check the
statistics); the command-line tests score a copy of the shared smoke CNN run
and the smoke study's mean ensemble on a folder of demo images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import cli
from test_external import copy_run, error_lines, smoke_cnn_run

from skin_lesion.info import CLASSES, MIN_ADAPT_IMAGES, DataError

SIZE = 48


@pytest.fixture(scope="module")
def folder(demo_dir) -> pd.DataFrame:
    """The first 70 demo images (image_id, dx, path): more than the minimum of one source."""
    meta = pd.read_csv(demo_dir / "HAM10000_metadata.csv", dtype=str).head(70)
    return meta.assign(path=[str(demo_dir / "images" / f"{i}.jpg") for i in meta["image_id"]])[["image_id", "dx", "path"]]


def untrained_cnn() -> keras.Model:
    from skin_lesion.models import build_model

    keras.utils.set_random_seed(0)
    return build_model("cnn", SIZE, weights=None)


def first_bn_inputs(model: keras.Model, frame: pd.DataFrame) -> np.ndarray:
    """What the model's first BatchNormalization layer receives for every image of ``frame``."""
    from skin_lesion.adapt import batchnorm_layers
    from skin_lesion.pipeline import make_pipeline

    probe = keras.Model(model.inputs, batchnorm_layers(model)[0].input)
    return np.concatenate([probe(x, training=False).numpy() for x, _ in make_pipeline(frame, (SIZE, SIZE), 32, cache=False).dataset])


def test_the_first_layer_gets_the_folders_exact_statistics_and_no_weight_changes(folder):
    """The first BatchNormalization layer's input does not depend on any other
    layer's statistics, so its adapted mean and variance are exactly those of
    its inputs over the folder; gammas, betas and kernels are left as learnt."""
    from skin_lesion.adapt import adapt_batchnorm, batchnorm_layers

    model = untrained_cnn()
    features = first_bn_inputs(model, folder)
    for layer in batchnorm_layers(model):  # training statistics far from the folder's, as another source's would be
        layer.moving_mean.assign(layer.moving_mean.numpy() + 3.0)
        layer.moving_variance.assign(layer.moving_variance.numpy() * 4.0 + 1.0)
    learnt = {w.path: w.numpy().copy() for w in model.weights if "moving" not in w.path}
    before = [layer.moving_mean.numpy().copy() for layer in batchnorm_layers(model)]
    done = adapt_batchnorm(model, folder, SIZE)
    first = batchnorm_layers(model)[0]
    np.testing.assert_allclose(first.moving_mean.numpy(), features.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(first.moving_variance.numpy(), features.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-7)
    for w in model.weights:
        if w.path in learnt:
            np.testing.assert_array_equal(w.numpy(), learnt[w.path])
    assert all(not np.allclose(layer.moving_mean.numpy(), b) for layer, b in zip(batchnorm_layers(model), before))
    assert done["images"] == len(folder) and done["layers"] == len(batchnorm_layers(model)) == 8
    assert model.get_layer(first.name) is first  # the model adapted in place, its graph unchanged


def test_the_same_folder_in_another_order_gives_the_same_statistics(folder):
    """Rows are put in one order before the seeded shuffle: a folder listed
    sorted by class or in reverse adapts the model the same way."""
    from skin_lesion.adapt import adapt_batchnorm, batchnorm_layers

    stats = []
    for frame in (folder, folder.iloc[::-1], folder.sort_values("dx")):
        model = untrained_cnn()
        adapt_batchnorm(model, frame, SIZE)
        stats.append(np.concatenate([np.concatenate([b.moving_mean.numpy(), b.moving_variance.numpy()]) for b in batchnorm_layers(model)]))
    np.testing.assert_allclose(stats[1], stats[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats[2], stats[0], rtol=1e-5, atol=1e-6)


def test_too_few_images_or_no_batchnorm_is_one_clear_error(folder):
    from skin_lesion.adapt import adapt_batchnorm

    with pytest.raises(DataError, match=f"{MIN_ADAPT_IMAGES - 1} image\\(s\\) to estimate the statistics from; it needs at least {MIN_ADAPT_IMAGES}"):
        adapt_batchnorm(untrained_cnn(), folder.head(MIN_ADAPT_IMAGES - 1), SIZE)
    inputs = keras.Input((SIZE, SIZE, 3))
    plain = keras.Model(inputs, keras.layers.Dense(len(CLASSES), activation="softmax")(keras.layers.GlobalAveragePooling2D()(inputs)), name="plain")
    with pytest.raises(DataError, match="the model plain has no BatchNormalization layer"):
        adapt_batchnorm(plain, folder, SIZE)


def test_the_statistics_stay_float32_under_mixed_precision():
    """A layer of a mixed-precision model (float16 compute, as a GPU run trains) sums
    in float32: one batch's count alone (8 x 40 x 40 = 12,800 here, 204,800 at
    160 px) is near float16's largest number, 65,504."""
    from skin_lesion.adapt import FolderStatistics

    rng = np.random.default_rng(0)
    batches = [rng.normal(5.0, 2.0, size=(8, 40, 40, 3)).astype("float32") for _ in range(6)]
    layer = FolderStatistics(dtype="mixed_float16")
    layer.build((None, 40, 40, 3))
    for x in batches:
        layer(x)
    mean, variance = layer.folder_moments()
    everything = np.concatenate(batches)
    np.testing.assert_allclose(mean, everything.mean(axis=(0, 1, 2)), rtol=1e-3)
    np.testing.assert_allclose(variance, everything.var(axis=(0, 1, 2)), rtol=1e-2)


def test_batches_are_even_so_no_batch_is_a_few_images(folder):
    """70 images in batches of at most 32: 23, 24, 23, not 32, 32, 6."""
    from skin_lesion.adapt import even_batches

    sizes = [len(x) for x in even_batches(folder, SIZE, 32)]
    assert sizes == [23, 24, 23]


def clinic(folder: pd.DataFrame, to: Path) -> Path:
    """The folder's images copied under new ids into ``to``/clinic, with ``to``/labels.csv."""
    images = to / "clinic"
    images.mkdir(parents=True)
    ids = [f"CLN_{k:04d}" for k in range(len(folder))]
    for image_id, path in zip(ids, folder["path"]):
        shutil.copy(path, images / f"{image_id}.jpg")
    pd.DataFrame({"image_id": ids, "dx": folder["dx"].to_numpy()}).to_csv(to / "labels.csv", index=False)
    return images


def test_evaluate_adapt_bn_scores_the_folder_with_its_own_statistics(tmp_path_factory, demo_dir, folder, tmp_path):
    """`evaluate --adapt-bn` on a run: outputs named NAME_adapt_bn beside the unadapted ones, which
    it leaves alone; the saved model is not changed; the temperature stays the trained model's."""
    from skin_lesion.bundle import file_sha256

    run = copy_run(smoke_cnn_run(tmp_path_factory, demo_dir), tmp_path / "run")
    images = clinic(folder, tmp_path)
    sha = file_sha256(run / "model.keras")
    plain = cli("evaluate", "--run", str(run), "--images", str(images), "--labels", str(tmp_path / "labels.csv"), "--tta", "1")
    adapted = cli("evaluate", "--run", str(run), "--images", str(images), "--labels", str(tmp_path / "labels.csv"), "--tta", "1", "--adapt-bn")
    assert plain.returncode == 0 and adapted.returncode == 0, adapted.stderr[-3000:]
    assert f"-> {run / 'metrics_clinic_adapt_bn.json'}, {run / 'predictions_clinic_adapt_bn.csv'}" in adapted.stdout
    m_plain, m_adapted = (json.loads((run / f"metrics_{n}.json").read_text()) for n in ("clinic", "clinic_adapt_bn"))
    assert "adapt_bn" not in m_plain and m_adapted["adapt_bn"]["images"] == len(folder) and m_adapted["adapt_bn"]["layers"] == 8
    assert m_adapted["temperature"] == m_plain["temperature"]  # fitted on validation before the adaptation
    p_plain, p_adapted = (pd.read_csv(run / f"predictions_{n}.csv")[list(CLASSES)].to_numpy() for n in ("clinic", "clinic_adapt_bn"))
    assert np.abs(p_plain - p_adapted).max() > 1e-3  # the statistics did change what it says
    np.testing.assert_allclose(p_adapted.sum(axis=1), 1.0, atol=1e-5)
    assert file_sha256(run / "model.keras") == sha
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["outputs"]["clinic_adapt_bn"] == {"metrics": "metrics_clinic_adapt_bn.json", "predictions": "predictions_clinic_adapt_bn.csv"}
    res = cli("evaluate", "--run", str(run), "--images", str(images), "--labels", str(tmp_path / "labels.csv"), "--name", "clinic_adapt_bn")
    assert res.returncode != 0 and error_lines(res.stderr) == [
        "error: --name clinic_adapt_bn: names ending _adapt_bn are kept for --adapt-bn's outputs; name the external set otherwise"]
    res = cli("evaluate", "--run", str(run), "--adapt-bn")
    assert res.returncode != 0 and "--adapt-bn adapts the model to an external folder; pass --images and --labels" in res.stderr


def test_a_mean_ensemble_adapts_each_member(smoke_runs, folder, tmp_path):
    """Each member is adapted to the folder and scored; the ensemble records what each did;
    a decision layer is refused with one line."""
    runs = tmp_path / "runs"
    shutil.copytree(smoke_runs, runs, ignore=shutil.ignore_patterns("checkpoint-epoch*.keras"))
    images = clinic(folder, tmp_path)
    res = cli("evaluate", "--run", str(runs / "smoke_ensemble"), "--images", str(images), "--labels", str(tmp_path / "labels.csv"), "--tta", "1", "--adapt-bn")
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((runs / "smoke_ensemble" / "manifest.json").read_text())
    metrics = json.loads((runs / "smoke_ensemble" / "metrics_clinic_adapt_bn.json").read_text())
    assert set(metrics["adapt_bn"]) == set(metrics["member_balanced_accuracy"]) and len(metrics["adapt_bn"]) == len(manifest["members"])
    assert all(v["images"] == len(folder) for v in metrics["adapt_bn"].values())
    for member in manifest["members"]:
        assert ((runs / "smoke_ensemble" / member).resolve() / "predictions_clinic_adapt_bn.csv").exists()
    res = cli("evaluate", "--run", str(runs / "smoke_stacked"), "--images", str(images), "--labels", str(tmp_path / "labels.csv"), "--adapt-bn")
    assert res.returncode != 0 and "is a decision layer; --adapt-bn scores a run or a mean ensemble" in res.stderr
