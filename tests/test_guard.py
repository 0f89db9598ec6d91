"""The out-of-distribution guard: its statistics, and the bundle refusing pictures that are not dermatoscopic.

The bundle tests use the session's smoke study on the demo set: the guard is
fitted on that run's training split, thresholded on its validation split, and
checked on sample photos, generated frames and the run's own test images.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import cli

from skin_lesion.guard import NOT_RECOGNISED, Guard, Mahalanobis, fit_guard, pixel_statistics


def _features(rng, n_per_class: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Seven Gaussian classes in 40 dimensions with correlated noise (a stand-in for pooled features)."""
    mix = rng.normal(size=(40, 40)) / 6
    means = rng.normal(scale=3, size=(7, 40))
    labels = np.repeat(np.arange(7), n_per_class)
    x = means[labels] + rng.normal(size=(len(labels), 40)) @ mix + shift
    return x, labels


def test_guard_refuses_at_most_two_percent_of_validation_and_points_far_from_training():
    rng = np.random.default_rng(0)
    train, labels = _features(rng, 300)
    val, _ = _features(np.random.default_rng(1), 100)
    val = val - val.mean(0) + train.mean(0)  # the same classes, drawn again
    stats_train, stats_val = rng.normal(size=(len(train), 10)), rng.normal(size=(len(val), 10))
    guard = fit_guard(train, labels, stats_train, val, stats_val)
    assert guard.reject_on_validation <= 0.02
    assert (~guard.recognised(val, stats_val)).mean() == pytest.approx(guard.reject_on_validation)
    far, _ = _features(rng, 10, shift=25.0)
    assert not guard.recognised(far, rng.normal(size=(len(far), 10))).any()  # features unlike training's
    assert not guard.recognised(train[:10], rng.normal(size=(10, 10)) + 8).any()  # pixels unlike training's


def test_guard_distance_is_the_mahalanobis_distance_to_the_nearest_class_mean(tmp_path):
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(2)
    train, labels = _features(rng, 200)
    check = Mahalanobis.fit(train, labels, train[:50], 0.01)
    means = np.stack([train[labels == c].mean(0) for c in range(7)])
    precision = np.linalg.inv(LedoitWolf(assume_centered=True).fit(train - means[labels]).covariance_)
    probe = rng.normal(size=(5, 40)) * 3
    expected = np.array([min((x - m) @ precision @ (x - m) for m in means) for x in probe])
    np.testing.assert_allclose(check.distance(probe), expected, rtol=1e-6)
    stats = rng.normal(size=(len(train), 10))
    guard = fit_guard(train, labels, stats, train[:50], stats[:50])
    loaded = Guard.load(guard.save(tmp_path / "guard.npz"))
    np.testing.assert_allclose(loaded.scores(probe, stats[:5]), guard.scores(probe, stats[:5]), rtol=1e-4)  # stored in float32


def test_pixel_statistics_separate_blank_and_noisy_frames_from_a_lesion(lesion_images):
    from skin_lesion.pixels import read_image

    lesion = pixel_statistics(read_image(lesion_images[0], 224))
    blank = pixel_statistics(np.full((224, 224, 3), 255.0))
    noise = pixel_statistics(np.random.default_rng(0).uniform(0, 255, (224, 224, 3)))
    assert lesion.shape == (10,) and np.isfinite(lesion).all()
    assert blank[3:6].max() < lesion[3:6].min()  # no spread of colour at all
    assert noise[7] > lesion[7] + 2  # far more fine detail (log scale)


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    from skin_lesion.guard import foreign_images

    return foreign_images(tmp_path_factory.mktemp("foreign"))


@pytest.fixture(scope="module")
def test_split_images(smoke_runs, demo_dir):
    """The smoke run's test-split images: never seen by training, the guard's fit or its thresholds."""
    split = pd.read_csv(smoke_runs / "smoke_efficientnet_lite0" / "split.csv")
    return [demo_dir / "images" / f"{i}.jpg" for i in split.loc[split["split"] == "test", "image_id"]]


def test_bundle_guard_refuses_pictures_that_are_not_dermatoscopic_and_accepts_lesions(bundles, foreign, test_split_images):
    from skin_lesion.bundle import Bundle

    bundle = Bundle(bundles["smoke_ensemble"])
    fitted = bundle.manifest["guard"]
    assert fitted["reject_on_validation"] <= 0.02 and fitted["fitted_on"]["train"] > 0
    refused = {name: bundle.analyse_file(path).recognised is False for name, path in foreign.items()}
    accepted = [bundle.analyse_file(p).recognised for p in test_split_images]
    detection, acceptance = np.mean(list(refused.values())), np.mean(accepted)
    print(f"guard on the smoke ensemble: {sum(refused.values())}/{len(refused)} foreign pictures refused; "
          f"{sum(accepted)}/{len(accepted)} test lesions accepted; let through: {sorted(k for k, v in refused.items() if not v)}")
    for name in ("blank_white", "blank_black", "noise_uniform", "text_page", "chelsea", "astronaut", "grace_hopper", "screenshot_chart"):
        assert refused[name], name
    assert detection >= 0.9
    # The smoke run's thresholds come from about 20 validation images (the largest distance among them),
    # so its test images are refused more often than a full run's (docs/benchmarks.md measures the cpu study's).
    assert acceptance >= 0.7


def test_predict_says_not_recognised_and_scores_only_with_show_anyway(bundles, foreign, demo_images):
    bundle = str(bundles["smoke_ensemble"])
    res = cli("predict", "--model", bundle, str(foreign["chelsea"]), str(demo_images[0]))
    assert res.returncode == 0, res.stderr[-2000:]
    cat_line = next(line for line in res.stdout.splitlines() if "chelsea" in line)
    assert NOT_RECOGNISED in cat_line and "%" not in cat_line
    res = cli("predict", "--model", bundle, "--json", "--show-anyway", str(foreign["chelsea"]))
    record = json.loads(res.stdout)["predictions"][0]
    assert record["recognised"] is False and record["message"] == NOT_RECOGNISED
    assert len(record["top3"]) == 3 and record["guard_score"] > 1 and set(record["guard_checks"]) == {"features", "pixels"}
    res = cli("predict", "--model", bundle, "--json", str(foreign["chelsea"]))
    record = json.loads(res.stdout)["predictions"][0]
    assert record["recognised"] is False and "top3" not in record and "label" not in record
