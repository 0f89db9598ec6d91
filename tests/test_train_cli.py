"""Training, evaluation and prediction through the command line, as a user runs them:
smoke runs on the demo set and the real data, kill-and-resume, k-fold CV,
MirroredStrategy on two logical CPUs, external labels, and user errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, cli
from PIL import Image

from skin_lesion.config import TrainConfig
from skin_lesion.inference import Predictor
from skin_lesion.info import CLASSES

SMOKE = ("train", "--profile", "smoke", "--tta", "2")


@pytest.fixture(scope="module")
def demo_run(demo_dir, tmp_path_factory) -> Path:
    """One smoke run of the CNN on the demo set, shared by the tests below; with
    weight averaging, so it holds a second model in ``average/``, and the square-root
    class mix, so it ends with a prior shift (which a resized copy must carry). (The
    pretrained backbone's runs are the smoke study's, which the bundle and report tests use.)"""
    run = tmp_path_factory.mktemp("runs") / "cnn"
    res = cli(*SMOKE, "--model", "cnn", "--average-last", "1", "--imbalance", "sqrt", "--data", str(demo_dir), "--run", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    return run


def _check_run_folder(run: Path, epochs: int):
    for name in ("config.json", "split.csv", "history.csv", "state.json", "model.keras", "manifest.json", "metrics.json", "predictions.csv"):
        assert (run / name).exists(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["kind"] == "run" and manifest["image_size"] == TrainConfig.load(run / "config.json").image_size
    assert manifest["outputs"]["test"] == {"metrics": "metrics.json", "predictions": "predictions.csv"} and manifest["temperature"] > 0
    history = pd.read_csv(run / "history.csv")
    assert len(history) == epochs
    # One validation pass an epoch fills the columns Keras' own pass used to, and each epoch records its cost.
    assert {"val_loss", "val_accuracy", "val_balanced_accuracy", "epoch_seconds"} <= set(history.columns)
    assert history["val_loss"].gt(0).all() and history["epoch_seconds"].gt(0).all()
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece", "confusion_matrix", "per_class"):
        assert key in metrics["calibrated"]
    for c in CLASSES:
        assert {"precision", "recall", "specificity", "f1", "auc"} <= set(metrics["calibrated"]["per_class"][c])
    pred = pd.read_csv(run / "predictions.csv")
    assert {"image_id", "dx", *CLASSES} <= set(pred.columns)
    assert pred[list(CLASSES)].sum(1).round(4).eq(1).all()
    split = pd.read_csv(run / "split.csv")
    assert split.groupby("lesion_id")["split"].nunique().max() == 1
    assert not list(run.glob("*.pkl")) and not list(run.glob("*.pickle"))


def test_smoke_train_evaluate_predict_on_demo(demo_run, demo_dir):
    _check_run_folder(demo_run, epochs=2)
    res = cli("evaluate", "--run", str(demo_run), "--tta", "1")
    assert res.returncode == 0 and "balanced_accuracy" in res.stdout, res.stderr[-2000:]
    images = sorted((demo_dir / "images").iterdir())[:2]
    res = cli("predict", "--run", str(demo_run), *map(str, images))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("%") >= 6 and "not a diagnosis" in res.stdout


def test_stack_fits_a_decision_layer_on_validation(demo_run, tmp_path):
    assert (demo_run / "predictions_val.csv").exists()
    # train evaluated the weight-averaged model as a run of its own; stack weighs it beside the best epoch
    assert (demo_run / "average" / "predictions_val.csv").exists()
    res = cli("stack", str(demo_run), str(demo_run / "average"), "--out", str(tmp_path / "both"))
    assert res.returncode == 0, res.stderr[-2000:]
    both = json.loads((tmp_path / "both" / "metrics.json").read_text())
    assert {c["models"] for c in both["candidates"]} == {"cnn", "cnn/average", "cnn+cnn/average"}
    res = cli("stack", str(demo_run), "--out", str(tmp_path / "stacked"))
    assert res.returncode == 0 and "decision layer: cnn" in res.stdout, res.stderr[-2000:]
    metrics = json.loads((tmp_path / "stacked" / "metrics.json").read_text())
    assert metrics["decision_layer"]["models"] == ["cnn"] and "balanced_accuracy" in metrics["calibrated"]
    op = metrics["mel_operating_point"]
    assert op["target_recall_on_val"] == 0.8 and op["confidence"] == 0.95 and "with 95% confidence" in res.stdout
    res = cli("stack", str(demo_run), "--out", str(tmp_path / "plain"), "--target-mel-recall", "0.9", "--mel-confidence", "0")
    assert res.returncode == 0, res.stderr[-2000:]
    op = json.loads((tmp_path / "plain" / "metrics.json").read_text())["mel_operating_point"]
    assert op["target_recall_on_val"] == 0.9 and op["confidence"] is None and "with" not in res.stdout.split("operating point")[1]
    res = cli("stack", str(tmp_path / "no-run"), "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "evaluate the run first" in res.stderr


def test_ensemble_averages_runs_and_predict_takes_its_folder(demo_run, demo_dir, tmp_path):
    ens = tmp_path / "ens"
    res = cli("ensemble", str(demo_run), str(demo_run / "average"), "--out", str(ens))
    assert res.returncode == 0 and "mean ensemble of 2 runs" in res.stdout, res.stderr[-2000:]
    metrics = json.loads((ens / "metrics.json").read_text())
    assert [(ens / m).resolve() for m in metrics["ensemble"]] == [demo_run.resolve(), (demo_run / "average").resolve()]
    assert {"balanced_accuracy", "macro_auc"} <= set(metrics["calibrated"]) and metrics["mel_operating_point"]["confidence"] == 0.95
    assert (ens / "predictions.csv").exists() and (ens / "predictions_val.csv").exists()  # it stacks and summarizes like a run
    image = sorted((demo_dir / "images").iterdir())[0]
    res = cli("predict", "--run", str(ens), "--json", str(image))
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)["predictions"][0]
    assert len(out["top3"]) == 3 and out["label"] == out["top3"][0]["dx"]  # no logit adjustment: the top class
    # with a logit adjustment the probabilities stay the mean's; the label is the argmax of log p + offset
    adj = tmp_path / "ens_adjusted"
    res = cli("ensemble", str(demo_run), str(demo_run / "average"), "--logit-adjust", "2", "--out", str(adj))
    assert res.returncode == 0 and "logit adjustment tau=2" in res.stdout, res.stderr[-2000:]
    offset = np.array(json.loads((adj / "metrics.json").read_text())["logit_adjust"]["offset"])
    res = cli("predict", "--run", str(adj), "--json", *map(str, sorted((demo_dir / "images").iterdir())[:4]))
    assert res.returncode == 0, res.stderr[-2000:]
    plain = Predictor(ens)  # the same members and temperature; only the label rule differs
    for out in json.loads(res.stdout)["predictions"]:
        p = plain.probs_file(out["image"])
        assert [t["dx"] for t in out["top3"]] == [CLASSES[i] for i in np.argsort(-p)[:3]]
        assert out["label"] == CLASSES[int(np.argmax(np.log(p) + offset))]
    # the manifest, not the metrics report, holds what predict follows: the members and the offset
    manifest = json.loads((adj / "manifest.json").read_text())
    assert manifest["kind"] == "mean_ensemble" and manifest["members"] == metrics["ensemble"]
    assert np.allclose(manifest["logit_offset"], offset) and json.loads((ens / "manifest.json").read_text())["logit_offset"] is None
    # a member that has gone: one line naming it, no traceback
    manifest = json.loads((ens / "manifest.json").read_text())
    manifest["members"].append("../nowhere")
    (ens / "manifest.json").write_text(json.dumps(manifest))
    res = cli("predict", "--run", str(ens), str(image))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "nowhere/model.keras: missing; the ensemble" in res.stderr


def test_evaluate_at_another_input_size_writes_a_run_that_ensembles(demo_run, demo_dir, tmp_path):
    from skin_lesion.inference import load_run_model, resize_run
    from skin_lesion.pipeline import read_image

    image = sorted((demo_dir / "images").iterdir())[0]
    # at the run's own size the copy is the same model: same outputs on a real JPEG
    same = resize_run(demo_run, 64, tmp_path / "at64")
    (a, _), (b, cfg) = load_run_model(demo_run), load_run_model(same)
    assert [layer.name for layer in a.layers if "prior_shift" in layer.name] == [layer.name for layer in b.layers if "prior_shift" in layer.name] != []
    x = read_image(image, 64)[None]
    assert cfg.extra["resized_from"] == os.path.relpath(demo_run.resolve(), same.resolve())
    assert abs(a(x).numpy() - b(x).numpy()).max() < 1e-6
    res = cli("evaluate", "--run", str(demo_run), "--image-size", "80", "--out", str(tmp_path / "at80"), "--tta", "1")
    assert res.returncode == 0 and "balanced_accuracy" in res.stdout, res.stderr[-2000:]
    at80 = tmp_path / "at80"
    assert TrainConfig.load(at80 / "config.json").image_size == 80
    assert load_run_model(at80)[0].input_shape[1:3] == (80, 80)
    assert (at80 / "split.csv").read_text() == (demo_run / "split.csv").read_text()
    assert json.loads((at80 / "metrics.json").read_text())["tta_views"] == 1 and (at80 / "predictions_val.csv").exists()
    # the resized copy joins a mean ensemble beside the run; predict feeds each its own size
    res = cli("ensemble", str(demo_run), str(at80), "--out", str(tmp_path / "ens"))
    assert res.returncode == 0, res.stderr[-2000:]
    res = cli("predict", "--run", str(tmp_path / "ens"), "--json", str(image))
    assert res.returncode == 0 and len(json.loads(res.stdout)["predictions"][0]["top3"]) == 3, res.stderr[-2000:]
    res = cli("evaluate", "--run", str(demo_run), "--image-size", "80")
    assert res.returncode != 0 and "--image-size and --out go together" in res.stderr


def test_a_mistyped_out_never_overwrites_a_run(demo_run, tmp_path):
    """ensemble, stack and evaluate --image-size write only into a new folder or one of their own
    kind: --out on a trained run, on one of the inputs or on another kind is one line, and the
    folder keeps every file; the same kind is rewritten, as a rerun of the study does."""
    def files(folder):
        return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    before = files(demo_run)
    ens, stacked = tmp_path / "ens", tmp_path / "stacked"
    for args, says in [
        (("ensemble", str(demo_run), str(demo_run / "average"), "--out", str(demo_run)), "is one of the runs it is made from"),
        (("stack", str(demo_run / "average"), "--out", str(demo_run)), "already holds a run, not a decision layer"),
        (("evaluate", "--run", str(demo_run / "average"), "--image-size", "80", "--out", str(demo_run)), "not a resized copy"),
    ]:
        res = cli(*args)
        assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr, (args, res.stderr[-2000:])
    assert files(demo_run) == before
    assert cli("ensemble", str(demo_run), str(demo_run / "average"), "--out", str(ens)).returncode == 0
    assert cli("stack", str(demo_run), "--out", str(stacked)).returncode == 0
    res = cli("stack", str(demo_run), "--out", str(ens))
    assert res.returncode == 2 and "already holds a mean ensemble, not a decision layer" in res.stderr, res.stderr[-2000:]
    res = cli("ensemble", str(demo_run), str(demo_run / "average"), "--out", str(stacked))
    assert res.returncode == 2 and "already holds a decision layer, not a mean ensemble" in res.stderr, res.stderr[-2000:]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    res = cli("ensemble", str(demo_run), str(demo_run / "average"), "--out", str(tmp_path / "notes"))
    assert res.returncode == 2 and "already holds a folder of other files" in res.stderr, res.stderr[-2000:]
    assert cli("ensemble", str(demo_run), str(demo_run / "average"), "--out", str(ens)).returncode == 0  # its own kind again
    at48 = tmp_path / "at48"
    assert cli("evaluate", "--run", str(demo_run), "--image-size", "48", "--out", str(at48), "--tta", "1").returncode == 0
    res = cli("evaluate", "--run", str(demo_run / "average"), "--image-size", "48", "--out", str(at48), "--tta", "1")
    assert res.returncode == 2 and "not a resized copy" in res.stderr, res.stderr[-2000:]
    assert cli("evaluate", "--run", str(demo_run), "--image-size", "56", "--out", str(at48), "--tta", "1").returncode == 0


def test_summarize_gives_each_run_and_mean_and_sd(demo_run, tmp_path):
    stacked = tmp_path / "stacked"
    assert cli("stack", str(demo_run), "--out", str(stacked)).returncode == 0
    res = cli("summarize", str(demo_run), str(stacked), "--csv", str(tmp_path / "s.csv"))
    assert res.returncode == 0 and "mean ± sd over 2 runs" in res.stdout, res.stderr[-2000:]
    table = pd.read_csv(tmp_path / "s.csv", index_col=0)
    runs = table.loc[[str(demo_run), str(stacked)], "balanced_accuracy"]
    assert table.loc["mean", "balanced_accuracy"] == pytest.approx(runs.mean())
    assert table.loc["sd", "balanced_accuracy"] == pytest.approx(runs.std(ddof=1))
    # The trained run's minutes of epochs; a decision layer has no epochs of its own, so no mean either.
    assert table.loc[str(demo_run), "train_minutes"] > 0
    assert table[["train_minutes"]].drop(index=str(demo_run)).isna().all().all()
    res = cli("summarize", str(tmp_path / "nothing"))
    assert res.returncode == 2 and "metrics.json: missing" in res.stderr


def test_predict_any_image_and_survives_bad_files(demo_run, demo_dir, tmp_path):
    src = Image.open(sorted((demo_dir / "images").iterdir())[0])
    src.convert("L").resize((37, 91)).save(tmp_path / "gray.png")
    src.convert("RGBA").resize((900, 700)).save(tmp_path / "big.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "notes.txt").write_text("hello")
    files = [tmp_path / n for n in ("gray.png", "broken.jpg", "big.png", "notes.txt")]
    res = cli("predict", "--run", str(demo_run), "--json", *map(str, files))
    assert res.returncode != 0  # some inputs were bad ...
    out = json.loads(res.stdout)
    assert [p["image"] for p in out["predictions"]] == [str(files[0]), str(files[2])]  # ... the good ones still scored
    assert all(len(p["top3"]) == 3 for p in out["predictions"])
    assert "broken.jpg: not a readable image" in res.stderr and "notes.txt: not a readable image" in res.stderr
    assert "Traceback" not in res.stderr and "not a diagnosis" in out["note"]


def test_evaluate_external_isic_and_ham_labels(demo_run, demo_dir, tmp_path):
    split = pd.read_csv(demo_run / "split.csv")
    test = split[split["split"] == "test"]
    isic = pd.DataFrame({"image": test["image_id"]})
    for col in ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"):
        isic[col] = (test["dx"].str.upper() == col).astype(float).to_numpy()
    isic.to_csv(tmp_path / "isic.csv", index=False)
    res = cli("evaluate", "--run", str(demo_run), "--images", str(demo_dir / "images"), "--labels", str(tmp_path / "isic.csv"), "--tta", "1")
    assert res.returncode == 0, res.stderr[-2000:]
    # an external set's outputs are named after its folder (here demo_dir/images)
    ext = json.loads((demo_run / "metrics_images.json").read_text())
    assert ext["calibrated"]["n"] == len(test) and ext["evaluated_on"] == "images" and ext["skipped"] == []
    assert len(pd.read_csv(demo_run / "predictions_images.csv")) == len(test)
    test[["image_id", "dx"]].to_csv(tmp_path / "ham.csv", index=False)
    res = cli("evaluate", "--run", str(demo_run), "--images", str(demo_dir / "images"), "--labels", str(tmp_path / "ham.csv"), "--tta", "1")
    assert res.returncode == 0
    (tmp_path / "odd.csv").write_text("name,label\na,b\n")
    res = cli("evaluate", "--run", str(demo_run), "--images", str(demo_dir / "images"), "--labels", str(tmp_path / "odd.csv"))
    assert res.returncode == 2 and "unknown label format" in res.stderr and "Traceback" not in res.stderr


def test_smoke_train_on_real_data(real_dir, tmp_path):
    run = tmp_path / "real"
    res = cli(*SMOKE, "--model", "cnn", "--data", str(real_dir), "--run", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    _check_run_folder(run, epochs=2)
    meta = pd.read_csv(real_dir / "HAM10000_metadata.csv")
    assert set(pd.read_csv(run / "split.csv")["image_id"]) <= set(meta["image_id"])
    image = sorted((real_dir / "images").iterdir())[0]
    res = cli("predict", "--run", str(run), str(image))
    assert res.returncode == 0 and image.name in res.stdout


def test_the_cnn_learns_its_batchnorm_from_scratch(demo_dir, tmp_path):
    """A frozen fresh BatchNormalization layer is the identity (mean 0, variance 1,
    scale 1): trained that way the CNN sat at chance for its first epochs."""
    import keras

    run = tmp_path / "cnn"
    res = cli(*SMOKE, "--model", "cnn", "--epochs", "1", "--no-eval", "--data", str(demo_dir), "--run", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    model = keras.models.load_model(run / "model.keras", safe_mode=True)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 8
    for layer in norms:
        gamma, beta, moving_mean, moving_var = (np.asarray(w) for w in layer.get_weights())
        assert np.abs(moving_mean).max() > 0 and np.abs(moving_var - 1).max() > 0, layer.name  # statistics learned
        assert np.abs(gamma - 1).max() > 0 and np.abs(beta).max() > 0, layer.name  # scale and shift trained


def test_killed_run_resumes_to_the_same_epochs(demo_dir, tmp_path):
    run = tmp_path / "resume"
    # The square-root mix, weight averaging and label smoothing ride along: the mean
    # must survive the kill too, and the checkpoint must reload with its custom loss.
    recipe = ["--imbalance", "sqrt", "--average-last", "3", "--label-smoothing", "0.1"]
    args = [sys.executable, "-m", "skin_lesion", *SMOKE, "--model", "cnn", "--epochs", "6", *recipe, "--no-eval", "--data", str(demo_dir), "--run", str(run)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    history = run / "history.csv"
    deadline = time.time() + 300
    while time.time() < deadline and (not history.exists() or len(history.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: like a crash or a lost machine
    proc.wait()
    done_before = len(pd.read_csv(history))
    assert 2 <= done_before < 6, "the run should be killed part-way"
    # options typed beside --resume cannot change the run: the ones that differ are named as ignored
    res = cli("train", "--run", str(run), "--resume", "--no-eval", "--model", "cnn", "--epochs", "9")
    assert res.returncode == 0, res.stderr[-3000:]
    warning = [line for line in res.stderr.splitlines() if "continues with its own config.json" in line]
    assert len(warning) == 1 and warning[0].split("; ignoring ")[1] == "--epochs 9 (the run has 6)", res.stderr[-3000:]
    hist = pd.read_csv(history)
    assert hist["epoch"].tolist() == list(range(6))  # every epoch once, none lost, none repeated
    assert (run / "model.keras").exists()  # the best epoch
    average = run / "average"  # the mean: a run folder of its own, which evaluate and stack take
    assert (average / "model.keras").exists() and (average / "split.csv").read_text() == (run / "split.csv").read_text()
    assert TrainConfig.load(average / "config.json").run == str(average)
    assert [p.name for p in run.glob("checkpoint-epoch*.keras")] == ["checkpoint-epoch006.keras"]
    assert [p.name for p in run.glob("average-epoch*.npz")] == ["average-epoch006.npz"]  # the mean of epochs 4-6
    assert hist["val_balanced_accuracy_average"].notna().tolist() == [False] * 5 + [True]
    assert TrainConfig.load(run / "config.json").label_smoothing == 0.1
    import keras

    loss = keras.models.load_model(run / "checkpoint-epoch006.keras", safe_mode=True).loss
    assert type(loss).__name__ == "SmoothedSparseCrossentropy" and loss.label_smoothing == 0.1


def test_kfold_cross_validation_writes_mean_and_sd(demo_dir, tmp_path):
    run = tmp_path / "cv"
    res = cli(*SMOKE, "--model", "cnn", "--epochs", "1", "--folds", "2", "--data", str(demo_dir), "--run", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    cv = json.loads((run / "cv_metrics.json").read_text())
    assert cv["k"] == 2 and len(cv["folds"]) == 2
    assert {"mean", "sd"} <= set(cv["summary"]["balanced_accuracy"])
    folds = [pd.read_csv(run / f"fold{i}" / "split.csv") for i in range(2)]
    assert folds[0].groupby("lesion_id")["fold"].nunique().max() == 1
    assert "+/-" in res.stdout


def test_the_gpu_code_path_runs_on_a_cpu(demo_dir, tmp_path):
    """The gpu profile's path, so a GPU user does not meet its first bug: mixed
    precision; augmentation as the model's first layer over several replicas
    (MirroredStrategy on two logical CPUs); XLA where Keras can compile the step
    (not with augmentation in the model; on one device, as XLA cannot reach
    variables on another logical CPU); and a mixed-precision run exports."""
    import keras

    from skin_lesion.bundle import Bundle

    for augment_on, devices in (("model", "2"), ("pipeline", "1")):
        run = tmp_path / augment_on
        res = cli(*SMOKE, "--model", "cnn", "--epochs", "1", "--devices", devices, "--augment-on", augment_on, "--gpu-path", "--no-eval",
                  "--max-per-class", "6", "--image-size", "32", "--data", str(demo_dir), "--run", str(run), fresh=True)
        assert res.returncode == 0, res.stderr[-3000:]
        model = keras.models.load_model(run / "model.keras")
        assert model.get_layer("block1_conv1").dtype_policy.name == "mixed_float16"  # float16 compute, float32 weights
        assert model.get_layer("head_softmax").dtype_policy.name == "float32"  # probabilities stay float32
        assert keras.models.load_model(run / "checkpoint-epoch001.keras").jit_compile == (augment_on == "pipeline")
        if augment_on == "model":
            assert "MirroredStrategy with 2 replica(s)" in res.stderr
            assert model.get_layer("augment").strength == 1.0
            # it exports: LiteRT has no float16 convolutions, so the bundle's file computes in float32
            assert cli("evaluate", "--run", str(run), "--tta", "1").returncode == 0
            res = cli("export", "--run", str(run), "--out", str(tmp_path / "bundle"))
            assert res.returncode == 0, res.stderr[-3000:]
            images = sorted((demo_dir / "images").iterdir())[:8]
            bundle, keras_path = Bundle(tmp_path / "bundle"), Predictor(run)
            np.testing.assert_allclose([bundle.probs_file(p) for p in images], [keras_path.probs_file(p) for p in images], atol=1e-2)


@pytest.mark.parametrize(
    "args, message",
    [
        (("train", "--run", "{tmp}/none", "--resume"), "nothing to resume"),
        (("evaluate", "--run", "{tmp}/none"), "none: run folder not found"),
        (("predict", "--run", "{tmp}/none", "x.jpg"), "none: run folder not found"),
        (("predict", "--model", "{tmp}/none", "x.jpg"), "none: bundle folder not found"),
        (("export", "--run", "{tmp}/none", "--out", "{tmp}/b"), "none: run folder not found"),
        (("train", "--data", "{tmp}/no-such-folder", "--run", "{tmp}/r"), "data folder not found"),
        # numbers out of range: argparse refuses them before anything runs
        (("train", "--label-smoothing", "1.5", "--run", "{tmp}/r"), "argument --label-smoothing: 1.5 is out of range: it must be at least 0 and below 1"),
        (("train", "--mixup", "-1", "--run", "{tmp}/r"), "argument --mixup: -1 is out of range: it must be at least 0"),
        (("train", "--mixup", "nan", "--run", "{tmp}/r"), "argument --mixup: 'nan' is not a finite number"),
        (("train", "--batch-size", "0", "--run", "{tmp}/r"), "argument --batch-size: 0 is out of range: it must be at least 1"),
        (("train", "--epochs", "two", "--run", "{tmp}/r"), "argument --epochs: 'two' is not a whole number"),
        (("train", "--image-size", "16", "--run", "{tmp}/r"), "argument --image-size: 16 is out of range: it must be at least 32"),
        (("train", "--dropout", "1", "--run", "{tmp}/r"), "argument --dropout: 1 is out of range: it must be at least 0 and below 1"),
        (("train", "--folds", "3", "--fold", "3", "--run", "{tmp}/r"), "--fold 3 needs --folds K with K above it"),
        (("evaluate", "--run", "{tmp}/none", "--tta", "0"), "argument --tta: 0 is out of range: it must be at least 1 and at most 8"),
        (("predict", "--run", "{tmp}/none", "--tta", "9", "x.jpg"), "argument --tta: 9 is out of range"),
        (("stack", "{tmp}/none", "--out", "{tmp}/s", "--mel-confidence", "1.5"), "argument --mel-confidence: 1.5 is out of range: it must be at least 0 and below 1"),
        (("ensemble", "{tmp}/none", "--out", "{tmp}/s", "--target-mel-recall", "inf"), "argument --target-mel-recall: 'inf' is not a finite number"),
        (("ensemble", "{tmp}/none", "--out", "{tmp}/s", "--target-mel-recall", "nan"), "argument --target-mel-recall: 'nan' is not a finite number"),
        (("train", "--mixup", "0.2", "--imbalance", "class_weight", "--run", "{tmp}/r"), "mixup does not combine with imbalance class_weight"),
    ],
)
def test_user_errors_are_one_line_and_nonzero(tmp_path, args, message):
    res = cli(*[a.format(tmp=tmp_path) for a in args])
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr


def test_help_for_every_command():
    for cmd in ("train", "evaluate", "predict", "export", "report", "data", "tune", "stack", "ensemble", "summarize"):
        res = cli(cmd, "--help")
        assert res.returncode == 0 and "usage" in res.stdout


def test_tune_writes_trials_and_a_config_that_train_reuses(demo_dir, tmp_path):
    run = tmp_path / "tune"
    res = cli("tune", "--model", "cnn", "--trials", "2", "--epochs", "1", "--max-per-class", "10", "--data", str(demo_dir), "--run", str(run))
    assert res.returncode == 0, res.stderr[-3000:]
    trials = pd.read_csv(run / "trials.csv")
    assert len(trials) == 2 and {"lr", "dropout", "image_size", "imbalance", "val_balanced_accuracy"} <= set(trials.columns)
    # every trial really trained: KerasTuner records a failed trial and carries on
    assert trials["status"].eq("COMPLETED").all() and trials["val_balanced_accuracy"].between(0, 1).all(), trials
    best = json.loads((run / "best_config.json").read_text())
    assert best["image_size"] in (64, 96, 128) and best["extra"]["trials"] == 2
    res = cli("train", "--config", str(run / "best_config.json"), "--profile", "smoke", "--epochs", "1", "--max-per-class", "10",
              "--data", str(demo_dir), "--run", str(tmp_path / "from_tuned"), "--no-eval")
    assert res.returncode == 0, res.stderr[-3000:]
    used = json.loads((tmp_path / "from_tuned" / "config.json").read_text())
    assert used["image_size"] == best["image_size"] and used["imbalance"] == best["imbalance"]


def test_profiles_place_augmentation_where_it_is_cheapest():
    """cpu: in tf.data, overlapping the train step (measured faster on 2 cores);
    gpu: inside the model, on the accelerator."""
    from skin_lesion.info import DataError

    assert TrainConfig(profile="cpu").resolved().augment_on == "pipeline"
    assert TrainConfig(profile="gpu").resolved().augment_on == "model"
    assert TrainConfig(profile="gpu", augment_on="pipeline").resolved().augment_on == "pipeline"
    cnn = TrainConfig(model="cnn", profile="cpu").resolved()
    assert (cnn.image_size, cnn.epochs, cnn.head_epochs) == (64, 10, 0)
    with pytest.raises(DataError, match="augment_on"):
        TrainConfig(augment_on="gpu").resolved()


def test_cpu_profile_imbalance_and_averaging(tmp_path):
    """Lite0 on the cpu profile: square-root mix and a 5-epoch weight average (smoke:
    the same in miniature); the CNN and other profiles keep oversampling, no
    averaging; a flag wins over the profile; the choice survives config.json."""
    lite0 = TrainConfig(model="efficientnet_lite0", profile="cpu").resolved()
    assert (lite0.imbalance, lite0.average_last) == ("sqrt", 5)
    smoke = TrainConfig(model="efficientnet_lite0", profile="smoke").resolved()
    assert (smoke.imbalance, smoke.average_last) == ("sqrt", 1)
    for cfg in (TrainConfig(model="cnn", profile="cpu"), TrainConfig(model="efficientnet_lite0", profile="gpu")):
        assert (cfg.resolved().imbalance, cfg.resolved().average_last) == ("oversample", 0)
    mine = TrainConfig(model="efficientnet_lite0", profile="cpu", imbalance="class_weight", average_last=0).resolved()
    assert (mine.imbalance, mine.average_last) == ("class_weight", 0)
    (tmp_path / "config.json").write_text(lite0.to_json())
    assert TrainConfig.load(tmp_path / "config.json") == lite0


def test_study_runs_the_cpu_study_trains_lite0_at_two_resolutions(tmp_path):
    """The runs notebook 02 trains, and the ones 03 finds (weight averages after their runs)."""
    from skin_lesion.study import study_run_dirs, study_runs

    runs = study_runs("cpu", "efficientnet_lite0")
    assert list(runs) == ["cpu_cnn", "cpu_efficientnet_lite0", "cpu_efficientnet_lite0_160"]
    main, second = (TrainConfig(**runs[n], profile="cpu").resolved() for n in list(runs)[1:])
    assert (main.image_size, main.imbalance, main.average_last, main.label_smoothing) == (224, "sqrt", 5, 0.1)
    assert (second.image_size, second.imbalance, second.average_last, second.label_smoothing) == (160, "oversample", 0, 0.0)
    assert TrainConfig(**study_runs("gpu", "efficientnet_lite0")["gpu_efficientnet_lite0"], profile="gpu").resolved().label_smoothing == 0.0
    assert list(study_runs("gpu", "efficientnet_lite0")) == ["gpu_cnn", "gpu_efficientnet_lite0"]
    assert list(study_runs("cpu", "resnet50")) == ["cpu_cnn", "cpu_resnet50"]
    for folder in ("cpu_cnn", "cpu_efficientnet_lite0", "cpu_efficientnet_lite0/average", "cpu_efficientnet_lite0_160", "cpu_other"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "model.keras").write_bytes(b"")
    found = [str(p.relative_to(tmp_path)) for p in study_run_dirs(tmp_path, "cpu")]
    # the study's members: the pretrained runs (each followed by its weight average), the CNN last
    assert found == ["cpu_efficientnet_lite0", "cpu_efficientnet_lite0/average", "cpu_efficientnet_lite0_160", "cpu_cnn"]


def test_train_or_resume_refuses_a_run_trained_with_another_config(tmp_path):
    """A study rerun must not silently reuse a run from before the study changed
    (here: the 224 px member before label smoothing): the error names the field."""
    from dataclasses import asdict

    from skin_lesion.info import DataError
    from skin_lesion.train import train_or_resume

    run = tmp_path / "cpu_efficientnet_lite0"
    run.mkdir()
    old = TrainConfig(model="efficientnet_lite0", profile="cpu", run=str(run)).resolved()
    (run / "config.json").write_text(json.dumps(asdict(old)))
    (run / "state.json").write_text(json.dumps({"epochs_done": old.epochs, "checkpoint": None, "best_score": 0.7, "best_epoch": 3, "history": []}))
    wanted = TrainConfig(model="efficientnet_lite0", profile="cpu", run=str(run), label_smoothing=0.1)
    with pytest.raises(DataError, match=r"cpu_efficientnet_lite0: holds a run trained with label_smoothing 0\.0 \(wanted 0\.1\); move that folder away"):
        train_or_resume(wanted)
    # the same config (the data may have moved) is reused as it is, without training
    assert train_or_resume(TrainConfig(model="efficientnet_lite0", profile="cpu", run=str(run), data="/elsewhere")) == run
