"""Mean ensembles: the mean of evaluated runs' calibrated probabilities.

Nothing but a temperature for the mean (which leaves its argmax as it is) and
the melanoma threshold is fitted on validation, so a mean ensemble has next
to nothing to overfit a small validation split with. Its folder is a run
folder of its own: ``predict`` takes it, ``stack`` and ``summarize`` read it.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd

from skin_lesion.calibration import class_frequency, logit_offset
from skin_lesion.evaluate import Evaluation, score_predictions
from skin_lesion.info import CLASSES, DataError
from skin_lesion.runs import TEST, RunFolder

log = logging.getLogger("skin_lesion")


def aligned_probabilities(runs: list[RunFolder], split: str) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Each run's saved probabilities on ``split`` (test or val), rows aligned by ``image_id`` to the first run's."""
    base = runs[0].predictions(split)
    out = {runs[0].label: base[list(CLASSES)].to_numpy(dtype=float)}
    for run in runs[1:]:
        own = run.predictions(split)
        merged = base[["image_id"]].merge(own, on="image_id", how="left")
        if merged[list(CLASSES)].isna().any().any() or len(own) != len(base):
            raise DataError(f"{run.path}: its {split} rows differ from {runs[0].path}'s; combine runs that share a split")
        out[run.label] = merged[list(CLASSES)].to_numpy(dtype=float)
    return base, out


def member_mean(probs: dict[str, np.ndarray]) -> np.ndarray:
    """The mean of the runs' (calibrated) probabilities: what a mean ensemble scores."""
    return np.mean(list(probs.values()), axis=0)


def train_class_frequency(run: RunFolder) -> np.ndarray:
    """Each class's share of the training rows of the run's ``split.csv`` (CLASSES order)."""
    split = run.read_split()
    if split is None or "split" not in split:
        raise DataError(f"{run.split_file}: missing; logit adjustment needs the training split of a run (pass run folders, not ensembles or k-fold parents)")
    train = split.loc[split["split"] == "train", "dx"]
    if train.empty:
        raise DataError(f"{run.split_file}: no training rows; logit adjustment needs a run with a train split")
    return class_frequency(train)


def mean_runs(
    runs: list[str | os.PathLike], out: str | os.PathLike, target_mel_recall: float = 0.8, mel_confidence: float | None = 0.95, logit_adjust: float = 0.0
) -> Evaluation:
    """The mean ensemble of evaluated runs that share a split, scored on their test split.

    ``logit_adjust`` (tau) changes the decision rule: the label is the argmax
    of the calibrated mean's log-probabilities minus tau * log(training class
    frequency), which moves decisions towards rare classes; the probabilities
    (AUC, ECE, what ``predict`` shows) stay the calibrated mean.

    Writes ``metrics.json`` (with ``ensemble``: the members, relative to
    ``out`` so a runs tree can move as a whole, and ``logit_adjust`` when tau
    is not 0), the predictions and a manifest that ``Predictor`` follows.
    """
    runs, out = [RunFolder(r) for r in runs], RunFolder(out)
    out.check_output("mean_ensemble", runs)
    val, val_probs = aligned_probabilities(runs, "val")
    test, test_probs = aligned_probabilities(runs, TEST)
    p_val, p_test = member_mean(val_probs), member_mean(test_probs)
    members = [out.relative(r) for r in runs]
    extra: dict = dict(ensemble=members)
    offset = None
    if logit_adjust:
        freq = train_class_frequency(runs[0])
        offset = logit_offset(freq, logit_adjust)
        extra["logit_adjust"] = dict(tau=float(logit_adjust), train_class_frequency=freq.tolist(), offset=offset.tolist())
    out.mkdir()
    out.update_manifest(kind="mean_ensemble", members=members, logit_offset=None if offset is None else offset.tolist())
    # tta_views None: the members' saved probabilities carry their own TTA (in their manifests)
    return score_predictions(out.path, None, val, p_val, test, p_test, None, target_mel_recall, TEST, mel_confidence, extra=extra, logit_offset=offset)


def score_runs_external(
    runs: list[RunFolder], images: str | os.PathLike, labels: str | os.PathLike, tta: int, name: str | None, skip_missing: bool,
    target_mel_recall: float, mel_confidence: float | None,
) -> tuple[str, pd.DataFrame, dict[str, np.ndarray], dict]:
    """Score each run on an external labelled set (``evaluate_run``: its outputs
    ``metrics_NAME.json`` and ``predictions_NAME.csv`` in its folder), for a
    combination of them: returns the set's name, its rows and each run's
    probabilities aligned to them, and what the combination's metrics record
    (the set, the labelled images skipped, each run's balanced accuracy)."""
    from skin_lesion.evaluate import evaluate_run

    scored = [evaluate_run(r.path, images=images, labels=labels, tta=tta, target_mel_recall=target_mel_recall,
                           mel_confidence=mel_confidence, name=name, skip_missing=skip_missing) for r in runs]
    name = scored[0].evaluated_on
    external, probs = aligned_probabilities(runs, name)
    extra = dict(images=str(images), labels=str(labels), skipped=scored[0].extra.get("skipped", []),
                 member_balanced_accuracy={r.label: s.calibrated["balanced_accuracy"] for r, s in zip(runs, scored)})
    return name, external, probs, extra


def evaluate_ensemble_external(
    ensemble: str | os.PathLike, images: str | os.PathLike, labels: str | os.PathLike, tta: int = 8,
    target_mel_recall: float = 0.8, mel_confidence: float | None = 0.95, name: str | None = None, skip_missing: bool = False,
) -> Evaluation:
    """A mean ensemble scored on an external labelled set, as it decides on its own test split.

    Each member is scored on the set first (``evaluate_run``: its own
    temperature, its outputs ``metrics_NAME.json`` and ``predictions_NAME.csv``
    in its folder); the mean of their calibrated probabilities then gets the
    ensemble's temperature and melanoma threshold (fitted again on the same
    validation predictions, so the same values) and its logit offset, and the
    ensemble's own ``metrics_NAME.json`` and ``predictions_NAME.csv`` are
    written beside its test metrics.
    """
    folder = RunFolder(ensemble)
    manifest = folder.manifest()
    members = [RunFolder(folder.path / m) for m in manifest.get("members", [])]
    if not members:
        raise DataError(f"{folder.path}: not a mean ensemble (no members in its manifest.json)")
    name, external, external_probs, extra = score_runs_external(members, images, labels, tta, name, skip_missing, target_mel_recall, mel_confidence)
    val, val_probs = aligned_probabilities(members, "val")
    offset = manifest.get("logit_offset")
    extra = dict(ensemble=manifest["members"], **extra)
    p_val, p_external = member_mean(val_probs), member_mean(external_probs)
    return score_predictions(folder.path, None, val, p_val, external, p_external, None, target_mel_recall, name, mel_confidence,
                             extra=extra, logit_offset=None if offset is None else np.asarray(offset, dtype=float))
