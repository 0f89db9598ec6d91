"""Benchmark the tf.data input pipeline: images/s for decode-only, the full
training pipeline on its first epoch (decode + cache fill + augment) and on
cached epochs, and peak memory. Uses $SKIN_LESION_DATA when set, else the demo set.

    python bench/pipeline.py [--size 224] [--batch 32] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from skin_lesion.data import load_dataset  # noqa: E402
from skin_lesion.pipeline import AUTOTUNE, decode_resize, make_pipeline  # noqa: E402


def drain(ds: tf.data.Dataset, steps: int | None = None) -> tuple[int, float]:
    """Pull every batch (or ``steps`` batches); return images seen and seconds taken."""
    n, t0 = 0, time.perf_counter()
    for i, item in enumerate(ds):
        x = item[0] if isinstance(item, tuple) else item
        n += int(x.shape[0])
        if steps and i + 1 >= steps:
            break
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="use the first N images only")
    ap.add_argument("--cached-epochs", type=int, default=2)
    args = ap.parse_args()
    ds = load_dataset(None)
    meta = ds.meta.head(args.limit) if args.limit else ds.meta
    size = (args.size, args.size)
    print(f"data: {ds.label}; {len(meta)} images; {args.size}x{args.size}; batch {args.batch}; {os.cpu_count()} CPU cores")

    decode = tf.data.Dataset.from_tensor_slices(meta["path"].tolist()).map(lambda p: decode_resize(p, size), num_parallel_calls=AUTOTUNE).batch(args.batch).prefetch(AUTOTUNE)
    n, dt = drain(decode)
    decode_rate = n / dt
    print(f"decode-only:                  {decode_rate:8.1f} images/s")

    pipe = make_pipeline(meta, size, args.batch, training=True, imbalance="none", augment=1.0)
    n, dt = drain(pipe.dataset, pipe.steps)
    first = n / dt
    print(f"training pipeline, 1st epoch: {first:8.1f} images/s  ({first / decode_rate:.0%} of decode-only; decode + cache fill + augment)")
    rates = []
    for _ in range(args.cached_epochs):
        n, dt = drain(pipe.dataset, pipe.steps)
        rates.append(n / dt)
    cached = max(rates)
    print(f"training pipeline, cached:    {cached:8.1f} images/s  ({cached / first:.1f}x the first epoch; augmentation on)")

    plain = make_pipeline(meta, size, args.batch, training=True, imbalance="none", augment=False)
    drain(plain.dataset, plain.steps)
    n, dt = drain(plain.dataset, plain.steps)
    print(f"cached, no augmentation:      {n / dt:8.1f} images/s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory:         {peak:8.0f} MiB")


if __name__ == "__main__":
    main()
