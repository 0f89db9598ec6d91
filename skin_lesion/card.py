"""The model card of an exported bundle, written from the run's own files.

It says what the model is for (research, not a diagnosis), what it was
trained on and under which licence, how the data was split, what it scored
with intervals, where it is weaker (the fairness tables' lowest groups), and
its known limits. Every number comes from the run folder; none is typed in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from skin_lesion.bundle import member_size
from skin_lesion.info import DEMO_MARK, DISCLAIMER
from skin_lesion.metrics import subgroup_tables
from skin_lesion.pixels import size_text
from skin_lesion.runs import RunFolder


def _fmt(value, interval=None) -> str:
    """0.751 [0.72, 0.78], or n/a."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    text = f"{value:.3f}"
    return text + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def _split_lines(folder: RunFolder) -> list[str]:
    """Images and lesions per part of the split the run (or its first member) trained on."""
    first = (folder.members() or [folder])[0]
    split = first.read_split()
    if split is None or "split" not in split:
        return ["- split: not recorded in the run folder"]
    table = split.groupby("split").agg(images=("image_id", "size"), lesions=("lesion_id", "nunique"))
    by = first.config().split_by
    lines = [f"- split by **{by}** (every image of a lesion in one part)" if by == "lesion" else f"- split by **{by}** (leaky: for comparison only)"]
    lines += [f"- {part}: {int(row.images)} images of {int(row.lesions)} lesions" for part, row in table.iterrows()]
    return lines


def _weak_groups(folder: RunFolder, min_n: int = 30, show: int = 4) -> list[str]:
    """The groups (sex, age band, body site, at least ``min_n`` test images) with the lowest balanced accuracy."""
    table = subgroup_tables(folder.predictions(), min_n=min_n)
    if table.empty:
        return [f"- no group has {min_n} or more test images"]
    rows = table.sort_values("balanced_accuracy").head(show)
    return [
        f"- {r.by.replace('_', ' ')} = {r.group}: balanced accuracy {_fmt(r.balanced_accuracy, (r.balanced_accuracy_lo, r.balanced_accuracy_hi))}, "
        f"melanoma recall {_fmt(r.mel_recall)} ({int(r.melanomas)} melanomas, {int(r.n)} images)"
        for r in rows.itertuples()
    ]


def model_card(folder: RunFolder, bundle: dict) -> str:
    """MODEL_CARD.md for ``bundle`` exported from ``folder``."""
    metrics = folder.metrics()
    c, ci, op = metrics["calibrated"], metrics.get("intervals_95", {}), metrics["mel_operating_point"]
    first_config = bundle["members"][0]["config"]
    synthetic = bool(first_config.get("data")) and (Path(first_config["data"]) / DEMO_MARK).exists()
    members = "\n".join(f"- `{m['file']}`: {m['model']} at {size_text(member_size(m))} (run `{m['run']}`), temperature {m['temperature']:.3f}" for m in bundle["members"])
    data = ("**SYNTHETIC demo images made by skin_lesion, not HAM10000: this model says nothing about skin cancer.**" if synthetic else
            "HAM10000 (Tschandl et al., 2018; Harvard Dataverse doi:10.7910/DVN/DBW86T), 10,015 dermatoscopic images of 7 diagnoses "
            "from two sites in Austria and Australia. Licence: **CC BY-NC 4.0**: non-commercial use, with attribution; "
            "this model is derived from it and carries the same terms.")
    return f"""# Model card: {Path(bundle['source']).name}

{DISCLAIMER}

## Intended use

Research and teaching on skin-lesion classification from dermatoscopic
images: comparing methods, studying errors and calibration. It is **not a
medical device and not a diagnosis**; it was not validated prospectively or
on any population beyond its training data. It scores dermatoscopic images
only; its out-of-distribution guard refuses many pictures that are not (see
"Known limits"), but a user must still make sure the input is a dermatoscopic
image of a skin lesion.

## Model

{"A mean ensemble" if bundle["kind"] == "mean_ensemble" else "One network"} over the 7 classes {", ".join(bundle["classes"])}:

{members}

The probabilities are calibrated by temperature scaling fitted on the
validation split{"; the ensemble's labels come from logit adjustment (tau " + str(first_tau(metrics)) + ")" if bundle.get("logit_offset") else ""}.
Melanoma operating point: p(mel) ≥ {op["threshold"]:.4f}, chosen on validation for
{op.get("target_recall_on_val", 0.8):.0%} melanoma recall{f" with {op['confidence']:.0%} confidence" if op.get("confidence") else ""}.

## Training data

{data}

{chr(10).join(_split_lines(folder))}

## Measured on the held-out test split ({c["n"]} images; 95% intervals resample lesions)

- balanced accuracy {_fmt(c["balanced_accuracy"], ci.get("balanced_accuracy"))}
- accuracy {_fmt(c["accuracy"])}, macro-F1 {_fmt(c["macro_f1"])}
- macro AUC {_fmt(c["macro_auc"], ci.get("macro_auc"))}
- melanoma recall at the operating point {_fmt(op["mel_recall"])}, specificity there {_fmt(op["mel_specificity"])}
- expected calibration error {_fmt(c["ece"])}

Per class (precision / recall / specificity / AUC):

{chr(10).join(f"- {k}: {_fmt(v['precision'])} / {_fmt(v['recall'])} / {_fmt(v['specificity'])} / {_fmt(v['auc'])} ({v['support']} images)" for k, v in c["per_class"].items())}

## Where it is weaker

The groups of test images with the lowest balanced accuracy:

{chr(10).join(_weak_groups(folder))}

## Known limits

- One dataset: the same clinics, cameras and years for training and test;
  images from elsewhere score lower (measure with `evaluate --images --labels`).
- Mostly fair-skinned patients; HAM10000 records no skin type, so
  performance on darker skin is unknown.
- Rare classes (dermatofibroma, vascular lesions) have few test images: their
  figures are uncertain.
{_guard_line(bundle.get("guard"))}

Software: skin_lesion {bundle["software"]["skin_lesion"]}, TensorFlow {bundle["software"]["tensorflow"]}, Keras {bundle["software"]["keras"]}.
"""


def _guard_line(guard: dict | None) -> str:
    """The model card's sentence on the out-of-distribution guard."""
    if not guard:
        return "- No out-of-distribution guard: a non-dermatoscopic picture still gets one of the 7 labels."
    return (f"- An out-of-distribution guard refuses images whose features (member {guard['member']}'s pooled last convolution) or "
            f"pixel statistics (colour, edges, detail) lie further from the {guard['fitted_on']['train']} training images' than "
            f"thresholds set to refuse at most {guard['reject_target']:.0%} of the {guard['fitted_on']['validation']} validation images "
            f"({guard['reject_on_validation']:.1%} refused). It catches pictures far from dermatoscopy (photos, screenshots, blank or "
            "noisy frames); it is not a check of image quality, and a close-up of skin that is not a lesion may pass.")


def first_tau(metrics: dict) -> float | None:
    """The logit adjustment's tau recorded in an ensemble's metrics."""
    return (metrics.get("logit_adjust") or {}).get("tau")
