"""The smoke study's numbers held fixed: the smoke study on the demo set gives the
predictions and metrics recorded in tests/reference/smoke_demo_study.json.

The reference is written by tests/reference/make_reference.py (the 250-image
demo set, seed 0, TTA 2) and rewritten only by a change meant to move the
study's numbers. (When the package was redesigned, the same file made by the
code before the redesign was matched byte for byte; docs/EXPERIMENTS.md.) On
the machine type that made it, training and evaluation reproduce its
predictions byte for byte, and the metrics computed from them exactly, the
AUCs to 1e-9 (the rank form of the AUC rounds once where scikit-learn's
trapezoid, which made the reference, sums; the same values up to the last bit); on another CPU, float rounding in training differs, so there the labels
must still agree on nearly every image. The mean ensemble's scoring is NumPy
only: rebuilt from the reference's own member predictions, it matches byte for
byte on the same machine type and to 1e-9 elsewhere (NumPy's vectorised exp
and log pick their kernels by the CPU's instruction sets, so the last bit of a
probability can differ between an AVX-512 CPU and one without).
"""

from __future__ import annotations

import io
import json
import math
import platform
from pathlib import Path

import numpy as np
import pandas as pd

from skin_lesion.info import CLASSES

REFERENCE = json.loads((Path(__file__).parent / "reference" / "smoke_demo_study.json").read_text())


def _same_machine_type() -> bool:
    """Whether this machine's CPU model, AVX-512 and TensorFlow match the reference's."""
    import tensorflow as tf

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), platform.processor())
    return (cpu, "avx512f" in cpuinfo, tf.__version__) == (REFERENCE["cpu"], REFERENCE["avx512"], REFERENCE["tensorflow"])


def _strip_paths(metrics: dict) -> dict:
    """A metrics file without the folders it names (they differ between machines)."""
    out = {k: v for k, v in metrics.items() if k != "run"}
    if out.get("config"):
        out["config"] = {k: v for k, v in out["config"].items() if k not in ("data", "run")}
    return out


def _assert_close(mine, ref, path: str = "metrics", only_auc: bool = False) -> None:
    """``mine`` equals ``ref`` (nested JSON) with its floats within 1e-9, its other values exactly;
    with ``only_auc`` only the AUCs get that margin (their last bit depends on how the AUC is summed)."""
    if isinstance(ref, dict):
        assert isinstance(mine, dict) and mine.keys() == ref.keys(), path
        for key in ref:
            _assert_close(mine[key], ref[key], f"{path}.{key}", only_auc)
    elif isinstance(ref, list):
        assert isinstance(mine, list) and len(mine) == len(ref), path
        for i, (a, b) in enumerate(zip(mine, ref)):
            _assert_close(a, b, f"{path}[{i}]", only_auc)
    elif isinstance(ref, float) and isinstance(mine, (int, float)) and (not only_auc or "auc" in path):
        assert math.isclose(mine, ref, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {mine} against {ref}"
    else:
        assert mine == ref, f"{path}: {mine!r} against {ref!r}"


def test_smoke_study_predictions_and_metrics_match_the_reference(smoke_runs):
    exact = _same_machine_type()
    for name, ref in REFERENCE["runs"].items():
        run = smoke_runs / name
        mine = (run / "predictions.csv").read_text()
        metrics = _strip_paths(json.loads((run / "metrics.json").read_text()))
        if exact:
            assert mine == ref["predictions"], f"{name}: test predictions differ from the reference's"
            assert (run / "predictions_val.csv").read_text() == ref["predictions_val"], f"{name}: validation predictions differ"
            _assert_close(metrics, ref["metrics"], f"{name}.metrics", only_auc=True)
        else:
            old, new = pd.read_csv(io.StringIO(ref["predictions"])), pd.read_csv(io.StringIO(mine))
            assert list(old["image_id"]) == list(new["image_id"]), name
            assert (old["pred_dx"] == new["pred_dx"]).mean() >= 0.9, f"{name}: labels moved on another CPU more than rounding explains"


def test_mean_ensemble_scoring_matches_the_reference_exactly(demo_dir, tmp_path):
    """The study's ensemble rebuilt from the reference members' saved predictions, through the current code."""
    from skin_lesion.ensemble import mean_runs
    from skin_lesion.runs import RunFolder
    from skin_lesion.splits import make_split_table, subsample
    from skin_lesion.study import STUDY_LOGIT_ADJUST

    members = ["smoke_efficientnet_lite0", "smoke_efficientnet_lite0/average", "smoke_efficientnet_lite0_48", "smoke_cnn"]
    meta = pd.read_csv(demo_dir / "HAM10000_metadata.csv", dtype={"image_id": str, "lesion_id": str})
    split = make_split_table(subsample(meta, 20, 0), seed=0)  # the smoke profile's split: its training class shares drive the logit offset
    for name in members:
        run = RunFolder(tmp_path / "runs" / name).mkdir()
        run.predictions_file().write_text(REFERENCE["runs"][name]["predictions"])
        run.predictions_file("val").write_text(REFERENCE["runs"][name]["predictions_val"])
        run.write_split(split)
    out = tmp_path / "runs" / "smoke_ensemble"
    result = mean_runs([tmp_path / "runs" / m for m in members], out, logit_adjust=STUDY_LOGIT_ADJUST)
    ref = REFERENCE["runs"]["smoke_ensemble"]
    mine, metrics = (out / "predictions.csv").read_text(), json.loads(json.dumps(_strip_paths(result.as_dict())))
    new, floats = pd.read_csv(io.StringIO(mine)), list(CLASSES)
    if _same_machine_type():
        assert mine == ref["predictions"]
        _assert_close(metrics, ref["metrics"], only_auc=True)
    else:
        old = pd.read_csv(io.StringIO(ref["predictions"]))
        assert old.drop(columns=floats).equals(new.drop(columns=floats))  # ids, labels and metadata exactly
        assert np.allclose(old[floats], new[floats], rtol=1e-9, atol=1e-12)
        _assert_close(metrics, ref["metrics"])
    assert np.allclose(new[floats].to_numpy().sum(1), 1)
