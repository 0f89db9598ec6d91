"""Lesion-grouped splits and folds, and the leaky by-image split kept for comparison.

HAM10000 holds several images of one lesion; a split by image leaks them
between train and test. Every split the study uses is grouped by ``lesion_id``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from skin_lesion.data import read_csv_table
from skin_lesion.info import DataError


def _allocate_lesions(lesions: pd.Series, shares: dict[str, float], seed: int) -> pd.Series:
    """Assign lesions (index: lesion_id, values: dx) to parts by share, class by class.

    Each class's lesions are shuffled and cut by the shares, so every part gets
    its share of every class (at least one lesion of a class once the class has
    three), even on tiny subsets where a stratified splitter refuses to run.
    """
    rng = np.random.default_rng(seed)
    part = pd.Series("train", index=lesions.index, name="split")
    for _, ids in lesions.groupby(lesions, sort=True):
        ids = np.array(sorted(ids.index))
        rng.shuffle(ids)
        start = 0
        for name, share in shares.items():
            n = int(round(share * len(ids)))
            n = max(n, 1) if len(ids) >= 3 else n
            part.loc[ids[start : start + n]] = name
            start += n
    return part


def lesion_split(meta: pd.DataFrame, val: float = 0.15, test: float = 0.15, seed: int = 0) -> pd.Series:
    """Assign each image to train/val/test by lesion, stratified by dx.

    Lesions (not images) are split, so every image of a lesion lands in the
    same part; cutting each class's lesions by the shares keeps each part's
    class mix close to the whole.
    """
    lesions = meta.groupby("lesion_id", sort=True)["dx"].first()
    part = _allocate_lesions(lesions, {"test": test, "val": val}, seed)
    return meta["lesion_id"].map(part).rename("split")


def lesion_folds(meta: pd.DataFrame, k: int = 5, seed: int = 0) -> pd.Series:
    """Assign each image a fold 0..k-1 with StratifiedGroupKFold (groups = lesion_id)."""
    if k < 2:
        raise DataError(f"--folds must be at least 2 (got {k})")
    lesions = meta["lesion_id"].nunique()
    if lesions < k:
        raise DataError(f"--folds {k}: the data holds only {lesions} lesion(s); ask for at most {lesions} folds")
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.full(len(meta), -1, dtype=int)
    for f, (_, idx) in enumerate(sgkf.split(meta, meta["dx"], groups=meta["lesion_id"])):
        fold[idx] = f
    return pd.Series(fold, index=meta.index, name="fold")


MIN_PER_CLASS_BY_IMAGE = 3  # a class stratified into train, val and test needs an image for each


def image_split(meta: pd.DataFrame, val: float = 0.15, test: float = 0.15, seed: int = 0) -> pd.Series:
    """The leaky split by image (as in the paper), for the leakage comparison only."""
    counts = meta["dx"].value_counts()
    if (counts < MIN_PER_CLASS_BY_IMAGE).any():
        rare = ", ".join(f"{c} ({n})" for c, n in counts[counts < MIN_PER_CLASS_BY_IMAGE].items())
        raise DataError(f"--by image stratifies each class over three parts: {rare} has fewer than {MIN_PER_CLASS_BY_IMAGE} images; split by lesion or add images")
    try:
        rest, test_idx = train_test_split(meta.index, test_size=test, stratify=meta["dx"], random_state=seed)
        train_idx, val_idx = train_test_split(rest, test_size=val / (1 - test), stratify=meta.loc[rest, "dx"], random_state=seed)
    except ValueError as e:  # too few images for a stratified part (scikit-learn says which)
        raise DataError(f"--by image: {e}; split by lesion or add images") from e
    part = pd.Series("train", index=meta.index, name="split")
    part.loc[val_idx] = "val"
    part.loc[test_idx] = "test"
    return part


def holdout_source_split(meta: pd.DataFrame, source: str, val: float = 0.15, seed: int = 0) -> pd.Series:
    """Hold one source (the ``dataset`` column) out as the whole test part.

    The other sources' lesions are split into train and val by lesion, class by
    class. A lesion photographed in the held-out source and elsewhere is
    dropped from train and val (NaN here), so no lesion of the held-out source
    is ever trained on or chosen on; the test part is exactly that source's images.
    """
    sources = sorted(meta["dataset"].dropna().unique()) if "dataset" in meta else []
    if source not in sources:
        raise DataError(f"--holdout-source {source!r} is not a source of this data (its dataset column holds: {', '.join(map(str, sources)) or 'nothing'})")
    held = meta["dataset"] == source
    if held.all():
        raise DataError(f"--holdout-source {source!r} is the only source of this data: nothing would be left to train on")
    of_held_lesion = meta["lesion_id"].isin(set(meta.loc[held, "lesion_id"]))
    rest = meta[~of_held_lesion]
    part = _allocate_lesions(rest.groupby("lesion_id", sort=True)["dx"].first(), {"val": val}, seed)
    out = meta["lesion_id"].map(part).rename("split")
    out[held] = "test"
    out[~held & of_held_lesion] = np.nan
    return out


def fold_parts(split: pd.DataFrame, fold: int, val: float = 0.15, seed: int = 0) -> pd.Series:
    """For k-fold CV: fold ``fold`` is the test part; a lesion-grouped ``val``
    share of the remaining lesions is held out for early stopping and calibration."""
    k = int(split["fold"].max()) + 1
    if not 0 <= fold < k:
        raise DataError(f"--fold {fold} is out of range: the split has folds 0..{k - 1}")
    rest = split[split["fold"] != fold]
    lesion_part = _allocate_lesions(rest.groupby("lesion_id")["dx"].first(), {"val": val}, seed)
    part = split["lesion_id"].map(lesion_part).fillna("train").rename("split")
    part[split["fold"] == fold] = "test"
    return part


def with_split(table: pd.DataFrame, fold: int | None, seed: int) -> pd.DataFrame:
    """``table`` (a ``split.csv``) with its ``split`` column: a k-fold table's is cut for ``fold`` (``fold_parts``)."""
    if "fold" in table and "split" not in table:
        table = table.assign(split=fold_parts(table, fold or 0, seed=seed).to_numpy())
    return table


