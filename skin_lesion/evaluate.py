"""Evaluation: predictions (with test-time augmentation), metrics, calibration,
the melanoma operating point, a decision layer (stacking several models and
metadata), subgroup tables, external label files, k-fold CV.

Everything here is scored on the run's lesion-grouped test split (or an
external set); choices (temperature, melanoma threshold, the decision layer)
are fitted on the validation split only, never on test.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from skin_lesion.data import CLASSES, DataError, corrupt_image, image_index, load_dataset
from skin_lesion.pipeline import label_ids, make_pipeline
from skin_lesion.train import AVERAGE_DIR, TrainConfig, completed_epochs, prepare_split, train, write_derived_run

log = logging.getLogger("skin_lesion")
MEL = CLASSES.index("mel")
ISIC_COLUMNS: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
AGE_BANDS: tuple[int, ...] = (0, 30, 45, 60, 75, 120)
# tau of the study's mean ensemble (``mean_runs(logit_adjust=...)``): chosen on validation
# across seeds 0-3, leave one seed out, by the rule registered in commit 120162f (docs/EXPERIMENTS.md, "Logit adjustment")
STUDY_LOGIT_ADJUST = 0.3


# --------------------------------------------------------------------------- prediction


def dihedral_views(x: tf.Tensor, n: int) -> list[tf.Tensor]:
    """The first ``n`` of the 8 flips/rotations of a batch: lesions have no up or down."""
    views = []
    for k in range(4):
        r = tf.image.rot90(x, k)
        views += [r, tf.image.flip_left_right(r)]
    return views[: max(1, n)]


def tta_function(model: keras.Model, tta: int = 1):
    """One compiled function: a batch in, probabilities averaged over ``tta`` dihedral views out."""

    def probs(x):
        return tf.reduce_mean(tf.stack([model(v, training=False) for v in dihedral_views(x, tta)]), axis=0)

    return tf.function(probs, reduce_retracing=True)


def predict_probs(model: keras.Model, frame: pd.DataFrame, image_size: int, batch_size: int = 32, tta: int = 1) -> np.ndarray:
    """Class probabilities for rows of ``frame`` in order, averaged over ``tta`` dihedral views."""
    pipe = make_pipeline(frame, (image_size, image_size), batch_size, cache=False)  # one pass: a cache would only cost memory
    fn = tta_function(model, tta)
    return np.concatenate([fn(x).numpy() for x, _ in pipe.dataset]).astype("float64")


def load_run_model(run: Path) -> tuple[keras.Model, TrainConfig]:
    """The run's best model (safe mode: no pickle, no arbitrary code) and its config."""
    path = Path(run) / "model.keras"
    if not path.exists():
        raise DataError(f"{path}: no trained model in the run folder; train it first (`python -m skin_lesion train --run {run}`)")
    return keras.models.load_model(path, safe_mode=True, compile=False), TrainConfig.load(Path(run) / "config.json")


def resize_run(run: str | Path, image_size: int, out: str | Path) -> Path:
    """Copy a run into ``out`` with its model taking ``image_size`` px inputs
    (the same weights: the backbones end in global pooling, so any size fits).

    Scoring a model at another size than it was trained at (test-time
    resolution, as in FixRes) is then a run like any other: ``evaluate``,
    ``ensemble`` and ``predict`` take the copy. Its ``config.json`` records the
    new size and ``extra.resized_from``; ``split.csv`` is the run's own."""
    run, out = Path(run), Path(out)
    if image_size < 32:  # the backbones downsample 32-fold
        raise DataError(f"--image-size {image_size}: too small; the models need at least 32 px")
    if out.resolve() == run.resolve():
        raise DataError(f"{out}: resizing a run needs another folder than the run itself; pass --out")
    model, cfg = load_run_model(run)
    inp = keras.Input((image_size, image_size, 3), name="image")
    try:
        sized = keras.models.clone_model(model, input_tensors=[inp] if isinstance(model.input, list) else inp)
        sized.set_weights(model.get_weights())
    except ValueError as e:
        raise DataError(f"{run / 'model.keras'}: this model cannot take {image_size} px inputs ({e})") from e
    out.mkdir(parents=True, exist_ok=True)
    sized.save(out / "model.keras")
    extra = {**cfg.extra, "resized_from": os.path.relpath(run.resolve(), out.resolve())}
    write_derived_run(run, out, image_size=image_size, extra=extra)
    return out


