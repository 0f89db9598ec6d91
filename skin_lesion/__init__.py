"""skin_lesion: skin-lesion classification on HAM10000 with Keras 3, split by lesion.

The public API a new experiment imports (``import skin_lesion as sl``)::

    ds = sl.load_dataset()                      # real HAM10000, else the synthetic demo set
    split = sl.lesion_split(ds.meta)            # train / val / test, grouped by lesion_id
    pipe = sl.make_pipeline(rows, (224, 224), training=True, imbalance="oversample")
    model = sl.build_model("efficientnet_lite0")
    run = sl.train(sl.TrainConfig(model="cnn", profile="smoke", run="runs/x"))
    result = sl.evaluate_run(run)               # an Evaluation; or images=..., labels=... for your own set
    sl.Predictor(run).predict_file("lesion.jpg")
    sl.export_bundle(run, "bundles/x")          # LiteRT models + manifest + guard + model card
    sl.Bundle("bundles/x").analyse_file("lesion.jpg")   # without TensorFlow; refuses non-dermatoscopic pictures

Names load on first use, so ``import skin_lesion`` (and the command line's
``--help``) does not start TensorFlow.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_API: dict[str, str] = {
    "CLASSES": "info", "UserError": "info", "DataError": "info",
    "Dataset": "data", "load_dataset": "data", "read_labels": "data", "external_set": "data",
    "make_demo": "demo",
    "lesion_split": "splits", "lesion_folds": "splits", "make_split_table": "splits",
    "make_pipeline": "pipeline", "read_image": "pipeline",
    "build_model": "models",
    "TrainConfig": "config", "PROFILES": "config",
    "train": "train", "train_or_resume": "train",
    "RunFolder": "runs",
    "classification_metrics": "metrics", "balanced_accuracy": "metrics",
    "evaluate_run": "evaluate", "Evaluation": "evaluate",
    "mean_runs": "ensemble",
    "Predictor": "inference",
    "make_gradcam_heatmap": "explain",
    "export_bundle": "export", "Bundle": "bundle", "Guard": "guard", "create_app": "serve",
}
__all__ = sorted(_API)
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    """Import the defining module of a public name when it is first used (PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module 'skin_lesion' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"skin_lesion.{_API[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
