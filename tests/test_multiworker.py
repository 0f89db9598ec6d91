"""Training across worker processes: two real workers on 127.0.0.1 through
``train --local-workers`` (MultiWorkerMirroredStrategy), one of them killed
mid-epoch and the run resumed, against one process with the same global batch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, cli

from skin_lesion.info import UserError
from skin_lesion.train_command import worker_argv
from skin_lesion.workers import WorkerFailed, cluster_config, free_ports, launch_local_workers, tf_config

# Lite0 at 64 px on a few images per class; no dropout, whose masks each worker
# draws on its own (a single process draws one mask for the whole batch). MixUp
# rides along: it blends the global batch before the workers split it, and its
# soft targets must reach each worker's compiled loss.
RUN = ("train", "--profile", "smoke", "--model", "efficientnet_lite0", "--dropout", "0", "--mixup", "0.4", "--no-eval")
# Largest difference allowed between the weights of one worker and of two after two
# epochs: the same sums added in another order (measured 1.4e-6 and 8.3e-6 on two CPUs).
WEIGHT_TOLERANCE = 1e-4
# The compared runs use TensorFlow's own CPU kernels. oneDNN's are picked by batch shape
# on some processors (AVX-512 ones), so one batch of 16 and two of 8 round differently,
# and Adam turns the rounding of near-zero gradients into whole steps: 9.2e-4 apart on
# such a CPU with oneDNN on. What is tested is the workers' data and updates, not that.
TF_KERNELS = {"TF_ENABLE_ONEDNN_OPTS": "0"}


def _weights(run: Path) -> list[np.ndarray]:
    import keras

    import skin_lesion.models  # noqa: F401  (registers the custom layers)

    return keras.models.load_model(run / "model.keras", safe_mode=True, compile=False).get_weights()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _kill_a_worker_mid_epoch(args: list[str], run: Path, epochs: int) -> subprocess.CompletedProcess:
    """Launch ``train ARGS`` on two local workers, SIGKILL worker 1 once the chief has
    begun its second epoch, and return the launcher's finished process."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **TF_KERNELS}
    launcher = subprocess.Popen([sys.executable, "-m", "skin_lesion", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    pids = {}
    try:
        while len(pids) < 2:
            line = launcher.stdout.readline()
            assert line, launcher.stderr.read()[-3000:]
            if m := re.match(r"worker (\d): pid (\d+)", line):
                pids[int(m[1])] = int(m[2])
        chief_log = run.parent / f"{run.name}.workers" / "worker0.log"
        # Mid-epoch: the first epoch is in the run folder and Keras has begun the second.
        _wait_for(lambda: (run / "history.csv").exists() and f"Epoch 2/{epochs}" in chief_log.read_text(), 300, "the second epoch")
        os.kill(pids[1], signal.SIGKILL)
        out, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:  # the test failed part-way: stop the launcher and its workers
            os.killpg(launcher.pid, signal.SIGKILL)
    for pid in pids.values():  # no worker left behind
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    return subprocess.CompletedProcess(launcher.args, launcher.returncode, out, err)


def test_two_workers_killed_and_resumed_train_like_one_process(demo_dir, tmp_path):
    """Two local workers with a per-worker batch of 8 against one process with a batch
    of 16: worker 1 is killed in the second epoch, the launcher stops the other and says
    how to resume, the resumed run finishes on two workers, and its weights are the one
    process's. The second epoch starts a new phase (the backbone unfrozen), which
    rebuilds its model from the first epoch's checkpoint in either run."""
    one, two = tmp_path / "one", tmp_path / "two"
    res = cli(*RUN, "--batch-size", "16", "--data", str(demo_dir), "--run", str(one), env=TF_KERNELS)
    assert res.returncode == 0, res.stderr[-3000:]
    args = [*RUN, "--epochs", "2", "--batch-size", "8", "--local-workers", "2", "--data", str(demo_dir), "--run", str(two)]
    killed = _kill_a_worker_mid_epoch(args, two, epochs=2)
    assert killed.returncode == 2, killed.stderr[-3000:]
    assert "worker 1 of 2 stopped (killed by SIGKILL); the other workers were stopped" in killed.stderr
    assert "--resume" in killed.stderr
    assert pd.read_csv(two / "history.csv")["epoch"].tolist() == [0]
    assert not (tmp_path / "two.workers" / "scratch").exists()  # the other worker's copy, removed by the launcher

    worker1_log = tmp_path / "two.workers" / "worker1.log"  # the launcher appends: what the resumed launch wrote starts here
    resumed_from = len(worker1_log.read_text())
    res = cli(*[a for a in args if a != "--no-eval"], "--resume", "--tta", "2", env=TF_KERNELS)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "MultiWorkerMirroredStrategy with 2 replica(s) on 2 workers" in res.stdout  # the chief's log, streamed
    assert "balanced_accuracy" in res.stdout  # the launcher evaluated the finished run
    # The run folder is complete and holds each epoch once; the other worker's copy is gone.
    assert {"config.json", "split.csv", "state.json", "history.csv", "model.keras", "manifest.json", "metrics.json"} <= {p.name for p in two.iterdir()}
    assert pd.read_csv(two / "history.csv")["epoch"].tolist() == [0, 1]
    assert json.loads((two / "state.json").read_text())["epochs_done"] == 2
    assert json.loads((two / "config.json").read_text())["run"] == str(two)
    assert not (tmp_path / "two.workers" / "scratch").exists()
    worker1 = worker1_log.read_text()[resumed_from:]
    assert "this is worker 1" in worker1 and re.search(r"Run \S*skin_lesion_worker1_\w+: efficientnet_lite0", worker1)  # into its scratch copy

    # Same data, same order, same updates: the weights agree up to summation order.
    diffs = [float(np.abs(a - b).max()) for a, b in zip(_weights(one), _weights(two))]
    assert max(diffs) <= WEIGHT_TOLERANCE, f"largest weight difference {max(diffs):.2e}"
    h1, h2 = pd.read_csv(one / "history.csv"), pd.read_csv(two / "history.csv")
    np.testing.assert_allclose(h1["loss"], h2["loss"], rtol=1e-5)
    # Equal here; a weight 1e-6 away could flip one validation image on another CPU.
    np.testing.assert_allclose(h1["val_balanced_accuracy"], h2["val_balanced_accuracy"], atol=0.05)


def test_a_worker_that_fails_stops_the_launcher_with_its_error(tmp_path):
    with pytest.raises(WorkerFailed, match=r"(?s)worker \d of 2 stopped \(exit code 2\).*no_such_folder"):
        launch_local_workers(["--profile", "smoke", "--data", str(tmp_path / "no_such_folder"), "--run", str(tmp_path / "r")], 2, log_dir=tmp_path / "logs")


def test_cluster_helpers(monkeypatch):
    ports = free_ports(3)
    assert len(set(ports)) == 3
    cfg = json.loads(cluster_config(["a:1", "b:2"], 1))
    assert cfg == {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", "not json")
    with pytest.raises(UserError, match="TF_CONFIG is not a cluster description"):
        tf_config()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:2"]}, "task": {"type": "chief", "index": 0}}))
    with pytest.raises(UserError, match="only a cluster of workers is supported"):
        tf_config()
    with pytest.raises(UserError, match="unset TF_CONFIG"):
        launch_local_workers([], 2)
    monkeypatch.setenv("TF_CONFIG", cluster_config(["a:1", "b:2"], 0))
    for command in ("study", "report"):  # they train in one process
        res = cli(command, "--profile", "smoke")
        assert res.returncode == 2 and "trains in one process; unset TF_CONFIG" in res.stderr
    monkeypatch.delenv("TF_CONFIG")
    assert tf_config() is None
    assert worker_argv(["--run", "r", "--local-workers", "2", "--seed", "1"]) == ["--run", "r", "--seed", "1", "--no-eval"]
    assert worker_argv(["--local-workers=3", "--no-eval"]) == ["--no-eval"]
    res = cli("train", "--lo", "2")  # an abbreviation would reach the workers and make each launch more
    assert res.returncode == 2 and "unrecognized arguments: --lo 2" in res.stderr