# --------------------------------------------------------------------------- metrics


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """ECE of the top-1 confidence: sum over equal-width bins of |accuracy - confidence| weighted by bin share."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def classification_metrics(y: np.ndarray, probs: np.ndarray, pred: np.ndarray | None = None) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class precision / recall (TPR) /
    specificity (TNR) / F1 / one-vs-rest AUC, macro AUC, confusion matrix, ECE."""
    pred = probs.argmax(1) if pred is None else pred
    labels = list(range(len(CLASSES)))
    cm = confusion_matrix(y, pred, labels=labels)
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    per_class = {}
    aucs = []
    for i, c in enumerate(CLASSES):
        tn = cm.sum() - cm[i].sum() - cm[:, i].sum() + cm[i, i]
        fp = cm[:, i].sum() - cm[i, i]
        auc = float(roc_auc_score(y == i, probs[:, i])) if 0 < (y == i).sum() < len(y) else None
        if auc is not None:
            aucs.append(auc)
        per_class[c] = dict(
            precision=float(prec[i]), recall=float(rec[i]), specificity=float(tn / (tn + fp)) if tn + fp else None,
            f1=float(f1[i]), auc=auc, support=int(support[i]),
        )
    present = np.unique(y)
    return dict(
        n=int(len(y)),
        accuracy=float(accuracy_score(y, pred)),
        balanced_accuracy=float(np.mean([rec[i] for i in present])),
        macro_f1=float(f1_score(y, pred, labels=list(present), average="macro", zero_division=0)),
        macro_auc=float(np.mean(aucs)) if aucs else None,
        mel_recall=per_class["mel"]["recall"] if (y == MEL).any() else None,
        mel_specificity=per_class["mel"]["specificity"],
        ece=expected_calibration_error(probs, y),
        per_class=per_class,
        confusion_matrix=cm.tolist(),
        classes=list(CLASSES),
    )


# --------------------------------------------------------------------------- calibration and operating point


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """Temperature T minimising validation NLL of softmax(log p / T) (grid, then refine)."""
    logp = np.log(np.clip(probs, 1e-12, 1))

    def nll(t: float) -> float:
        z = logp / t
        z = z - z.max(1, keepdims=True)
        return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1))).mean())

    grid = np.exp(np.linspace(np.log(0.25), np.log(8), 60))
    best = grid[np.argmin([nll(t) for t in grid])]
    fine = np.linspace(best * 0.9, best * 1.1, 41)
    return float(fine[np.argmin([nll(t) for t in fine])])


def apply_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    """Rescale probabilities by temperature ``t`` (t > 1 softens over-confident models)."""
    z = np.log(np.clip(probs, 1e-12, 1)) / t
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def train_class_frequency(run: str | Path) -> np.ndarray:
    """Each class's share of the training rows in the run's ``split.csv`` (CLASSES order)."""
    path = Path(run) / "split.csv"
    if not path.exists():
        raise DataError(f"{path}: missing; logit adjustment needs the training split of a run (train it, or pass run folders, not ensembles)")
    split = pd.read_csv(path)
    counts = split.loc[split["split"] == "train", "dx"].value_counts()
    if counts.sum() == 0:
        raise DataError(f"{path}: no training rows; logit adjustment needs a run with a train split (not a k-fold parent)")
    # a class absent from training counts as one image, so its log-frequency stays finite
    freq = np.array([max(int(counts.get(c, 0)), 1) for c in CLASSES], dtype=float)
    return freq / freq.sum()


def _recall_threshold(p_mel: np.ndarray, target_recall: float) -> float:
    """Highest threshold on melanomas' p(mel) that keeps ``target_recall`` of them at or above it."""
    p = np.sort(p_mel)[::-1]
    if len(p) == 0:
        return 0.5
    k = int(np.ceil(target_recall * len(p))) - 1
    return float(p[min(max(k, 0), len(p) - 1)])


def mel_threshold(
    probs: np.ndarray, y: np.ndarray, target_recall: float = 0.8, groups: np.ndarray | None = None, confidence: float | None = None, n: int = 300, seed: int = 0
) -> float:
    """p(mel) threshold for a melanoma operating point chosen on these (validation) rows.

    Without ``confidence``: the highest threshold whose recall on these rows
    reaches ``target_recall``. With ``confidence`` (say 0.95): the threshold is
    lowered until the target is reached in that share of lesion-grouped
    bootstrap resamples of the rows, a margin for the sampling noise of a
    validation split with a few hundred melanomas, wider the fewer it holds.
    """
    point = _recall_threshold(probs[y == MEL, MEL], target_recall)
    if not confidence or not (y == MEL).any():
        return point
    draws = [_recall_threshold(probs[idx][y[idx] == MEL, MEL], target_recall) for idx in lesion_resamples(len(y), groups, n, seed) if (y[idx] == MEL).any()]
    return float(min(point, np.quantile(draws, 1 - confidence)))


def _mel_recall_at(probs: np.ndarray, y: np.ndarray, threshold: float, offset: np.ndarray | None = None) -> float | None:
    """Melanoma recall of ``decide(probs, threshold, offset)`` on these rows (None without melanomas)."""
    return float((decide(probs, threshold, offset)[y == MEL] == MEL).mean()) if (y == MEL).any() else None


def operating_point(
    y: np.ndarray, probs: np.ndarray, threshold: float, target_recall: float, confidence: float | None, val_mel_recall: float | None,
    offset: np.ndarray | None = None,
) -> dict:
    """The ``mel_operating_point`` record: how the threshold was chosen on
    validation, and accuracy, balanced accuracy, macro-F1 and melanoma
    recall / specificity on these (test) rows when it decides."""
    at = classification_metrics(y, probs, decide(probs, threshold, offset))
    return dict(
        threshold=threshold, target_recall_on_val=target_recall, confidence=confidence, val_mel_recall=val_mel_recall,
        **{k: at[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "mel_recall", "mel_specificity")},
    )


