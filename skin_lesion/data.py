"""Dataset facts, metadata loading and validation, lesion-grouped splits, the
synthetic demo set, and the HAM10000 download.

Why one module: everything that touches the dataset folder lives here, so the
rest of the package works from a validated metadata table with absolute image
paths and never reads the folder layout itself.

HAM10000 holds several images of one lesion; a split by image leaks them
between train and test. Every split made here is grouped by ``lesion_id``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

log = logging.getLogger("skin_lesion")

# The dataset facts in one table (MedMNIST's ``info.py`` idea).
CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CLASS_NAMES: dict[str, str] = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}
HAM_COUNTS: dict[str, int] = {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142}
METADATA_FILE = "HAM10000_metadata.csv"
COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset")
REQUIRED_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx")
IMAGE_FOLDERS: tuple[str, ...] = ("images", "HAM10000_images_part_1", "HAM10000_images_part_2")
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
DEMO_MARK = "SYNTHETIC_DEMO"  # a file in the demo folder that marks it as synthetic

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = PROJECT_ROOT / "data" / "ham10000"
DEFAULT_DEMO = PROJECT_ROOT / "data" / "demo"

# Harvard Dataverse, doi:10.7910/DVN/DBW86T: the dataset's listing names each
# file with its id and MD5; files are fetched by id in their original format.
DATAVERSE = "https://dataverse.harvard.edu"
DATAVERSE_DOI = "doi:10.7910/DVN/DBW86T"
DOWNLOAD_FILES: tuple[str, ...] = ("HAM10000_metadata", "HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip")


class DataError(Exception):
    """A problem with the user's data: the message names the file and the fix."""


@dataclass(frozen=True)
class Dataset:
    """A validated dataset: its folder, metadata with an ``path`` column, and whether it is synthetic."""

    root: Path
    meta: pd.DataFrame
    synthetic: bool

    @property
    def label(self) -> str:
        """Human label for logs, figures and the report."""
        return "SYNTHETIC DEMO DATA (not HAM10000)" if self.synthetic else f"HAM10000 ({self.root})"


# --------------------------------------------------------------------------- folders


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


# --------------------------------------------------------------------------- metadata


