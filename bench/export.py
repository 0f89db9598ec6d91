"""What turning a trained model into a LiteRT file costs, by two routes.

``export.litert_model`` hands the converter one traced inference function and
a module holding the model's variables. The other route, which Keras'
documentation shows, writes a SavedModel first (``Model.export``) and converts
that. This trains a smoke EfficientNet-Lite0 run on a fresh synthetic demo
set at 64 px or at ``--image-size`` (or takes ``--run``), converts its model
both ways, and prints the seconds of each and the largest difference between
the two files' outputs on random images, through the signature a bundle calls.
(A run with its augmentation inside the model converts only the first way:
``Model.export`` traces the augmentation in training mode, and LiteRT has no
kernels for its random ops.)

    python bench/export.py [--run RUN | --image-size 224] [--images 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from skin_lesion.config import TrainConfig
from skin_lesion.demo import make_demo
from skin_lesion.export import litert_model, serving_model
from skin_lesion.inference import load_run_model
from skin_lesion.pixels import hw
from skin_lesion.train import train


def through_saved_model(model: keras.Model, image_size) -> bytes:
    """The same flatbuffer by way of a SavedModel written by ``Model.export``."""
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "saved_model"
        serving_model(model).export(str(saved), format="tf_saved_model", input_signature=[tf.TensorSpec([1, *hw(image_size), 3], tf.float32, name="image")], verbose=False)
        return tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert()


def outputs(flatbuffer: bytes, images: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Each image through the file's serving signature, as ``bundle.Bundle`` runs it."""
    runner = Interpreter(model_content=flatbuffer).get_signature_runner()
    return [runner(image=image[None]) for image in images]


def timed(convert, model, size) -> tuple[bytes, float]:
    start = time.perf_counter()
    flatbuffer = convert(model, size)
    return flatbuffer, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a trained run (default: train a smoke Lite0 run on a fresh demo set)")
    parser.add_argument("--image-size", type=int, default=64, help="the smoke run's input size when it trains one (224: the study's Lite0)")
    parser.add_argument("--images", type=int, default=20, help="random images to compare the two files on")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            demo = make_demo(Path(tmp) / "demo", n_images=250, seed=0)
            run = train(TrainConfig(model="efficientnet_lite0", profile="smoke", data=str(demo), run=str(Path(tmp) / "run"), seed=0,
                                    image_size=args.image_size), verbose=0)
        model, cfg = load_run_model(run)
        # each route once untimed first, so neither pays for the other's first-use costs
        for convert in (litert_model, through_saved_model):
            convert(model, cfg.input_size)
        direct, direct_s = timed(litert_model, model, cfg.input_size)
        saved, saved_s = timed(through_saved_model, model, cfg.input_size)
    images = np.random.default_rng(0).uniform(0, 255, (args.images, *hw(cfg.input_size), 3)).astype("float32")
    diff = max(float(np.abs(a[k] - b[k]).max()) for a, b in zip(outputs(direct, images), outputs(saved, images)) for k in a)
    print(f"{cfg.model} at {cfg.input_size} px to LiteRT ({len(direct) / 2**20:.1f} MiB):")
    print(f"  traced function + variables (export.litert_model): {direct_s:6.1f} s")
    print(f"  SavedModel first (Model.export):                   {saved_s:6.1f} s")
    print(f"  largest output difference on {args.images} random images: {diff:.2e}")


if __name__ == "__main__":
    main()
