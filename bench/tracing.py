"""What one small training run and its evaluation spend on TensorFlow traces.

On a CPU, a smoke run (EfficientNet-Lite0 at 64 px on a few demo images per
class: what most tests train) costs more in tracing its functions than in
arithmetic. This trains one such run on a fresh synthetic demo set, evaluates
it, and prints how often Keras traced its train and predict steps and the
project its TTA function, and the seconds of training, of its validation
passes and of the evaluation.

    python bench/tracing.py [--images 250] [--tta 2]
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import keras

import skin_lesion.callbacks as callbacks
import skin_lesion.inference as inference
from skin_lesion.config import TrainConfig
from skin_lesion.demo import make_demo
from skin_lesion.evaluate import evaluate_run
from skin_lesion.train import train

TRACES: collections.Counter = collections.Counter()


def count_traces(name: str) -> None:
    """Wrap ``keras.Model.<name>``: its Python body runs once per trace, never per step."""
    original = getattr(keras.Model, name)

    def traced(self, data):
        TRACES[name] += 1
        return original(self, data)

    setattr(keras.Model, name, traced)


def timed_validation() -> list[float]:
    """Wrap the validation pass of training; returns the list its seconds go into."""
    seconds: list[float] = []
    original = callbacks.predict_probs

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    callbacks.predict_probs = timed
    return seconds


def kept_tta_functions() -> list:
    """Wrap ``inference.tta_function``; returns the list of the functions it hands out."""
    handed: list = []
    original = inference.tta_function

    def kept(*args, **kwargs):
        handed.append(original(*args, **kwargs))
        return handed[-1]

    inference.tta_function = kept
    return handed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=250, help="demo images (the tests' demo set has 250)")
    parser.add_argument("--tta", type=int, default=2, help="views at evaluation (the smoke study's)")
    args = parser.parse_args()

    for name in ("train_step", "predict_step"):
        count_traces(name)
    validation = timed_validation()
    tta_functions = kept_tta_functions()
    with tempfile.TemporaryDirectory() as tmp:
        demo = make_demo(Path(tmp) / "demo", n_images=args.images, seed=0)
        cfg = TrainConfig(model="efficientnet_lite0", profile="smoke", data=str(demo), run=str(Path(tmp) / "run"), seed=0)
        start = time.perf_counter()
        run = train(cfg, verbose=0)
        training = time.perf_counter() - start
        start = time.perf_counter()
        evaluate_run(run, tta=args.tta)
        evaluation = time.perf_counter() - start
        distinct = {id(call): call for call in tta_functions}.values()  # a function kept with its model is handed out again
        tta_traces = sum(traced.experimental_get_tracing_count() for call in distinct for traced in call.functions.values())
    print(f"smoke EfficientNet-Lite0 run on {args.images} demo images (two phases, weight average), then evaluate --tta {args.tta}:")
    print(f"  training:            {training:6.1f} s  (traces: train step {TRACES['train_step']}, Keras predict step {TRACES['predict_step']})")
    print(f"  its validation:      {sum(validation):6.1f} s  ({len(validation)} passes)")
    print(f"  evaluation:          {evaluation:6.1f} s  (validation and test sets; traces of the TTA function: {tta_traces})")


if __name__ == "__main__":
    main()