def decide(probs: np.ndarray, threshold: float | None, offset: np.ndarray | None = None) -> np.ndarray:
    """Predicted class: melanoma when p(mel) reaches the threshold, else the most probable
    class -- with a per-class log ``offset`` (logit adjustment), the argmax of log p + offset."""
    pred = probs.argmax(1) if offset is None else (np.log(np.clip(probs, 1e-12, 1)) + np.asarray(offset, dtype=float)).argmax(1)
    if threshold is not None:
        pred = np.where(probs[:, MEL] >= threshold, MEL, pred)
    return pred


# --------------------------------------------------------------------------- decision layer: stacking and metadata fusion

# HAM10000's body sites; any other value (or "unknown") is encoded as no site.
SITES: tuple[str, ...] = (
    "abdomen", "acral", "back", "chest", "ear", "face", "foot", "genital", "hand", "lower extremity", "neck", "scalp", "trunk", "upper extremity",
)


def metadata_features(frame: pd.DataFrame) -> np.ndarray:
    """Age (scaled, squared, missing flag), sex and body site one-hot: what a
    clinician knows before the biopsy. Never ``dx_type``, which reveals the label."""
    def column(name: str) -> pd.Series:  # an absent column reads as all unknown
        return frame[name] if name in frame else pd.Series([None] * len(frame), index=frame.index)

    age = pd.to_numeric(column("age"), errors="coerce").to_numpy(dtype=float)
    missing = np.isnan(age)
    a = np.where(missing, 50.0, age) / 100
    sex = np.stack([column("sex").eq(s).to_numpy() for s in ("male", "female")], 1)
    site = np.stack([column("localization").eq(s).to_numpy() for s in SITES], 1)
    return np.column_stack([a, a**2, missing, sex, site]).astype(float)


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
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict

    y = label_ids(val["dx"])
    names = list(val_probs)
    sets = [list(c) for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]
    present = np.unique(y)
    k = max(2, min(folds, int(np.bincount(y)[present].min())))  # every fold can hold every class
    cv = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
    candidates, best = [], None
    for models_ in sets:
        for metadata in (False, True):
            x = stack_inputs([val_probs[m] for m in models_], val, metadata)
            for C in Cs:
                lr = _logistic(C)
                oof = _all_classes(cross_val_predict(lr, x, y, cv=cv, groups=val["lesion_id"].to_numpy(), method="predict_proba"), present)
                score = float(balanced_accuracy_score(y, oof.argmax(1)))
                candidates.append(dict(models="+".join(models_), metadata=metadata, C=C, cv_balanced_accuracy=score))
                if best is None or score > best[0]:
                    best = (score, models_, metadata, C, x, oof)
    score, models_, metadata, C, x, oof = best
    estimator = _logistic(C).fit(x, y)
    groups = val["lesion_id"].to_numpy()
    threshold = mel_threshold(oof, y, target_mel_recall, groups, mel_confidence)
    return DecisionLayer(
        list(models_), metadata, C, score, threshold, candidates, estimator,
        target_mel_recall=target_mel_recall, mel_confidence=mel_confidence, val_mel_recall=_mel_recall_at(oof, y, threshold),
    )


def score_decision_layer(layer: DecisionLayer, test_probs: dict[str, np.ndarray], test: pd.DataFrame, out: Path | None = None) -> dict:
    """Test metrics of a fitted decision layer (argmax, and at its melanoma
    threshold); with ``out``, writes ``metrics.json`` and ``predictions.csv`` there."""
    y = label_ids(test["dx"])
    probs = layer.probs(test_probs, test)
    pred = decide(probs, layer.mel_threshold)
    result = dict(
        decision_layer=layer.summary(),
        candidates=layer.candidates,
        calibrated=classification_metrics(y, probs),
        intervals_95=lesion_bootstrap(y, probs, test["lesion_id"].to_numpy() if "lesion_id" in test else None),
        mel_operating_point=operating_point(y, probs, layer.mel_threshold, layer.target_mel_recall, layer.mel_confidence, layer.val_mel_recall),
    )
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        prediction_table(test, probs, pred).to_csv(out / "predictions.csv", index=False)
    return result


def run_probabilities(run: Path, split: str) -> tuple[pd.DataFrame, np.ndarray]:
    """A run's saved calibrated probabilities (``predictions.csv`` for test,
    ``predictions_val.csv`` for validation) and the rows they belong to."""
    path = Path(run) / ("predictions.csv" if split == "test" else f"predictions_{split}.csv")
    if not path.exists():
        raise DataError(f"{path}: no saved predictions; evaluate the run first (`python -m skin_lesion evaluate --run {run}`)")
    table = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str})
    return table, table[list(CLASSES)].to_numpy(dtype=float)


def run_label(run: str | Path) -> str:
    """A run's name in tables: its folder, with the parent's for a weight-averaged sub-run (``RUN/average``)."""
    run = Path(run)
    return f"{run.parent.name}/{run.name}" if run.name == AVERAGE_DIR else run.name


