"""Every figure of the study, one function each, each returning a Figure.

Notebooks call these and the report saves them. When the data is the
synthetic demo set, every figure carries a red banner saying so
(``synthetic=True``), so a figure cannot be mistaken for a HAM10000 result.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from PIL import Image
from sklearn.metrics import auc, roc_curve

from skin_lesion.info import AGE_BANDS, CLASSES
from skin_lesion.metrics import HEADLINE

SYNTHETIC_BANNER = "SYNTHETIC DEMO DATA - not HAM10000, not a clinical result"
PALETTE = dict(zip(CLASSES, sns.color_palette("colorblind", len(CLASSES))))
# The headline metrics of a model comparison (metrics.HEADLINE), in panel order, with their panel titles.
HEADLINE_METRICS: dict[str, str] = {k: k.replace("_", " ").replace("f1", "F1").replace("auc", "AUC").replace("mel ", "melanoma ") for k in HEADLINE}
# Below this many melanomas a group's melanoma recall is a few coin flips, not an estimate.
MIN_MELANOMAS = 5
SUBGROUP_TITLES = {"sex": "sex", "age_band": "age band", "localization": "body site", "dataset": "source"}
METRIC_NAMES = {"balanced_accuracy": "balanced accuracy", "mel_recall": "melanoma recall (sensitivity)", "ece": "expected calibration error (ECE, lower is better)"}


def _finish(fig: plt.Figure, title: str, synthetic: bool) -> plt.Figure:
    """Title, tight layout and, for synthetic data, the banner."""
    height = fig.get_figheight()
    if synthetic:
        # Room above the title for the banner: about 0.45 inch whatever the figure's height.
        top = 1 - 0.45 / height
        fig.suptitle(title, fontsize=12, fontweight="bold", y=top)
        fig.tight_layout(rect=(0, 0, 1, top - 0.02))
        fig.text(0.5, 1 - 0.04 / height, SYNTHETIC_BANNER, ha="center", va="top", color="white", fontsize=10, fontweight="bold",
                 bbox=dict(facecolor="#c0392b", edgecolor="none", boxstyle="round,pad=0.3"))
    else:
        fig.suptitle(title, fontsize=12, fontweight="bold")
        fig.tight_layout()
    return fig


def _legend_outside(ax: plt.Axes, **kwargs) -> None:
    """The legend to the right of the axes, where it cannot cover data (tight_layout makes room for it)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize=8, **kwargs)


def save_figure(fig: plt.Figure, name: str, folder: str | Path | None) -> None:
    """Save ``fig`` as ``folder/name.png`` (the report's figure files); no-op without a folder.

    Returns nothing, so a notebook cell ending in this call shows only the figure."""
    if folder:
        path = Path(folder) / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")


# --------------------------------------------------------------------------- EDA


def class_counts(meta: pd.DataFrame, synthetic: bool = False) -> plt.Figure:
    """Images per diagnosis with counts and shares (the paper's Fig 7.2)."""
    counts = meta["dx"].value_counts().reindex(CLASSES, fill_value=0)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(counts.index, counts.values, color=[PALETTE[c] for c in counts.index])
    for i, v in enumerate(counts.values):
        ax.text(i, v, f"{v}\n{v / counts.sum():.1%}", ha="center", va="bottom", fontsize=8)
    ax.set(xlabel="diagnosis (dx)", ylabel="images", ylim=(0, counts.max() * 1.2))
    return _finish(fig, "Images per class", synthetic)


def site_by_class(meta: pd.DataFrame, synthetic: bool = False) -> plt.Figure:
    """Body site by diagnosis, as a row-normalised heatmap with counts (Fig 7.3)."""
    table = pd.crosstab(meta["localization"], meta["dx"]).reindex(columns=CLASSES, fill_value=0)
    table = table.loc[table.sum(1).sort_values(ascending=False).index]
    fig, ax = plt.subplots(figsize=(8, max(4.0, 1.8 + 0.32 * len(table))))
    # Every row and column labelled (seaborn's "auto" skips labels on a crowded axis); the height keeps them apart.
    sns.heatmap(table.div(table.sum(0), axis=1), annot=table.values, fmt="d", annot_kws={"fontsize": 8}, cmap="Blues",
                cbar_kws={"label": "share of class"}, xticklabels=True, yticklabels=True, ax=ax)
    ax.tick_params(axis="y", rotation=0)
    ax.set(xlabel="diagnosis", ylabel="body site")
    return _finish(fig, "Body site by class (counts; colour = share of the class)", synthetic)


