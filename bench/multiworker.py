"""Training throughput on one worker and on several local workers, same global batch.

    python bench/multiworker.py [--data DIR] [--workers 1 2] [--image-size 128]

Trains the same run (EfficientNet-Lite0, a few epochs on a class-balanced
subset) once as a single process and once per ``--workers`` count through
``train --local-workers N``, each with the same global batch (the per-worker
batch is the global batch over N), and prints for each: training images per
second in the last epoch (fine-tuning; its validation pass included, which
every worker runs whole), wall time of the command, and the CPU cores its
processes kept busy on average (CPU seconds over wall seconds).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def children_cpu_seconds() -> float:
    """User + system CPU time of every finished child process so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train_once(n: int, args, out: Path) -> dict:
    """One run with ``n`` workers (1: a plain process); its figures."""
    run = out / f"workers{n}"
    cmd = [sys.executable, "-m", "skin_lesion", "train", "--profile", "smoke", "--model", "efficientnet_lite0",
           "--max-per-class", str(args.max_per_class), "--image-size", str(args.image_size), "--epochs", str(args.epochs),
           "--batch-size", str(args.global_batch // n), "--no-eval", "--run", str(run)]
    cmd += ["--data", args.data] if args.data else []
    cmd += ["--local-workers", str(n)] if n > 1 else []
    cpu0, t0 = children_cpu_seconds(), time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    wall, cpu = time.perf_counter() - t0, children_cpu_seconds() - cpu0
    if res.returncode:
        sys.exit(f"{n} worker(s) failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    split = pd.read_csv(run / "split.csv")
    steps = math.ceil((split["split"] == "train").sum() / args.global_batch)
    last = pd.read_csv(run / "history.csv")["epoch_seconds"].iloc[-1]
    return dict(workers=n, per_worker_batch=args.global_batch // n, images_per_s=steps * args.global_batch / last,
                last_epoch_s=last, wall_s=wall, cores_busy=cpu / wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="dataset folder (default: $SKIN_LESION_DATA, else the synthetic demo set)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--global-batch", dest="global_batch", type=int, default=32)
    ap.add_argument("--max-per-class", dest="max_per_class", type=int, default=200)
    ap.add_argument("--image-size", dest="image_size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores; Lite0 at {args.image_size} px, {args.max_per_class} images a class at most, "
          f"{args.epochs} epochs, global batch {args.global_batch}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [train_once(n, args, Path(tmp)) for n in args.workers]
    table = pd.DataFrame(rows).set_index("workers")
    print(table.round(2).to_string())


if __name__ == "__main__":
    main()
