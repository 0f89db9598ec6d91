"""Evaluating a run on an external labelled set, as a user meets it through the
command line: absent images, outputs named after the set, ISIC and HAM label
files, and images written by other software than the demo's.

One smoke CNN run is trained once per session (``smoke_cnn_run``, which
test_model_files shares); every test scores a copy of it, so no test sees
another's outputs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cli
from PIL import Image

from skin_lesion.info import CLASSES

ISIC = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
# TensorFlow's own start-up lines (absl/glog: "I0000 00:00:1796395918.693721  14306 port.cc:153] ...",
# and absl's pre-init notice): printed by the runtime whatever TF_CPP_MIN_LOG_LEVEL
# says, so they are set aside before counting the lines the package printed.
_TF_RUNTIME_LINE = re.compile(r"^(?:[IWEF]\d{4} \d\d:\d\d:[\d.]+\s+\d+ \S+:\d+\] |WARNING: All log messages before absl::InitializeLog\(\))")
# The package's own log records (``logging.basicConfig`` in ``__main__``: "14:52:08 WARNING Data: ...").
_LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def package_lines(stderr: str) -> list[str]:
    """The non-empty lines of ``stderr`` that are not TensorFlow's runtime log."""
    return [line for line in stderr.splitlines() if line.strip() and not _TF_RUNTIME_LINE.match(line)]


def error_lines(stderr: str) -> list[str]:
    """The package's lines on ``stderr`` other than its log records: what it says about a failure."""
    return [line for line in package_lines(stderr) if not _LOG_RECORD.match(line)]


def smoke_cnn_run(tmp_path_factory, demo_dir: Path) -> Path:
    """A smoke CNN run on the demo set, trained and evaluated (TTA 2) once per session
    and shared by this file and test_model_files: copy it (``copy_run``) before changing it."""
    run = tmp_path_factory.getbasetemp() / "shared_smoke_cnn"
    if not (run / "predictions_val.csv").exists():
        shutil.rmtree(run, ignore_errors=True)
        res = cli("train", "--profile", "smoke", "--tta", "2", "--model", "cnn", "--data", str(demo_dir), "--run", str(run))
        assert res.returncode == 0, res.stderr[-3000:]
    return run