def age_by_class(meta: pd.DataFrame, synthetic: bool = False) -> plt.Figure:
    """Age distribution per diagnosis (Fig 7.4); missing ages are counted in the title."""
    fig, ax = plt.subplots(figsize=(8, 4))
    sns.boxplot(data=meta.dropna(subset=["age"]), x="dx", y="age", order=list(CLASSES), hue="dx", palette=PALETTE, legend=False, ax=ax)
    ax.set(xlabel="diagnosis", ylabel="age (years)")
    return _finish(fig, f"Age by class ({meta['age'].isna().sum()} images without age)", synthetic)


def sex_by_class(meta: pd.DataFrame, synthetic: bool = False) -> plt.Figure:
    """Sex share within each diagnosis, stacked bars."""
    table = pd.crosstab(meta["dx"], meta["sex"], normalize="index").reindex(CLASSES)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    table.plot.bar(stacked=True, ax=ax, colormap="Set2", rot=0)
    ax.set(xlabel="diagnosis", ylabel="share of images", ylim=(0, 1))
    # The stacks fill the axes to 1.0, so the only free place for the legend is outside.
    _legend_outside(ax, title="sex")
    return _finish(fig, "Sex by class", synthetic)


def images_per_lesion(meta: pd.DataFrame, synthetic: bool = False) -> plt.Figure:
    """How many images each lesion has: why splits must be grouped by lesion."""
    counts = meta.groupby("lesion_id").size().value_counts().sort_index()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(counts.index.astype(str), counts.values, color="#4c72b0")
    for i, v in enumerate(counts.values):
        ax.text(i, v, str(v), ha="center", va="bottom", fontsize=8)
    shared = int((meta.groupby("lesion_id").size() > 1).sum())
    ax.set(xlabel="images of the lesion", ylabel="lesions")
    return _finish(fig, f"Images per lesion ({shared} lesions have several)", synthetic)


def dx_type_by_class(meta: pd.DataFrame, synthetic: bool = False) -> plt.Figure:
    """How each diagnosis was confirmed (dx_type): nearly a label, so never a model input."""
    table = pd.crosstab(meta["dx"], meta["dx_type"]).reindex(CLASSES, fill_value=0)
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.heatmap(table, annot=True, fmt="d", cmap="Greens", ax=ax)
    ax.set(xlabel="diagnosis method", ylabel="diagnosis")
    return _finish(fig, "Diagnosis method by class", synthetic)


def missing_values(meta: pd.DataFrame, synthetic: bool = False) -> plt.Figure:
    """Missing or 'unknown' values per metadata column."""
    cols = ["age", "sex", "localization", "dx_type"]
    missing = {c: int(meta[c].isna().sum() + (meta[c].astype(str) == "unknown").sum()) for c in cols}
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(list(missing), list(missing.values()), color="#dd8452")
    for i, v in enumerate(missing.values()):
        ax.text(v, i, f" {v}", va="center", fontsize=8)
    ax.set(xlabel="images with the value missing or 'unknown'", xlim=(0, max(max(missing.values()), 1) * 1.18))
    return _finish(fig, "Missing values", synthetic)


def sample_grid(meta: pd.DataFrame, per_class: int = 4, seed: int = 0, synthetic: bool = False) -> plt.Figure:
    """A few images of each class, one row per class."""
    fig, axes = plt.subplots(len(CLASSES), per_class, figsize=(per_class * 2, len(CLASSES) * 1.6))
    for r, c in enumerate(CLASSES):
        rows = meta[meta["dx"] == c]
        rows = rows.sample(min(per_class, len(rows)), random_state=seed) if len(rows) else rows
        for k in range(per_class):
            ax = axes[r, k]
            ax.axis("off")
            if k < len(rows):
                ax.imshow(Image.open(rows.iloc[k]["path"]).convert("RGB"))
        axes[r, 0].set_title(c, loc="left", fontsize=9)
    return _finish(fig, "Sample images per class", synthetic)


