"""Benchmark the tf.data input pipeline: images/s for decode-only, the training
pipeline on its first epoch (decode + cache fill) and on cached epochs -- with
augmentation in the model (augment_on=model) and in tf.data
(augment_on=pipeline) -- the augmentation alone, and peak memory. Uses
$SKIN_LESION_DATA when set, else the demo set.

    python bench/pipeline.py [--size 224] [--batch 32] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from skin_lesion.augment import make_augmenter  # noqa: E402
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


def epoch_rates(meta, size: tuple[int, int], args, augment: bool | float) -> tuple[float, float]:
    """Images/s of a training pipeline on its first epoch and on its cached epochs
    (best of ``args.repeats`` first epochs and of ``args.cached_epochs`` cached ones)."""
    first = 0.0
    for _ in range(args.repeats):  # a fresh pipeline (empty cache) each time
        pipe = make_pipeline(meta, size, args.batch, training=True, imbalance="none", augment=augment)
        n, dt = drain(pipe.dataset, pipe.steps)
        first = max(first, n / dt)
    cached = max(n / dt for n, dt in (drain(pipe.dataset, pipe.steps) for _ in range(args.cached_epochs)))
    return first, cached


def augment_rate(size: tuple[int, int], batch: int, repeats: int = 20) -> float:
    """Images/s of the training augmentation alone on one batch of random pixels
    (compiled, as in a train step): the cost that moves to the accelerator with
    augment_on=model."""
    aug = make_augmenter(1.0)
    x = tf.random.uniform((batch, *size, 3), 0, 255)
    step = tf.function(lambda images: aug(images, training=True))
    step(x)
    t0 = time.perf_counter()
    for _ in range(repeats):
        step(x).numpy()
    return batch * repeats / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--limit", type=int, default=None, help="use the first N images only")
    ap.add_argument("--cached-epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="best of N for decode-only and first epochs (the 2-core VM's speed varies run to run)")
    args = ap.parse_args()
    ds = load_dataset(None)
    meta = ds.meta.head(args.limit) if args.limit else ds.meta
    size = (args.size, args.size)
    print(f"data: {ds.label}; {len(meta)} images; {args.size}x{args.size}; batch {args.batch}; {os.cpu_count()} CPU cores")

    decode = tf.data.Dataset.from_tensor_slices(meta["path"].tolist()).map(lambda p: decode_resize(p, size), num_parallel_calls=AUTOTUNE).batch(args.batch).prefetch(AUTOTUNE)
    drain(decode)  # the first pass warms the OS file cache, so every pipeline below reads warm files
    decode_rate = max(n / dt for n, dt in (drain(decode) for _ in range(args.repeats)))
    print(f"decode-only:                  {decode_rate:8.1f} images/s")

    print("training pipeline, augmentation in the model (augment_on=model; the gpu profile):")
    plain_first, plain_cached = epoch_rates(meta, size, args, augment=False)
    print(f"  1st epoch (decode + cache fill): {plain_first:8.1f} images/s  ({plain_first / decode_rate:.0%} of decode-only)")
    print(f"  cached epochs:                   {plain_cached:8.1f} images/s  ({plain_cached / plain_first:.1f}x the first epoch)")
    print("training pipeline, augmentation in tf.data (augment_on=pipeline; the cpu profile):")
    aug_first, aug_cached = epoch_rates(meta, size, args, augment=1.0)
    print(f"  1st epoch (+ augment):           {aug_first:8.1f} images/s  ({aug_first / decode_rate:.0%} of decode-only)")
    print(f"  cached epochs (augment only):    {aug_cached:8.1f} images/s  ({aug_cached / aug_first:.1f}x the first epoch)")
    print(f"augmentation alone (LesionAugment on this CPU): {augment_rate(size, args.batch):8.1f} images/s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory:         {peak:8.0f} MiB")


if __name__ == "__main__":
    main()