def copy_run(run: Path, to: Path) -> Path:
    """A copy of a run folder (without its resume checkpoints, which nothing here reads)."""
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("checkpoint-epoch*.keras"))
    return to


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dir) -> Path:
    return smoke_cnn_run(tmp_path_factory, demo_dir)


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A fresh copy of the trained run for one test."""
    return copy_run(trained, tmp_path / "run")


@pytest.fixture(scope="module")
def labelled(trained, demo_dir) -> pd.DataFrame:
    """Twelve demo images with their labels (image_id, dx, path): the raw material of the external sets below."""
    split = pd.read_csv(trained / "split.csv", dtype=str)
    rows = split[split["split"] == "test"].head(12)
    return rows.assign(path=[str(demo_dir / "images" / f"{i}.jpg") for i in rows["image_id"]])[["image_id", "dx", "path"]].reset_index(drop=True)


def external_folder(labelled: pd.DataFrame, folder: Path, prefix: str = "EXT") -> pd.DataFrame:
    """A folder of JPEG copies (as a clinic would export them: Pillow, quality 85) under new
    ids; returns image_id, dx of what it holds."""
    folder.mkdir(parents=True)
    ids = [f"{prefix}_{k:04d}" for k in range(len(labelled))]
    for image_id, path in zip(ids, labelled["path"]):
        Image.open(path).convert("RGB").save(folder / f"{image_id}.jpg", quality=85)
    return pd.DataFrame({"image_id": ids, "dx": labelled["dx"].to_numpy()})


def evaluate(run: Path, images: Path, labels: Path, *extra: str) -> object:
    return cli("evaluate", "--run", str(run), "--images", str(images), "--labels", str(labels), "--tta", "1", *extra)


def written_files(stdout: str) -> list[str]:
    """The files the printed 'evaluated on ... -> A, B' line names."""
    line = next(line for line in stdout.splitlines() if line.startswith("evaluated on "))
    return line.split(" -> ", 1)[1].split(", ")


def test_the_study_reads_back_an_evaluation_only_while_what_it_came_from_is_unchanged(run, labelled, tmp_path):
    """``current_evaluation`` gives the test-split metrics a run was scored with while its
    model file, split, views and settings are unchanged; anything else is scored again."""
    import keras

    from skin_lesion.evaluate import current_evaluation

    saved = json.loads((run / "metrics.json").read_text())
    assert current_evaluation(run, tta=2) == saved  # the shared run was scored with TTA 2
    assert current_evaluation(run, tta=1) is None and current_evaluation(run, tta=2, target_mel_recall=0.9) is None
    external_folder(labelled, tmp_path / "clinic").to_csv(tmp_path / "labels.csv", index=False)
    assert evaluate(run, tmp_path / "clinic", tmp_path / "labels.csv").returncode == 0
    assert current_evaluation(run, tta=2) == saved  # an external set's scores leave the test split's standing
    split = (run / "split.csv").read_text()
    (run / "split.csv").write_text(split.replace("\n", "\r\n"))  # the same rows in other bytes: cannot be known to be the same
    assert current_evaluation(run, tta=2) is None
    (run / "split.csv").write_text(split)
    keras.models.load_model(run / "model.keras").save(run / "model.keras")  # the same weights, saved again
    assert current_evaluation(run, tta=2) is None
    assert cli("evaluate", "--run", str(run), "--tta", "1").returncode == 0  # scored again, with one view
    assert current_evaluation(run, tta=2) is None and current_evaluation(run, tta=1) == json.loads((run / "metrics.json").read_text())
    (run / "predictions_val.csv").unlink()  # what the study's combinations read
    assert current_evaluation(run, tta=1) is None


def test_an_absent_labelled_image_is_an_error_unless_skipped(run, labelled, tmp_path):
    images = tmp_path / "clinic"
    table = external_folder(labelled, images)
    labels = pd.concat([table, pd.DataFrame({"image_id": ["EXT_gone"], "dx": ["mel"]})], ignore_index=True)
    labels.to_csv(tmp_path / "labels.csv", index=False)

    res = evaluate(run, images, tmp_path / "labels.csv")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and package_lines(res.stderr)[-1] == lines[0], package_lines(res.stderr)
    assert str(images) in lines[0] and "EXT_gone" in lines[0] and "--skip-missing" in lines[0], lines[0]
    assert not (run / "metrics_clinic.json").exists() and not (run / "predictions_clinic.csv").exists()

    res = evaluate(run, images, tmp_path / "labels.csv", "--skip-missing")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "skipped 1 labelled image(s)" in res.stdout and "EXT_gone" in res.stdout, res.stdout
    metrics = json.loads((run / "metrics_clinic.json").read_text())
    assert metrics["skipped"] == ["EXT_gone"] and metrics["calibrated"]["n"] == len(table)
    pred = pd.read_csv(run / "predictions_clinic.csv", dtype={"image_id": str})
    assert sorted(pred["image_id"]) == sorted(table["image_id"])


def test_outputs_are_named_after_the_set_and_listed_in_the_manifest(run, labelled, tmp_path):
    first, second = tmp_path / "clinic_a", tmp_path / "clinic_b"
    external_folder(labelled.head(8), first, "A").to_csv(tmp_path / "a.csv", index=False)
    external_folder(labelled.tail(8), second, "B").to_csv(tmp_path / "b.csv", index=False)
    test_metrics = (run / "metrics.json").read_bytes()
    manifest_before = json.loads((run / "manifest.json").read_text())

    res = evaluate(run, first, tmp_path / "a.csv")
    assert res.returncode == 0, res.stderr[-2000:]
    a_files = [run / "metrics_clinic_a.json", run / "predictions_clinic_a.csv"]
    assert written_files(res.stdout) == [str(f) for f in a_files], res.stdout  # the files written, not metrics.json
    a_bytes = [f.read_bytes() for f in a_files]
    metrics = json.loads(a_bytes[0])
    assert metrics["evaluated_on"] == "clinic_a" and metrics["calibrated"]["n"] == 8 and metrics["skipped"] == []

    res = evaluate(run, first, tmp_path / "a.csv", "--name", "other")
    assert res.returncode == 0, res.stderr[-2000:]
    assert written_files(res.stdout) == [str(run / "metrics_other.json"), str(run / "predictions_other.csv")], res.stdout
    assert json.loads((run / "metrics_other.json").read_text())["evaluated_on"] == "other"

    res = evaluate(run, second, tmp_path / "b.csv")
    assert res.returncode == 0, res.stderr[-2000:]
    assert written_files(res.stdout) == [str(run / "metrics_clinic_b.json"), str(run / "predictions_clinic_b.csv")], res.stdout
    assert set(pd.read_csv(run / "predictions_clinic_b.csv")["image_id"]) == {f"B_{k:04d}" for k in range(8)}

    # scoring other sets overwrote neither the first set's outputs nor the test split's
    assert [f.read_bytes() for f in a_files] == a_bytes and (run / "metrics.json").read_bytes() == test_metrics
    manifest = json.loads((run / "manifest.json").read_text())
    outputs = manifest["outputs"]
    assert outputs["clinic_a"] == {"metrics": "metrics_clinic_a.json", "predictions": "predictions_clinic_a.csv"}
    assert outputs["other"] == {"metrics": "metrics_other.json", "predictions": "predictions_other.csv"}
    assert outputs["clinic_b"] == {"metrics": "metrics_clinic_b.json", "predictions": "predictions_clinic_b.csv"}
    assert outputs["test"] == manifest_before["outputs"]["test"] and outputs["val"] == manifest_before["outputs"]["val"]
    for name in ("clinic_a", "other", "clinic_b"):
        assert all((run / f).exists() for f in outputs[name].values())
    # an external set changes what predict applies in no way: the temperature and threshold stay validation's
    assert {k: manifest[k] for k in ("kind", "image_size", "temperature", "mel_threshold")} == {
        k: manifest_before[k] for k in ("kind", "image_size", "temperature", "mel_threshold")}

    # the run's own splits keep their names, whether asked for or a folder's name
    res = evaluate(run, first, tmp_path / "a.csv", "--name", "test")
    assert res.returncode == 2 and "reserved" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    external_folder(labelled.head(4), tmp_path / "val", "V").to_csv(tmp_path / "v.csv", index=False)
    res = evaluate(run, tmp_path / "val", tmp_path / "v.csv")
    assert res.returncode == 2 and "reserved" in res.stderr and "--name" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert (run / "metrics.json").read_bytes() == test_metrics and (run / "predictions_val.csv").exists()
    assert json.loads((run / "manifest.json").read_text())["outputs"] == outputs


def test_isic_one_hot_and_ham_labels_score_the_same(run, labelled, tmp_path):
    images = tmp_path / "isic_2019"
    table = external_folder(labelled, images, "ISIC")
    isic = pd.DataFrame({"image": table["image_id"]})
    for col in ISIC:
        isic[col] = (table["dx"].str.upper() == col).astype(float)
    isic.to_csv(tmp_path / "isic.csv", index=False)
    table.to_csv(tmp_path / "ham.csv", index=False)

    res = evaluate(run, images, tmp_path / "isic.csv", "--name", "isic")
    assert res.returncode == 0, res.stderr[-2000:]
    res = evaluate(run, images, tmp_path / "ham.csv", "--name", "ham")
    assert res.returncode == 0, res.stderr[-2000:]
    isic_pred, ham_pred = (pd.read_csv(run / f"predictions_{n}.csv", dtype={"image_id": str}) for n in ("isic", "ham"))
    assert isic_pred["dx"].tolist() == table["dx"].tolist() == ham_pred["dx"].tolist()
    pd.testing.assert_frame_equal(isic_pred, ham_pred)
    isic_m, ham_m = (json.loads((run / f"metrics_{n}.json").read_text()) for n in ("isic", "ham"))
    assert isic_m["calibrated"] == ham_m["calibrated"] and isic_m["calibrated"]["n"] == len(table)


def _other_software(labelled: pd.DataFrame, folder: Path) -> dict[str, Path]:
    """The same lesions as other cameras and tools write them: another JPEG
    quality and chroma subsampling, progressive, PNG with alpha, grayscale, another size."""
    folder.mkdir()
    src = [Image.open(p).convert("RGB") for p in labelled["path"][:6]]
    files = {
        "q75_420": (src[0], "jpg", dict(quality=75, subsampling=2)),  # 4:2:0
        "q95_444_progressive": (src[1], "jpg", dict(quality=95, subsampling=0, progressive=True)),
        "rgba": (src[2].convert("RGBA"), "png", {}),
        "gray": (src[3].convert("L"), "jpg", dict(quality=90)),
        "odd_size": (src[4].resize((333, 251)), "jpg", dict(quality=80)),
        "png_small": (src[5].resize((61, 47)), "png", {}),
    }
    out = {}
    for name, (img, ext, opts) in files.items():
        out[name] = folder / f"{name}.{ext}"
        img.save(out[name], **opts)
    return out


def test_images_from_other_software_score_and_predict_agrees_with_the_library_and_evaluate(run, labelled, tmp_path):
    from skin_lesion.inference import Predictor

    files = _other_software(labelled, tmp_path / "other_software")
    pd.DataFrame({"image_id": list(files), "dx": labelled["dx"][: len(files)].to_numpy()}).to_csv(tmp_path / "labels.csv", index=False)
    tta = str(json.loads((run / "manifest.json").read_text())["tta_views"])  # the views the fitted temperature was fitted with
    res = cli("evaluate", "--run", str(run), "--images", str(tmp_path / "other_software"), "--labels", str(tmp_path / "labels.csv"), "--tta", tta)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads((run / "metrics_other_software.json").read_text())
    assert metrics["calibrated"]["n"] == len(files)
    # the same validation and views refit the same temperature, so evaluate's probabilities are predict's
    assert metrics["temperature"] == pytest.approx(json.loads((run / "manifest.json").read_text())["temperature"], abs=1e-12)
    rows = pd.read_csv(run / "predictions_other_software.csv").set_index("image_id")
    assert rows[list(CLASSES)].sum(1).round(6).eq(1).all()

    res = cli("predict", "--run", str(run), "--tta", tta, "--json", *map(str, files.values()))
    assert res.returncode == 0, res.stderr[-2000:]
    printed = json.loads(res.stdout)["predictions"]
    assert [p["image"] for p in printed] == [str(p) for p in files.values()]
    predictor = Predictor(run, tta=int(tta))
    for (name, path), out in zip(files.items(), printed):
        library = predictor.probs_file(path)
        assert np.abs(library - rows.loc[name, list(CLASSES)].to_numpy(dtype=float)).max() < 1e-6, name
        assert [t["dx"] for t in out["top3"]] == [CLASSES[i] for i in np.argsort(-library)[:3]], name
        for t in out["top3"]:  # the command rounds to 4 decimals
            assert abs(t["probability"] - library[CLASSES.index(t["dx"])]) <= 5e-5 + 1e-6, (name, t)


def _score_on_clinic(smoke_runs: Path, name: str, labelled: pd.DataFrame, tmp_path: Path) -> tuple[Path, object, dict]:
    """A copy of the smoke study's combination ``name`` scored by `evaluate` on a 12-image external
    folder called clinic; returns its folder, the finished command and its manifest (which lists the outputs)."""
    runs = tmp_path / "runs"
    shutil.copytree(smoke_runs, runs, ignore=shutil.ignore_patterns("checkpoint-epoch*.keras"))
    folder = runs / name
    images = tmp_path / "clinic"
    external_folder(labelled, images).to_csv(tmp_path / "labels.csv", index=False)
    res = evaluate(folder, images, tmp_path / "labels.csv")
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["outputs"]["clinic"] == {"metrics": "metrics_clinic.json", "predictions": "predictions_clinic.csv"}
    return folder, res, manifest


def test_a_mean_ensemble_scores_an_external_set_as_it_decides_on_test(smoke_runs, labelled, tmp_path):
    """The study's ensemble (logit-adjusted, members at two sizes) on an external folder: each member
    scored and written, then the mean with the ensemble's own temperature, offset and threshold."""
    from skin_lesion.calibration import apply_temperature, decide
    from skin_lesion.data import label_ids
    from skin_lesion.metrics import balanced_accuracy
    from skin_lesion.runs import RunFolder

    ensemble, res, manifest = _score_on_clinic(smoke_runs, "smoke_ensemble", labelled, tmp_path)
    assert written_files(res.stdout) == [str(ensemble / "metrics_clinic.json"), str(ensemble / "predictions_clinic.csv")]
    members = [(ensemble / m).resolve() for m in manifest["members"]]
    member_probs = [pd.read_csv(m / "predictions_clinic.csv", dtype={"image_id": str}).sort_values("image_id")[list(CLASSES)].to_numpy() for m in members]
    mine = pd.read_csv(ensemble / "predictions_clinic.csv", dtype={"image_id": str}).sort_values("image_id")
    expected = apply_temperature(np.mean(member_probs, axis=0), manifest["temperature"])
    np.testing.assert_allclose(mine[list(CLASSES)].to_numpy(), expected, atol=1e-6)
    metrics = json.loads((ensemble / "metrics_clinic.json").read_text())
    assert metrics["temperature"] == pytest.approx(manifest["temperature"])  # fitted on the same validation predictions
    decided = decide(expected, None, np.asarray(manifest["logit_offset"]))
    assert metrics["calibrated"]["n"] == len(labelled) and set(metrics["member_balanced_accuracy"]) == {RunFolder(m).label for m in members}
    assert metrics["calibrated"]["balanced_accuracy"] == pytest.approx(balanced_accuracy(label_ids(mine["dx"]), decided))
    res = cli("evaluate", "--run", str(ensemble))
    assert res.returncode != 0 and "is a mean ensemble" in res.stderr


