"""Hyperparameter search with KerasTuner, scored on the validation split only.

Searched: learning rate, dropout, input size, how deep the backbone is
unfrozen, and the imbalance method. Each trial trains ``epochs`` epochs on the
run's lesion-grouped train split (optionally capped per class, to fit a
budget) and is scored by validation balanced accuracy; the test split is never
read. Writes ``trials.csv`` and ``best_config.json``, which
``train --config`` reuses.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import keras
import keras_tuner as kt
import pandas as pd

from skin_lesion.callbacks import BalancedAccuracy
from skin_lesion.config import LITE_NAMES, TrainConfig, is_pretrained
from skin_lesion.data import label_ids, load_dataset
from skin_lesion.info import UserError
from skin_lesion.models import build_model, lite_stage_first_block, set_backbone_trainable
from skin_lesion.pipeline import make_pipeline
from skin_lesion.runs import RunFolder, write_atomic
from skin_lesion.train import compile_model, prepare_split

log = logging.getLogger("skin_lesion")
# Where fine-tuning may start, per model: shallow to deep (for the Lite sizes, the
# first block of their last, sixth and fifth stage: block15, 11, 8 in Lite0).
UNFREEZE_CHOICES: dict[str, list[str]] = {
    **{name: [lite_stage_first_block(name, stage) for stage in (6, 5, 4)] for name in LITE_NAMES},
    "resnet50": ["conv5_block1_1_conv", "conv4_block1_1_conv"],
    "cnn": ["all"],
}


class LesionHyperModel(kt.HyperModel):
    """Builds a model and its input pipeline from one set of hyperparameters."""

    def __init__(self, cfg: TrainConfig, meta: pd.DataFrame):
        super().__init__()
        self.cfg, self.meta = cfg, meta

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        size = hp.Choice("image_size", [160, 192, 224] if self.cfg.model != "cnn" else [64, 96, 128])
        model = build_model(self.cfg.model, size, weights=self.cfg.weights, dropout=hp.Float("dropout", 0.1, 0.5, step=0.1))
        unfreeze = hp.Choice("unfreeze_from", UNFREEZE_CHOICES[self.cfg.model])
        set_backbone_trainable(model, unfreeze, freeze_batchnorm=is_pretrained(self.cfg.model, self.cfg.weights))
        compile_model(model, hp.Float("lr", 1e-4, 3e-3, sampling="log"))
        hp.Choice("imbalance", ["oversample", "class_weight", "undersample"])  # used by fit; declared here so every trial records it
        return model

    def fit(self, hp: kt.HyperParameters, model: keras.Model, *args, **kwargs):
        size = (hp.get("image_size"),) * 2
        imbalance = hp.get("imbalance")
        train = make_pipeline(self.meta[self.meta["split"] == "train"], size, self.cfg.batch_size, training=True, imbalance=imbalance, seed=self.cfg.seed)
        val_rows = self.meta[self.meta["split"] == "val"]
        val = make_pipeline(val_rows, size, self.cfg.batch_size)
        callbacks = [BalancedAccuracy(val.dataset, label_ids(val_rows["dx"])), *kwargs.pop("callbacks", [])]
        return model.fit(train.dataset, steps_per_epoch=train.steps, class_weight=train.class_weight, callbacks=callbacks, **kwargs)


def tune(run: str | Path, data: str | None = None, trials: int = 6, epochs: int = 3, model: str = "efficientnet_lite0", max_per_class: int | None = None, seed: int = 0) -> Path:
    """Random search over ``trials`` configurations; returns the path of ``best_config.json``."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(model=model, profile="cpu", data=data, run=str(run), max_per_class=max_per_class, seed=seed).resolved()
    meta = prepare_split(cfg, load_dataset(data), RunFolder(run), fresh=False)  # KerasTuner resumes its trials: they keep their split
    tuner = kt.RandomSearch(
        LesionHyperModel(cfg, meta), objective=kt.Objective("val_balanced_accuracy", "max"), max_trials=trials, seed=seed,
        directory=str(run), project_name="kerastuner", overwrite=False,
    )
    t0 = time.time()
    tuner.search(epochs=epochs, verbose=2)
    rows = []
    for trial in tuner.oracle.trials.values():
        rows.append({"trial": trial.trial_id, "status": trial.status, "val_balanced_accuracy": trial.score, **trial.hyperparameters.values})
    table = pd.DataFrame(rows).sort_values("val_balanced_accuracy", ascending=False)
    failed = int((table["status"] != "COMPLETED").sum())
    if failed == len(table):
        raise UserError(f"{run}: every one of the {failed} tuning trials failed (KerasTuner's log above says why); no best config written")
    if failed:
        log.warning("Tuning: %d of %d trials failed; the best config comes from the others", failed, len(table))
    write_atomic(run / "trials.csv", table.to_csv(index=False))
    best = tuner.get_best_hyperparameters(1)[0].values
    best_cfg = TrainConfig(**{**asdict(cfg), "image_size": best["image_size"], "dropout": best["dropout"], "unfreeze_from": best["unfreeze_from"],
                              "finetune_lr": best["lr"], "imbalance": best["imbalance"], "max_per_class": None, "run": "runs/tuned"})
    best_cfg.extra = {"tuned_by": str(run / "trials.csv"), "trials": trials, "epochs_per_trial": epochs, "search_seconds": round(time.time() - t0)}
    write_atomic(run / "best_config.json", json.dumps(asdict(best_cfg), indent=2))
    log.info("Tuning: %d trials x %d epochs in %.0f s; best val balanced accuracy %.4f", trials, epochs, time.time() - t0, table["val_balanced_accuracy"].max())
    return run / "best_config.json"
