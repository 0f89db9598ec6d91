"""What the bundle's out-of-distribution guard refuses: the run's test split and pictures that are not dermatoscopic.

    python bench/guard.py --bundle bundles/cpu_ensemble --run runs/cpu_ensemble

Prints the share of the run's test-split images the guard refuses (it never
saw them: it is fitted on the training split and thresholded on validation),
then each non-dermatoscopic picture (scikit-image's and matplotlib's samples,
generated blank, noise, text and screenshot frames) with each check's
distance over its threshold (above 1 is refused) and the verdict, and the
detection rate over them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import numpy as np
    import pandas as pd

    from skin_lesion.bundle import Bundle, member_size
    from skin_lesion.data import load_dataset
    from skin_lesion.guard import foreign_images
    from skin_lesion.pixels import size_text
    from skin_lesion.runs import RunFolder

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--run", required=True, help="the run or mean ensemble the bundle was exported from (for its test split)")
    args = ap.parse_args()
    bundle = Bundle(args.bundle)
    if bundle.guard is None:
        sys.exit(f"{args.bundle}: this bundle has no guard; export it again")
    run = RunFolder(args.run)
    first = (run.members() or [run])[0]
    meta = load_dataset(first.config().data).meta.merge(first.read_split()[["image_id", "split"]], on="image_id")
    test = meta[meta["split"] == "test"]
    verdicts = np.array([bundle.analyse_file(p).recognised for p in test["path"]])
    g = bundle.manifest["guard"]
    size = size_text(member_size(g))
    print(f"guard: features of member {g['member']} at {size} and pixel statistics; fitted on {g['fitted_on']['train']} training images, "
          f"thresholds set on {g['fitted_on']['validation']} validation images ({g['reject_on_validation']:.1%} of them refused)")
    print(f"test split: {(~verdicts).sum()} of {len(verdicts)} refused ({(~verdicts).mean():.1%})")
    by_class = pd.Series(~verdicts, index=test["dx"].to_numpy()).groupby(level=0).mean()
    print("  refused by class: " + ", ".join(f"{k} {v:.1%}" for k, v in by_class.items()))
    with tempfile.TemporaryDirectory() as tmp:
        pictures = foreign_images(tmp)
        refused, total = 0, len(pictures)
        for name, path in pictures.items():
            a = bundle.analyse_file(path)
            refused += a.recognised is False
            features, pixels = a.guard_scores
            print(f"  {name:28s} features {features:8.2f}  pixels {pixels:10.2f}  {'refused' if a.recognised is False else 'LET THROUGH as ' + a.label}")
    print(f"non-dermatoscopic pictures: {refused} of {total} refused ({refused / total:.1%})")


if __name__ == "__main__":
    main()