def aligned_probabilities(runs: list[Path], split: str) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Each run's probabilities on ``split``, rows aligned by ``image_id`` to the first run's."""
    base, first = run_probabilities(runs[0], split)
    out = {run_label(runs[0]): first}
    for run in runs[1:]:
        table, _ = run_probabilities(run, split)
        merged = base[["image_id"]].merge(table, on="image_id", how="left")
        if merged[list(CLASSES)].isna().any().any():
            raise DataError(f"{run}: its {split} rows differ from {runs[0]}'s; stack runs that share a split")
        out[run_label(run)] = merged[list(CLASSES)].to_numpy(dtype=float)
    return base, out


def stack_runs(runs: list[str | Path], out: str | Path, target_mel_recall: float = 0.8, mel_confidence: float | None = 0.95) -> dict:
    """Fit a decision layer on the evaluated runs' validation predictions and
    score it on their shared test split; writes ``metrics.json`` and
    ``predictions.csv`` into ``out``."""
    runs = [Path(r) for r in runs]
    val, val_probs = aligned_probabilities(runs, "val")
    test, test_probs = aligned_probabilities(runs, "test")
    layer = fit_decision_layer(val_probs, val, target_mel_recall=target_mel_recall, mel_confidence=mel_confidence)
    log.info("Decision layer: %s (validation CV balanced accuracy %.3f)", layer.summary(), layer.cv_balanced_accuracy)
    return score_decision_layer(layer, test_probs, test, out)


def mean_runs(
    runs: list[str | Path], out: str | Path, target_mel_recall: float = 0.8, mel_confidence: float | None = 0.95, logit_adjust: float = 0.0
) -> dict:
    """The mean ensemble of evaluated runs that share a split: the mean of their
    temperature-scaled probabilities, argmax, with a melanoma threshold chosen on
    validation as for a single run. Nothing but that threshold (and a
    temperature for the mean, which leaves the argmax as it is) is fitted on
    validation, so unlike the decision layer it has next to nothing to overfit
    a small split with.

    ``logit_adjust`` (tau, Menon et al.'s post-hoc logit adjustment) changes
    the decision rule: the label is the argmax of the calibrated mean's
    log-probabilities minus tau * log(training class frequency), which moves
    decisions towards rare classes; the probabilities (AUC, ECE, what
    ``predict`` shows) stay the calibrated mean. The study uses
    ``STUDY_LOGIT_ADJUST``, chosen across seeds on validation (docs/EXPERIMENTS.md,
    "Logit adjustment").

    Writes ``metrics.json`` (with ``ensemble``: the member runs, and
    ``logit_adjust`` when tau is not 0), ``predictions.csv`` and
    ``predictions_val.csv`` into ``out``, so the result summarizes, stacks and
    predicts like a run.
    """
    runs, out = [Path(r) for r in runs], Path(out)
    val, val_probs = aligned_probabilities(runs, "val")
    test, test_probs = aligned_probabilities(runs, "test")
    p_val, p_test = (np.mean(list(p.values()), axis=0) for p in (val_probs, test_probs))
    # members relative to the ensemble's folder, so a runs tree can move as a whole
    extra: dict = dict(ensemble=[os.path.relpath(r.resolve(), out.resolve()) for r in runs])
    offset = None
    if logit_adjust:
        freq = train_class_frequency(runs[0])
        offset = -float(logit_adjust) * np.log(freq)
        extra["logit_adjust"] = dict(tau=float(logit_adjust), train_class_frequency=freq.tolist(), offset=offset.tolist())
    # tta_views None: the members' saved probabilities carry their own TTA (in their metrics.json)
    return score_predictions(out, None, val, p_val, test, p_test, None, target_mel_recall, "test", mel_confidence, extra=extra, logit_offset=offset)


def logit_adjust_scan(ensembles: list[str | Path], taus: list[float] | np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validation balanced accuracy of mean ensembles (one per seed, say) under
    logit adjustment ``tau``, from their saved validation probabilities (which
    no tau changes) and their first member's training class shares.

    Returns the table (one row per tau, one column per ensemble, and ``mean``)
    and a leave-one-out check: for each ensemble, the tau that is best on the
    others' mean, and what it and tau = 0 score on the held-out one -- how a
    tau chosen this way does on data it was not chosen on. Test is not read.
    """
    scores, plain, taus = {}, {}, [float(t) + 0.0 for t in taus]  # + 0.0: no -0.0 in the index
    for folder in map(Path, ensembles):
        val, probs = run_probabilities(folder, "val")
        y = label_ids(val["dx"])
        members = _member_folders(folder)
        if not members:
            raise DataError(f"{folder / 'metrics.json'}: not a mean ensemble (no members); pass `ensemble` output folders")
        offset = -np.log(train_class_frequency(members[0]))
        scores[str(folder)] = [mean_recall(y, decide(probs, None, tau * offset)) for tau in taus]
        plain[str(folder)] = mean_recall(y, probs.argmax(1))
    table = pd.DataFrame(scores, index=pd.Index(taus, name="tau"))
    rows = []
    for name in table.columns:
        others = table.drop(columns=name).mean(axis=1) if len(table.columns) > 1 else table[name]
        tau = float(others.idxmax())
        rows.append(dict(held_out=name, tau=tau, balanced_accuracy=float(table.loc[tau, name]), at_tau_0=plain[name]))
    return table.assign(mean=table.mean(axis=1)), pd.DataFrame(rows)


def _member_folders(folder: Path) -> list[Path]:
    """The member folders a mean ensemble's ``metrics.json`` lists, as they are recorded."""
    return [folder / m for m in json.loads((folder / "metrics.json").read_text()).get("ensemble", [])]


def ensemble_members(folder: str | Path) -> list[Path]:
    """The member runs of a mean ensemble's folder (``mean_runs``); [] for anything else."""
    folder = Path(folder)
    members = _member_folders(folder)
    for m in members:
        if not (m / "model.keras").exists():
            raise DataError(f"{folder / 'metrics.json'}: its member run {m} has no model.keras; move the runs tree as a whole or rerun `ensemble`")
    return members


# --------------------------------------------------------------------------- spread over seeds and folds

SUMMARY_COLUMNS: tuple[str, ...] = ("balanced_accuracy", "accuracy", "macro_f1", "macro_auc", "mel_recall", "ece", "op_mel_recall", "op_mel_specificity", "train_minutes")


def _training_run(run: Path) -> Path:
    """The run whose epochs produced ``run``: itself, or for a weight average
    (``RUN/average``, which has no history of its own) the run that wrote it."""
    if not (run / "history.csv").exists() and run.name == AVERAGE_DIR and (run.parent / "history.csv").exists():
        return run.parent
    return run


def training_minutes(run: str | Path) -> float:
    """Minutes of training epochs (validation passes included) behind ``run``:
    the sum of its ``history.csv``'s ``epoch_seconds``; for a mean ensemble, the
    sum over its distinct training runs (a weight average adds nothing to its
    run's). NaN where any of them predates that record (runs before 2026-12-03)
    or has no history (a decision layer, a resized copy)."""
    run = Path(run)
    members = _member_folders(run) if (run / "metrics.json").exists() else []
    total = 0.0
    for trained in {_training_run(m).resolve() for m in members} or {_training_run(run)}:
        history = trained / "history.csv"
        columns = pd.read_csv(history) if history.exists() else pd.DataFrame()
        if "epoch_seconds" not in columns or columns["epoch_seconds"].isna().any():
            return float("nan")
        total += float(columns["epoch_seconds"].sum())
    return total / 60


def summarize_runs(runs: list[str | Path]) -> pd.DataFrame:
    """Headline test metrics of evaluated runs (or ``stack`` outputs), one row
    each, then ``mean`` and ``sd`` rows: the spread over seeds, splits or folds.

    Calibrated argmax metrics, the melanoma operating point (``op_``), and the
    minutes of training epochs behind each (``train_minutes``, see ``training_minutes``).
    """
    rows = {}
    for run in map(Path, runs):
        path = run / "metrics.json"
        if not path.exists():
            raise DataError(f"{path}: missing; evaluate the run (`python -m skin_lesion evaluate --run {run}`) or stack it first")
        m = json.loads(path.read_text())
        c, op = m["calibrated"], m.get("mel_operating_point", {})
        row = {k: c.get(k) for k in SUMMARY_COLUMNS[:6]}
        row.update(op_mel_recall=op.get("mel_recall"), op_mel_specificity=op.get("mel_specificity"), train_minutes=training_minutes(run))
        rows[str(run)] = row
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(SUMMARY_COLUMNS)).astype(float)
    if len(table) > 1:
        runs_only = table.iloc[: len(rows)]
        table.loc["mean"] = runs_only.mean()
        table.loc["sd"] = runs_only.std(ddof=1)
        if runs_only["train_minutes"].isna().any():  # no mean time where some runs did not record theirs
            table.loc[["mean", "sd"], "train_minutes"] = np.nan
    return table


