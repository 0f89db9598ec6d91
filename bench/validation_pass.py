"""What one validation pass costs in a training epoch, on this machine.

Before 2026-12-03 every epoch ran validation twice: ``fit``'s own pass (for
``val_loss`` and ``val_accuracy``) and the ``BalancedAccuracy`` callback's
``predict`` (for the metric the checkpoints keep). Since then the callback's
one pass gives all three. This times both kinds of pass with a trained run's
model on that run's validation split, twice each (the first includes decoding).

    python bench/validation_pass.py --run runs/fls/s4_lite0_ls
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from skin_lesion.evaluate import run_frames  # noqa: E402
from skin_lesion.pipeline import make_pipeline  # noqa: E402
from skin_lesion.train import compile_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a trained run folder (config.json, split.csv, model.keras)")
    args = parser.parse_args()
    meta, cfg = run_frames(args.run)
    val = meta[meta["split"] == "val"]
    pipe = make_pipeline(val, (cfg.image_size, cfg.image_size), cfg.batch_size)
    model = keras.models.load_model(f"{args.run}/model.keras", safe_mode=True, compile=False)
    compile_model(model, 1e-4, cfg.label_smoothing)
    passes = {"predict (the callback's pass)": lambda: model.predict(pipe.dataset, verbose=0), "evaluate (fit's own pass)": lambda: model.evaluate(pipe.dataset, verbose=0)}
    for round_ in (1, 2):
        for name, fn in passes.items():
            t0 = time.perf_counter()
            fn()
            print(f"round {round_}: {name}: {time.perf_counter() - t0:.1f} s for {len(val)} images at {cfg.image_size} px", flush=True)


if __name__ == "__main__":
    main()
