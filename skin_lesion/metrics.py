"""Metrics in NumPy (and scikit-learn): per-class and headline scores, calibration
error, the lesion-grouped bootstrap, and subgroup tables for fairness.

Nothing here knows about models or files: every function takes labels and
probabilities as arrays, so it works for a run, an ensemble or a new experiment.
Images of one lesion are not independent, so every interval resamples whole
lesions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from skin_lesion.data import label_ids
from skin_lesion.info import AGE_BANDS, AGE_EDGES, CLASSES, MEL

# The headline metrics, in the order tables and figures show them.
HEADLINE: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "mel_recall")


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y`` (the ISIC metric);
    classes only in ``pred`` count as errors, not as classes (routine in small groups)."""
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


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


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC of ``score`` for the boolean ``positive`` (None unless both kinds are present).

    The Mann-Whitney form, ties counting one half: the value scikit-learn's
    ``roc_auc_score`` gives, at a fraction of its cost, which matters in the
    bootstrap (seven classes times 300 resamples per evaluation)."""
    positive, score = np.asarray(positive, dtype=bool), np.asarray(score, dtype=float)
    if not np.isfinite(score).all():
        raise ValueError("AUC: the scores hold NaN or infinite values")
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc(y: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean one-vs-rest AUC over the classes present in ``y`` that are not all of it (None if none)."""
    aucs = [a for a in (binary_auc(y == c, probs[:, c]) for c in np.unique(y)) if a is not None]
    return float(np.mean(aucs)) if aucs else None


def classification_metrics(y: np.ndarray, probs: np.ndarray, pred: np.ndarray | None = None) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class precision / recall (TPR) /
    specificity (TNR) / F1 / one-vs-rest AUC, macro AUC, confusion matrix, ECE.
    ``pred`` (default the argmax) is the decided label, where a decision rule moves it."""
    pred = probs.argmax(1) if pred is None else pred
    labels = list(range(len(CLASSES)))
    cm = confusion_matrix(y, pred, labels=labels)
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    per_class = {}
    aucs = []
    for i, c in enumerate(CLASSES):
        tn = cm.sum() - cm[i].sum() - cm[:, i].sum() + cm[i, i]
        fp = cm[:, i].sum() - cm[i, i]
        auc = binary_auc(y == i, probs[:, i])
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


# --------------------------------------------------------------------------- the lesion-grouped bootstrap


def lesion_resamples(n_rows: int, groups: np.ndarray | None = None, n: int = 300, seed: int = 0) -> Iterator[np.ndarray]:
    """Yield ``n`` bootstrap row indices that draw whole lesions (rows sharing a
    group), since images of one lesion are not independent; no groups: rows."""
    codes = pd.factorize(pd.Series(groups if groups is not None else np.arange(n_rows)))[0]
    order = np.argsort(codes, kind="stable")
    members = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])


def percentile_interval(draws: list[float]) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap draws (NaN, NaN without any)."""
    return (float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))) if draws else (np.nan, np.nan)


def lesion_bootstrap(
    y: np.ndarray, probs: np.ndarray, groups: np.ndarray | None = None, n: int = 300, seed: int = 0, pred: np.ndarray | None = None
) -> dict[str, tuple[float, float]]:
    """95% percentile intervals of balanced accuracy, macro AUC and melanoma
    recall (of ``pred``, by default the argmax), resampling whole lesions."""
    draws: dict[str, list[float]] = {"balanced_accuracy": [], "macro_auc": [], "mel_recall": []}
    pred = probs.argmax(1) if pred is None else pred
    for idx in lesion_resamples(len(y), groups, n, seed):
        yy, pp, pr = y[idx], probs[idx], pred[idx]
        draws["balanced_accuracy"].append(balanced_accuracy(yy, pr))
        auc = macro_auc(yy, pp)
        if auc is not None:
            draws["macro_auc"].append(auc)
        if (yy == MEL).any():
            draws["mel_recall"].append(float((pr[yy == MEL] == MEL).mean()))
    return {k: percentile_interval(v) for k, v in draws.items() if v}


def lesion_interval(stat: Callable[[np.ndarray], float | None], n_rows: int, groups: np.ndarray | None, n: int = 300, seed: int = 0) -> tuple[float, float]:
    """95% interval of ``stat(row indices)`` over lesion-grouped resamples (draws where it is undefined are left out)."""
    draws = [s for s in (stat(idx) for idx in lesion_resamples(n_rows, groups, n, seed)) if s is not None and np.isfinite(s)]
    return percentile_interval(draws)


# --------------------------------------------------------------------------- subgroups


def age_band(age: pd.Series) -> pd.Series:
    """Age bands (<30, 30-44, 45-59, 60-74, 75+, unknown) for fairness tables."""
    bands = pd.cut(pd.to_numeric(age, errors="coerce"), AGE_EDGES, right=False, labels=list(AGE_BANDS[:-1])).astype(object)
    return bands.where(bands.notna(), AGE_BANDS[-1])


def subgroup_table(pred: pd.DataFrame, by: str, min_n: int = 1) -> pd.DataFrame:
    """Per group of column ``by`` of a predictions table: images, melanomas,
    balanced accuracy, melanoma recall and ECE, each with a 95% interval that
    resamples the group's lesions (``lesion_id``, else rows)."""
    rows = []
    for group, g in pred.groupby(by, observed=True):
        if len(g) < min_n:
            continue
        y, p = label_ids(g["dx"]), label_ids(g["pred_dx"])
        probs = g[list(CLASSES)].to_numpy()
        lesions = g["lesion_id"].to_numpy() if "lesion_id" in g else None
        stats = {
            "balanced_accuracy": lambda i, y=y, p=p: balanced_accuracy(y[i], p[i]),
            "mel_recall": lambda i, y=y, p=p: float((p[i][y[i] == MEL] == MEL).mean()) if (y[i] == MEL).any() else None,
            "ece": lambda i, y=y, probs=probs: expected_calibration_error(probs[i], y[i]),
        }
        row = dict(group=group, n=len(g), melanomas=int((y == MEL).sum()))
        for name, stat in stats.items():
            value = stat(np.arange(len(g)))
            lo, hi = lesion_interval(stat, len(g), lesions) if value is not None else (np.nan, np.nan)
            row.update({name: np.nan if value is None else float(value), f"{name}_lo": lo, f"{name}_hi": hi})
        rows.append(row)
    return pd.DataFrame(rows).assign(by=by)


def subgroup_tables(pred: pd.DataFrame, groupings: tuple[str, ...] = ("sex", "age_band", "localization", "dataset"), min_n: int = 1) -> pd.DataFrame:
    """``subgroup_table`` for each grouping, stacked (``age_band`` is made from ``age``;
    ``dataset`` is the source: clinic, camera and years)."""
    pred = pred.assign(age_band=age_band(pred["age"])) if "age" in pred else pred
    return pd.concat([subgroup_table(pred, by, min_n=min_n) for by in groupings if by in pred], ignore_index=True)