# --------------------------------------------------------------------------- subgroups


def age_band(age: pd.Series) -> pd.Series:
    """Age bands (<30, 30-44, 45-59, 60-74, 75+, unknown) for fairness tables."""
    labels = ["<30", "30-44", "45-59", "60-74", "75+"]
    bands = pd.cut(pd.to_numeric(age, errors="coerce"), AGE_BANDS, right=False, labels=labels).astype(object)
    return bands.where(bands.notna(), "unknown")


def bootstrap_ci(values: np.ndarray, stat, n: int = 300, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of ``stat`` over rows of ``values``."""
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n):
        idx = rng.integers(0, len(values), len(values))
        s = stat(values[idx])
        if s is not None and np.isfinite(s):
            stats.append(s)
    return (float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))) if stats else (np.nan, np.nan)


def mean_recall(y: np.ndarray, pred: np.ndarray) -> float:
    """Balanced accuracy over the classes present in ``y`` (sklearn's score without its
    warning when ``pred`` holds other classes, which is routine in resamples and small groups)."""
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def lesion_resamples(n_rows: int, groups: np.ndarray | None = None, n: int = 300, seed: int = 0):
    """Yield ``n`` bootstrap row indices that draw whole lesions (rows sharing a
    group), since images of one lesion are not independent; no groups: rows."""
    codes = pd.factorize(pd.Series(groups if groups is not None else np.arange(n_rows)))[0]
    order = np.argsort(codes, kind="stable")
    members = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])


def lesion_bootstrap(
    y: np.ndarray, probs: np.ndarray, groups: np.ndarray | None = None, n: int = 300, seed: int = 0, pred: np.ndarray | None = None
) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of balanced accuracy, macro AUC and melanoma
    recall (of ``pred``, by default the argmax), resampling whole lesions."""
    draws: dict[str, list[float]] = {"balanced_accuracy": [], "macro_auc": [], "mel_recall": []}
    pred = probs.argmax(1) if pred is None else pred
    for idx in lesion_resamples(len(y), groups, n, seed):
        yy, pp, pr = y[idx], probs[idx], pred[idx]
        draws["balanced_accuracy"].append(mean_recall(yy, pr))
        aucs = [roc_auc_score(yy == c, pp[:, c]) for c in np.unique(yy) if 0 < (yy == c).sum() < len(yy)]
        if aucs:
            draws["macro_auc"].append(float(np.mean(aucs)))
        if (yy == MEL).any():
            draws["mel_recall"].append(float((pr[yy == MEL] == MEL).mean()))
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in draws.items() if v}


