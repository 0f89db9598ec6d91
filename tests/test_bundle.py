"""The exported bundle: LiteRT models that reproduce the Keras run without TensorFlow.

On the session's smoke study (trained on the demo set), scored on real
HAM10000 images where present: a single run and the study's mean ensemble,
whose members take 64 and 48 px inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, cli

from skin_lesion.info import CLASSES, DataError


@pytest.mark.parametrize("name", ["smoke_efficientnet_lite0", "smoke_ensemble"])
def test_bundle_matches_the_keras_run_on_the_same_input(bundles, smoke_runs, lesion_images, name):
    from skin_lesion.bundle import Bundle
    from skin_lesion.inference import Predictor
    from skin_lesion.pipeline import read_image

    bundle, keras_path = Bundle(bundles[name]), Predictor(smoke_runs / name)
    assert bundle.sizes == keras_path.sizes
    batches = {s: np.stack([read_image(p, s) for p in lesion_images]) for s in bundle.sizes}
    expected = keras_path.probs_sized(batches)
    got = np.stack([bundle.probs_sized({s: batches[s][i] for s in bundle.sizes}) for i in range(len(lesion_images))])
    assert np.abs(got - expected).max() <= 1e-4
    assert [bundle.label(p) for p in got] == [keras_path.label(p) for p in expected]
    if name == "smoke_ensemble":
        assert len(bundle.sizes) > 1 and bundle.offset is not None  # members at two input sizes, logit-adjusted labels


def test_tf_free_preprocessing_matches_training_and_labels_agree_end_to_end(bundles, smoke_runs, lesion_images):
    from skin_lesion import bundle as tf_free
    from skin_lesion import pipeline, pixels
    from skin_lesion.inference import Predictor

    worst = max(float(np.abs(pixels.read_image(p, s) - pipeline.read_image(p, s)).max()) for p in lesion_images for s in (64, 48, 224))
    print(f"largest pixel difference, TensorFlow-free against training's decoder, {len(lesion_images)} images at 48, 64, 224 px: {worst}")
    assert worst <= 1
    b, k = tf_free.Bundle(bundles["smoke_ensemble"]), Predictor(smoke_runs / "smoke_ensemble")
    assert [b.label(b.probs_file(p)) for p in lesion_images] == [k.label(k.probs_file(p)) for p in lesion_images]


def test_predict_with_a_bundle_never_imports_tensorflow_or_keras(bundles, demo_images, tmp_path):
    probe = (
        "import sys, runpy\n"
        f"sys.argv = ['skin_lesion', 'predict', '--model', {str(bundles['smoke_ensemble'])!r}, '--json', '--heatmap', {str(tmp_path / 'heat.png')!r}, {str(demo_images[0])!r}]\n"
        "try:\n    runpy.run_module('skin_lesion', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'sklearn', 'matplotlib'})\n"
        "print('HEAVY', heavy)\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "HEAVY []" in res.stdout, res.stdout[-500:]
    result = json.loads(res.stdout[: res.stdout.index("HEAVY")])["predictions"][0]
    assert result["label"] in CLASSES and len(result["top3"]) == 3 and isinstance(result["melanoma_above_threshold"], bool)
    assert (tmp_path / "heat.png").stat().st_size > 1000


def test_bundle_heatmap_is_gradcam_of_the_logit_up_to_scale(bundles, smoke_runs, lesion_images):
    from skin_lesion.bundle import Bundle
    from skin_lesion.explain import make_gradcam_heatmap
    from skin_lesion.inference import load_run_model
    from skin_lesion.pipeline import read_image

    name = "smoke_efficientnet_lite0"
    bundle = Bundle(bundles[name])
    model, cfg = load_run_model(smoke_runs / name)
    for path in lesion_images[:5]:
        c = CLASSES.index(bundle.label(bundle.probs_file(path)))
        cam = bundle.heatmap_file(path, class_index=c)
        grad = make_gradcam_heatmap(read_image(path, cfg.image_size)[None], model, class_index=c, score="logit")[0]
        np.testing.assert_allclose(cam, grad, atol=1e-3)


def test_model_card_is_written_from_the_run(bundles, smoke_runs, demo_dir):
    card = (bundles["smoke_ensemble"] / "MODEL_CARD.md").read_text()
    metrics = json.loads((smoke_runs / "smoke_ensemble" / "metrics.json").read_text())
    assert "not a diagnosis" in card and "split by **lesion**" in card
    assert f"balanced accuracy {metrics['calibrated']['balanced_accuracy']:.3f} [" in card
    synthetic = (Path(demo_dir) / "SYNTHETIC_DEMO").exists()
    assert ("SYNTHETIC" in card) == synthetic and ("CC BY-NC 4.0" in card) != synthetic
    manifest = json.loads((bundles["smoke_ensemble"] / "manifest.json").read_text())
    assert manifest["classes"] == list(CLASSES) and manifest["logit_offset"] and manifest["mel_threshold"] is not None
    assert [m["image_size"] for m in manifest["members"]] == [64, 64, 48, 64] and manifest["software"]["tensorflow"]
    assert [m["input_shape"] for m in manifest["members"]] == [[64, 64], [64, 64], [48, 48], [64, 64]] and manifest["version"] == 1


def test_a_bundle_from_before_input_shapes_still_loads(bundles, lesion_images, tmp_path):
    """Bundles exported before non-square inputs name only ``image_size``: read as squares, they score as before."""
    from skin_lesion.bundle import Bundle

    out = tmp_path / "old"
    shutil.copytree(bundles["smoke_ensemble"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    for member in manifest["members"]:
        del member["input_shape"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    old, new = Bundle(out), Bundle(bundles["smoke_ensemble"])
    assert old.sizes == new.sizes == [48, 64]
    np.testing.assert_array_equal(old.probs_file(lesion_images[0]), new.probs_file(lesion_images[0]))


def _broken_copy(bundle: Path, tmp_path: Path, how: str) -> Path:
    """A copy of the bundle, damaged one way."""
    out = tmp_path / how
    shutil.copytree(bundle, out)
    model = out / "member0.tflite"
    manifest = json.loads((out / "manifest.json").read_text())
    if how == "missing_model":
        model.unlink()
    elif how == "truncated_model":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif how == "corrupt_model_with_its_checksum":
        model.write_bytes(os.urandom(4096))
        manifest["members"][0]["sha256"] = __import__("hashlib").sha256(model.read_bytes()).hexdigest()
    elif how == "size_mismatch":
        manifest["members"][0]["image_size"], manifest["members"][0]["input_shape"] = 96, [96, 96]
    elif how == "manifest_not_json":
        (out / "manifest.json").write_text("{not json")
        return out
    elif how == "other_classes":
        manifest["classes"] = ["benign", "malignant"]
    elif how == "missing_manifest":
        (out / "manifest.json").unlink()
        return out
    elif how == "missing_guard":
        (out / "guard.npz").unlink()
    elif how == "damaged_guard":
        (out / "guard.npz").write_bytes(b"PK" + os.urandom(512))
    elif how == "missing_head":
        (out / manifest["members"][0]["head"]).unlink()
    elif how == "damaged_head":
        (out / manifest["members"][0]["head"]).write_bytes(b"PK" + os.urandom(512))
    elif how == "damaged_head_of_an_older_export":  # no head_sha256 recorded: np.load finds the damage
        (out / manifest["members"][0]["head"]).write_bytes(b"PK" + os.urandom(512))
        del manifest["members"][0]["head_sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("how, says", [
    ("missing_model", "member0.tflite: missing"),
    ("truncated_model", "damaged or replaced"),
    ("corrupt_model_with_its_checksum", "not a loadable LiteRT model"),
    ("size_mismatch", "the manifest says 96 px"),
    ("manifest_not_json", "not valid JSON"),
    ("other_classes", "another label set"),
    ("missing_manifest", "manifest.json: missing"),
    ("missing_guard", "guard.npz: missing"),
    ("damaged_guard", "damaged or replaced"),
    ("missing_head", "member0_head.npz: missing"),
    ("damaged_head", "member0_head.npz: damaged or replaced"),
    ("damaged_head_of_an_older_export", "not the head weights export wrote"),
])
def test_a_broken_bundle_is_one_line_and_exit_2(bundles, lesion_images, tmp_path, how, says):
    broken = _broken_copy(bundles["smoke_efficientnet_lite0"], tmp_path, how)
    res = cli("predict", "--model", str(broken), str(lesion_images[0]))
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_export_needs_an_evaluated_run(smoke_runs, tmp_path):
    run = tmp_path / "unevaluated"
    shutil.copytree(smoke_runs / "smoke_cnn", run)
    (run / "manifest.json").write_text(json.dumps({"kind": "run", "image_size": 64}))
    res = cli("export", "--run", str(run), "--out", str(tmp_path / "b"))
    assert res.returncode == 2 and "not evaluated yet" in res.stderr and "Traceback" not in res.stderr


def test_export_never_deletes_a_run_folder(smoke_runs, bundles, tmp_path):
    """A run folder holds a manifest.json too: --out on it (the run itself, one of the ensemble's
    members, the folder holding them, or another run's folder) is refused and every file stays;
    only an earlier bundle is replaced."""
    from skin_lesion.export import _clear_out, export_bundle
    from skin_lesion.runs import RunFolder

    ensemble, member, other = (smoke_runs / n for n in ("smoke_ensemble", "smoke_cnn", "smoke_stacked"))
    before = {p: sorted(f.name for f in p.iterdir()) for p in (ensemble, member, other)}
    res = cli("export", "--run", str(ensemble), "--out", str(ensemble))
    assert res.returncode == 2 and "choose a new folder for --out" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    for out, says in ((member, "is the run"), (other, "is not a bundle"), (smoke_runs, "is the run")):
        with pytest.raises(DataError, match=says):
            export_bundle(ensemble, out)
    assert {p: sorted(f.name for f in p.iterdir()) for p in before} == before
    assert RunFolder(member).manifest()["kind"] == "run"

    # and the other way round: a bundle is no place for an ensemble's or a decision layer's files
    copy = shutil.copytree(bundles["smoke_ensemble"], tmp_path / "bundle_copy")
    res = cli("ensemble", str(member), str(smoke_runs / "smoke_efficientnet_lite0"), "--out", str(copy))
    assert res.returncode == 2 and "already holds a bundle, not a mean ensemble" in res.stderr, res.stderr[-2000:]
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in bundles["smoke_ensemble"].iterdir())

    earlier = shutil.copytree(bundles["smoke_ensemble"], tmp_path / "earlier")
    _clear_out(earlier, [RunFolder(ensemble)])
    assert not earlier.exists()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        _clear_out(tmp_path / "a_file", [RunFolder(ensemble)])
