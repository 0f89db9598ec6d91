"""Latency of one request to the local API (``serve --model BUNDLE``), as a client sees it.

    python bench/serve.py --bundle bundles/cpu_ensemble IMAGE

Starts the server as a user does, waits for it, sends one image
``--repeats`` times (one request at a time, after a warm-up) and prints the
median and 90th percentile wall time of ``POST /api/predict`` (upload,
decode, every member, the guard, the heatmap PNG, the JSON), then the same
for eight clients at once.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("image")
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "skin_lesion", "serve", "--model", args.bundle, "--port", str(port)], cwd=ROOT,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                httpx.get(url + "/api/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        print(f"{os.cpu_count()} CPU cores; server ready {time.perf_counter() - start:.2f} s after start")
        files = {"image": (Path(args.image).name, Path(args.image).read_bytes(), "image/jpeg")}
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(3):
                client.post("/api/predict", files=files)
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                assert client.post("/api/predict", files=files).status_code == 200
                times.append(1000 * (time.perf_counter() - t))
        print(f"one request at a time: median {np.median(times):.1f} ms, 90th percentile {np.percentile(times, 90):.1f} ms ({args.repeats} requests)")

        def one(_):
            t = time.perf_counter()
            assert httpx.post(url + "/api/predict", files=files, timeout=60).status_code == 200
            return 1000 * (time.perf_counter() - t)

        t = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(one, range(8)))
        print(f"eight clients at once: all answered in {1000 * (time.perf_counter() - t):.0f} ms (slowest {max(together):.0f} ms; requests are scored one at a time)")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    main()