def subgroup_table(pred: pd.DataFrame, by: str, min_n: int = 1) -> pd.DataFrame:
    """Per group of column ``by``: images, melanomas, balanced accuracy, melanoma
    recall and ECE, each rate with a 95% bootstrap interval."""
    rows = []
    for group, g in pred.groupby(by, observed=True):
        if len(g) < min_n:
            continue
        y = g["y"].to_numpy()
        probs = g[list(CLASSES)].to_numpy()
        yp = np.column_stack([y, g["pred"].to_numpy(), np.arange(len(g))])

        def bal(a):
            return mean_recall(a[:, 0], a[:, 1]) if len(a) else None

        def mel_rec(a):
            m = a[:, 0] == MEL
            return (a[m, 1] == MEL).mean() if m.any() else None

        def ece(a, probs=probs):
            return expected_calibration_error(probs[a[:, 2]], a[:, 0])

        row = dict(group=group, n=len(g), melanomas=int((y == MEL).sum()))
        for name, fn in (("balanced_accuracy", bal), ("mel_recall", mel_rec), ("ece", ece)):
            value = fn(yp)
            lo, hi = bootstrap_ci(yp, fn) if value is not None else (np.nan, np.nan)
            row.update({name: np.nan if value is None else float(value), f"{name}_lo": lo, f"{name}_hi": hi})
        rows.append(row)
    return pd.DataFrame(rows).assign(by=by)


# --------------------------------------------------------------------------- external labels


def read_labels(csv: Path) -> pd.DataFrame:
    """External labels as ``image_id, dx``: HAM-style (image_id,dx) or ISIC one-hot
    (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC)."""
    csv = Path(csv)
    if not csv.exists():
        raise DataError(f"{csv}: labels file not found")
    df = pd.read_csv(csv, dtype={"image_id": str, "image": str})
    if {"image_id", "dx"} <= set(df.columns):
        out = df[["image_id", "dx"]].copy()
    elif {"image", *ISIC_COLUMNS} <= set(df.columns):
        onehot = df[list(ISIC_COLUMNS)].to_numpy(dtype=float)
        if not np.allclose(onehot.sum(1), 1):
            raise DataError(f"{csv}: ISIC one-hot rows must sum to 1 (rows {np.where(~np.isclose(onehot.sum(1), 1))[0][:5].tolist()})")
        out = pd.DataFrame({"image_id": df["image"], "dx": [ISIC_COLUMNS[i].lower() for i in onehot.argmax(1)]})
    else:
        raise DataError(f"{csv}: unknown label format; expected columns image_id,dx or image,{','.join(ISIC_COLUMNS)}")
    bad = sorted(set(out["dx"]) - set(CLASSES))
    if bad:
        raise DataError(f"{csv}: unknown dx label(s) {bad}; allowed: {', '.join(CLASSES)}")
    return out