def test_a_decision_layer_scores_an_external_set_as_it_decides_on_test(smoke_runs, labelled, tmp_path):
    """The study's decision layer on an external folder: its runs scored and written, the layer
    fitted again on the same validation predictions (same choice), then its threshold applied."""
    from skin_lesion.calibration import decide
    from skin_lesion.data import label_ids
    from skin_lesion.ensemble import aligned_probabilities
    from skin_lesion.metrics import balanced_accuracy
    from skin_lesion.runs import RunFolder
    from skin_lesion.stacking import fit_decision_layer

    stacked, res, manifest = _score_on_clinic(smoke_runs, "smoke_stacked", labelled, tmp_path)
    assert f"-> {stacked / 'metrics_clinic.json'}, {stacked / 'predictions_clinic.csv'}" in res.stdout
    for run in manifest["stacked_runs"]:  # every run it may stack was scored on the set
        assert ((stacked / run).resolve() / "predictions_clinic.csv").exists()
    test_metrics, metrics = (json.loads((stacked / f).read_text()) for f in ("metrics.json", "metrics_clinic.json"))
    assert metrics["decision_layer"] == test_metrics["decision_layer"] and metrics["calibrated"]["n"] == len(labelled)
    mine = pd.read_csv(stacked / "predictions_clinic.csv", dtype={"image_id": str})
    # The layer refitted on the runs' validation predictions, applied to their predictions on the set.
    stacked_runs = [RunFolder((stacked / r).resolve()) for r in manifest["stacked_runs"]]
    val, val_probs = aligned_probabilities(stacked_runs, "val")
    layer = fit_decision_layer(val_probs, val, target_mel_recall=0.8, mel_confidence=0.95)
    frame, probs = aligned_probabilities(stacked_runs, "clinic")
    assert frame["image_id"].tolist() == mine["image_id"].tolist()
    np.testing.assert_allclose(mine[list(CLASSES)].to_numpy(), layer.probs(probs, frame), atol=1e-9)
    decided = decide(mine[list(CLASSES)].to_numpy(), metrics["decision_layer"]["mel_threshold"])
    assert (mine["pred_dx"] == [CLASSES[i] for i in decided]).all()
    assert metrics["calibrated"]["balanced_accuracy"] == pytest.approx(balanced_accuracy(label_ids(mine["dx"]), mine[list(CLASSES)].to_numpy().argmax(1)))
    res = cli("evaluate", "--run", str(stacked))
    assert res.returncode != 0 and "is a decision layer" in res.stderr
