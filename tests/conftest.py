"""Shared fixtures: a small synthetic demo set, the real HAM10000 when
$SKIN_LESION_DATA points at it, and a helper to run the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
REAL = os.environ.get("SKIN_LESION_DATA")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A 250-image synthetic demo set, made once per test session."""
    from skin_lesion.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo"), n_images=250, seed=0)


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """The real HAM10000 folder, or skip."""
    if not REAL or not (Path(REAL) / "HAM10000_metadata.csv").exists():
        pytest.skip("real HAM10000 not available: set SKIN_LESION_DATA to its folder")
    return Path(REAL)


@pytest.fixture(scope="session")
def study_data(demo_dir) -> Path:
    """The data the end-to-end tests use: real HAM10000 where present, else the demo set."""
    if REAL and (Path(REAL) / "HAM10000_metadata.csv").exists():
        return Path(REAL)
    return demo_dir


def cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m skin_lesion ARGS`` as a user would; returns the finished process."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "skin_lesion", *args], cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=timeout)


@pytest.fixture(scope="session")
def smoke_runs(study_data, tmp_path_factory) -> Path:
    """The smoke study trained and evaluated once per test session (real data where present,
    else the demo set): what notebooks 02 and 03 make. The report test reuses these runs."""
    from skin_lesion.study import evaluate_study, train_study

    runs = tmp_path_factory.mktemp("smoke_study") / "runs"
    train_study(runs, "smoke", study_data, seed=0, pretrained="efficientnet_lite0", verbose=0)
    evaluate_study(runs, "smoke")
    return runs