def external_frame(images: Path, labels: Path) -> pd.DataFrame:
    """Rows (image_id, dx, path) of an external set; listed images must exist."""
    table = read_labels(labels)
    images = Path(images)
    if not images.is_dir():
        raise DataError(f"{images}: image folder not found")
    index = {p.stem: p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    index.update(image_index(images))
    missing = [i for i in table["image_id"] if i not in index]
    if missing:
        raise DataError(f"{images}: {len(missing)} labelled image(s) absent, e.g. {missing[0]}")
    table["path"] = [str(index[i]) for i in table["image_id"]]
    bad = [p for p in (corrupt_image(Path(x)) for x in table["path"]) if p]
    if bad:
        raise DataError(bad[0])
    return table


# --------------------------------------------------------------------------- whole runs


def run_frames(run: Path) -> tuple[pd.DataFrame, TrainConfig]:
    """The run's metadata with its ``split`` column, from ``split.csv`` and ``config.json``."""
    cfg = TrainConfig.load(Path(run) / "config.json")
    ds = load_dataset(cfg.data)
    return prepare_split(cfg, ds, Path(run)), cfg


def evaluate_run(
    run: str | Path,
    images: Path | None = None,
    labels: Path | None = None,
    tta: int = 8,
    target_mel_recall: float = 0.8,
    mel_confidence: float | None = 0.95,
    out_name: str | None = None,
) -> dict:
    """Score a run on its test split (or an external set) and write ``metrics.json``
    and ``predictions.csv`` into the run folder.

    Reported: raw argmax metrics, calibrated metrics (temperature fitted on
    validation), and the melanoma operating point (threshold chosen on
    validation for ``target_mel_recall`` with ``mel_confidence``; see ``mel_threshold``).
    """
    run = Path(run)
    model, cfg = load_run_model(run)
    meta, _ = run_frames(run)
    val = meta[meta["split"] == "val"]
    test = external_frame(images, labels) if images else meta[meta["split"] == "test"]
    p_val = predict_probs(model, val, cfg.image_size, tta=tta)
    p_test = predict_probs(model, test, cfg.image_size, tta=tta)
    name = out_name or ("external" if images else "test")
    return score_predictions(run, cfg, val, p_val, test, p_test, tta, target_mel_recall, name, mel_confidence)


def score_predictions(
    run: Path,
    cfg: TrainConfig | None,
    val: pd.DataFrame,
    p_val: np.ndarray,
    test: pd.DataFrame,
    p_test: np.ndarray,
    tta: int | None,
    target_mel_recall: float,
    name: str,
    mel_confidence: float | None = 0.95,
    extra: dict | None = None,
    logit_offset: np.ndarray | None = None,
) -> dict:
    """Metrics, calibration and operating point from validation and test probabilities
    (plus ``extra`` keys for ``metrics.json``); writes files.

    ``logit_offset`` (per class) changes the decision rule, not the probabilities:
    the label is the argmax of the calibrated log-probabilities plus the offset
    (``decide``), so the argmax metrics, the operating point and the predicted
    labels use it, while AUC and ECE stay those of the calibrated probabilities.
    ``raw`` is the plain argmax before temperature and offset."""
    y_val, y_test = label_ids(val["dx"]), label_ids(test["dx"])
    t = fit_temperature(p_val, y_val)
    cal_test = apply_temperature(p_test, t)
    cal_val = apply_temperature(p_val, t)
    thr = mel_threshold(cal_val, y_val, target_mel_recall, val["lesion_id"].to_numpy() if "lesion_id" in val else None, mel_confidence)
    label_test, label_val = decide(cal_test, None, logit_offset), decide(cal_val, None, logit_offset)
    pred = decide(cal_test, thr, logit_offset)
    result = dict(
        run=str(run),
        config=asdict(cfg) if cfg else None,
        evaluated_on=name,
        tta_views=tta,
        raw=classification_metrics(y_test, p_test),
        temperature=t,
        calibrated=classification_metrics(y_test, cal_test, label_test),
        mel_operating_point=operating_point(
            y_test, cal_test, thr, target_mel_recall, mel_confidence, _mel_recall_at(cal_val, y_val, thr, logit_offset), logit_offset
        ),
        validation=classification_metrics(y_val, cal_val, label_val),
        intervals_95=lesion_bootstrap(y_test, cal_test, test["lesion_id"].to_numpy() if "lesion_id" in test else None, pred=label_test),
        **(extra or {}),
    )
    run.mkdir(parents=True, exist_ok=True)
    suffix = "" if name == "test" else f"_{name}"
    (run / f"metrics{suffix}.json").write_text(json.dumps(result, indent=2))
    prediction_table(test, cal_test, pred).to_csv(run / f"predictions{suffix}.csv", index=False)
    if name == "test":  # what a decision layer over several runs is fitted on
        prediction_table(val, cal_val, decide(cal_val, thr, logit_offset)).to_csv(run / "predictions_val.csv", index=False)
    return result


def prediction_table(frame: pd.DataFrame, probs: np.ndarray, pred: np.ndarray) -> pd.DataFrame:
    """The standard predictions file: image_id, true label, predicted label, 7 probabilities, metadata."""
    out = pd.DataFrame({"image_id": frame["image_id"].to_numpy(), "dx": frame["dx"].to_numpy(), "pred_dx": [CLASSES[i] for i in pred]})
    for i, c in enumerate(CLASSES):
        out[c] = probs[:, i]
    for col in ("lesion_id", "age", "sex", "localization"):
        if col in frame:
            out[col] = frame[col].to_numpy()
    return out


def cross_validate(cfg: TrainConfig, k: int, tta: int = 8, verbose: int | str = "auto") -> dict:
    """k-fold CV grouped by lesion: one sub-run per fold (``RUN/foldI``), then
    per-fold and mean +/- sd metrics in ``RUN/cv_metrics.json``."""
    root = Path(cfg.run)
    root.mkdir(parents=True, exist_ok=True)
    per_fold = []
    for f in range(k):
        sub_run = root / f"fold{f}"
        sub = TrainConfig(**{**asdict(cfg), "folds": k, "fold": f, "run": str(sub_run)})
        if not (sub_run / "config.json").exists():
            train(sub, verbose=verbose)
        elif completed_epochs(sub_run) < TrainConfig.load(sub_run / "config.json").epochs:
            train(sub, resume=True, verbose=verbose)  # a stopped CV picks up where it was
        metrics = evaluate_run(sub_run, tta=tta)
        per_fold.append(metrics)
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "mel_recall", "ece")
    summary = {}
    for key in keys:
        vals = [m["calibrated"][key] for m in per_fold if m["calibrated"][key] is not None]
        summary[key] = dict(mean=float(np.mean(vals)), sd=float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, folds=vals)
    out = dict(k=k, summary=summary, folds=[m["calibrated"] for m in per_fold])
    (root / "cv_metrics.json").write_text(json.dumps(out, indent=2))
    return out


