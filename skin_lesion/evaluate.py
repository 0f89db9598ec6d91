"""Score a run on its lesion-grouped test split or on an external labelled set.

Choices (the temperature, the melanoma threshold) are fitted on the run's
validation split only, never on what is scored. Each evaluation writes its
metrics and predictions into the run folder under its own name and lists
them in the run's manifest.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from skin_lesion import __version__
from skin_lesion.bundle import file_sha256
from skin_lesion.calibration import apply_temperature, decide, fit_temperature, mel_recall_at, mel_threshold, operating_point
from skin_lesion.config import TrainConfig
from skin_lesion.data import external_set, label_ids, load_dataset, resolve_data_dir
from skin_lesion.inference import load_run_model, predict_probs, tta_views
from skin_lesion.info import CLASSES, METADATA_FILE, DataError
from skin_lesion.metrics import classification_metrics, lesion_bootstrap
from skin_lesion.refit import Refit, calibration_frames, refit_of, screen_scores
from skin_lesion.runs import TEST, RunFolder, training_minutes
from skin_lesion.splits import with_split

log = logging.getLogger("skin_lesion")

# The manifest's record of what the test split's scores came from (``scoring_record``).
SCORED_FROM = "scored_from"
# The modules whose code decides a run's scores: a change to any of them scores the run again.
SCORING_MODULES = ("evaluate", "metrics", "calibration", "inference", "pipeline", "pixels", "data", "splits", "refit")


@dataclass
class Evaluation:
    """One evaluation of a run (or mean ensemble): what ``metrics[_NAME].json`` holds, as fields.

    ``calibrated`` holds the headline metrics after temperature scaling (and,
    for an ensemble with logit adjustment, its decision rule); ``raw`` the
    plain argmax before; ``mel_operating_point`` the melanoma threshold chosen
    on validation and what it gives here. ``files`` lists what was written.
    """

    run: str
    config: dict | None
    evaluated_on: str
    tta_views: int | None
    raw: dict
    temperature: float
    calibrated: dict
    mel_operating_point: dict
    validation: dict
    intervals_95: dict
    extra: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    @property
    def balanced_accuracy(self) -> float:
        return self.calibrated["balanced_accuracy"]

    def as_dict(self) -> dict:
        """The metrics file's content: the fields above (not ``files``), then ``extra``'s keys."""
        out = {k: v for k, v in asdict(self).items() if k not in ("extra", "files")}
        return {**out, **self.extra}


def prediction_table(frame: pd.DataFrame, probs: np.ndarray, pred: np.ndarray) -> pd.DataFrame:
    """The standard predictions file: image_id, true label, predicted label, 7 probabilities, metadata."""
    out = pd.DataFrame({"image_id": frame["image_id"].to_numpy(), "dx": frame["dx"].to_numpy(), "pred_dx": [CLASSES[i] for i in pred]})
    for i, c in enumerate(CLASSES):
        out[c] = probs[:, i]
    for col in ("lesion_id", "age", "sex", "localization", "dataset"):
        if col in frame:
            out[col] = frame[col].to_numpy()
    return out


def run_frames(run: str | os.PathLike) -> tuple[pd.DataFrame, TrainConfig]:
    """The run's metadata with its ``split`` column (from ``split.csv``) and its config."""
    run = RunFolder(run)
    cfg = run.config()
    table = run.read_split()
    if table is None:
        raise DataError(f"{run.split_file}: missing; a trained run has the split.csv train wrote (train the run, or copy the whole folder)")
    table = with_split(table, cfg.fold, cfg.seed)
    ds = load_dataset(cfg.data)
    meta = ds.meta.merge(table[["image_id", "split"]], on="image_id", how="inner")
    if meta.empty:
        raise DataError(f"{run.split_file}: its image_ids do not match the data folder {ds.root}; point --data (or the config) at the run's data")
    return meta, cfg


