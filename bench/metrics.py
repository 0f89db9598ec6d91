"""What the lesion-grouped bootstrap of one evaluation costs, with the project's
rank-based AUC and with scikit-learn's ``roc_auc_score`` in its place.

Every ``evaluate`` (a run, an ensemble, the decision layer) draws 300 lesion
resamples of its test set and computes balanced accuracy, macro AUC (seven
one-vs-rest AUCs) and melanoma recall on each. This times that bootstrap on a
test-sized set of random labels and probabilities (the cost depends on the
number of rows and lesions, not on the values), and checks that both AUCs give
the same intervals.

    python bench/metrics.py [--rows 1500] [--images-per-lesion 1.35]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from skin_lesion import metrics
from skin_lesion.info import CLASSES


def sklearn_macro_auc(y: np.ndarray, probs: np.ndarray) -> float | None:
    """Macro AUC as the project computed it before: scikit-learn per class."""
    aucs = [roc_auc_score(y == c, probs[:, c]) for c in np.unique(y) if 0 < (y == c).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else None


def timed_bootstrap(y: np.ndarray, probs: np.ndarray, lesions: np.ndarray) -> tuple[float, dict]:
    """Seconds for one ``lesion_bootstrap`` and its intervals."""
    start = time.perf_counter()
    intervals = metrics.lesion_bootstrap(y, probs, lesions)
    return time.perf_counter() - start, intervals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1500, help="test images (HAM10000's lesion-grouped test split holds about 1,500)")
    parser.add_argument("--images-per-lesion", type=float, default=1.35, help="HAM10000 has 10,015 images of 7,470 lesions")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    y = rng.integers(0, len(CLASSES), args.rows)
    probs = rng.dirichlet(np.ones(len(CLASSES)), args.rows)
    lesions = rng.integers(0, int(args.rows / args.images_per_lesion), args.rows)

    rank_seconds, rank_intervals = timed_bootstrap(y, probs, lesions)
    project_auc = metrics.macro_auc
    metrics.macro_auc = sklearn_macro_auc
    try:
        sk_seconds, sk_intervals = timed_bootstrap(y, probs, lesions)
    finally:
        metrics.macro_auc = project_auc
    same = all(np.allclose(rank_intervals[k], sk_intervals[k], rtol=0, atol=1e-12) for k in rank_intervals)
    print(f"lesion bootstrap, 300 resamples of {args.rows} images:")
    print(f"  rank AUC (skin_lesion.metrics): {rank_seconds:6.2f} s")
    print(f"  scikit-learn roc_auc_score:     {sk_seconds:6.2f} s  ({sk_seconds / rank_seconds:.0f}x)")
    print(f"  same intervals to 1e-12: {same}")


if __name__ == "__main__":
    main()
