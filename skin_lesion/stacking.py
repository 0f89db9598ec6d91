"""The decision layer: a class-balanced logistic regression stacked on several
models' log-probabilities, optionally with age, sex and body site.

Lesion-grouped cross-validation on the validation split chooses which models
to stack (every non-empty subset), whether metadata goes in, and the
regularisation; the choice is refitted on all of validation and scored on
test. ``dx_type`` is never an input: it nearly reveals the label.
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from skin_lesion.calibration import decide, mel_recall_at, mel_threshold, operating_point
from skin_lesion.data import label_ids, metadata_features
from skin_lesion.ensemble import aligned_probabilities, score_runs_external
from skin_lesion.evaluate import prediction_table
from skin_lesion.info import CLASSES, DataError
from skin_lesion.metrics import balanced_accuracy, classification_metrics, lesion_bootstrap
from skin_lesion.runs import TEST, RunFolder

log = logging.getLogger("skin_lesion")


def stack_inputs(probs: list[np.ndarray], frame: pd.DataFrame | None, metadata: bool) -> np.ndarray:
    """Log-probabilities of each model side by side, plus metadata when asked."""
    parts = [np.log(np.clip(p, 1e-6, 1)) for p in probs]
    if metadata:
        parts.append(metadata_features(frame))
    return np.column_stack(parts)


def _all_classes(probs: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Columns for every class in CLASSES order (zeros for classes absent from the fit)."""
    out = np.zeros((len(probs), len(CLASSES)))
    out[:, np.asarray(present, dtype=int)] = probs
    return out


@dataclass
class DecisionLayer:
    """A multinomial logistic regression over models' log-probabilities (and
    optionally metadata), class-balanced so it aims at balanced accuracy.
    Fitted on the validation split only; ``mel_threshold`` comes from its
    out-of-fold validation predictions."""

    models: list[str]
    metadata: bool
    C: float
    cv_balanced_accuracy: float
    mel_threshold: float
    candidates: list[dict]
    estimator: object = None
    target_mel_recall: float = 0.8
    mel_confidence: float | None = None
    val_mel_recall: float | None = None  # out-of-fold, at mel_threshold

    def probs(self, probs: dict[str, np.ndarray], frame: pd.DataFrame) -> np.ndarray:
        """Probabilities for rows of ``frame`` from each model's probabilities."""
        p = self.estimator.predict_proba(stack_inputs([probs[m] for m in self.models], frame, self.metadata))
        return _all_classes(p, self.estimator.classes_)

    def summary(self) -> dict:
        keys = ("models", "metadata", "C", "cv_balanced_accuracy", "mel_threshold", "target_mel_recall", "mel_confidence", "val_mel_recall")
        return {k: getattr(self, k) for k in keys}


def _logistic(C: float):
    """Standardised inputs (fast, well-conditioned fits) -> class-balanced multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline as sk_pipeline
    from sklearn.preprocessing import StandardScaler

    return sk_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=2000))


def fit_decision_layer(
    val_probs: dict[str, np.ndarray],
    val: pd.DataFrame,
    Cs: tuple[float, ...] = (0.01, 0.1, 1.0),
    folds: int = 5,
    target_mel_recall: float = 0.8,
    mel_confidence: float | None = 0.95,
    seed: int = 0,
) -> DecisionLayer:
    """Choose, by lesion-grouped cross-validation on the validation split, which
    models to stack (every non-empty subset), with or without metadata, and the
    regularisation C; refit the best on all of validation.

    The candidates include each model alone without metadata, so the ensemble
    and the metadata are kept only when validation says they help; with three
    or more models, every pair is a candidate too, so a weak extra model cannot
    push out a pair that helps.
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, cross_val_predict

    y = label_ids(val["dx"])
    names = list(val_probs)
    sets = [list(c) for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]
    present = np.unique(y)
    counts = np.bincount(y)[present]
    k = max(2, min(folds, int(counts.min())))  # every fold can hold every class
    # When no class has two validation images, stratified folds cannot be cut: plain grouped folds
    # (a fold that misses a class predicts it with probability 0).
    cv = StratifiedGroupKFold(k, shuffle=True, random_state=seed) if counts.max() >= k else GroupKFold(k)
    candidates, best = [], None
    for models_ in sets:
        for metadata in (False, True):
            x = stack_inputs([val_probs[m] for m in models_], val, metadata)
            for C in Cs:
                lr = _logistic(C)
                with warnings.catch_warnings():  # on a small validation split some folds miss a class, as said above
                    warnings.filterwarnings("ignore", "Number of classes in training fold", RuntimeWarning)
                    oof = _all_classes(cross_val_predict(lr, x, y, cv=cv, groups=val["lesion_id"].to_numpy(), method="predict_proba"), present)
                score = balanced_accuracy(y, oof.argmax(1))
                candidates.append(dict(models="+".join(models_), metadata=metadata, C=C, cv_balanced_accuracy=score))
                if best is None or score > best[0]:
                    best = (score, models_, metadata, C, x, oof)
    score, models_, metadata, C, x, oof = best
    estimator = _logistic(C).fit(x, y)
    groups = val["lesion_id"].to_numpy()
    threshold = mel_threshold(oof, y, target_mel_recall, groups, mel_confidence)
    return DecisionLayer(
        list(models_), metadata, C, score, threshold, candidates, estimator,
        target_mel_recall=target_mel_recall, mel_confidence=mel_confidence, val_mel_recall=mel_recall_at(oof, y, threshold),
    )


