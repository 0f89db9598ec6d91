"""From probabilities to decisions: temperature scaling, the melanoma operating
point and logit adjustment, all fitted on the validation split only.

- Temperature scaling rescales log-probabilities by one number T that makes
  validation likelihood highest; the argmax stays, confidence becomes honest.
- The melanoma operating point is a threshold on p(mel) chosen on validation
  for a target melanoma recall: melanoma is called whenever p(mel) reaches it.
- Logit adjustment (Menon et al., ICLR 2021) decides by the argmax of
  log p - tau log(training class frequency), which calls rare classes more often;
  it moves labels, never the probabilities shown to a user.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from skin_lesion.info import CLASSES, MEL

if TYPE_CHECKING:
    import pandas as pd

# The scikit-learn metrics are imported where a threshold is chosen or scored, so that applying
# a fitted temperature and decision rule (``apply_temperature``, ``decide``) needs NumPy alone:
# the exported bundle's TensorFlow-free predictor uses them.


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


def class_frequency(dx: pd.Series) -> np.ndarray:
    """Each class's share of ``dx`` (CLASSES order); a class absent counts as one
    image, so its log-frequency stays finite."""
    counts = dx.value_counts()
    freq = np.array([max(int(counts.get(c, 0)), 1) for c in CLASSES], dtype=float)
    return freq / freq.sum()


def logit_offset(train_frequency: np.ndarray, tau: float) -> np.ndarray:
    """The per-class offset of logit adjustment: -tau * log(training class frequency)."""
    return -float(tau) * np.log(train_frequency)


def decide(probs: np.ndarray, threshold: float | None, offset: np.ndarray | None = None) -> np.ndarray:
    """Predicted class: melanoma when p(mel) reaches the threshold, else the most probable
    class -- with a per-class log ``offset`` (logit adjustment), the argmax of log p + offset."""
    pred = probs.argmax(1) if offset is None else (np.log(np.clip(probs, 1e-12, 1)) + np.asarray(offset, dtype=float)).argmax(1)
    if threshold is not None:
        pred = np.where(probs[:, MEL] >= threshold, MEL, pred)
    return pred


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
    from skin_lesion.metrics import lesion_resamples

    point = _recall_threshold(probs[y == MEL, MEL], target_recall)
    if not confidence or not (y == MEL).any():
        return point
    draws = [_recall_threshold(probs[idx][y[idx] == MEL, MEL], target_recall) for idx in lesion_resamples(len(y), groups, n, seed) if (y[idx] == MEL).any()]
    return float(min(point, np.quantile(draws, 1 - confidence)))


def mel_recall_at(probs: np.ndarray, y: np.ndarray, threshold: float, offset: np.ndarray | None = None) -> float | None:
    """Melanoma recall of ``decide(probs, threshold, offset)`` on these rows (None without melanomas)."""
    return float((decide(probs, threshold, offset)[y == MEL] == MEL).mean()) if (y == MEL).any() else None


def operating_point(
    y: np.ndarray, probs: np.ndarray, threshold: float, target_recall: float, confidence: float | None, val_mel_recall: float | None,
    offset: np.ndarray | None = None,
) -> dict:
    """The ``mel_operating_point`` record: how the threshold was chosen on
    validation, and accuracy, balanced accuracy, macro-F1 and melanoma
    recall / specificity on these (test) rows when it decides."""
    from skin_lesion.metrics import classification_metrics

    at = classification_metrics(y, probs, decide(probs, threshold, offset))
    return dict(
        threshold=threshold, target_recall_on_val=target_recall, confidence=confidence, val_mel_recall=val_mel_recall,
        **{k: at[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "mel_recall", "mel_specificity")},
    )