# --------------------------------------------------------------------------- single images


class ImageError(Exception):
    """An input file that is not a readable image: the message names it."""


def read_image(path: str | Path, image_size: int) -> np.ndarray:
    """Any JPEG/PNG of any size as a float32 (size, size, 3) array in [0, 255]:
    grayscale and RGBA converted to RGB, resized as in training."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError as e:
        raise ImageError(f"{path}: file not found") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}); pass a JPEG or PNG file") from e
    img = tf.image.resize(rgb, (image_size, image_size), antialias=True)
    return tf.round(tf.clip_by_value(img, 0, 255)).numpy().astype("float32")


class Predictor:
    """Scores single images fast: each model behind one compiled function, with
    its run's fitted temperature applied when the run has been evaluated.

    ``run`` is a run folder, or a mean ensemble's folder (``ensemble``): then
    every member scores the image at its own input size, and the mean of their
    calibrated probabilities gets the ensemble's temperature, exactly as
    ``mean_runs`` scored the test split.
    """

    def __init__(self, run: str | Path, tta: int = 1):
        run = Path(run)
        members = ensemble_members(run) if (run / "metrics.json").exists() else []
        self.runs = members or [run]
        self.members = []
        for member in self.runs:
            model, cfg = load_run_model(member)
            self.members.append((tta_function(model, tta), cfg, _saved_temperature(member)))
        # a mean ensemble's own temperature goes on the mean of its members' calibrated probabilities;
        # its logit adjustment, if it has one, moves only the decided label (``label``)
        self.temperature = _saved_temperature(run) if members else 1.0
        self.offset = _saved_logit_offset(run) if members else None
        self.cfg = self.members[0][1]
        self.sizes = sorted({cfg.image_size for _, cfg, _ in self.members})
        self._all_members = self._one_graph()

    def _one_graph(self):
        """Every member behind one compiled function, one input per size: TensorFlow
        then runs the members side by side, where calling them one after another
        leaves cores idle (on 2 cores, the study's four members: 28 ms against 39)."""
        fns = [(fn, self.sizes.index(cfg.image_size)) for fn, cfg, _ in self.members]

        def all_members(*inputs):
            return [fn(inputs[i]) for fn, i in fns]

        return tf.function(all_members, reduce_retracing=True)

    def _mean(self, batches: dict[int, np.ndarray]) -> np.ndarray:
        """Mean of the members' calibrated probabilities, each fed the batch at its input size."""
        outs = self._all_members(*[tf.convert_to_tensor(batches[s], tf.float32) for s in self.sizes])
        out = [apply_temperature(o.numpy(), t) for o, (_, _, t) in zip(outs, self.members)]
        return apply_temperature(np.mean(out, axis=0), self.temperature)

    def probs(self, images: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities for a batch of (size, size, 3) images at ``cfg.image_size``
        (an ensemble whose members differ in size takes files: ``probs_file``)."""
        if len(self.sizes) > 1:
            raise ValueError("this ensemble's members take different input sizes; score files with probs_file")
        return self._mean({self.cfg.image_size: images})

    def probs_file(self, path: str | Path) -> np.ndarray:
        """Calibrated class probabilities for one image file (read once per input size)."""
        return self._mean({size: read_image(path, size)[None] for size in self.sizes})[0]

    def label(self, probs: np.ndarray) -> str:
        """The decided class for one image's probabilities: the argmax, or for an
        ensemble with a logit adjustment the argmax of log p + its offset."""
        return CLASSES[int(decide(np.asarray(probs)[None], None, self.offset)[0])]

    def predict_file(self, path: str | Path, top: int = 3) -> list[tuple[str, float]]:
        """Top ``top`` (class, probability) for one image file."""
        return top_classes(self.probs_file(path), top)


def top_classes(probs: np.ndarray, top: int = 3) -> list[tuple[str, float]]:
    """The ``top`` most probable (class, probability) pairs of one image's probabilities."""
    order = np.argsort(-probs)[:top]
    return [(CLASSES[i], float(probs[i])) for i in order]


def _saved_logit_offset(run: Path) -> np.ndarray | None:
    """A mean ensemble's per-class logit offset (``mean_runs(logit_adjust=...)``); None if it has none."""
    adjust = json.loads((Path(run) / "metrics.json").read_text()).get("logit_adjust")
    return np.asarray(adjust["offset"], dtype=float) if adjust else None


def _saved_temperature(run: Path) -> float:
    """The temperature fitted on validation when the run (or ensemble) was evaluated; 1 if it was not."""
    metrics = Path(run) / "metrics.json"
    return float(json.loads(metrics.read_text()).get("temperature", 1.0)) if metrics.exists() else 1.0