def read_metadata(csv: Path) -> pd.DataFrame:
    """Read and validate a HAM10000-style metadata CSV (CRLF or LF, missing ages,
    ``unknown`` sex and site); raise DataError naming the file on any problem."""
    if not csv.exists():
        raise DataError(f"{csv}: metadata file not found; the data folder needs {METADATA_FILE} (or run `python -m skin_lesion data demo`)")
    try:
        df = pd.read_csv(csv, dtype={"lesion_id": str, "image_id": str, "dx": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{csv}: not a readable CSV ({str(e).splitlines()[0]}); re-download the metadata") from e
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


def load_dataset(data: str | os.PathLike | None = None, verify_images: bool = False) -> Dataset:
    """Load the dataset folder (see :func:`resolve_data_dir`) with an absolute
    ``path`` per image; raise DataError if any listed image is absent."""
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
        bad = [p for p in (corrupt_image(Path(x)) for x in meta["path"]) if p]
        if bad:
            raise DataError(bad[0])
    if synthetic:
        log.warning("Data: %s", "SYNTHETIC DEMO DATA (not HAM10000)")
    return Dataset(root=root, meta=meta, synthetic=synthetic)


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
        problems.append(f"{root / 'images' / (image_id + '.jpg')}: listed in {METADATA_FILE} but absent; restore the file or drop its row")
    for image_id in sorted(set(index) - listed):
        problems.append(f"{index[image_id]}: image not listed in {METADATA_FILE}; add a row or remove it")
    for image_id in sorted(listed & set(index)):
        p = corrupt_image(index[image_id])
        if p:
            problems.append(p)
    return problems


# --------------------------------------------------------------------------- splits


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
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.full(len(meta), -1, dtype=int)
    for f, (_, idx) in enumerate(sgkf.split(meta, meta["dx"], groups=meta["lesion_id"])):
        fold[idx] = f
    return pd.Series(fold, index=meta.index, name="fold")


def image_split(meta: pd.DataFrame, val: float = 0.15, test: float = 0.15, seed: int = 0) -> pd.Series:
    """The leaky split by image (as in the paper), for the leakage comparison only."""
    rest, test_idx = train_test_split(meta.index, test_size=test, stratify=meta["dx"], random_state=seed)
    train_idx, val_idx = train_test_split(rest, test_size=val / (1 - test), stratify=meta.loc[rest, "dx"], random_state=seed)
    part = pd.Series("train", index=meta.index, name="split")
    part.loc[val_idx] = "val"
    part.loc[test_idx] = "test"
    return part


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


def make_split_table(meta: pd.DataFrame, folds: int | None = None, seed: int = 0, by: str = "lesion") -> pd.DataFrame:
    """The ``split.csv`` table: image_id, lesion_id, dx and ``split`` (or ``fold``)."""
    out = meta[["image_id", "lesion_id", "dx"]].copy()
    if folds:
        out["fold"] = lesion_folds(meta, folds, seed)
    elif by == "image":
        out["split"] = image_split(meta, seed=seed)
    else:
        out["split"] = lesion_split(meta, seed=seed)
    return out


# --------------------------------------------------------------------------- synthetic demo set

# Per class: base RGB colour, border irregularity, texture strength, lesion size,
# a second colour (blue-grey veil, vessels, scale...). Chosen so that the
# classes differ in colour, shape, border and texture, as real lesions do.
_DEMO_STYLE: dict[str, dict] = {
    "nv": dict(rgb=(150, 95, 60), irregular=0.05, texture=0.15, radius=(0.22, 0.32), accent=None),
    "mel": dict(rgb=(70, 40, 30), irregular=0.35, texture=0.55, radius=(0.28, 0.42), accent=(80, 90, 130)),
    "bkl": dict(rgb=(165, 125, 80), irregular=0.15, texture=0.65, radius=(0.25, 0.38), accent=(200, 180, 130)),
    "bcc": dict(rgb=(200, 130, 130), irregular=0.20, texture=0.25, radius=(0.18, 0.30), accent=(225, 210, 210)),
    "akiec": dict(rgb=(190, 90, 70), irregular=0.25, texture=0.45, radius=(0.20, 0.34), accent=(235, 225, 200)),
    "vasc": dict(rgb=(175, 35, 55), irregular=0.08, texture=0.20, radius=(0.14, 0.24), accent=(110, 10, 40)),
    "df": dict(rgb=(135, 85, 65), irregular=0.05, texture=0.10, radius=(0.12, 0.20), accent=(235, 225, 215)),
}
_SITES = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "foot", "neck", "scalp", "hand", "ear", "genital", "unknown")
_SITE_P = np.array([2192, 2077, 1404, 1118, 1022, 745, 407, 319, 168, 128, 90, 56, 48, 234], float)
_CLASS_AGE = {"nv": (45, 15), "mel": (61, 14), "bkl": (64, 13), "bcc": (67, 12), "akiec": (68, 10), "vasc": (52, 20), "df": (52, 14)}
_DX_TYPE = {"nv": "follow_up", "mel": "histo", "bkl": "histo", "bcc": "histo", "akiec": "histo", "vasc": "consensus", "df": "histo"}


def demo_metadata(n_images: int = 700, seed: int = 0) -> pd.DataFrame:
    """HAM10000-shaped metadata with HAM's class shares (every class present),
    age, sex and site patterns, and one to four images per lesion."""
    rng = np.random.default_rng(seed)
    total = sum(HAM_COUNTS.values())
    rows: list[dict] = []
    lesion_no = 0
    for dx in CLASSES:
        want = max(12, round(n_images * HAM_COUNTS[dx] / total))
        made = 0
        while made < want:
            lesion_no += 1
            n = min(want - made, int(rng.choice([1, 1, 1, 2, 2, 3, 4])))
            mu, sd = _CLASS_AGE[dx]
            age = float(np.clip(round(rng.normal(mu, sd) / 5) * 5, 0, 85))
            sex = str(rng.choice(["male", "female", "unknown"], p=[0.54, 0.455, 0.005]))
            site = str(rng.choice(_SITES, p=_SITE_P / _SITE_P.sum()))
            if dx in ("bcc", "akiec") and rng.random() < 0.4:
                site = "face"
            for _ in range(n):
                rows.append(dict(lesion_id=f"DEMO_L{lesion_no:05d}", dx=dx, dx_type=_DX_TYPE[dx], age=age, sex=sex, localization=site, dataset="synthetic_demo"))
            made += n
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    df.insert(1, "image_id", [f"DEMO_{i:07d}" for i in range(len(df))])
    df.loc[rng.random(len(df)) < 0.005, "age"] = np.nan
    return df[list(COLUMNS)]


def demo_image(dx: str, rng: np.random.Generator, size: tuple[int, int] = (200, 150)) -> Image.Image:
    """Draw one lesion-like image: skin background, an irregular blob whose
    colour, border and texture depend on the class, hair and vignetting."""
    w, h = size
    style = _DEMO_STYLE[dx]
    skin = np.array([225, 180, 160]) + rng.normal(0, 12, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.ones((h, w, 3)) * skin
    img += rng.normal(0, 4, (h, w, 1))
    cx, cy = w / 2 + rng.normal(0, w * 0.06), h / 2 + rng.normal(0, h * 0.06)
    r0 = rng.uniform(*style["radius"]) * min(w, h) * 1.6
    theta = np.arctan2(yy - cy, xx - cx)
    rad = np.hypot(xx - cx, (yy - cy) * rng.uniform(1.0, 1.4))
    wobble = sum(style["irregular"] * rng.uniform(0.3, 1) * np.sin(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5, 7))
    edge = r0 * (1 + wobble)
    inside = np.clip((edge - rad) / (2 + 10 * style["irregular"]), 0, 1)[..., None]
    colour = np.array(style["rgb"]) + rng.normal(0, 10, 3)
    noise = rng.normal(0, 1, (h // 6 + 1, w // 6 + 1))
    noise = np.kron(noise, np.ones((6, 6)))[:h, :w, None] * 40 * style["texture"]
    lesion = colour + noise
    if style["accent"] is not None:
        blob = np.clip(1 - np.hypot(xx - cx - rng.normal(0, r0 / 3), yy - cy - rng.normal(0, r0 / 3)) / (r0 * 0.5), 0, 1)[..., None]
        lesion = lesion * (1 - 0.7 * blob) + np.array(style["accent"]) * 0.7 * blob
    img = img * (1 - inside) + lesion * inside
    img *= 1 - 0.35 * (np.hypot((xx - w / 2) / w, (yy - h / 2) / h) ** 2)[..., None] * 2
    pic = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    for _ in range(int(rng.integers(0, 5))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        draw.line([(x0, y0), (x0 + rng.normal(0, 60), y0 + rng.normal(0, 60))], fill=(40, 30, 25), width=1)
    return pic.filter(ImageFilter.GaussianBlur(0.6))


def make_demo(out: str | os.PathLike = DEFAULT_DEMO, n_images: int = 700, seed: int = 0) -> Path:
    """Write the synthetic demo set (metadata + JPEGs) into ``out``. Deterministic by seed."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    meta = demo_metadata(n_images, seed)
    rng = np.random.default_rng(seed + 1)
    for image_id, dx in zip(meta["image_id"], meta["dx"]):
        demo_image(dx, rng).save(out / "images" / f"{image_id}.jpg", quality=90)
    meta.to_csv(out / METADATA_FILE, index=False)
    (out / DEMO_MARK).write_text("This folder is the SYNTHETIC demo set made by `python -m skin_lesion data demo`; it is not HAM10000.\n")
    (out / "README.md").write_text(
        "# Synthetic demo set\n\nMade by skin_lesion (`python -m skin_lesion data demo`): drawn lesion-like images with "
        "HAM10000-shaped metadata. NOT real dermatoscopy; numbers measured on it say nothing about skin cancer.\n"
    )
    log.warning("Wrote SYNTHETIC demo set: %d images in %s", len(meta), out)
    return out


# --------------------------------------------------------------------------- download


def _fetch(url: str, dest: Path, timeout: float = 10.0, progress: bool = True) -> Path:
    """Download ``url`` into ``dest``, resuming a partial ``dest.part`` with an HTTP Range request."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # already complete
            part.rename(dest)
            return dest
        raise DataError(f"{url}: download failed with HTTP {e.code}; try again later or download by hand into {dest.parent}") from e
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"{url}: no network ({reason}); download HAM10000 by hand (doi:10.7910/DVN/DBW86T) into {dest.parent} or set SKIN_LESION_DATA") from e
    with resp:
        mode = "ab" if have and resp.status == 206 else "wb"
        total = resp.headers.get("Content-Length")
        total = int(total) + (have if mode == "ab" else 0) if total else None
        from tqdm import tqdm

        with part.open(mode) as f, tqdm(total=total, initial=have if mode == "ab" else 0, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    part.rename(dest)
    return dest


def _md5(path: Path) -> str:
    """MD5 of a file, read in chunks (what Dataverse publishes)."""
    h = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def dataverse_listing(server: str = DATAVERSE, doi: str = DATAVERSE_DOI, timeout: float = 10.0) -> list[dict]:
    """The dataset's files from the Dataverse API: name, download URL, MD5 (of the original file)."""
    import json

    url = f"{server}/api/datasets/:persistentId/?persistentId={doi}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            listing = json.load(resp)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"{url}: no network ({reason}); download HAM10000 by hand ({doi}) into data/ham10000 or set SKIN_LESION_DATA") from e
    except ValueError as e:
        raise DataError(f"{url}: the answer is not the Dataverse JSON listing; try again later") from e
    files = []
    for entry in listing["data"]["latestVersion"]["files"]:
        f = entry["dataFile"]
        name = f.get("originalFileName") or f["filename"]
        md5 = f.get("md5") or (f.get("checksum") or {}).get("value")
        files.append(dict(name=name, url=f"{server}/api/access/datafile/{f['id']}?format=original", md5=md5))
    return files


def download(out: str | os.PathLike = DEFAULT_DATA, server: str = DATAVERSE, doi: str = DATAVERSE_DOI, timeout: float = 10.0, progress: bool = True) -> Path:
    """Fetch HAM10000 from Harvard Dataverse into ``out``: resumable, MD5-verified, unpacked.

    Zips are unpacked into their ``HAM10000_images_part_N`` folders and the
    metadata is saved as ``HAM10000_metadata.csv``. Downloads sit in
    ``out/downloads`` so an interrupted run resumes where it stopped. Tests
    point ``server`` at a local stand-in.
    """
    out = Path(out)
    wanted = [f for f in dataverse_listing(server, doi, timeout) if any(f["name"].startswith(w) for w in DOWNLOAD_FILES)]
    if not wanted:
        raise DataError(f"{server}: the listing of {doi} holds none of {', '.join(DOWNLOAD_FILES)}; download by hand")
    (out / "downloads").mkdir(parents=True, exist_ok=True)
    for f in wanted:
        dest = out / "downloads" / f["name"]
        if not dest.exists():
            _fetch(f["url"], dest, timeout=timeout, progress=progress)
        if f["md5"] and _md5(dest) != f["md5"]:
            dest.unlink()
            raise DataError(f"{dest}: checksum mismatch (expected md5 {f['md5']}); the file was removed, run the download again")
        if dest.suffix == ".zip":
            _unzip_images(dest, out / dest.stem)
        else:
            sep = "\t" if dest.suffix == ".tab" else ","
            pd.read_csv(dest, sep=sep, dtype=str).to_csv(out / METADATA_FILE, index=False)
    log.info("HAM10000 is in %s", out)
    return out


def _unzip_images(archive: Path, target: Path) -> None:
    """Unpack the image files of ``archive`` flat into ``target`` (no paths from the zip are trusted)."""
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z:
        for member in z.infolist():
            name = Path(member.filename).name
            if member.is_dir() or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with z.open(member) as src, (target / name).open("wb") as dst:
                shutil.copyfileobj(src, dst)