def score_decision_layer(layer: DecisionLayer, test_probs: dict[str, np.ndarray], test: pd.DataFrame, out: str | os.PathLike | None = None,
                         name: str = TEST, runs: list[RunFolder] | None = None, extra: dict | None = None) -> dict:
    """Test metrics of a fitted decision layer (argmax, and at its melanoma
    threshold); with ``out``, writes ``metrics.json`` and ``predictions.csv``
    there (``metrics_NAME.json`` and ``predictions_NAME.csv`` for an external
    set ``name``) and records ``runs``, the runs it may stack, in its manifest."""
    y = label_ids(test["dx"])
    probs = layer.probs(test_probs, test)
    pred = decide(probs, layer.mel_threshold)
    result = dict(
        decision_layer=layer.summary(),
        candidates=layer.candidates,
        calibrated=classification_metrics(y, probs),
        intervals_95=lesion_bootstrap(y, probs, test["lesion_id"].to_numpy() if "lesion_id" in test else None),
        mel_operating_point=operating_point(y, probs, layer.mel_threshold, layer.target_mel_recall, layer.mel_confidence, layer.val_mel_recall),
        evaluated_on=name,
        **(extra or {}),
    )
    if out is not None:
        RunFolder(out).check_output("decision_layer", runs or [])
        folder = RunFolder(out).mkdir()
        folder.write_json(folder.metrics_file(name), result)
        folder.write_table(folder.predictions_file(name), prediction_table(test, probs, pred))
        fields = dict(kind="decision_layer", models=layer.models)
        if runs is not None:
            fields["stacked_runs"] = [folder.relative(r) for r in runs]
        folder.update_manifest({name: {"metrics": folder.metrics_file(name).name, "predictions": folder.predictions_file(name).name}}, **fields)
        result["files"] = [str(folder.metrics_file(name)), str(folder.predictions_file(name))]
    return result


def stack_runs(runs: list[str | os.PathLike], out: str | os.PathLike, target_mel_recall: float = 0.8, mel_confidence: float | None = 0.95) -> dict:
    """Fit a decision layer on the evaluated runs' validation predictions and
    score it on their shared test split; writes ``metrics.json`` and
    ``predictions.csv`` into ``out``."""
    runs = [RunFolder(r) for r in runs]
    RunFolder(out).check_output("decision_layer", runs)  # before the fit, not after it
    val, val_probs = aligned_probabilities(runs, "val")
    test, test_probs = aligned_probabilities(runs, TEST)
    layer = fit_decision_layer(val_probs, val, target_mel_recall=target_mel_recall, mel_confidence=mel_confidence)
    log.info("Decision layer: %s (validation CV balanced accuracy %.3f)", layer.summary(), layer.cv_balanced_accuracy)
    return score_decision_layer(layer, test_probs, test, out, runs=runs)


def evaluate_stacked_external(
    stacked: str | os.PathLike, images: str | os.PathLike, labels: str | os.PathLike, tta: int = 8, name: str | None = None, skip_missing: bool = False,
) -> dict:
    """A decision layer (``stack --out``) scored on an external labelled set, as it decides on its test split.

    Each run it may stack is scored on the set first (``evaluate_run``: its
    outputs ``metrics_NAME.json`` and ``predictions_NAME.csv`` in its folder);
    the layer is fitted again on the same validation predictions, first (the
    same choice of models, metadata, C, cross-validated score and melanoma
    threshold, which is checked), and its ``metrics_NAME.json`` and
    ``predictions_NAME.csv`` are written beside its test metrics. The
    operating point's target and confidence are the layer's own.
    """
    folder = RunFolder(stacked)
    manifest = folder.manifest()
    if manifest.get("kind") != "decision_layer" or not manifest.get("stacked_runs"):
        raise DataError(f"{folder.path}: not a decision layer that names its runs; make it (again) with `stack RUNS --out {folder.path}`")
    recorded = folder.metrics()["decision_layer"]
    runs = [RunFolder(folder.path / r) for r in manifest["stacked_runs"]]
    target, confidence = recorded["target_mel_recall"], recorded["mel_confidence"]
    val, val_probs = aligned_probabilities(runs, "val")
    layer = fit_decision_layer(val_probs, val, target_mel_recall=target, mel_confidence=confidence)
    fitted = layer.summary()
    if any(fitted[k] != recorded[k] for k in ("models", "metadata", "C")) or any(
            abs(fitted[k] - recorded[k]) > 1e-9 for k in ("mel_threshold", "cv_balanced_accuracy")):
        raise DataError(f"{folder.path}: its runs' validation predictions no longer give the decision layer it recorded; stack them again")
    name, external, external_probs, extra = score_runs_external(runs, images, labels, tta, name, skip_missing, target, confidence)
    return score_decision_layer(layer, external_probs, external, folder.path, name=name, extra=extra)
