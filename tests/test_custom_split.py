"""``train --split FILE``: a run on a split table the user made (say, ``data split``'s
table with part of its training set cut away), checked against the data first."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli

from skin_lesion import data, splits
from skin_lesion.info import DataError
from skin_lesion.runs import RunFolder


@pytest.fixture
def table(demo_dir) -> pd.DataFrame:
    """The demo set's lesion-grouped split, as ``data split`` makes it."""
    return splits.make_split_table(data.load_dataset(demo_dir).meta, seed=0)


def test_a_run_trains_on_the_tables_own_parts(demo_dir, table, tmp_path):
    # Cut training to one lesion in two (whole lesions), as a support-matched screen does.
    train_lesions = sorted(table.loc[table["split"] == "train", "lesion_id"].unique())
    cut = table[~table["lesion_id"].isin(train_lesions[::2])]
    cut.to_csv(tmp_path / "cut.csv", index=False)
    run = tmp_path / "run"
    run.mkdir()
    table.to_csv(run / "split.csv", index=False)  # what a start that died left, from an earlier table: a fresh start reads the file again
    res = cli("train", "--profile", "smoke", "--model", "cnn", "--epochs", "1", "--tta", "2", "--split", str(tmp_path / "cut.csv"),
              "--data", str(demo_dir), "--run", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    counts = cut["split"].value_counts()
    # Every image of the table, none other: the smoke profile's 20-a-class cap does not apply to a given table.
    assert f"{counts['train']} train / {counts['val']} val images" in res.stderr
    written = pd.read_csv(run / "split.csv", dtype=str)
    pd.testing.assert_frame_equal(written, cut.reset_index(drop=True).astype(str))
    assert set(RunFolder(run).predictions()["image_id"]) == set(cut.loc[cut["split"] == "test", "image_id"])
    config = json.loads((run / "config.json").read_text())
    assert config["split_file"] == str(tmp_path / "cut.csv") and config["max_per_class"] is None


def _broken(table: pd.DataFrame, how: str) -> pd.DataFrame:
    """``table`` with one mistake a user can make by hand."""
    t = table.copy()
    if how == "column":
        return t.drop(columns="lesion_id")
    if how == "part":
        t.loc[0, "split"] = "holdout"
    elif how == "leak":  # one image of a multi-image lesion moved to another part
        lesion = t.groupby("lesion_id").filter(lambda g: len(g) > 1)["lesion_id"].iloc[0]
        i = t.index[t["lesion_id"] == lesion][0]
        t.loc[i, "split"] = "test" if t.loc[i, "split"] != "test" else "train"
    elif how == "image":
        t.loc[0, "image_id"] = "ISIC_not_here"
    elif how == "label":
        t.loc[0, "dx"] = "mel" if t.loc[0, "dx"] != "mel" else "nv"
    elif how == "no_val":
        t = t[t["split"] != "val"]
    elif how == "twice":
        t = pd.concat([t, t.iloc[:1]])
    elif how == "empty":
        t.loc[1, "image_id"] = None
    elif how == "class":  # every dermatofibroma lesion of train moved, whole, to val
        t.loc[(t["split"] == "train") & (t["dx"] == "df"), "split"] = "val"
    return t


@pytest.mark.parametrize("how, message", [
    ("column", r"missing column\(s\) \['lesion_id'\]; a split table has image_id, lesion_id, dx and split"),
    ("part", r"unknown split value\(s\) \['holdout'\]; each row is train, val or test"),
    ("leak", r"1 lesion\(s\) in more than one part \(first: \S+\); keep each lesion's images in one part"),
    ("image", r"1 image\(s\) are not in the data's metadata \(first: ISIC_not_here\)"),
    ("label", r"1 image\(s\) have another dx than the metadata"),
    ("no_val", "no val rows; a run needs train and val images"),
    ("twice", r"image \S+ is listed more than once"),
    ("empty", r"1 empty image_id cell\(s\) \(first: data row 2\); fill or drop those rows"),
    ("class", "no train images of df; every class of the data needs some in train"),
])
def test_a_broken_table_is_refused_naming_the_file(demo_dir, table, tmp_path, how, message):
    path = tmp_path / "split.csv"
    _broken(table, how).to_csv(path, index=False)
    with pytest.raises(DataError, match=f"^{path}: {message}"):
        splits.read_split_file(path, data.load_dataset(demo_dir).meta)


def test_a_fold_table_is_pointed_at_folds(demo_dir, tmp_path):
    meta = data.load_dataset(demo_dir).meta
    splits.make_split_table(meta, folds=3).to_csv(tmp_path / "folds.csv", index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['split'\].*goes with `train --folds`, not --split"):
        splits.read_split_file(tmp_path / "folds.csv", meta)


def test_the_command_line_refuses_before_training(demo_dir, table, tmp_path):
    _broken(table, "leak").to_csv(tmp_path / "leak.csv", index=False)
    res = cli("train", "--profile", "smoke", "--split", str(tmp_path / "leak.csv"), "--data", str(demo_dir), "--run", str(tmp_path / "r"))
    assert res.returncode == 2 and "lesion(s) in more than one part" in res.stderr
    assert not (tmp_path / "r").exists()  # refused before the run folder was made
    res = cli("train", "--profile", "smoke", "--split", str(tmp_path / "absent.csv"), "--data", str(demo_dir), "--run", str(tmp_path / "r2"))
    assert res.returncode == 2 and "absent.csv: split table not found; write one with" in res.stderr
    table[table["split"] != "test"].to_csv(tmp_path / "no_test.csv", index=False)
    res = cli("train", "--profile", "smoke", "--split", str(tmp_path / "no_test.csv"), "--data", str(demo_dir), "--run", str(tmp_path / "r4"))
    assert res.returncode == 2 and "no_test.csv: no test rows to score the run on; add some, or pass --no-eval" in res.stderr
    # A saved smoke config carries the profile's 20-a-class cap: --split replaces it, so the table's own problem is what is said.
    (tmp_path / "smoke.json").write_text(json.dumps({"profile": "smoke", "max_per_class": 20}))
    res = cli("train", "--config", str(tmp_path / "smoke.json"), "--split", str(tmp_path / "leak.csv"), "--data", str(demo_dir), "--run", str(tmp_path / "r5"))
    assert res.returncode == 2 and "lesion(s) in more than one part" in res.stderr
    res = cli("train", "--refit-from", str(tmp_path / "r"), "--split", str(tmp_path / "leak.csv"), "--run", str(tmp_path / "r6"))
    assert res.returncode == 2 and "drop --split " in res.stderr
    table.to_csv(tmp_path / "ok.csv", index=False)
    for other in (["--folds", "3"], ["--holdout-source", "synthetic_demo"], ["--split-by", "image"], ["--max-per-class", "5"]):
        res = cli("train", "--profile", "smoke", "--split", str(tmp_path / "ok.csv"), *other, "--data", str(demo_dir), "--run", str(tmp_path / "r3"))
        assert res.returncode == 2 and "--split trains on the table's own parts; it does not combine with" in res.stderr, other


def test_a_fresh_start_makes_its_split_again(demo_dir, table, tmp_path):
    """A start that died before its first epoch leaves its split.csv behind; a restart with
    another seed makes the split of its own config, while a resumed run keeps the table."""
    from skin_lesion.config import TrainConfig
    from skin_lesion.train import prepare_split

    ds = data.load_dataset(demo_dir)
    run = RunFolder(tmp_path / "run").mkdir()
    run.write_split(table)  # seed 0's, left by the start that died
    cfg = TrainConfig(model="cnn", profile="smoke", run=str(run.path), seed=1, data=str(demo_dir)).resolved()
    meta = prepare_split(cfg, ds, run, fresh=True)
    seed1 = splits.make_split_table(splits.subsample(ds.meta, cfg.max_per_class, 1), seed=1)
    assert not seed1.equals(table)
    assert run.read_split()[["image_id", "split"]].equals(seed1[["image_id", "split"]].reset_index(drop=True))
    assert set(meta.loc[meta["split"] == "test", "image_id"]) == set(seed1.loc[seed1["split"] == "test", "image_id"])
    run.write_split(table)
    resumed = prepare_split(cfg, ds, run, fresh=False)
    assert set(resumed.loc[resumed["split"] == "test", "image_id"]) == set(table.loc[table["split"] == "test", "image_id"])


def test_a_corrupt_image_stops_a_fresh_run_before_training(demo_dir, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(demo_dir, copy)
    used = splits.subsample(data.load_dataset(copy).meta, 20, 0)  # the smoke profile's 20 a class: a file the run reads
    victim = Path(used["path"].iloc[5])
    victim.write_bytes(victim.read_bytes()[:200])  # a truncated JPEG
    res = cli("train", "--profile", "smoke", "--model", "cnn", "--data", str(copy), "--run", str(tmp_path / "run"))
    assert res.returncode == 2 and f"{victim}: unreadable or corrupt image" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "run" / "history.csv").exists()
