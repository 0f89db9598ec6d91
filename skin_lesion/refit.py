"""Refitting a finished run on its train + validation images.

A run keeps its best epoch by validation balanced accuracy and fits its
temperature and melanoma threshold on validation, so its validation lesions
never train the model. A refit (``train --refit-from RUN``) trains RUN's own
config on RUN's train and validation images, on RUN's learning-rate schedule
up to the epoch RUN kept, and keeps that epoch's weights: every choice was
made by RUN. Its calibration is fitted on RUN's predictions for the added
images, which are out-of-fold (RUN never trained on them).

A refit cannot be scored on the images it trained on, so ``--refit-half H``
adds only half H of RUN's validation lesions and scores the refit and RUN
on the other half with the same calibration (``refit_screen`` in the
metrics): how a refit is screened with no look at the test split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from skin_lesion.config import TrainConfig
from skin_lesion.info import DataError
from skin_lesion.runs import STATE, RunFolder
from skin_lesion.splits import validation_halves, with_split

HALVES = (0, 1)


@dataclass(frozen=True)
class Refit:
    """What a refit run's manifest records: its source run, the epoch it keeps,
    and which validation half it added (None: all of validation)."""

    source: Path
    epoch: int
    half: int | None

    def as_dict(self) -> dict:
        return {"source": str(self.source), "epoch": self.epoch, "half": self.half}


def refit_of(run: str | os.PathLike | RunFolder) -> Refit | None:
    """The refit a run folder records in its manifest, or None for an ordinary run.

    The source is stored relative to the refit's folder, so a runs folder moved
    as a whole keeps working."""
    folder = RunFolder(run)
    raw = folder.manifest().get("refit")
    if not raw:
        return None
    return Refit(folder.linked(raw["source"]).path, int(raw["epoch"]), raw.get("half"))


def refit_table(table: pd.DataFrame, half: int | None, seed: int) -> pd.DataFrame:
    """The source's split table with its validation images moved to train:
    all of them, or half ``half`` (the other half stays validation).

    An ``added`` column marks the moved images: the refit's calibration set.
    """
    if "split" not in table or not (table["split"] == "val").any():
        raise DataError("the source run's split.csv has no validation images to refit on (k-fold runs are refit per fold's own run folder)")
    out = table.copy()
    is_val = out["split"] == "val"
    if half is None:
        added = is_val
    else:
        halves = validation_halves(out[is_val], seed)
        added = is_val & out.index.isin(halves.index[halves == half])
    out["added"] = added
    out.loc[added, "split"] = "train"
    return out


def start_refit(source: str | os.PathLike, out: str | os.PathLike, half: int | None = None) -> TrainConfig:
    """Write the refit run folder ``out`` (config, split, manifest) from the finished run ``source``;
    returns the config ``train`` then runs."""
    src = RunFolder(source)
    if refit_of(src):
        raise DataError(f"{src.path}: is itself a refit; refit its source run instead")
    if not src.config_file.exists() or not src.has_model():
        raise DataError(f"{src.path}: not a finished run (no config.json or model.keras); --refit-from takes a trained run folder")
    if half is not None and half not in HALVES:
        raise DataError(f"--refit-half {half}: choose 0 or 1")
    if not (src.path / STATE).exists():
        raise DataError(f"{src.path}: holds no training record (state.json), as a weight average or a resized copy does; refit the run that trained it")
    state = src.state()
    cfg = src.config().resolved()
    if cfg.folds and cfg.fold is None:
        raise DataError(f"{src.path}: a k-fold run's parent folder; refit one fold's run (its fold-K folder)")
    epoch = int(state.get("best_epoch") or 0)
    if epoch < 1 or src.completed_epochs() < cfg.epochs:
        raise DataError(f"{src.path}: trained {src.completed_epochs()} of {cfg.epochs} epochs; finish it first (`train --resume --run {src.path}`)")
    table = src.read_split()
    if table is None:
        raise DataError(f"{src.split_file}: missing; the source run needs the split.csv train wrote")
    table = with_split(table, cfg.fold, cfg.seed)
    dest = RunFolder(out)
    if dest.config_file.exists() or dest.history_file.exists():  # a split alone is what a start that died left: written again
        raise DataError(f"{dest.path}: the run folder already holds a run; pass --resume to continue it or choose a new --run")
    cfg = replace(cfg, run=str(dest.path), split_file=None)  # its split.csv is the source's table with validation added, not a file to read again
    dest.write_split(refit_table(table, half, cfg.seed))
    dest.update_manifest(refit={**Refit(src.path, epoch, half).as_dict(), "source": dest.relative(src)})
    dest.write_config(cfg)  # last: a folder with a config is a run that `train --resume` continues
    return cfg


def last_epoch(cfg: TrainConfig, refit: Refit | None) -> int:
    """The epoch a run (``refit``: its ``refit_of``) trains up to: a refit stops at the
    epoch it keeps (unless it also averages the last epochs' weights, which needs them all)."""
    if refit is None or cfg.average_last:
        return cfg.epochs
    return min(refit.epoch, cfg.epochs)


def calibration_frames(run: str | os.PathLike, meta: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A refit's calibration images (the validation images it added) and the
    validation images it kept (empty for a full refit), rows of ``meta``."""
    table = RunFolder(run).read_split()
    added_ids = set(table.loc[table["added"].astype(bool), "image_id"]) if table is not None and "added" in table else set()
    if not added_ids:
        raise DataError(f"{RunFolder(run).split_file}: a refit's split.csv marks the images it added (column added); recreate the run with --refit-from")
    return meta[meta["image_id"].isin(added_ids)], meta[meta["split"] == "val"]


def screen_scores(y_kept: np.ndarray, refit_probs: np.ndarray, source_probs: np.ndarray) -> dict:
    """The refit screen on the kept half: both models' metrics there and the
    difference in balanced accuracy (refit minus source)."""
    from skin_lesion.metrics import classification_metrics

    refit_m, source_m = classification_metrics(y_kept, refit_probs), classification_metrics(y_kept, source_probs)
    return {
        "kept_images": int(len(y_kept)),
        "refit": refit_m,
        "source": source_m,
        "balanced_accuracy_difference": refit_m["balanced_accuracy"] - source_m["balanced_accuracy"],
    }