# --------------------------------------------------------------------------- training


def training_curves(history: pd.DataFrame, metric: str = "accuracy", synthetic: bool = False, title: str | None = None) -> plt.Figure:
    """Train and validation ``metric`` per epoch (accuracy: Fig 7.6, loss: Fig 7.7)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    epochs = np.arange(1, len(history) + 1)
    ax.plot(epochs, history[metric], "o-", label=f"train {metric}")
    if f"val_{metric}" in history:
        ax.plot(epochs, history[f"val_{metric}"], "s-", label=f"validation {metric}")
    if metric == "accuracy" and "val_balanced_accuracy" in history:
        ax.plot(epochs, history["val_balanced_accuracy"], "^--", label="validation balanced accuracy")
    ax.set(xlabel="epoch", ylabel=metric)
    # Curves can run anywhere in the axes (rising accuracy, falling loss), so no corner is reliably free.
    _legend_outside(ax)
    return _finish(fig, title or f"Training {metric}", synthetic)


# --------------------------------------------------------------------------- evaluation


def confusion(cm: np.ndarray | list, normalize: bool = False, synthetic: bool = False, title: str | None = None) -> plt.Figure:
    """Confusion matrix, counts or row-normalised (recall on the diagonal) (Fig 7.5)."""
    cm = np.asarray(cm, dtype=float)
    data = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    sns.heatmap(data, annot=True, fmt=".2f" if normalize else ".0f", cmap="Blues", xticklabels=CLASSES, yticklabels=CLASSES, ax=ax)
    ax.set(xlabel="predicted", ylabel="true")
    return _finish(fig, title or ("Confusion matrix (row-normalised)" if normalize else "Confusion matrix (counts)"), synthetic)


def per_class_bars(metrics: dict, synthetic: bool = False, title: str = "Per-class precision, recall (TPR), specificity (TNR), F1") -> plt.Figure:
    """Grouped bars of the per-class metrics in ``metrics['per_class']``."""
    table = per_class_frame(metrics)[["precision", "recall", "specificity", "f1"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    table.plot.bar(ax=ax, rot=0, colormap="tab10", width=0.8)
    ax.set(ylim=(0, 1.05), ylabel="score", xlabel="class")
    ax.legend(ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=8)
    return _finish(fig, title, synthetic)


def per_class_frame(metrics: dict) -> pd.DataFrame:
    """The per-class metrics of a metrics dict as a table (rows: classes)."""
    return pd.DataFrame(metrics["per_class"]).T.astype(float)


def roc_curves(pred: pd.DataFrame, synthetic: bool = False, title: str = "ROC curves, one class vs rest") -> plt.Figure:
    """One-vs-rest ROC curve per class from a predictions table (columns dx and one per class)."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for c in CLASSES:
        y = (pred["dx"] == c).to_numpy()
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, pred[c])
            ax.plot(fpr, tpr, color=PALETTE[c], label=f"{c} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate (1 - TNR)", ylabel="true positive rate (TPR)", xlim=(0, 1), ylim=(0, 1.01), aspect="equal")
    # A weak class's curve crosses the lower right, so the legend goes beside the axes.
    _legend_outside(ax)
    return _finish(fig, title, synthetic)


def reliability_diagram(pred: pd.DataFrame, bins: int = 10, synthetic: bool = False, title: str = "Reliability diagram") -> plt.Figure:
    """Accuracy against top-1 confidence in equal-width bins, with the bin counts."""
    probs = pred[list(CLASSES)].to_numpy()
    conf = probs.max(1)
    correct = (np.array(CLASSES)[probs.argmax(1)] == pred["dx"].to_numpy())
    edges = np.linspace(0, 1, bins + 1)
    mids, accs, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            mids.append((lo + hi) / 2)
            accs.append(correct[sel].mean())
            counts.append(sel.sum())
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.bar(mids, accs, width=1 / bins, edgecolor="k", alpha=0.7, label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    for m, a, n in zip(mids, accs, counts):
        ax.text(m, a, str(n), ha="center", va="bottom", fontsize=7)
    # Headroom above 1.0 for the count over a full bar; the legend sits above the axes, clear of bars and counts.
    ax.set(xlabel="confidence (top-1 probability); number: images in the bin", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.12), yticks=np.linspace(0, 1, 6))
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.01), borderaxespad=0, ncol=2, fontsize=8)
    return _finish(fig, title, synthetic)


