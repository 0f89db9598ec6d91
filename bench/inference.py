"""Benchmark inference on this machine: single-image latency (warm, median of
many calls of one compiled function, as `predict` uses) and batch throughput,
for each model at its default input size. Weights do not change the cost, so
untrained models are used and nothing needs a network or a trained run.

    python bench/inference.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from skin_lesion.models import DEFAULT_SIZE, build_model  # noqa: E402
from skin_lesion.pixels import size_text  # noqa: E402


def latency_ms(fn, x: tf.Tensor, repeats: int) -> float:
    """Median wall time of ``fn(x)`` after warm-up, in milliseconds."""
    for _ in range(3):
        fn(x).numpy()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x).numpy()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--models", nargs="+", default=["cnn", "efficientnet_lite0", "resnet50"])
    ap.add_argument("--run", help="also time `predict` end to end (read file, resize, model, calibrate) for this run")
    ap.add_argument("--image", help="the image file for --run")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPU cores, TensorFlow {tf.__version__}, GPU: {bool(tf.config.list_physical_devices('GPU'))}")
    print(f"{'model':20s} {'input':>7s} {'params':>9s} {'1 image (ms, median)':>22s} {'batch ' + str(args.batch) + ' (images/s)':>20s}")
    for name in args.models:
        size = DEFAULT_SIZE[name]
        model = build_model(name, size, weights="none")
        fn = tf.function(lambda x, m=model: m(x, training=False))
        rng = np.random.default_rng(0)
        one = tf.constant(rng.uniform(0, 255, (1, size, size, 3)).astype("float32"))
        batch = tf.constant(rng.uniform(0, 255, (args.batch, size, size, 3)).astype("float32"))
        single = latency_ms(fn, one, args.repeats)
        per_batch = latency_ms(fn, batch, max(5, args.repeats // 5))
        print(f"{name:20s} {size:>4d}px {model.count_params() / 1e6:8.2f}M {single:22.1f} {args.batch / per_batch * 1000:20.1f}")
    if args.run and args.image:
        from skin_lesion.inference import Predictor

        predictor = Predictor(args.run)
        for _ in range(3):
            predictor.predict_file(args.image)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            predictor.predict_file(args.image)
            times.append(time.perf_counter() - t0)
        models = ", ".join(f"{m.run.config().model} {size_text(m.image_size)}" for m in predictor.members)
        print(f"predict end to end ({args.run}: {models}): {1000 * np.median(times):.1f} ms per image (median of {args.repeats})")


if __name__ == "__main__":
    main()