def evaluate_run(
    run: str | os.PathLike,
    images: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    tta: int = 8,
    target_mel_recall: float = 0.8,
    mel_confidence: float | None = 0.95,
    name: str | None = None,
    skip_missing: bool = False,
) -> Evaluation:
    """Score a run on its test split, or on an external set (``images`` + ``labels``),
    and write the metrics and predictions into the run folder.

    Reported: raw argmax metrics, calibrated metrics (temperature fitted on
    validation), and the melanoma operating point (threshold chosen on
    validation for ``target_mel_recall`` with ``mel_confidence``; see
    ``calibration.mel_threshold``). An external set's outputs are named after
    it (``name``, default its folder's name); ``skip_missing`` scores the
    labelled images that are there and records the rest.
    """
    model, cfg = load_run_model(run)
    meta, _ = run_frames(run)
    val = meta[meta["split"] == "val"]
    extra: dict = {}
    if images:
        external = external_set(images, labels, name, skip_missing)
        scored, name = external.frame, external.name
        if name in (TEST, "val"):
            raise DataError(f"--name {name}: reserved for the run's own splits; name the external set otherwise")
        extra = dict(images=str(images), labels=str(labels), skipped=external.skipped)
        if external.skipped:
            log.warning("%s: %d labelled image(s) absent and skipped, e.g. %s", images, len(external.skipped), external.skipped[0])
    else:
        scored, name = meta[meta["split"] == "test"], TEST
    tta = tta_views(cfg.input_size, tta)
    if name == TEST:  # recorded as read, before scoring; dropped until the new scores are all written
        record = scoring_record(run, cfg, tta, target_mel_recall, mel_confidence)
        RunFolder(run).drop_from_manifest(SCORED_FROM)
    refit = refit_of(run)
    if refit:
        val, p_val = refit_calibration(run, refit, model, cfg, meta, tta, extra, screen=name == TEST)
    else:
        p_val = predict_probs(model, val, cfg.input_size, tta=tta)
    p_scored = predict_probs(model, scored, cfg.input_size, tta=tta)
    result = score_predictions(run, cfg, val, p_val, scored, p_scored, tta, target_mel_recall, name, mel_confidence, extra=extra)
    if name == TEST:
        RunFolder(run).update_manifest(**{SCORED_FROM: record})
    return result


@functools.cache
def scoring_code_sha256() -> str:
    """SHA-256 of the source of ``SCORING_MODULES``: the scoring code, as it is in this process."""
    digest = hashlib.sha256()
    for name in SCORING_MODULES:
        digest.update(Path(importlib.import_module(f"skin_lesion.{name}").__file__).read_bytes())
    return digest.hexdigest()