def _score(value) -> float:
    """A metric value as a float; NaN where it is missing (None), so it can never be drawn as a zero."""
    try:
        return np.nan if value is None else float(value)
    except (TypeError, ValueError):
        return np.nan


def model_comparison(results: dict[str, dict], synthetic: bool = False, title: str = "Models side by side (test split)") -> plt.Figure:
    """Headline metrics of several models (name -> metrics dict): one panel of horizontal bars per metric.

    Models keep the dict's order, top to bottom, in every panel, so a row reads
    across the panels and the names are written once; each value stands at its
    bar's end (the panel's best in bold), and a missing value reads "n/a"
    rather than a zero bar. No legend: the axis names the models."""
    names = list(results)
    scores = {k: np.array([_score(results[n].get(k)) for n in names]) for k in HEADLINE_METRICS}
    colors = sns.color_palette("colorblind", len(names))
    rows = np.arange(len(names))
    fig, axes = plt.subplots(1, len(HEADLINE_METRICS), sharey=True, squeeze=False,
                             figsize=(2.6 + 1.75 * len(HEADLINE_METRICS), 1.3 + 0.34 * len(names)))
    for ax, (key, label) in zip(axes[0], HEADLINE_METRICS.items()):
        values = scores[key]
        known = np.isfinite(values)
        best = values[known].max() if known.any() else np.nan
        ax.barh(rows[known], values[known], height=0.7, color=[colors[i] for i in rows[known]])
        for y, v in zip(rows, values):
            if np.isfinite(v):
                ax.text(v + 0.02, y, f"{v:.3f}", va="center", fontsize=8, fontweight="bold" if v == best else "normal")
            else:
                ax.text(0.02, y, "n/a", va="center", fontsize=8, color="grey", style="italic")
        # Room right of 1.0 for a value label, so the longest bar's label stays inside its panel.
        ax.set(xlim=(0, 1.4), xticks=[0, 0.5, 1], title=label)
        ax.title.set_fontsize(10)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0, 0].set_yticks(rows, names, fontsize=9)
    axes[0, 0].set_ylim(len(names) - 0.5, -0.5)  # first model on top
    return _finish(fig, title, synthetic)


# --------------------------------------------------------------------------- explain and fairness


