"""Holding one source out: the lesion-grouped split whose test part is one
``dataset`` source, never trained or chosen on, and the study tested on it."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from conftest import cli

from skin_lesion import data, splits
from skin_lesion.info import CLASSES, DataError
from skin_lesion.runs import RunFolder
from skin_lesion.study import combination_folders, shift_table


@pytest.fixture(scope="module")
def sources_dir(demo_dir, tmp_path_factory):
    """The demo set told it comes from two clinics (a third of its lesions from
    clinic_a), with one lesion photographed in both."""
    out = tmp_path_factory.mktemp("sources")
    meta = pd.read_csv(demo_dir / "HAM10000_metadata.csv")
    lesions = sorted(meta["lesion_id"].unique())
    meta["dataset"] = meta["lesion_id"].map({lesion: "clinic_a" if i % 3 == 0 else "clinic_b" for i, lesion in enumerate(lesions)})
    shared = meta.groupby("lesion_id").filter(lambda g: len(g) > 1 and (g["dataset"] == "clinic_a").all())["lesion_id"].iloc[0]
    meta.loc[meta.index[meta["lesion_id"] == shared][-1], "dataset"] = "clinic_b"
    meta.to_csv(out / "HAM10000_metadata.csv", index=False)
    (out / "images").symlink_to(demo_dir / "images")
    return out


def _assert_source_held_out(meta: pd.DataFrame, table: pd.DataFrame, source: str) -> None:
    """Test is exactly the source's images; no lesion of the source is in train or val."""
    merged = meta.merge(table[["image_id", "split"]], on="image_id", how="left")
    assert set(merged.loc[merged["split"] == "test", "image_id"]) == set(meta.loc[meta["dataset"] == source, "image_id"])
    held = set(meta.loc[meta["dataset"] == source, "lesion_id"])
    assert not held & set(merged.loc[merged["split"].isin(["train", "val"]), "lesion_id"])
    assert merged.dropna(subset=["split"]).groupby("lesion_id")["split"].nunique().max() == 1
    dropped = merged[merged["split"].isna()]
    assert dropped["lesion_id"].isin(held).all() and (dropped["dataset"] != source).all()


def test_holdout_source_split_on_two_clinics(sources_dir):
    meta = data.load_dataset(sources_dir).meta
    table = splits.make_split_table(meta, seed=0, holdout_source="clinic_a")
    _assert_source_held_out(meta, table, "clinic_a")
    assert len(table) == len(meta) - 1  # the shared lesion's clinic_b image is in no part
    assert {"train", "val", "test"} == set(table["split"]) and "dataset" in table
    assert table.equals(splits.make_split_table(meta, seed=0, holdout_source="clinic_a"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(holdout_source="clinic_c"), r"not a source of this data \(its dataset column holds: clinic_a, clinic_b\)"),
    (dict(holdout_source="clinic_a", folds=3), "does not combine with --folds"),
])
def test_holdout_source_errors(sources_dir, kwargs, message):
    with pytest.raises(DataError, match=message):
        splits.make_split_table(data.load_dataset(sources_dir).meta, **kwargs)


def test_holding_out_the_only_source_is_refused(demo_dir):
    with pytest.raises(DataError, match="the only source of this data"):
        splits.make_split_table(data.load_dataset(demo_dir).meta, holdout_source="synthetic_demo")


def test_real_sources_held_out(real_dir):
    meta = data.load_dataset(real_dir).meta
    for source, n_test, n_dropped in (("rosendahl", 2259, 0), ("vidir_modern", 3363, 9)):
        table = splits.make_split_table(meta, seed=0, holdout_source=source)
        _assert_source_held_out(meta, table, source)
        assert (table["split"] == "test").sum() == n_test and len(meta) - len(table) == n_dropped


def test_split_cli_shows_the_training_support_left(sources_dir, tmp_path):
    res = cli("data", "split", "--data", str(sources_dir), "--holdout-source", "clinic_a", "--out", str(tmp_path / "split.csv"))
    assert res.returncode == 0, res.stderr
    assert "images per class (1 image(s) of the held-out lesions from other sources left out)" in res.stdout
    assert all(c in res.stdout for c in CLASSES)


def test_train_on_a_held_out_source(sources_dir, tmp_path):
    run = tmp_path / "run"
    res = cli("train", "--profile", "smoke", "--model", "cnn", "--epochs", "1", "--tta", "2", "--holdout-source", "clinic_a",
              "--data", str(sources_dir), "--run", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    split = pd.read_csv(run / "split.csv")  # smoke keeps about 20 images a class, then holds clinic_a out
    assert set(split.loc[split["split"] == "test", "dataset"]) == {"clinic_a"}
    assert set(split.loc[split["split"] != "test", "dataset"]) == {"clinic_b"}
    assert set(RunFolder(run).predictions()["dataset"]) == {"clinic_a"}
    assert json.loads((run / "config.json").read_text())["holdout_source"] == "clinic_a"


def test_study_command_tabulates_every_result(smoke_runs, demo_dir, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(smoke_runs, runs)  # trained and evaluated: the command reuses the runs and their evaluations, and combines them again
    res = cli("study", "--profile", "smoke", "--backbone", "efficientnet_lite0", "--data", str(demo_dir), "--runs", str(runs))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on the lesion-grouped test split" in res.stdout and "is complete: reusing it" in res.stderr
    assert res.stderr.count("reusing its evaluation") == 4  # Lite0, its weight average, Lite0 at 48 px, the CNN
    table = pd.read_csv(runs / "study_metrics.csv", index_col=0)
    assert {"smoke_ensemble", "paper_ensemble", "stacked"} <= set(table.index)
    assert {"balanced_accuracy", "macro_auc", "op_mel_recall", *(f"recall_{c}" for c in CLASSES)} <= set(table.columns)
    expected = json.loads((smoke_runs / "smoke_ensemble" / "metrics.json").read_text())["calibrated"]["balanced_accuracy"]
    assert table.loc["smoke_ensemble", "balanced_accuracy"] == pytest.approx(expected)


def test_shift_table_and_per_source_figures(smoke_runs):
    from skin_lesion.metrics import subgroup_tables

    results = {name: json.loads((folder / "metrics.json").read_text()) for name, folder in combination_folders(smoke_runs, "smoke").items()}
    table = shift_table(results)
    for name, m in results.items():
        assert table.loc[name, "balanced_accuracy"] == m["calibrated"]["balanced_accuracy"]
        assert table.loc[name, "recall_mel"] == m["calibrated"]["per_class"]["mel"]["recall"]
    groups = subgroup_tables(RunFolder(smoke_runs / "smoke_ensemble").predictions())
    assert list(groups.loc[groups["by"] == "dataset", "group"]) == ["synthetic_demo"]
