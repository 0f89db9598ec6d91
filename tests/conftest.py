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


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the group marks
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test`` runs two workers) every test that needs the
    smoke study goes to one worker, so the study is trained once, not once a worker."""
    for item in items:
        if "smoke_runs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("smoke_study"))


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


def cli(*args: str, env: dict | None = None, timeout: int = 600, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m skin_lesion ARGS`` as a user would; returns the finished process.

    By default the command's ``main`` runs inside the test process with its own
    stdout, stderr and log handler (the code path of a real run, without
    starting TensorFlow again for every call); ``fresh`` (or ``env``) starts a
    new Python process, for what needs one: device set-up, environment
    variables, imports that must not happen.
    """
    if fresh or env:
        full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        return subprocess.run([sys.executable, "-m", "skin_lesion", *args], cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=timeout)
    return _cli_in_process(list(args))


def _cli_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """``main(args)`` with captured output, exit code as a process would give it, and a traceback for a bug."""
    import contextlib
    import io
    import logging
    import traceback

    from skin_lesion.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    logger = logging.getLogger("skin_lesion")
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (1 if e.code else 0)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(cwd)
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    return subprocess.CompletedProcess(["python", "-m", "skin_lesion", *args], code or 0, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def smoke_runs(demo_dir, tmp_path_factory) -> Path:
    """The smoke study on the 250-image demo set, trained and evaluated once per test session: what
    notebooks 02 and 03 make. The report, bundle, guard, serve and reference tests share these runs."""
    from skin_lesion.study import evaluate_study, train_study

    runs = tmp_path_factory.mktemp("smoke_study") / "runs"
    train_study(runs, "smoke", demo_dir, seed=0, pretrained="efficientnet_lite0", verbose=0)
    evaluate_study(runs, "smoke")
    return runs


@pytest.fixture(scope="session")
def bundles(smoke_runs, tmp_path_factory) -> dict[str, Path]:
    """Bundles of the smoke study's pretrained run and of its ensemble, exported once per session through the command line."""
    out = tmp_path_factory.mktemp("bundles")
    made = {}
    for name in ("smoke_efficientnet_lite0", "smoke_ensemble"):
        res = cli("export", "--run", str(smoke_runs / name), "--out", str(out / name))
        assert res.returncode == 0, res.stderr[-3000:]
        made[name] = out / name
    return made


@pytest.fixture(scope="session")
def lesion_images(study_data) -> list[Path]:
    """Up to 200 images of the study's data (all real HAM10000 JPEGs where present)."""
    import pandas as pd

    meta = pd.read_csv(study_data / "HAM10000_metadata.csv")
    paths = [study_data / "images" / f"{i}.jpg" for i in meta["image_id"]]
    return [p for p in paths if p.exists()][:200]


@pytest.fixture(scope="session")
def demo_images(demo_dir) -> list[Path]:
    """The demo set's images, sorted: what the smoke study's bundles were trained on, so their guard accepts them."""
    return sorted((demo_dir / "images").glob("*.jpg"))
