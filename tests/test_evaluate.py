"""Metrics, calibration, operating point and subgroup tables on known inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from skin_lesion.data import CLASSES, DataError
from skin_lesion.evaluate import (
    MEL,
    age_band,
    apply_temperature,
    classification_metrics,
    decide,
    expected_calibration_error,
    fit_temperature,
    mel_threshold,
    read_labels,
    subgroup_table,
)


def _onehot(pred: np.ndarray, conf: float = 0.9) -> np.ndarray:
    p = np.full((len(pred), len(CLASSES)), (1 - conf) / (len(CLASSES) - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def test_metrics_match_hand_counts():
    y = np.array([0, 0, 1, 1, 4, 4, 4, 5, 5, 5])
    pred = np.array([0, 1, 1, 1, 4, 5, 4, 5, 5, 4])
    m = classification_metrics(y, _onehot(pred))
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["balanced_accuracy"] == pytest.approx(np.mean([0.5, 1.0, 2 / 3, 2 / 3]))
    mel = m["per_class"]["mel"]
    assert mel["recall"] == pytest.approx(2 / 3) and mel["precision"] == pytest.approx(2 / 3)
    assert mel["specificity"] == pytest.approx(6 / 7)  # 7 non-mel, one called mel
    assert np.array(m["confusion_matrix"]).sum() == 10 and m["confusion_matrix"][4][5] == 1


def test_ece_zero_when_confidence_equals_accuracy_and_temperature_fixes_overconfidence():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 4000)
    right = rng.random(4000) < 0.6
    pred = np.where(right, y, (y + 1) % 7)
    calibrated = _onehot(pred, 0.6)
    assert expected_calibration_error(calibrated, y) < 0.03
    over = _onehot(pred, 0.99)
    t = fit_temperature(over, y)
    assert t > 1.5
    assert expected_calibration_error(apply_temperature(over, t), y) < expected_calibration_error(over, y) / 3


def test_melanoma_threshold_reaches_target_recall_on_its_data():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 7, 2000)
    probs = rng.dirichlet(np.ones(7), 2000)
    probs[y == MEL, MEL] += 0.3
    probs /= probs.sum(1, keepdims=True)
    t = mel_threshold(probs, y, 0.8)
    by_threshold = (probs[y == MEL, MEL] >= t).mean()
    assert 0.8 <= by_threshold < 0.81  # the highest threshold that reaches the target
    assert (decide(probs, t)[y == MEL] == MEL).mean() >= by_threshold  # argmax can only add melanoma calls


def test_subgroups_have_counts_and_intervals():
    rng = np.random.default_rng(2)
    n = 300
    y = rng.integers(0, 7, n)
    pred = np.where(rng.random(n) < 0.7, y, (y + 1) % 7)
    frame = pd.DataFrame(_onehot(pred), columns=list(CLASSES)).assign(y=y, pred=pred, sex=rng.choice(["male", "female"], n), age=rng.choice([20, 50, 80, np.nan], n))
    frame["age_band"] = age_band(frame["age"])
    assert set(frame["age_band"]) == {"<30", "45-59", "75+", "unknown"}
    table = subgroup_table(frame, "sex")
    assert table["n"].sum() == n
    assert (table["balanced_accuracy_lo"] <= table["balanced_accuracy"]).all() and (table["balanced_accuracy"] <= table["balanced_accuracy_hi"]).all()


def test_label_files_both_formats_and_errors(tmp_path):
    (tmp_path / "ham.csv").write_text("image_id,dx\nA,mel\nB,nv\n")
    (tmp_path / "isic.csv").write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nA,1,0,0,0,0,0,0\nB,0,0,0,0,0,0,1\n")
    assert read_labels(tmp_path / "ham.csv")["dx"].tolist() == ["mel", "nv"]
    assert read_labels(tmp_path / "isic.csv")["dx"].tolist() == ["mel", "vasc"]
    (tmp_path / "bad.csv").write_text("image_id,dx\nA,mole\n")
    with pytest.raises(DataError, match="unknown dx"):
        read_labels(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="not found"):
        read_labels(tmp_path / "none.csv")
