"""Data layer: metadata validation, dataset checks, lesion-grouped splits, demo set, download."""

from __future__ import annotations

import hashlib
import http.server
import json
import shutil
import threading
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli

from skin_lesion import data, demo, download, splits
from skin_lesion.info import CLASSES, HAM_COUNTS, METADATA_FILE, DataError


def _copy_demo(src: Path, dst: Path, n: int = 30) -> Path:
    """A writable copy of the first ``n`` demo images and their metadata."""
    meta = pd.read_csv(src / METADATA_FILE).head(n)
    (dst / "images").mkdir(parents=True)
    for i in meta["image_id"]:
        shutil.copy(src / "images" / f"{i}.jpg", dst / "images")
    meta.to_csv(dst / METADATA_FILE, index=False)
    return dst


def test_real_metadata_loads_with_its_quirks(real_dir):
    ds = data.load_dataset(real_dir)
    assert len(ds.meta) == 10015 and ds.meta["lesion_id"].nunique() == 7470
    assert ds.meta["dx"].value_counts().to_dict() == HAM_COUNTS
    assert ds.meta["age"].isna().sum() == 57  # missing ages stay missing
    assert (ds.meta["sex"] == "unknown").sum() > 0
    assert not ds.synthetic and all(Path(p).exists() for p in ds.meta["path"].head(20))


def test_original_part_folders_are_found(demo_dir, tmp_path):
    d = _copy_demo(demo_dir, tmp_path / "ds")
    (d / "images").rename(d / "HAM10000_images_part_1")
    moved = sorted((d / "HAM10000_images_part_1").iterdir())[:10]
    (d / "HAM10000_images_part_2").mkdir()
    for p in moved:
        p.rename(d / "HAM10000_images_part_2" / p.name)
    assert len(data.load_dataset(d).meta) == 30


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.drop(columns=["dx"]), "missing column(s) dx"),
        (lambda m: m.assign(extra=1), "unexpected column(s) extra"),
        (lambda m: m.assign(dx=["melanoma"] + list(m["dx"][1:])), "unknown dx label(s) ['melanoma']"),
        (lambda m: pd.concat([m, m.head(1)]), "duplicate image_id"),
    ],
)
def test_bad_metadata_is_one_clear_line(demo_dir, tmp_path, mutate, message):
    d = _copy_demo(demo_dir, tmp_path / "ds")
    csv = d / METADATA_FILE
    mutate(pd.read_csv(csv)).to_csv(csv, index=False)
    with pytest.raises(DataError) as err:
        data.load_dataset(d)
    assert message in str(err.value) and str(csv) in str(err.value) and "\n" not in str(err.value)


