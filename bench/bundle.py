"""Benchmark the exported bundle against the Keras path, in one run on this machine.

For each path (``predict --model BUNDLE``, TensorFlow-free; ``predict --run RUN``, Keras):
- cold: a fresh process from start to the printed top-3 of one image (median of --cold runs);
- peak memory of that process (its maximum resident set size);
- warm: the median latency of scoring one image file in a process that has loaded the model
  (the bundle's includes its out-of-distribution guard, as ``predict --model`` runs it).

    python bench/bundle.py --run runs/cpu_ensemble --bundle bundles/cpu_ensemble IMAGE [--cold 5 --repeats 50]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `predict --model` runs (see skin_lesion/__main__.py)

import numpy as np  # noqa: E402


def _predict(flag: str, target: str, image: str) -> list[str]:
    return [sys.executable, "-m", "skin_lesion", "predict", flag, target, image]


def cold_and_peak(flag: str, target: str, image: str, runs: int) -> tuple[float, float]:
    """Median seconds of a fresh ``predict`` process (start to printed top-3), and its largest peak resident memory in MiB."""
    times, peaks = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.Popen(_predict(flag, target, image), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        _, status, usage = os.wait4(proc.pid, 0)
        times.append(time.perf_counter() - t0)
        if status:
            raise SystemExit(proc.stderr.read().decode()[-2000:])
        peaks.append(usage.ru_maxrss / 1024)  # Linux reports KiB
    return float(np.median(times)), float(max(peaks))


def warm_ms(score, repeats: int) -> float:
    """Median milliseconds of ``score()``: one image file decoded, resized, run through every member and calibrated."""
    for _ in range(3):
        score()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        score()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True, help="the run or mean ensemble the bundle was exported from")
    ap.add_argument("--bundle", required=True)
    ap.add_argument("image")
    ap.add_argument("--cold", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPU cores; image {args.image}")
    rows = []
    for label, flag, target in (("bundle (LiteRT, no TensorFlow)", "--model", args.bundle), ("Keras run", "--run", args.run)):
        rows.append((label, flag, target, *cold_and_peak(flag, target, args.image, args.cold)))
    from skin_lesion.bundle import Bundle

    bundle = Bundle(args.bundle)
    warm = {"--model": warm_ms(lambda: bundle.analyse_file(args.image), args.repeats)}  # what predict --model does: the guard too
    from skin_lesion.inference import Predictor

    keras_path = Predictor(args.run)
    warm["--run"] = warm_ms(lambda: keras_path.probs_file(args.image), args.repeats)
    for label, flag, _target, seconds, peak in rows:
        print(f"{label:32s} cold {seconds:6.2f} s   peak {peak:6.0f} MiB   warm {warm[flag]:6.1f} ms per image")


if __name__ == "__main__":
    main()
