"""Model files that will not load, as a user meets them: ``predict`` on a run
folder whose model is missing, truncated, not a zip, holds code, does not
match its config, or whose ensemble member has gone, exits 2 with one line
naming the file and no traceback; the library raises ModelFileError (a UserError).

Every case breaks a copy of one smoke CNN run (trained once per session, shared
with test_external)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import cli
from test_external import copy_run, package_lines, smoke_cnn_run

from skin_lesion.info import DataError, UserError


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dir) -> Path:
    return smoke_cnn_run(tmp_path_factory, demo_dir)


@pytest.fixture(scope="module")
def image(demo_dir) -> Path:
    return sorted((demo_dir / "images").iterdir())[0]


@dataclass
class Broken:
    """A broken run folder: the folder to predict with, the file at fault, words the message must hold."""

    folder: Path
    file: Path
    says: tuple[str, ...]
    marker: Path | None = None  # a file the model's code would write if it ran


def _missing(run: Path, tmp: Path) -> Broken:
    (run / "model.keras").unlink()
    return Broken(run, run / "model.keras", ("not found",))


def _truncated(run: Path, tmp: Path) -> Broken:
    data = (run / "model.keras").read_bytes()
    (run / "model.keras").write_bytes(data[: len(data) // 2])
    return Broken(run, run / "model.keras", ("not a complete .keras file", "truncated"))


def _not_a_zip(run: Path, tmp: Path) -> Broken:
    size = (run / "model.keras").stat().st_size
    (run / "model.keras").write_bytes(np.random.default_rng(0).bytes(size))
    return Broken(run, run / "model.keras", ("not a complete .keras file", "not a zip"))


def _lambda(run: Path, tmp: Path) -> Broken:
    """A model of the run's shape whose Lambda layer writes ``marker`` when it runs."""
    import keras

    marker = tmp / "the_lambda_ran"
    inp = keras.Input((64, 64, 3))
    x = keras.layers.Lambda(lambda x, marker: (__import__("pathlib").Path(marker).write_text("ran"), x)[1], arguments={"marker": str(marker)})(inp)
    out = keras.layers.Dense(7, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    keras.Model(inp, out).save(run / "model.keras")
    assert marker.exists()  # building the model ran the lambda once: the marker works
    marker.unlink()
    return Broken(run, run / "model.keras", ("contains Python code", "not loaded"), marker)


def _wrong_size(run: Path, tmp: Path) -> Broken:
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["image_size"] == 64
    (run / "config.json").write_text(json.dumps({**cfg, "image_size": 96}))
    return Broken(run, run / "model.keras", ("(64, 64, 3)", "config.json says 96 px"))


def _member_gone(run: Path, tmp: Path) -> Broken:
    other = copy_run(run, tmp / "member_b")
    res = cli("ensemble", str(run), str(other), "--out", str(tmp / "ens"))
    assert res.returncode == 0, res.stderr[-2000:]
    shutil.rmtree(other)
    return Broken(tmp / "ens", other / "model.keras", ("missing", "ensemble"))


def _config_not_json(run: Path, tmp: Path) -> Broken:
    (run / "config.json").write_text('{"model": "cnn", "image_size": 64,')  # cut off mid-write
    return Broken(run, run / "config.json", ("cannot read the run config",))


def _other_keras(run: Path, tmp: Path) -> Broken:
    """A .keras file whose config names a layer class this Keras does not have, as a file from another version can."""
    import zipfile

    src = run / "model.keras"
    data = {}
    with zipfile.ZipFile(src) as z:
        for name in z.namelist():
            data[name] = z.read(name)
    config = json.loads(data["config.json"])
    config["config"]["layers"][-1]["class_name"] = "DenseFromAFutureKeras"
    data["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(src, "w") as z:
        for name, blob in data.items():
            z.writestr(name, blob)
    return Broken(run, src, ("cannot load it", "another Keras version"))


def _other_classes(run: Path, tmp: Path) -> Broken:
    """A model of the run's input size that gives 5 scores, not one per class."""
    import keras

    inp = keras.Input((64, 64, 3), name="image")
    out = keras.layers.Dense(5, activation="softmax")(keras.layers.GlobalAveragePooling2D()(inp))
    keras.Model(inp, out).save(run / "model.keras")
    return Broken(run, run / "model.keras", ("gives 5 scores", "not one per class"))


CASES: dict[str, Callable[[Path, Path], Broken]] = {
    "missing": _missing, "truncated": _truncated, "not_a_zip": _not_a_zip, "lambda": _lambda,
    "wrong_size": _wrong_size, "ensemble_member_gone": _member_gone, "config_not_json": _config_not_json,
    "other_keras": _other_keras, "other_classes": _other_classes,
}


@pytest.mark.parametrize("case", list(CASES))
def test_predict_with_a_model_file_that_will_not_load_is_one_line(case, trained, image, tmp_path):
    broken = CASES[case](copy_run(trained, tmp_path / "run"), tmp_path)
    res = cli("predict", "--run", str(broken.folder), str(image))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = package_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    named = lines[0].removeprefix("error: ").split(": ", 1)[0]
    assert Path(named).resolve() == broken.file.resolve(), (lines[0], broken.file)  # the message starts with the file at fault
    for words in broken.says:
        assert words in lines[0], (words, lines[0])
    assert res.stdout == ""  # no prediction from a model that did not load
    if broken.marker:
        assert not broken.marker.exists(), "the model file's code ran"


FILE_CASES = ("missing", "truncated", "not_a_zip", "lambda", "other_keras")


@pytest.mark.parametrize("case", list(CASES))
def test_the_library_raises_a_user_error_naming_the_file(case, trained, tmp_path):
    from skin_lesion.inference import ModelFileError, Predictor, load_model_file, load_run_model

    assert issubclass(ModelFileError, UserError) and issubclass(ModelFileError, DataError)
    broken = CASES[case](copy_run(trained, tmp_path / "run"), tmp_path)
    if case in FILE_CASES:
        with pytest.raises(ModelFileError) as err:
            load_model_file(broken.file)
        assert str(err.value).startswith(f"{broken.file}: ")
    if case == "wrong_size":
        with pytest.raises(ModelFileError, match=r"config\.json says 96 px"):
            load_run_model(broken.folder)
    with pytest.raises(UserError) as err:
        Predictor(broken.folder)
    named = str(err.value).split(": ", 1)[0]
    assert Path(named).resolve() == broken.file.resolve(), str(err.value)
    if broken.marker:
        assert not broken.marker.exists(), "the model file's code ran"


def test_a_zip_without_a_model_inside_is_not_a_model_file(tmp_path):
    import zipfile

    from skin_lesion.inference import ModelFileError, load_model_file

    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not a model")
    with pytest.raises(ModelFileError, match="no config or weights inside"):
        load_model_file(path)


def test_the_lambda_marker_would_show_code_that_ran(trained, tmp_path):
    """The check above can fail: loading the same file without safe mode runs its code."""
    import keras

    broken = _lambda(copy_run(trained, tmp_path / "run"), tmp_path)
    keras.models.load_model(broken.file, safe_mode=False, compile=False)
    assert broken.marker.exists()
