"""Write tests/reference/smoke_demo_study.json: the smoke study on the 250-image demo set (seed 0, TTA 2).

    .venv/bin/python tests/reference/make_reference.py OUT_DIR

Run it after a change that is meant to move the study's numbers (say, the demo
set or a recipe), on the machine type whose CPU it records; test_reference then
holds every later change to these predictions and metrics.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import tensorflow as tf

from skin_lesion import __version__
from skin_lesion.demo import make_demo
from skin_lesion.study import evaluate_study, train_study

RUNS = ("smoke_cnn", "smoke_efficientnet_lite0/average", "smoke_efficientnet_lite0", "smoke_efficientnet_lite0_48", "smoke_ensemble")


def strip_paths(metrics: dict) -> dict:
    """A metrics file without the folders it names (as test_reference compares it)."""
    out = {k: v for k, v in metrics.items() if k != "run"}
    if out.get("config"):
        out["config"] = {k: v for k, v in out["config"].items() if k not in ("data", "run")}
    return out


def main() -> None:
    out = Path(sys.argv[1])
    demo = make_demo(out / "demo", n_images=250, seed=0)
    runs = out / "runs"
    train_study(runs, "smoke", demo, seed=0, pretrained="efficientnet_lite0", verbose=0)
    evaluate_study(runs, "smoke")
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), platform.processor())
    reference = dict(made_with=f"skin_lesion {__version__}", cpu=cpu, avx512="avx512f" in cpuinfo, tensorflow=tf.__version__, runs={
        name: dict(metrics=strip_paths(json.loads((runs / name / "metrics.json").read_text())),
                   predictions=(runs / name / "predictions.csv").read_text(),
                   predictions_val=(runs / name / "predictions_val.csv").read_text())
        for name in RUNS
    })
    target = Path(__file__).parent / "smoke_demo_study.json"
    target.write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