def validation_halves(val: pd.DataFrame, seed: int = 0) -> pd.Series:
    """Cut validation rows (columns lesion_id, dx) into halves 0 and 1 by lesion,
    class by class: what a refit screen adds to training and what it scores on."""
    lesions = val.groupby("lesion_id", sort=True)["dx"].first()
    part = _allocate_lesions(lesions, {"half1": 0.5}, seed)
    return val["lesion_id"].map(part).eq("half1").astype(int).rename("half")


def make_split_table(meta: pd.DataFrame, folds: int | None = None, seed: int = 0, by: str = "lesion", holdout_source: str | None = None) -> pd.DataFrame:
    """The ``split.csv`` table: image_id, lesion_id, dx and ``split`` (or ``fold``).

    With ``holdout_source`` the test part is that source (``holdout_source_split``);
    the images it drops (other sources' photographs of its lesions) are left out.
    """
    out = meta[["image_id", "lesion_id", "dx"]].copy()
    if holdout_source is not None:
        if folds or by != "lesion":
            raise DataError("--holdout-source makes its own lesion-grouped train/val/test split; it does not combine with --folds or --split-by image")
        out["split"] = holdout_source_split(meta, holdout_source, seed=seed)
        out["dataset"] = meta["dataset"]
        return out.dropna(subset=["split"]).reset_index(drop=True)
    if folds:
        out["fold"] = lesion_folds(meta, folds, seed)
    elif by == "image":
        out["split"] = image_split(meta, seed=seed)
    else:
        out["split"] = lesion_split(meta, seed=seed)
    return out


SPLIT_PARTS = ("train", "val", "test")