def _sha256_or_none(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None


def scoring_record(run: str | os.PathLike, cfg: TrainConfig, views: int, target_mel_recall: float, mel_confidence: float | None) -> dict:
    """What a run's test-split evaluation is computed from: the bytes of its model file (and of a
    refit's source model, which scores its calibration set) and of its split, the data folder
    and its metadata file, the views, the operating point's settings, and the code that scores
    (the package's scoring modules, TensorFlow's and Keras' versions). Images replaced under
    the same names are not seen. A missing file records None."""
    import keras
    import tensorflow as tf

    folder = RunFolder(run)
    root, _ = resolve_data_dir(cfg.data)
    record = dict(model_sha256=_sha256_or_none(folder.model_file), split_sha256=_sha256_or_none(folder.split_file),
                  data=str(root.resolve()), metadata_sha256=_sha256_or_none(root / METADATA_FILE), tta_views=views,
                  target_mel_recall=target_mel_recall, mel_confidence=mel_confidence,
                  code=dict(skin_lesion=__version__, scoring_sha256=scoring_code_sha256(), tensorflow=tf.__version__, keras=keras.__version__))
    refit = refit_of(run)
    if refit:
        record["source_model_sha256"] = _sha256_or_none(RunFolder(refit.source).model_file)
    return record


def current_evaluation(run: str | os.PathLike, tta: int = 8, target_mel_recall: float = 0.8, mel_confidence: float | None = 0.95) -> dict | None:
    """The run's test-split metrics (``metrics.json``) when its manifest records that they were
    scored from what ``scoring_record`` reads now, with these settings; else None.

    What lets the study (notebook 03, the ``study`` command) read back an evaluation
    instead of scoring every image again; ``evaluate`` always scores."""
    folder = RunFolder(run)
    recorded = folder.manifest().get(SCORED_FROM)
    written = (folder.metrics_file(TEST), folder.predictions_file(TEST), folder.predictions_file("val"))
    if not recorded or not all(f.is_file() for f in written):
        return None
    cfg = folder.config()
    current = scoring_record(run, cfg, tta_views(cfg.input_size, tta), target_mel_recall, mel_confidence)
    return folder.metrics() if recorded == current else None


def refit_calibration(run, refit: Refit, model, cfg: TrainConfig, meta: pd.DataFrame, tta: int, extra: dict, screen: bool) -> tuple[pd.DataFrame, np.ndarray]:
    """A refit's calibration set and probabilities: the validation images it
    added, as its source run (which never trained on them) scores them.

    With ``screen`` and a kept validation half, ``extra["refit_screen"]`` gets the
    refit's and the source's metrics there under that calibration (``refit.screen_scores``)."""
    cal, kept = calibration_frames(run, meta)
    source_model, source_cfg = load_run_model(refit.source)  # at the source's own input size (a resized copy of a refit has another)
    p_cal = predict_probs(source_model, cal, source_cfg.input_size, tta=tta)
    extra["refit"] = {**refit.as_dict(), "calibrated_on": f"the source run's out-of-fold predictions for the {len(cal)} validation images this run added"}
    if screen and not kept.empty:
        t = fit_temperature(p_cal, label_ids(cal["dx"]))
        p_refit = apply_temperature(predict_probs(model, kept, cfg.input_size, tta=tta), t)
        p_source = apply_temperature(predict_probs(source_model, kept, source_cfg.input_size, tta=tta), t)
        extra["refit_screen"] = screen_scores(label_ids(kept["dx"]), p_refit, p_source)
        log.info("refit screen on the kept %d validation images: balanced accuracy %.4f (refit) vs %.4f (source)", len(kept),
                 extra["refit_screen"]["refit"]["balanced_accuracy"], extra["refit_screen"]["source"]["balanced_accuracy"])
    return cal, p_cal


def score_predictions(
    run: str | os.PathLike,
    cfg: TrainConfig | None,
    val: pd.DataFrame,
    p_val: np.ndarray,
    test: pd.DataFrame,
    p_test: np.ndarray,
    tta: int | None,
    target_mel_recall: float,
    name: str,
    mel_confidence: float | None = 0.95,
    extra: dict | None = None,
    logit_offset: np.ndarray | None = None,
) -> Evaluation:
    """Metrics, calibration and operating point from validation and scored probabilities;
    writes the metrics and predictions files and records them in the manifest.

    ``logit_offset`` (per class) changes the decision rule, not the probabilities:
    the label is the argmax of the calibrated log-probabilities plus the offset
    (``calibration.decide``), so the argmax metrics, the operating point and the
    predicted labels use it, while AUC and ECE stay those of the calibrated
    probabilities. ``raw`` is the plain argmax before temperature and offset."""
    folder = RunFolder(run)
    y_val, y_test = label_ids(val["dx"]), label_ids(test["dx"])
    t = fit_temperature(p_val, y_val)
    cal_test = apply_temperature(p_test, t)
    cal_val = apply_temperature(p_val, t)
    thr = mel_threshold(cal_val, y_val, target_mel_recall, val["lesion_id"].to_numpy() if "lesion_id" in val else None, mel_confidence)
    label_test, label_val = decide(cal_test, None, logit_offset), decide(cal_val, None, logit_offset)
    pred = decide(cal_test, thr, logit_offset)
    result = Evaluation(
        run=str(run),
        config=asdict(cfg) if cfg else None,
        evaluated_on=name,
        tta_views=tta,
        raw=classification_metrics(y_test, p_test),
        temperature=t,
        calibrated=classification_metrics(y_test, cal_test, label_test),
        mel_operating_point=operating_point(y_test, cal_test, thr, target_mel_recall, mel_confidence, mel_recall_at(cal_val, y_val, thr, logit_offset), logit_offset),
        validation=classification_metrics(y_val, cal_val, label_val),
        intervals_95=lesion_bootstrap(y_test, cal_test, test["lesion_id"].to_numpy() if "lesion_id" in test else None, pred=label_test),
        extra=extra or {},
    )
    result.files = [folder.metrics_file(name), folder.predictions_file(name)]
    folder.write_json(result.files[0], result.as_dict())
    folder.write_table(result.files[1], prediction_table(test, cal_test, pred))
    outputs = {name: {"metrics": result.files[0].name, "predictions": result.files[1].name}}
    if name == TEST:  # what a decision layer over several runs is fitted on, and what a predictor applies
        result.files.append(folder.predictions_file("val"))
        folder.write_table(result.files[2], prediction_table(val, cal_val, decide(cal_val, thr, logit_offset)))
        outputs["val"] = {"predictions": result.files[2].name}
        folder.update_manifest(outputs, temperature=t, mel_threshold=thr, tta_views=tta)
    else:
        folder.update_manifest(outputs)
    return result


# --------------------------------------------------------------------------- spread over seeds and folds

SUMMARY_COLUMNS: tuple[str, ...] = ("balanced_accuracy", "accuracy", "macro_f1", "macro_auc", "mel_recall", "ece", "op_mel_recall", "op_mel_specificity", "train_minutes")


def summarize_runs(runs: list[str | os.PathLike]) -> pd.DataFrame:
    """Headline test metrics of evaluated runs (or ``stack`` outputs), one row
    each, then ``mean`` and ``sd`` rows: the spread over seeds, splits or folds.

    Calibrated argmax metrics, the melanoma operating point (``op_``), and the
    minutes of training epochs behind each (``train_minutes``, see ``runs.training_minutes``).
    """
    rows = {}
    for run in map(RunFolder, runs):
        m = run.metrics()
        c, op = m["calibrated"], m.get("mel_operating_point", {})
        row = {k: c.get(k) for k in SUMMARY_COLUMNS[:6]}
        row.update(op_mel_recall=op.get("mel_recall"), op_mel_specificity=op.get("mel_specificity"), train_minutes=training_minutes(run))
        rows[str(run.path)] = row
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(SUMMARY_COLUMNS)).astype(float)
    if len(table) > 1:
        runs_only = table.iloc[: len(rows)]
        table.loc["mean"] = runs_only.mean()
        table.loc["sd"] = runs_only.std(ddof=1)
        if runs_only["train_minutes"].isna().any():  # no mean time where some runs did not record theirs
            table.loc[["mean", "sd"], "train_minutes"] = np.nan
    return table
