"""The synthetic demo set teaches what the real study does: the CNN from scratch learns on it
(above chance, short of perfect) and no model scores a perfect test split."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from skin_lesion.models.cnn import BN_MOMENTUM, bn_momentum_for


def test_bn_momentum_is_lowered_only_for_short_trainings():
    assert bn_momentum_for(None) == bn_momentum_for(1000) == bn_momentum_for(20_000) == BN_MOMENTUM  # every HAM10000 run
    assert bn_momentum_for(160) == pytest.approx(1 - 10 / 160)  # the demo set's cpu run
    assert bn_momentum_for(160) ** 160 < 1e-4 < BN_MOMENTUM ** 160  # what is left of the starting statistics at the end
    assert bn_momentum_for(3) == 0.0  # a few steps (a k-fold smoke test): the last batch's statistics, never negative


def test_the_cnn_learns_on_the_demo_set_with_the_cpu_profile(tmp_path):
    """The cpu profile's CNN recipe (64 px, oversampling, batch 32), shortened to 4 epochs, on the
    700-image demo set that `make report` generates: validation balanced accuracy well above chance
    (1/7) and short of 1."""
    from skin_lesion.config import TrainConfig
    from skin_lesion.demo import make_demo
    from skin_lesion.train import train

    demo = make_demo(tmp_path / "demo", n_images=700, seed=0)
    run = train(TrainConfig(model="cnn", profile="cpu", data=str(demo), run=str(tmp_path / "cnn"), seed=0, epochs=4), verbose=0)
    history = pd.read_csv(run / "history.csv")
    print(history[["epoch", "accuracy", "val_balanced_accuracy"]].to_string())
    assert history["val_balanced_accuracy"].max() >= 0.3
    assert history["val_balanced_accuracy"].max() < 1.0


def test_the_pretrained_model_is_not_perfect_on_the_demo_test_split(smoke_runs):
    """The smoke study's pretrained run and ensemble on the demo's test split: short of perfect
    (the look-alike images cannot all be right), the ensemble well above chance."""
    scores = {name: json.loads((smoke_runs / name / "metrics.json").read_text())["calibrated"] for name in ("smoke_efficientnet_lite0", "smoke_ensemble")}
    for name, calibrated in scores.items():
        assert calibrated["balanced_accuracy"] < 1.0 and calibrated["macro_auc"] < 1.0, name
    assert scores["smoke_ensemble"]["balanced_accuracy"] > 1 / 7 + 0.2
