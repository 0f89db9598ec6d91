"""Load and validate a dataset folder, and external label files.

Everything that touches a dataset folder lives here, so the rest of the
package works from a validated metadata table with absolute image paths and
never reads a folder layout itself. Every user error is a one-line
``DataError`` that names the file and the fix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from skin_lesion.info import (
    CLASSES,
    COLUMNS,
    DEFAULT_DATA,
    DEFAULT_DEMO,
    DEMO_MARK,
    IMAGE_FOLDERS,
    IMAGE_SUFFIXES,
    ISIC_COLUMNS,
    METADATA_FILE,
    REQUIRED_COLUMNS,
    SITES,
    SYNTHETIC_LABEL,
    DataError,
)

log = logging.getLogger("skin_lesion")


@dataclass(frozen=True)
class Dataset:
    """A validated dataset: its folder, metadata with a ``path`` column, and whether it is synthetic."""

    root: Path
    meta: pd.DataFrame
    synthetic: bool

    @property
    def label(self) -> str:
        """Human label for logs, figures and the report."""
        return SYNTHETIC_LABEL if self.synthetic else f"HAM10000 ({self.root})"


def resolve_data_dir(data: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """Pick the dataset folder: ``--data``, else ``$SKIN_LESION_DATA``, else
    ``data/ham10000``, else the synthetic demo set (made if missing).

    Returns the folder and whether it is the synthetic demo set.
    """
    if data:
        root = Path(data).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: data folder not found; pass --data to a folder holding {METADATA_FILE}")
        return root, (root / DEMO_MARK).exists()
    env = os.environ.get("SKIN_LESION_DATA")
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: $SKIN_LESION_DATA points to no folder; fix or unset it")
        return root, (root / DEMO_MARK).exists()
    if (DEFAULT_DATA / METADATA_FILE).exists():
        return DEFAULT_DATA, False
    if not (DEFAULT_DEMO / METADATA_FILE).exists():
        from skin_lesion.demo import make_demo

        make_demo(DEFAULT_DEMO)
    log.warning("No HAM10000 found: using the SYNTHETIC demo set at %s (set SKIN_LESION_DATA for real data)", DEFAULT_DEMO)
    return DEFAULT_DEMO, True


def image_index(root: Path) -> dict[str, Path]:
    """Map image_id to its file across the accepted image folders."""
    index: dict[str, Path] = {}
    for folder in IMAGE_FOLDERS:
        d = root / folder
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.suffix.lower() in IMAGE_SUFFIXES:
                index.setdefault(p.stem, p)
    return index


def read_csv_table(csv: Path, dtype: dict, fix: str = "") -> pd.DataFrame:
    """``pd.read_csv`` with a one-line DataError naming the file (and ``fix``) when it cannot be read as a CSV."""
    try:
        return pd.read_csv(csv, dtype=dtype)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError, OSError) as e:
        raise DataError(f"{csv}: not a readable CSV ({str(e).splitlines()[0]}){fix}") from e


def read_metadata(csv: Path) -> pd.DataFrame:
    """Read and validate a HAM10000-style metadata CSV (CRLF or LF, missing ages,
    ``unknown`` sex and site); raise DataError naming the file on any problem."""
    if not csv.exists():
        raise DataError(f"{csv}: metadata file not found; the data folder needs {METADATA_FILE} (or run `python -m skin_lesion data demo`)")
    df = read_csv_table(csv, {"lesion_id": str, "image_id": str, "dx": str}, fix="; re-download the metadata")
    problems = metadata_problems(df, csv)
    if problems:
        raise DataError(problems[0])
    df = df.copy()
    for col, fill in (("sex", "unknown"), ("localization", "unknown"), ("dx_type", "unknown"), ("dataset", "unknown")):
        if col not in df:
            df[col] = fill
        df[col] = df[col].fillna(fill).astype(str)
    if "age" not in df:
        df["age"] = np.nan
    df["age"] = pd.to_numeric(df["age"], errors="coerce")
    return df


def metadata_problems(df: pd.DataFrame, csv: Path) -> list[str]:
    """Every problem of a metadata table, one line each, naming the file."""
    out: list[str] = []
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    extra = [c for c in df.columns if c not in COLUMNS]
    if missing:
        out.append(f"{csv}: missing column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
        return out
    if extra:
        out.append(f"{csv}: unexpected column(s) {', '.join(map(str, extra))}; expected {','.join(COLUMNS)}")
    if df.empty:
        out.append(f"{csv}: no rows; the metadata lists no images")
    bad = sorted(set(df["dx"].dropna()) - set(CLASSES))
    if bad or df["dx"].isna().any():
        rows = df.index[~df["dx"].isin(CLASSES)].tolist()[:3]
        out.append(f"{csv}: unknown dx label(s) {bad or ['<empty>']} (rows {rows}); allowed: {', '.join(CLASSES)}")
    dup = df["image_id"][df["image_id"].duplicated()].unique().tolist()
    if dup:
        out.append(f"{csv}: duplicate image_id(s) {dup[:5]}; each image must be listed once")
    if df["lesion_id"].isna().any() or df["image_id"].isna().any():
        out.append(f"{csv}: empty lesion_id or image_id in rows {df.index[df[['lesion_id', 'image_id']].isna().any(axis=1)].tolist()[:5]}")
    return out


METADATA_PARTS: tuple[str, ...] = ("age", "sex", "site")


def metadata_features(frame: pd.DataFrame, parts: tuple[str, ...] = METADATA_PARTS) -> np.ndarray:
    """Age (scaled, squared, missing flag), sex and body site one-hot, or those of ``parts``:
    what a clinician knows before the biopsy. Never ``dx_type``, which reveals the label."""
    def column(name: str) -> pd.Series:  # an absent column reads as all unknown
        return frame[name] if name in frame else pd.Series([None] * len(frame), index=frame.index)

    age = pd.to_numeric(column("age"), errors="coerce").to_numpy(dtype=float)
    missing = np.isnan(age)
    a = np.where(missing, 50.0, age) / 100
    sex = np.stack([column("sex").eq(s).to_numpy() for s in ("male", "female")], 1)
    site = np.stack([column("localization").eq(s).to_numpy() for s in SITES], 1)
    columns = {"age": [a, a**2, missing], "sex": [sex], "site": [site]}
    return np.column_stack([c for part in parts for c in columns[part]]).astype(float)


def load_dataset(data: str | os.PathLike | None = None, verify_images: bool = False) -> Dataset:
    """Load the dataset folder (see :func:`resolve_data_dir`) with an absolute
    ``path`` per image; raise DataError if any listed image is absent or, with
    ``verify_images``, cannot be decoded (:func:`check_images`)."""
    root, synthetic = resolve_data_dir(data)
    meta = read_metadata(root / METADATA_FILE)
    index = image_index(root)
    if not index:
        raise DataError(f"{root}: no images found in {' or '.join(IMAGE_FOLDERS)}/; put the JPEGs there")
    missing = [i for i in meta["image_id"] if i not in index]
    if missing:
        raise DataError(f"{root}: {len(missing)} image(s) listed in {METADATA_FILE} are absent, e.g. {missing[0]}.jpg; run `python -m skin_lesion data check --data {root}`")
    meta["path"] = [str(index[i]) for i in meta["image_id"]]
    if verify_images:
        check_images(meta["path"])
    if synthetic:
        log.warning("Data: %s", SYNTHETIC_LABEL)
    return Dataset(root=root, meta=meta, synthetic=synthetic)


def check_images(paths: Iterable[str | os.PathLike]) -> None:
    """Decode every image with Pillow and raise a DataError naming the first that fails
    (HAM10000's 200x150 JPEGs: about 0.3 ms each on one core)."""
    for path in paths:
        problem = corrupt_image(Path(path))
        if problem:
            raise DataError(problem)


def corrupt_image(path: Path) -> str | None:
    """Return a one-line problem if the image cannot be fully decoded, else None."""
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # PIL raises many types for broken files
        return f"{path}: unreadable or corrupt image ({type(e).__name__}); replace the file"
    return None


def check_dataset(data: str | os.PathLike | None) -> list[str]:
    """Every problem in a dataset folder, one line each naming the file: for ``data check``."""
    root = Path(data) if data else resolve_data_dir(None)[0]
    if not root.is_dir():
        return [f"{root}: data folder not found; pass --data to a folder holding {METADATA_FILE}"]
    csv = root / METADATA_FILE
    if not csv.exists():
        return [f"{csv}: metadata file not found; the data folder needs {METADATA_FILE}"]
    try:
        df = pd.read_csv(csv, dtype=str)
    except Exception as e:
        return [f"{csv}: not a readable CSV ({str(e).splitlines()[0]})"]
    problems = metadata_problems(df, csv)
    if "image_id" not in df:
        return problems
    index = image_index(root)
    listed = set(df["image_id"].dropna())
    for image_id in sorted(listed - set(index)):
        problems.append(f"{image_id}.jpg: listed in {csv} but absent from {root}; restore the file or drop its row")
    for image_id in sorted(set(index) - listed):
        problems.append(f"{index[image_id]}: image not listed in {METADATA_FILE}; add a row or remove it")
    for image_id in sorted(listed & set(index)):
        p = corrupt_image(index[image_id])
        if p:
            problems.append(p)
    return problems


def label_ids(dx: pd.Series) -> np.ndarray:
    """Class names to integer ids in CLASSES order; unknown labels are a DataError."""
    lookup = {c: i for i, c in enumerate(CLASSES)}
    unknown = sorted(set(dx) - set(lookup))
    if unknown:
        raise DataError(f"unknown dx label(s) {unknown}; allowed: {', '.join(CLASSES)}")
    return dx.map(lookup).to_numpy(dtype=np.int32)


# --------------------------------------------------------------------------- external labelled sets


def read_labels(csv: str | os.PathLike) -> pd.DataFrame:
    """External labels as ``image_id, dx``: HAM-style (image_id,dx) or ISIC one-hot
    (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC)."""
    csv = Path(csv)
    if not csv.exists():
        raise DataError(f"{csv}: labels file not found")
    df = read_csv_table(csv, {"image_id": str, "image": str})
    if {"image_id", "dx"} <= set(df.columns):
        out = df[["image_id", "dx"]].copy()
    elif {"image", *ISIC_COLUMNS} <= set(df.columns):
        values = df[list(ISIC_COLUMNS)].apply(pd.to_numeric, errors="coerce")
        rows = np.where(values.isna().any(axis=1))[0]
        if len(rows):
            raise DataError(f"{csv}: ISIC one-hot cells must be numbers (0 or 1); data row(s) {_lines(rows)} hold something else")
        onehot = values.to_numpy(dtype=float)
        if not np.allclose(onehot.sum(1), 1):
            raise DataError(f"{csv}: ISIC one-hot rows must sum to 1; data row(s) {_lines(np.where(~np.isclose(onehot.sum(1), 1))[0])} do not")
        out = pd.DataFrame({"image_id": df["image"], "dx": [ISIC_COLUMNS[i].lower() for i in onehot.argmax(1)]})
    else:
        raise DataError(f"{csv}: unknown label format; expected columns image_id,dx or image,{','.join(ISIC_COLUMNS)}")
    for column in ("image_id", "dx"):
        rows = np.where(out[column].isna() | (out[column].astype(str).str.strip() == ""))[0]
        if len(rows):
            raise DataError(f"{csv}: empty {column} in data row(s) {_lines(rows)}; fill them in or drop those rows")
    repeated = sorted(out.loc[out["image_id"].duplicated(), "image_id"].unique())
    if repeated:
        raise DataError(f"{csv}: image_id(s) {repeated[:5]} labelled more than once; keep one row per image")
    bad = sorted(set(out["dx"]) - set(CLASSES))
    if bad:
        raise DataError(f"{csv}: unknown dx label(s) {bad}; allowed: {', '.join(CLASSES)}")
    return out


def _lines(rows: np.ndarray) -> str:
    """Row positions counted from 1 after the header (blank lines not counted), the first five."""
    shown = ", ".join(str(int(r) + 1) for r in rows[:5])
    return shown + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")


@dataclass
class ExternalSet:
    """An external labelled set: its name, rows (image_id, dx, path) and the labelled images it lacked."""

    name: str
    frame: pd.DataFrame
    skipped: list[str] = field(default_factory=list)


def external_set(images: str | os.PathLike, labels: str | os.PathLike, name: str | None = None, skip_missing: bool = False) -> ExternalSet:
    """The labelled images of an external folder. A labelled image absent from the
    folder is an error, or with ``skip_missing`` is left out and listed in ``skipped``.
    ``name`` defaults to the folder's name (it names the outputs of evaluating it)."""
    table = read_labels(labels)
    images = Path(images)
    if not images.is_dir():
        raise DataError(f"{images}: image folder not found")
    index = {p.stem: p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    index.update(image_index(images))
    missing = [i for i in table["image_id"] if i not in index]
    if missing and not skip_missing:
        raise DataError(f"{images}: {len(missing)} labelled image(s) absent, e.g. {missing[0]}; restore them or pass --skip-missing to score the rest")
    table = table[table["image_id"].isin(index)].reset_index(drop=True)
    if table.empty:
        raise DataError(f"{images}: none of the images listed in {labels} is in the folder")
    table["path"] = [str(index[i]) for i in table["image_id"]]
    check_images(table["path"])
    return ExternalSet(name or images.resolve().name, table, missing)
