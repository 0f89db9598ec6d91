"""Download HAM10000 from Harvard Dataverse (doi:10.7910/DVN/DBW86T): resumable,
MD5-verified, unpacked into the folder layout ``data.load_dataset`` reads.

Without a network it fails at once with a one-line message that names the
manual alternative; tests point ``server`` at a local stand-in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pandas as pd

from skin_lesion.info import DEFAULT_DATA, IMAGE_SUFFIXES, METADATA_FILE, DataError

log = logging.getLogger("skin_lesion")

# The dataset's listing names each file with its id and MD5; files are fetched by id in their original format.
DATAVERSE = "https://dataverse.harvard.edu"
DATAVERSE_DOI = "doi:10.7910/DVN/DBW86T"
DOWNLOAD_FILES: tuple[str, ...] = ("HAM10000_metadata", "HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip")

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