def test_missing_folder_and_missing_images(demo_dir, tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        data.load_dataset(tmp_path / "nowhere")
    d = _copy_demo(demo_dir, tmp_path / "ds")
    victim = sorted((d / "images").iterdir())[0]
    victim.unlink()
    with pytest.raises(DataError, match="absent"):
        data.load_dataset(d)


def test_data_check_reports_every_problem(demo_dir, tmp_path):
    d = _copy_demo(demo_dir, tmp_path / "ds")
    images = sorted((d / "images").iterdir())
    images[0].unlink()  # listed but absent
    images[1].write_bytes(images[1].read_bytes()[:200])  # truncated JPEG
    shutil.copy(images[2], d / "images" / "EXTRA_1.jpg")  # present but not listed
    meta = pd.read_csv(d / METADATA_FILE)
    meta.loc[3, "dx"] = "cancer"
    meta.to_csv(d / METADATA_FILE, index=False)
    res = cli("data", "check", "--data", str(d))
    assert res.returncode != 0
    out = res.stdout
    assert images[0].stem in out and "absent" in out
    assert images[1].name in out and "corrupt" in out
    assert "EXTRA_1.jpg" in out and "not listed" in out
    assert "unknown dx label(s) ['cancer']" in out
    assert "Traceback" not in res.stderr


def test_data_check_ok_on_demo(demo_dir):
    res = cli("data", "check", "--data", str(demo_dir))
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout


def _assert_grouped_and_stratified(meta: pd.DataFrame, split: pd.Series, tolerance: float = 0.02):
    parts = meta.assign(split=split.to_numpy())
    assert parts.groupby("lesion_id")["split"].nunique().max() == 1, "a lesion crosses parts"
    whole = meta["dx"].value_counts(normalize=True)
    for _, group in parts.groupby("split"):
        share = group["dx"].value_counts(normalize=True).reindex(whole.index, fill_value=0)
        assert (share - whole).abs().max() <= tolerance, (share - whole).abs().max()


def test_real_split_grouped_by_lesion_and_stratified(real_dir):
    meta = data.load_dataset(real_dir).meta
    split = splits.lesion_split(meta, seed=0)
    _assert_grouped_and_stratified(meta, split)
    lesion_share = meta.assign(s=split).groupby("lesion_id")["s"].first().value_counts(normalize=True)
    assert abs(lesion_share["test"] - 0.15) < 0.01 and abs(lesion_share["val"] - 0.15) < 0.01
    folds = splits.lesion_folds(meta, 5, seed=0)
    _assert_grouped_and_stratified(meta, folds)
    assert folds.nunique() == 5


def test_split_is_deterministic_and_grouped_on_demo(demo_dir):
    meta = data.load_dataset(demo_dir).meta
    a, b = splits.lesion_split(meta, seed=3), splits.lesion_split(meta, seed=3)
    assert a.equals(b) and not a.equals(splits.lesion_split(meta, seed=4))
    assert meta.assign(s=a).groupby("lesion_id")["s"].nunique().max() == 1
    assert set(a) == {"train", "val", "test"}


def test_fold_parts_hold_out_one_fold_and_a_grouped_val(demo_dir):
    meta = data.load_dataset(demo_dir).meta
    table = splits.make_split_table(meta, folds=3, seed=0)
    part = splits.fold_parts(table, 1)
    assert (part[table["fold"] == 1] == "test").all()
    assert table.assign(p=part).groupby("lesion_id")["p"].nunique().max() == 1
    with pytest.raises(DataError, match="out of range"):
        splits.fold_parts(table, 3)


def test_split_cli_writes_csv(demo_dir, tmp_path):
    out = tmp_path / "split.csv"
    res = cli("data", "split", "--data", str(demo_dir), "--out", str(out), "--folds", "3", "--seed", "1")
    assert res.returncode == 0, res.stderr
    table = pd.read_csv(out)
    assert {"image_id", "lesion_id", "dx", "fold"} <= set(table.columns) and table["fold"].nunique() == 3


def test_splits_the_data_cannot_hold_are_one_line(demo_dir, tmp_path):
    """More folds than lesions, or a class too small to stratify by image: one line
    naming what to change, no scikit-learn traceback."""
    d = tmp_path / "tiny"
    shutil.copytree(demo_dir, d)
    meta = pd.read_csv(d / METADATA_FILE)
    keep = meta[meta["dx"] != "df"].groupby("dx").head(6)
    pd.concat([keep, meta[meta["dx"] == "df"].head(1)]).to_csv(d / METADATA_FILE, index=False)
    res = cli("data", "split", "--data", str(d), "--by", "image", "--out", str(tmp_path / "s.csv"))
    assert res.returncode == 2 and "df (1) has fewer than 3 images" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    many = str(pd.read_csv(d / METADATA_FILE)["lesion_id"].nunique() + 1)
    res = cli("data", "split", "--data", str(d), "--folds", many, "--out", str(tmp_path / "f.csv"))
    assert res.returncode == 2 and f"ask for at most {int(many) - 1} folds" in res.stderr, res.stderr[-2000:]


def test_demo_set_is_deterministic_and_ham_shaped(tmp_path):
    a = demo.make_demo(tmp_path / "a", n_images=120, seed=5)
    b = demo.make_demo(tmp_path / "b", n_images=120, seed=5)
    ma, mb = pd.read_csv(a / METADATA_FILE), pd.read_csv(b / METADATA_FILE)
    assert ma.equals(mb)
    first = ma["image_id"].iloc[0]
    assert (a / "images" / f"{first}.jpg").read_bytes() == (b / "images" / f"{first}.jpg").read_bytes()
    assert set(ma["dx"]) == set(CLASSES) and ma["dx"].value_counts().idxmax() == "nv"
    assert (ma.groupby("lesion_id").size() > 1).any()
    ds = data.load_dataset(a)
    assert ds.synthetic and "SYNTHETIC" in ds.label


def test_demo_classes_differ_in_colour(demo_dir):
    """The demo images must carry class signal: mean colour differs between classes."""
    from PIL import Image

    meta = data.load_dataset(demo_dir).meta
    means = {c: np.mean([np.asarray(Image.open(p)).mean((0, 1)) for p in meta[meta["dx"] == c]["path"].head(8)], 0) for c in ("nv", "mel", "vasc")}
    assert np.linalg.norm(means["mel"] - means["vasc"]) > 10 and np.linalg.norm(means["nv"] - means["mel"]) > 10


def test_external_set_names_itself_and_skips_missing_images_only_when_asked(demo_dir, tmp_path):
    d = _copy_demo(demo_dir, tmp_path / "ext", n=5)
    meta = pd.read_csv(d / METADATA_FILE)
    labels = tmp_path / "labels.csv"
    pd.concat([meta[["image_id", "dx"]], pd.DataFrame({"image_id": ["GONE_1"], "dx": ["mel"]})]).to_csv(labels, index=False)
    with pytest.raises(DataError, match="1 labelled image\\(s\\) absent, e.g. GONE_1") as err:
        data.external_set(d / "images", labels)
    assert "\n" not in str(err.value)
    ext = data.external_set(d / "images", labels, skip_missing=True)
    assert ext.name == "images" and ext.skipped == ["GONE_1"]
    assert list(ext.frame["image_id"]) == list(meta["image_id"]) and all(Path(p).exists() for p in ext.frame["path"])
    assert data.external_set(d / "images", labels, name="clinic", skip_missing=True).name == "clinic"


# --------------------------------------------------------------------------- download, against a local stand-in


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, honouring Range requests (for resume), and a Dataverse-like listing."""

    listing: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/api/datasets/"):
            body = json.dumps(self.listing).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        name = self.path.split("/api/access/datafile/")[-1].split("?")[0]
        path = Path(self.directory) / name
        blob = path.read_bytes()
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(blob) - start))
        self.end_headers()
        self.wfile.write(blob[start:])


@pytest.fixture()
def standin_server(demo_dir, tmp_path):
    """A local HTTP server holding a tiny HAM10000 stand-in: metadata CSV and two image zips."""
    files = tmp_path / "served"
    files.mkdir()
    meta = pd.read_csv(demo_dir / METADATA_FILE).head(6)
    meta.to_csv(files / "HAM10000_metadata.csv", index=False)
    for k, chunk in enumerate((meta.head(3), meta.tail(3)), start=1):
        with zipfile.ZipFile(files / f"HAM10000_images_part_{k}.zip", "w") as z:
            for i in chunk["image_id"]:
                z.write(demo_dir / "images" / f"{i}.jpg", f"HAM10000_images_part_{k}/{i}.jpg")
    entries = []
    for name in sorted(p.name for p in files.iterdir()):
        md5 = hashlib.md5((files / name).read_bytes()).hexdigest()
        entries.append({"dataFile": {"id": name, "filename": name, "md5": md5}})
    handler = type("H", (_Handler,), {"listing": {"data": {"latestVersion": {"files": entries}}}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(files)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files, entries
    server.shutdown()


def test_download_from_standin_resumes_and_verifies(standin_server, tmp_path):
    url, files, _ = standin_server
    out = tmp_path / "ham"
    # a partial download left by an interrupted run is resumed, not restarted
    (out / "downloads").mkdir(parents=True)
    blob = (files / "HAM10000_images_part_1.zip").read_bytes()
    (out / "downloads" / "HAM10000_images_part_1.zip.part").write_bytes(blob[:100])
    download.download(out, server=url, progress=False)
    assert (out / "downloads" / "HAM10000_images_part_1.zip").read_bytes() == blob
    ds = data.load_dataset(out)
    assert len(ds.meta) == 6


def test_download_rejects_a_bad_checksum(standin_server, tmp_path):
    url, files, entries = standin_server
    (files / "HAM10000_images_part_2.zip").write_bytes(b"tampered")
    with pytest.raises(DataError, match="checksum mismatch"):
        download.download(tmp_path / "ham", server=url, progress=False)


def test_download_without_network_fails_fast_and_clearly(tmp_path):
    res = cli("data", "download", "--out", str(tmp_path / "ham"), "--server", "http://127.0.0.1:9", "--timeout", "3")
    assert res.returncode == 2
    assert "no network" in res.stderr and "Traceback" not in res.stderr
