"""Refitting a finished run on train + validation (``train --refit-from``): the
split it trains on, the epoch it keeps, the calibration it borrows from its
source, and the half-validation screen."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import cli

from skin_lesion.calibration import fit_temperature
from skin_lesion.data import label_ids, load_dataset
from skin_lesion.evaluate import run_frames
from skin_lesion.inference import load_run_model, predict_probs
from skin_lesion.info import DataError
from skin_lesion.metrics import balanced_accuracy
from skin_lesion.refit import refit_of, refit_table, start_refit
from skin_lesion.runs import RunFolder
from skin_lesion.splits import make_split_table, validation_halves


def test_validation_halves_cut_lesions_class_by_class(demo_dir):
    table = make_split_table(load_dataset(demo_dir).meta, seed=0)
    val = table[table["split"] == "val"]
    halves = validation_halves(val, seed=0)
    assert set(halves) == {0, 1}
    assert halves.groupby(val["lesion_id"]).nunique().max() == 1  # no lesion in both halves
    lesions = val.assign(half=halves).groupby("lesion_id").first()
    for dx, group in lesions.groupby("dx"):
        if len(group) >= 2:
            assert set(group["half"]) == {0, 1}, dx
    assert halves.equals(validation_halves(val, seed=0))
    assert not halves.equals(validation_halves(val, seed=1))


def test_refit_table_moves_validation_to_train(demo_dir):
    table = make_split_table(load_dataset(demo_dir).meta, seed=0)
    was_val = table["split"] == "val"
    full = refit_table(table, None, seed=0)
    assert not (full["split"] == "val").any() and full["added"].equals(was_val)
    assert (full.loc[table["split"] == "test", "split"] == "test").all()
    half = refit_table(table, 0, seed=0)
    kept = half["split"] == "val"
    assert (half["added"] | kept).equals(was_val) and not (half["added"] & kept).any()
    assert 0.3 < half["added"].sum() / was_val.sum() < 0.7
    with pytest.raises(DataError, match="no validation images"):
        refit_table(full.drop(columns="added"), None, seed=0)


def _source_probs(source, frame, tta):
    model, cfg = load_run_model(source)
    return predict_probs(model, frame, cfg.input_size, tta=tta)


def test_last_epoch_and_the_kept_epoch_checkpoint(tmp_path):
    """A refit stops at its source's kept epoch (all epochs when it averages) and
    saves that epoch as model.keras even when a later one scores higher."""
    import keras

    from skin_lesion.callbacks import RunCheckpoint
    from skin_lesion.config import TrainConfig
    from skin_lesion.refit import last_epoch

    run = RunFolder(tmp_path / "r").mkdir()
    cfg = TrainConfig(model="cnn", profile="smoke", epochs=5, average_last=0)
    assert last_epoch(cfg, refit_of(run)) == 5  # an ordinary run
    run.update_manifest(refit={"source": "../src", "epoch": 2, "half": None})
    assert last_epoch(cfg, refit_of(run)) == 2 and last_epoch(TrainConfig(model="cnn", epochs=5, average_last=2), refit_of(run)) == 5

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    for keep, kept in ((2, 2), (None, 3)):  # the kept epoch, or (ordinary) the best score
        folder = RunFolder(tmp_path / f"keep{keep}").mkdir()
        checkpoint = RunCheckpoint(folder, keep_epoch=keep)
        checkpoint.set_model(model)
        for epoch, score in enumerate((0.1, 0.2, 0.9)):
            model.layers[0].bias.assign([float(epoch)])
            checkpoint.on_epoch_end(epoch, {"val_balanced_accuracy": score})
        assert folder.state()["best_epoch"] == kept
        assert float(keras.models.load_model(folder.model_file).layers[0].bias.numpy()[0]) == kept - 1


def test_refit_half_trains_to_the_source_epoch_and_screens_on_the_other_half(smoke_runs, tmp_path):
    source = RunFolder(smoke_runs / "smoke_cnn")
    out = RunFolder(tmp_path / "h0")
    res = cli("train", "--refit-from", str(source.path), "--refit-half", "0", "--run", str(out.path), "--tta", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    kept_epoch = source.state()["best_epoch"]
    assert json.loads(out.config_file.read_text()) == {**json.loads(source.config_file.read_text()), "run": str(out.path)}
    assert out.state()["epochs_done"] == kept_epoch == out.state()["best_epoch"] == len(out.history())
    assert refit_of(out).epoch == kept_epoch and refit_of(out).half == 0

    meta, _ = run_frames(out)
    table = out.read_split()
    added, kept = meta[meta["image_id"].isin(table.loc[table["added"], "image_id"])], meta[meta["split"] == "val"]
    src_meta, _ = run_frames(source)
    assert set(added["image_id"]) | set(kept["image_id"]) == set(src_meta.loc[src_meta["split"] == "val", "image_id"])
    assert set(meta.loc[meta["split"] == "train", "image_id"]) == set(src_meta.loc[src_meta["split"] == "train", "image_id"]) | set(added["image_id"])

    metrics = out.metrics()
    screen = metrics["refit_screen"]
    assert screen["kept_images"] == len(kept)
    # the source's score on the kept half, recomputed here (a temperature leaves the argmax as it is)
    p_kept = _source_probs(source, kept, 2)
    assert screen["source"]["balanced_accuracy"] == pytest.approx(balanced_accuracy(label_ids(kept["dx"]), p_kept.argmax(1)))
    assert screen["balanced_accuracy_difference"] == pytest.approx(screen["refit"]["balanced_accuracy"] - screen["source"]["balanced_accuracy"])
    # the temperature is fitted on the source's (out-of-fold) predictions for the added half
    assert out.manifest()["temperature"] == pytest.approx(fit_temperature(_source_probs(source, added, 2), label_ids(added["dx"])), rel=1e-4)
    assert refit_of(out).source == source.path.resolve()
    # a mean ensemble needs members scored on the same validation images
    res = cli("ensemble", str(out.path), str(source.path), "--out", str(tmp_path / "mixed"))
    assert res.returncode != 0 and "rows differ" in res.stderr


def test_full_refit_has_no_validation_left_and_still_calibrates(smoke_runs, tmp_path):
    source = RunFolder(smoke_runs / "smoke_efficientnet_lite0")  # averages its last epoch: trains every epoch
    out = RunFolder(tmp_path / "full")
    res = cli("train", "--refit-from", str(source.path), "--run", str(out.path), "--tta", "1")
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = source.config()
    assert out.state()["epochs_done"] == cfg.epochs and out.state()["best_epoch"] == source.state()["best_epoch"]
    assert not (out.read_split()["split"] == "val").any()
    assert "refit_screen" not in out.metrics() and out.manifest()["temperature"] > 0
    average = out.average
    assert average.has_model() and refit_of(average).source == source.average.path.resolve()
    assert "refit_screen" not in average.metrics()
    res = cli("export", "--run", str(out.path), "--out", str(tmp_path / "bundle"))  # its guard sets its threshold on the added images
    assert res.returncode == 0, res.stderr[-3000:]
    guard = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["guard"]
    added = int(out.read_split()["added"].sum())
    assert guard["fitted_on"]["validation"] == added and guard["fitted_on"]["train"] == int((out.read_split()["split"] == "train").sum()) - added
    from skin_lesion.train import train_or_resume

    assert train_or_resume(out.config(), verbose=0) == out.path  # finished: reused, not trained again
    assert out.state()["epochs_done"] == cfg.epochs


@pytest.mark.parametrize("extra, message", [
    (["--model", "cnn"], "drop --model"),
    (["--seed", "3", "--resume"], "drop --seed, --resume"),
    (["--local-workers", "2"], "drop --local-workers"),
])
def test_refit_refuses_options_that_change_the_recipe(smoke_runs, tmp_path, extra, message):
    res = cli("train", "--refit-from", str(smoke_runs / "smoke_cnn"), "--run", str(tmp_path / "r"), *extra)
    assert res.returncode != 0 and message in res.stderr
    assert not (tmp_path / "r").exists()


def test_refit_is_started_on_one_machine(smoke_runs, tmp_path):
    """Under TF_CONFIG every worker would write the new run folder: the refit is refused, with the way to do it."""
    tf_config = json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker", "index": 0}})
    res = cli("train", "--refit-from", str(smoke_runs / "smoke_cnn"), "--run", str(tmp_path / "r"), env={"TF_CONFIG": tf_config})
    assert res.returncode != 0 and "without TF_CONFIG" in res.stderr and "train --resume --run OUT" in res.stderr
    assert not (tmp_path / "r").exists()


def test_refit_errors_name_the_fix(smoke_runs, tmp_path):
    res = cli("train", "--refit-half", "1", "--run", str(tmp_path / "r"))
    assert res.returncode != 0 and "goes with --refit-from" in res.stderr
    with pytest.raises(DataError, match="not a finished run"):
        start_refit(tmp_path / "nothing", tmp_path / "r")
    with pytest.raises(DataError, match="no training record.*refit the run that trained it"):
        start_refit(smoke_runs / "smoke_efficientnet_lite0" / "average", tmp_path / "r")
    stopped = tmp_path / "stopped"
    shutil.copytree(smoke_runs / "smoke_cnn", stopped)
    state = json.loads((stopped / "state.json").read_text())
    (stopped / "state.json").write_text(json.dumps({**state, "epochs_done": 1}))
    with pytest.raises(DataError, match="trained 1 of 2 epochs; finish it first"):
        start_refit(stopped, tmp_path / "r")
    refit = start_refit(smoke_runs / "smoke_cnn", tmp_path / "r", half=1)
    with pytest.raises(DataError, match="is itself a refit"):
        start_refit(refit.run, tmp_path / "r2")
    with pytest.raises(DataError, match="already holds a run"):
        start_refit(smoke_runs / "smoke_cnn", tmp_path / "r")
    assert "added" in RunFolder(tmp_path / "r").read_split()
