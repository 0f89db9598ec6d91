"""The run folder: the one owner of its file names, its atomic writes and its manifest.

A run folder (``runs/NAME/``) holds everything needed to rerun, resume and use a model:

- ``config.json``: the ``TrainConfig`` (everything needed to rerun);
- ``split.csv``: image_id, lesion_id, dx and ``split`` (or ``fold``);
- ``state.json``, ``checkpoint-epochNNN.keras``: the last finished epoch, for ``--resume``;
- ``history.csv``: one row per epoch; ``model.keras``: the best epoch on validation;
- ``average/``: with ``average_last``, the mean of the last epochs' weights, a run folder of its own;
- ``metrics[_NAME].json`` and ``predictions[_NAME].csv``: an evaluation (NAME: an external set),
  ``predictions_val.csv``: the validation predictions a decision layer is fitted on;
- ``manifest.json``: what a predictor needs and what was written (below).

``metrics.json`` is a report; ``manifest.json`` is the contract: the kind of
folder (a trained run, a mean ensemble, a decision layer), its input size, the
temperature and melanoma threshold fitted on validation, an ensemble's members
and logit offset, and every evaluation's output files. Nothing reads a
prediction rule out of a report.

Writes are atomic (a temporary file, then ``os.replace``), so a run killed at
any instant leaves the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd

from skin_lesion.config import TrainConfig
from skin_lesion.info import CLASSES, DataError
from skin_lesion.pixels import hw

AVERAGE_DIR = "average"
CONFIG = "config.json"
SPLIT = "split.csv"
STATE = "state.json"
HISTORY = "history.csv"
MODEL = "model.keras"
MANIFEST = "manifest.json"
CV_METRICS = "cv_metrics.json"
TEST = "test"  # the name of the evaluation on the run's own test split


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def input_fields(cfg: TrainConfig) -> dict:
    """What a run's manifest says of its model's input: ``image_size`` (px, the width), and
    ``input_shape`` (height, width) when the input is not square."""
    height, width = hw(cfg.input_size)
    return {"image_size": cfg.image_size} if height == width else {"image_size": cfg.image_size, "input_shape": [height, width]}


class RunFolder:
    """One run folder (or a mean ensemble's, or a decision layer's): every file name and every read and write of it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ names

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def split_file(self) -> Path:
        return self.path / SPLIT

    @property
    def history_file(self) -> Path:
        return self.path / HISTORY

    @property
    def model_file(self) -> Path:
        return self.path / MODEL

    @property
    def manifest_file(self) -> Path:
        return self.path / MANIFEST

    @property
    def cv_metrics_file(self) -> Path:
        return self.path / CV_METRICS

    def metrics_file(self, name: str = TEST) -> Path:
        """``metrics.json`` for the run's own test split, ``metrics_NAME.json`` for an external set."""
        return self.path / ("metrics.json" if name == TEST else f"metrics_{name}.json")

    def predictions_file(self, name: str = TEST) -> Path:
        """``predictions.csv`` (test), ``predictions_val.csv`` (validation), ``predictions_NAME.csv`` (an external set)."""
        return self.path / ("predictions.csv" if name == TEST else f"predictions_{name}.csv")

    def checkpoint_file(self, epochs_done: int) -> Path:
        """The checkpoint (model + optimizer) after ``epochs_done`` epochs."""
        return self.path / f"checkpoint-epoch{epochs_done:03d}.keras"

    def average_file(self, epochs_done: int) -> Path:
        """The running weight average after ``epochs_done`` epochs."""
        return self.path / f"average-epoch{epochs_done:03d}.npz"

    def partial_files(self) -> list[Path]:
        """Every checkpoint and running-average file, for clean-up after an epoch."""
        return [*self.path.glob("checkpoint-epoch*.keras"), *self.path.glob("average-epoch*.npz")]

    @property
    def average(self) -> RunFolder:
        """The weight-averaged model's run folder (``RUN/average``)."""
        return RunFolder(self.path / AVERAGE_DIR)

    def fold(self, k: int) -> RunFolder:
        """Fold ``k``'s sub-run of a k-fold cross-validation."""
        return RunFolder(self.path / f"fold{k}")

    @property
    def label(self) -> str:
        """The run's name in tables: its folder, with the parent's for a weight average (``RUN/average``)."""
        return f"{self.path.parent.name}/{self.path.name}" if self.path.name == AVERAGE_DIR else self.path.name

    def has_model(self) -> bool:
        return self.model_file.exists()

    def mkdir(self) -> RunFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def held_kind(self) -> str:
        """What a non-empty folder holds: a bundle, a run, a mean ensemble or decision layer (from its
        manifest, or for one written before manifests from its metrics), else other files."""
        try:
            manifest = self.manifest()
        except DataError:  # not valid JSON: judged by its other files
            manifest = {}
        if "format" in manifest:  # an exported bundle's manifest names its format; a run's never does
            return "bundle"
        if manifest.get("kind"):
            return manifest["kind"]
        if self.config_file.exists():
            return "run"
        try:
            metrics = json.loads(self.metrics_file().read_text()) if self.metrics_file().exists() else {}
        except ValueError:
            metrics = {}
        return "mean_ensemble" if "ensemble" in metrics else "decision_layer" if "decision_layer" in metrics else "folder of other files"

    def check_output(self, kind: str, inputs: list[RunFolder] = ()) -> None:
        """Refuse to write a ``kind`` (a mean ensemble, a decision layer) here when this folder is one
        of its ``inputs`` or already holds something else (a trained run, another kind): a mistyped
        ``--out`` must not turn a run into an ensemble of itself. The same kind is rewritten, as a
        rerun of the study does."""
        here = self.path.resolve()
        if any(r.path.resolve() == here for r in inputs):
            raise DataError(f"{self.path}: is one of the runs it is made from; choose a new folder for --out")
        if self.path.exists() and not self.path.is_dir():
            raise DataError(f"{self.path}: is a file; choose a new folder for --out")
        if not self.path.exists() or not any(self.path.iterdir()):
            return
        held = self.held_kind()
        if held != kind:
            raise DataError(f"{self.path}: already holds a {held.replace('_', ' ')}, not a {kind.replace('_', ' ')}; choose a new folder for --out")

    # ------------------------------------------------------------------ config and state

    def config(self) -> TrainConfig:
        """The run's ``TrainConfig``; a missing file is a one-line error."""
        if not self.config_file.exists():
            raise DataError(f"{self.config_file}: missing; a run folder needs the config.json that train wrote")
        return TrainConfig.load(self.config_file)

    def write_config(self, cfg: TrainConfig) -> None:
        write_atomic(self.mkdir().config_file, cfg.to_json())

    def state(self) -> dict:
        """``state.json``: epochs done, the checkpoint that holds them, the best score and epoch, history rows."""
        path = self.path / STATE
        return json.loads(path.read_text()) if path.exists() else {"epochs_done": 0, "checkpoint": None, "best_score": None, "best_epoch": None, "history": []}

    def completed_epochs(self) -> int:
        """Epochs finished so far (0 for a new run)."""
        return int(self.state()["epochs_done"])

    def write_state(self, state: dict) -> None:
        """Replace ``state.json``, then rewrite ``history.csv`` from it (both atomically)."""
        write_atomic(self.path / STATE, json.dumps(state, indent=1))
        write_atomic(self.history_file, pd.DataFrame(state["history"]).to_csv(index=False))

    def history(self) -> pd.DataFrame:
        """``history.csv`` (an empty table for a folder that trained nothing)."""
        return pd.read_csv(self.history_file) if self.history_file.exists() else pd.DataFrame()

    def read_split(self) -> pd.DataFrame | None:
        """``split.csv``, or None when the run has none yet."""
        return pd.read_csv(self.split_file, dtype={"image_id": str, "lesion_id": str}) if self.split_file.exists() else None

    def write_split(self, table: pd.DataFrame) -> None:
        write_atomic(self.mkdir().split_file, table.to_csv(index=False))

    def derive(self, out: str | os.PathLike, **changes) -> RunFolder:
        """Make ``out`` a run folder of its own derived from this one (a weight
        average, a resized copy): this config pointing at ``out`` with ``changes``, and this split."""
        child = RunFolder(out).mkdir()
        if self.config_file.exists():
            raw = json.loads(self.config_file.read_text())
            write_atomic(child.config_file, json.dumps({**raw, "run": str(child.path), **changes}, indent=2))
        if self.split_file.exists():
            shutil.copyfile(self.split_file, child.split_file)
        child.update_manifest(kind="run", **(input_fields(child.config()) if child.config_file.exists() else {"image_size": changes.get("image_size")}))
        refit = self.manifest().get("refit")
        if refit:  # a refit's copies calibrate as it does; its weight average on its source's average, where there is one
            source = self.linked(refit["source"])
            if child.path == self.average.path and source.average.has_model():
                source = source.average
            child.update_manifest(refit={**refit, "source": child.relative(source)})
        return child

    # ------------------------------------------------------------------ evaluations

    def write_json(self, path: Path, obj: dict) -> None:
        self.mkdir()
        write_atomic(path, json.dumps(obj, indent=2))

    def write_table(self, path: Path, table: pd.DataFrame) -> None:
        self.mkdir()
        write_atomic(path, table.to_csv(index=False))

    def metrics(self, name: str = TEST) -> dict:
        """An evaluation's metrics; missing is a one-line error naming the command that makes it."""
        path = self.metrics_file(name)
        if not path.exists():
            raise DataError(f"{path}: missing; evaluate the run first (`python -m skin_lesion evaluate --run {self.path}`)")
        return json.loads(path.read_text())

    def predictions(self, name: str = TEST) -> pd.DataFrame:
        """Saved calibrated predictions (``name``: test, val or an external set's name)."""
        path = self.predictions_file(name)
        if not path.exists():
            raise DataError(f"{path}: no saved predictions; evaluate the run first (`python -m skin_lesion evaluate --run {self.path}`)")
        table = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str})
        missing = [c for c in CLASSES if c not in table]
        if missing:
            raise DataError(f"{path}: not a predictions file (no column(s) {', '.join(missing)}); evaluate the run again")
        return table

    # ------------------------------------------------------------------ manifest

    def manifest(self) -> dict:
        """``manifest.json`` ({} when absent: a run not yet evaluated)."""
        if not self.manifest_file.exists():
            return {}
        try:
            return json.loads(self.manifest_file.read_text())
        except ValueError as e:
            raise DataError(f"{self.manifest_file}: not valid JSON ({e}); evaluate the run again to rewrite it") from e

    def update_manifest(self, outputs: dict | None = None, **fields) -> dict:
        """Merge ``fields`` (and one evaluation's ``outputs``: name -> file names) into ``manifest.json``."""
        manifest = self.manifest()
        manifest.update(fields)
        if outputs:
            manifest["outputs"] = {**manifest.get("outputs", {}), **outputs}
        self.write_json(self.manifest_file, manifest)
        return manifest

    def drop_from_manifest(self, *keys: str) -> None:
        """Remove ``keys`` from ``manifest.json``: a record that stops holding once a new write begins."""
        manifest = self.manifest()
        if any(k in manifest for k in keys):
            self.write_json(self.manifest_file, {k: v for k, v in manifest.items() if k not in keys})

    def relative(self, other: str | os.PathLike | RunFolder) -> str:
        """``other``'s path as this folder's manifest stores it: relative to this folder,
        so a runs folder moved as a whole keeps its links."""
        return os.path.relpath(RunFolder(other).path.resolve(), self.path.resolve())

    def linked(self, stored: str | os.PathLike) -> RunFolder:
        """The run a path in this folder's manifest names (``relative`` reversed; an absolute path stays as it is)."""
        return RunFolder(os.path.normpath(self.path.resolve() / stored))

    def members(self) -> list[RunFolder]:
        """A mean ensemble's member runs (as the manifest records them, relative to this folder); [] for a run."""
        return [RunFolder(self.path / m) for m in self.manifest().get("members", [])]

    def training_run(self) -> RunFolder:
        """The run whose epochs produced this one: itself, or for a weight average the run that wrote it."""
        if not self.history_file.exists() and self.path.name == AVERAGE_DIR and (self.path.parent / HISTORY).exists():
            return RunFolder(self.path.parent)
        return self


def training_minutes(run: str | os.PathLike | RunFolder) -> float:
    """Minutes of training epochs (validation passes included) behind ``run``: the
    sum of its ``history.csv``'s ``epoch_seconds``; for a mean ensemble, the sum
    over its distinct training runs (a weight average adds nothing to its run's).
    NaN where a run has no such record (a decision layer, a resized copy)."""
    run = RunFolder(run)
    total = 0.0
    trained = {m.training_run().path.resolve() for m in run.members()} or {run.training_run().path}
    for path in trained:
        history = RunFolder(path).history()
        if "epoch_seconds" not in history or history["epoch_seconds"].isna().any():
            return float("nan")
        total += float(history["epoch_seconds"].sum())
    return total / 60