def read_split_file(csv: str | Path, meta: pd.DataFrame) -> pd.DataFrame:
    """A user's split table (``train --split``), checked against the data's metadata.

    It has the columns ``data split`` writes: image_id, lesion_id, dx and split
    (train, val or test). Images the table leaves out are not used; each image
    must be in the data with the same lesion and label, every class of the data
    needs training images, and no lesion may sit in two parts (its images would
    leak between them).
    """
    csv = Path(csv)
    if not csv.is_file():
        raise DataError(f"{csv}: split table not found; write one with `python -m skin_lesion data split --out FILE`")
    table = read_csv_table(csv, {"image_id": str, "lesion_id": str, "dx": str, "split": str})
    missing = [c for c in ("image_id", "lesion_id", "dx", "split") if c not in table]
    if missing:
        hint = " (a table of `data split --folds` goes with `train --folds`, not --split)" if missing == ["split"] and "fold" in table else ""
        raise DataError(f"{csv}: missing column(s) {missing}; a split table has image_id, lesion_id, dx and split, as `data split` writes{hint}")
    table = table[["image_id", "lesion_id", "dx", "split"]]
    empty = table.isna()
    if empty.any().any():
        column = empty.any().idxmax()
        raise DataError(f"{csv}: {int(empty[column].sum())} empty {column} cell(s) (first: data row {int(empty[column].to_numpy().argmax()) + 1}); fill or drop those rows")
    bad = sorted(set(table["split"]) - set(SPLIT_PARTS))
    if bad:
        raise DataError(f"{csv}: unknown split value(s) {bad}; each row is train, val or test")
    for part in ("train", "val"):
        if not (table["split"] == part).any():
            raise DataError(f"{csv}: no {part} rows; a run needs train and val images")
    if table["image_id"].duplicated().any():
        raise DataError(f"{csv}: image {table.loc[table['image_id'].duplicated(), 'image_id'].iloc[0]} is listed more than once")
    known = table.merge(meta[["image_id", "lesion_id", "dx"]], on="image_id", how="left", suffixes=("", "_data"), indicator=True)
    absent = known.loc[known["_merge"] == "left_only", "image_id"]
    if len(absent):
        raise DataError(f"{csv}: {len(absent)} image(s) are not in the data's metadata (first: {absent.iloc[0]}); was the table made for other data?")
    for col in ("lesion_id", "dx"):
        differs = known[known[col] != known[f"{col}_data"]]
        if len(differs):
            row = differs.iloc[0]
            raise DataError(f"{csv}: {len(differs)} image(s) have another {col} than the metadata (first: {row['image_id']}, {row[col]} against {row[f'{col}_data']})")
    untrained = sorted(set(meta["dx"]) - set(table.loc[table["split"] == "train", "dx"]))
    if untrained:
        # The class mix and the model's prior shift divide by each class's share of training.
        raise DataError(f"{csv}: no train images of {', '.join(untrained)}; every class of the data needs some in train")
    parts = table.groupby("lesion_id")["split"].nunique()
    if (parts > 1).any():
        raise DataError(f"{csv}: {int((parts > 1).sum())} lesion(s) in more than one part (first: {parts[parts > 1].index[0]}); "
                        "keep each lesion's images in one part, or its images leak between them")
    return table.reset_index(drop=True)


def subsample(meta: pd.DataFrame, max_per_class: int | None, seed: int) -> pd.DataFrame:
    """Keep whole lesions until each class has about ``max_per_class`` images (smoke runs)."""
    if not max_per_class:
        return meta
    rng = np.random.default_rng(seed)
    keep = []
    for _, group in meta.groupby("dx"):
        lesions = np.array(group["lesion_id"].unique())
        rng.shuffle(lesions)
        counts = group.groupby("lesion_id").size()
        total = 0
        for lesion in lesions:
            if total >= max_per_class:
                break
            keep.append(lesion)
            total += counts[lesion]
    return meta[meta["lesion_id"].isin(set(keep))].reset_index(drop=True)
