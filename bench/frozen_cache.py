"""Would caching the frozen early blocks of EfficientNet-Lite pay on this machine,
and what does a fine-tuning step of each Lite size cost here?

The cpu profile fine-tunes Lite0 from ``block8_expand_conv`` up; the blocks
below never change, yet every training step runs them forward. Caching their
output (one cached copy per augmented view, since augmentation happens on the
image, before them) would leave only the trainable top to run each step.
This measures, at the profile's batch and input size, with untrained weights
(the cost does not depend on them):

- the full fine-tuning step (frozen bottom forward + top forward/backward);
- the frozen bottom's forward alone (the cost of caching one view per image);
- the top's training step on cached feature maps;
- the memory one cached view of the training split takes.

It prints the per-epoch speed-up and the number of epochs (each fed one of
V cached views) that the cache needs to break even.

    python bench/frozen_cache.py [--model efficientnet_lite1] [--unfreeze-from block8_expand_conv] [--steps 10] [--policy mixed_bfloat16] [--label-smoothing 0.1]

``--model`` picks the Lite size (default Lite0); ``--unfreeze-from`` defaults to
where the ``cpu`` profile fine-tunes that size from (its fifth stage).

``--policy`` sets Keras' global dtype policy first: this machine's CPU (AMD
EPYC with AVX512-BF16) might run bfloat16 convolutions faster than float32.

``--label-smoothing`` trains the full step with the study's smoothed loss
(``make_loss``), to time what smoothing adds to a step on the same machine.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from skin_lesion.config import UNFREEZE_FROM  # noqa: E402
from skin_lesion.losses import make_loss  # noqa: E402
from skin_lesion.models import LITE_NAMES, build_model, set_backbone_trainable  # noqa: E402

TRAIN_IMAGES = 7000  # about the training split of the lesion-grouped HAM10000 split


def median_seconds(fn, steps: int) -> float:
    """Median wall time of ``fn()`` over ``steps`` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def split_at(model: keras.Model, layer_name: str) -> tuple[keras.Model, keras.Model]:
    """The frozen bottom (image -> input of ``layer_name``) and the trainable top
    (that tensor -> probabilities) as two models sharing the original layers."""
    cut = model.get_layer(layer_name).input
    bottom = keras.Model(model.input, cut, name="bottom")
    top = keras.Model(cut, model.output, name="top")
    return bottom, top


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0", choices=LITE_NAMES)
    ap.add_argument("--unfreeze-from", dest="unfreeze_from", help="default: where the cpu profile starts fine-tuning this model")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--policy", default="float32", help="Keras dtype policy, e.g. mixed_bfloat16")
    ap.add_argument("--label-smoothing", dest="label_smoothing", type=float, default=0.0, help="the full step's loss: smoothed by EPS (0 = plain)")
    args = ap.parse_args()
    args.unfreeze_from = args.unfreeze_from or UNFREEZE_FROM[args.model]
    keras.mixed_precision.set_global_policy(args.policy)
    print(f"{os.cpu_count()} CPU cores, TensorFlow {tf.__version__}; {args.model} {args.size}px, batch {args.batch}, "
          f"trainable from {args.unfreeze_from}, policy {args.policy}, label smoothing {args.label_smoothing}")

    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (args.batch, args.size, args.size, 3)).astype("float32"))
    labels = tf.constant(rng.integers(0, 7, args.batch))

    model = build_model(args.model, args.size, weights="none")
    set_backbone_trainable(model, args.unfreeze_from)
    model.compile(keras.optimizers.Adam(1e-4), make_loss(args.label_smoothing))
    full = median_seconds(lambda: model.train_on_batch(images, labels), args.steps)

    bottom, top = split_at(model, args.unfreeze_from)
    bottom_fn = tf.function(lambda x: bottom(x, training=False))
    cache_batch = median_seconds(lambda: bottom_fn(images).numpy(), args.steps)
    features = bottom_fn(images)
    top.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
    cached = median_seconds(lambda: top.train_on_batch(features, labels), args.steps)

    per_image = int(np.prod(features.shape[1:]))
    gib_per_view = TRAIN_IMAGES * per_image * 2 / 2**30  # float16 in the cache
    steps_per_epoch = TRAIN_IMAGES / args.batch
    print(f"cached feature map {tuple(features.shape[1:])}: {gib_per_view:.2f} GiB per view of {TRAIN_IMAGES} training images (float16)")
    print(f"full fine-tuning step      {1000 * full:8.0f} ms  ({args.batch / full:6.1f} images/s)")
    print(f"frozen bottom forward      {1000 * cache_batch:8.0f} ms  ({args.batch / cache_batch:6.1f} images/s) = caching one view")
    print(f"top step on cached maps    {1000 * cached:8.0f} ms  ({args.batch / cached:6.1f} images/s)")
    saved = full - cached
    print(f"epoch: {steps_per_epoch * full / 60:.1f} min full vs {steps_per_epoch * cached / 60:.1f} min cached ({full / cached:.2f}x); "
          f"caching one view costs {steps_per_epoch * cache_batch / 60:.1f} min, repaid after {cache_batch / saved:.1f} epochs on it" if saved > 0 else
          "epoch: the cached step is not faster")


if __name__ == "__main__":
    main()
