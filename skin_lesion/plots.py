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

from skin_lesion.data import CLASSES

SYNTHETIC_BANNER = "SYNTHETIC DEMO DATA - not HAM10000, not a clinical result"
PALETTE = dict(zip(CLASSES, sns.color_palette("colorblind", len(CLASSES))))


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
    fig, ax = plt.subplots(figsize=(8, 6))
    sns.heatmap(table.div(table.sum(0), axis=1), annot=table.values, fmt="d", cmap="Blues", cbar_kws={"label": "share of class"}, ax=ax)
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
    fig, ax = plt.subplots(figsize=(7, 4))
    table.plot.bar(stacked=True, ax=ax, colormap="Set2", rot=0)
    ax.set(xlabel="diagnosis", ylabel="share of images")
    ax.legend(title="sex", bbox_to_anchor=(1, 1))
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
    ax.set(xlabel="images with the value missing or 'unknown'")
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
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = np.arange(1, len(history) + 1)
    ax.plot(epochs, history[metric], "o-", label=f"train {metric}")
    if f"val_{metric}" in history:
        ax.plot(epochs, history[f"val_{metric}"], "s-", label=f"validation {metric}")
    if metric == "accuracy" and "val_balanced_accuracy" in history:
        ax.plot(epochs, history["val_balanced_accuracy"], "^--", label="validation balanced accuracy")
    ax.set(xlabel="epoch", ylabel=metric)
    ax.legend()
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
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for c in CLASSES:
        y = (pred["dx"] == c).to_numpy()
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, pred[c])
            ax.plot(fpr, tpr, color=PALETTE[c], label=f"{c} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate (1 - TNR)", ylabel="true positive rate (TPR)")
    ax.legend(fontsize=8, loc="lower right")
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
    ax.set(xlabel="confidence (top-1 probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.05))
    ax.legend(loc="upper left")
    return _finish(fig, title, synthetic)


def model_comparison(results: dict[str, dict], synthetic: bool = False, title: str = "Models side by side (test split)") -> plt.Figure:
    """Headline metrics of several models (name -> metrics dict) as grouped bars."""
    keys = ["accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "mel_recall"]
    table = pd.DataFrame({name: {k: m.get(k) or 0.0 for k in keys} for name, m in results.items()})
    fig, ax = plt.subplots(figsize=(8, 4))
    table.plot.bar(ax=ax, rot=0, width=0.8)
    for cont in ax.containers:
        ax.bar_label(cont, fmt="%.2f", fontsize=7)
    ax.set(ylim=(0, 1.1), ylabel="score")
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


def subgroup_plot(table: pd.DataFrame, metric: str = "balanced_accuracy", synthetic: bool = False, title: str | None = None) -> plt.Figure:
    """A metric per subgroup with its 95% interval and the group size, one panel per grouping."""
    groupings = list(dict.fromkeys(table["by"]))
    fig, axes = plt.subplots(1, len(groupings), figsize=(4.5 * len(groupings), 4), squeeze=False)
    for ax, by in zip(axes[0], groupings):
        t = table[table["by"] == by].dropna(subset=[metric])
        y = np.arange(len(t))
        err = np.vstack([t[metric] - t[f"{metric}_lo"], t[f"{metric}_hi"] - t[metric]]).clip(0)
        ax.errorbar(t[metric], y, xerr=err, fmt="o", capsize=3)
        ax.set_yticks(y, [f"{g} (n={int(n)})" for g, n in zip(t["group"], t["n"])], fontsize=8)
        ax.set(xlabel=metric.replace("_", " "), title=by, xlim=(0, 1.05) if metric != "ece" else None)
        ax.invert_yaxis()
    return _finish(fig, title or f"{metric.replace('_', ' ')} by group (95% bootstrap CI)", synthetic)