def image_grid(images: list[np.ndarray], titles: list[str], ncols: int = 4, synthetic: bool = False, title: str = "") -> plt.Figure:
    """Images (uint8 RGB) in a grid with a title each, e.g. Grad-CAM overlays."""
    nrows = max(1, int(np.ceil(len(images) / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 2.6, nrows * 2.5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, t in zip(axes.ravel(), images, titles):
        ax.imshow(img)
        ax.set_title(t, fontsize=8)
    return _finish(fig, title, synthetic)


def _ordered_groups(rows: pd.DataFrame) -> pd.DataFrame:
    """One grouping's rows of a subgroup table in reading order: age bands youngest
    first, any other grouping largest (``n``) first; "unknown" last either way."""
    groups = rows["group"].astype(str)
    if set(groups) <= set(AGE_BANDS):
        return rows.iloc[np.argsort(groups.map(AGE_BANDS.index).to_numpy(), kind="stable")]
    return rows.iloc[np.lexsort((-rows["n"].to_numpy(dtype=float), (groups == "unknown").to_numpy()))]


def _subgroup_label(row: pd.Series, metric: str) -> tuple[str, bool]:
    """A group's tick label and whether its estimate is firm enough for a filled point.

    The count is what the metric was measured on: melanomas for melanoma recall,
    images otherwise. Not firm, and said so in the label: no estimate, an
    interval that is missing or of zero width (a resample of one or two cases
    cannot bound anything), or a melanoma recall from under ``MIN_MELANOMAS``
    melanomas."""
    mel = metric == "mel_recall"
    count = f"mel n={int(row['melanomas'])}" if mel else f"n={int(row['n'])}"
    value, lo, hi = row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"]
    if not np.isfinite(value):
        note = "no melanomas" if mel and row["melanomas"] == 0 else "no estimate"
    elif not (np.isfinite(lo) and np.isfinite(hi)) or hi - lo < 1e-9:
        note = "too few to bound"
    elif mel and row["melanomas"] < MIN_MELANOMAS:
        note = f"under {MIN_MELANOMAS} melanomas"
    else:
        note = ""
    return f"{row['group']} ({count})" + (f": {note}" if note else ""), not note


def subgroup_plot(table: pd.DataFrame, metric: str = "balanced_accuracy", synthetic: bool = False, title: str | None = None) -> plt.Figure:
    """A metric per subgroup with its 95% interval and the group's count, one panel per grouping, stacked.

    Filled points are estimates with an interval; hollow grey points (and grey
    labels saying why) are groups too small to bound, so a lone 1.0 from one
    melanoma never looks certain. Panels are stacked, each as tall as its
    groups need, so labels never crowd; the legend sits above the top panel."""
    groupings = list(dict.fromkeys(table["by"]))
    panels = [_ordered_groups(table[table["by"] == by]) for by in groupings]
    sizes = [len(rows) + 0.6 for rows in panels]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": sizes},
                             figsize=(8.5, 0.8 + 0.75 * len(panels) + 0.27 * sum(sizes)))
    firm_colour, weak_colour = "#4c72b0", "#8c8c8c"
    any_weak = False
    for ax, by, rows in zip(axes[:, 0], groupings, panels):
        labels = [_subgroup_label(row, metric) for _, row in rows.iterrows()]
        any_weak |= not all(firm for _, firm in labels)
        for y, ((_, row), (_, firm)) in enumerate(zip(rows.iterrows(), labels)):
            value, lo, hi = row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"]
            if not np.isfinite(value):
                continue
            colour = firm_colour if firm else weak_colour
            err = [[max(value - lo, 0)], [max(hi - value, 0)]] if np.isfinite(lo) and np.isfinite(hi) else None
            ax.errorbar([value], [y], xerr=err, fmt="o", ms=6, capsize=3, color=colour, mec=colour, mfc=colour if firm else "white")
        ax.set_yticks(np.arange(len(rows)), [text for text, _ in labels], fontsize=8)
        for tick, (_, firm) in zip(ax.get_yticklabels(), labels):
            tick.set_color("black" if firm else weak_colour)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_title(SUBGROUP_TITLES.get(by, by.replace("_", " ")), loc="left", fontsize=10)
        ax.tick_params(axis="x", labelbottom=True, labelsize=8)  # every panel keeps its scale
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    if metric == "ece":
        ends = table[[metric, f"{metric}_hi"]].to_numpy(dtype=float)
        right = max(np.nanmax(ends) * 1.1, 0.05) if np.isfinite(ends).any() else 1.0
        axes[0, 0].set_xlim(-0.02 * right, right)  # a point at 0 shows whole
    else:
        axes[0, 0].set_xlim(-0.03, 1.05)
    axes[-1, 0].set_xlabel(METRIC_NAMES.get(metric, metric.replace("_", " ")))
    weak_note = f"too few to bound, or under {MIN_MELANOMAS} melanomas" if metric == "mel_recall" else "too few to bound"
    handles = [plt.Line2D([], [], marker="o", color=firm_colour, label="estimate, 95% interval")]
    if any_weak:
        handles.append(plt.Line2D([], [], marker="o", ls="none", color=weak_colour, mfc="white", label=weak_note))
    # On the top panel's title row, right of its short title: above the data, and the panels keep the full width.
    axes[0, 0].legend(handles=handles, loc="lower right", bbox_to_anchor=(1, 1.01), borderaxespad=0, ncol=2, fontsize=8)
    return _finish(fig, title or f"{metric.replace('_', ' ')} by group (95% bootstrap CI)", synthetic)
