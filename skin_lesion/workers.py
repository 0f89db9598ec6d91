"""Training across processes: the cluster a worker is part of, and a launcher
that starts several workers on this machine.

A multi-worker run is TensorFlow's own: every worker runs the same ``train``
command with a ``TF_CONFIG`` naming the cluster and its own place in it, and
``tf.distribute.MultiWorkerMirroredStrategy`` keeps their weights identical by
all-reducing the gradients. Worker 0 is the chief: it alone writes the run
folder; the others train into temporary folders that are removed.

This module imports no TensorFlow: the launcher only starts and watches processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from skin_lesion.info import UserError


class WorkerFailed(UserError):
    """A worker of a ``--local-workers`` run stopped with an error; the others were stopped."""


def tf_config() -> dict | None:
    """The ``TF_CONFIG`` this process was started with (None when unset), read as JSON.

    Only a cluster of equal workers is understood (``{"worker": [...]}``, this
    task a ``worker``; worker 0 is the chief): anything else is refused rather
    than half read, since two processes that both believed they were the chief
    would both write the run folder.
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    example = '{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}'
    try:
        cfg = json.loads(raw)
        workers, task = cfg["cluster"]["worker"], cfg["task"]
        index = int(task["index"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"TF_CONFIG is not a cluster description ({e!r}); it must be JSON like {example}, or unset to train in one process") from e
    if set(cfg["cluster"]) != {"worker"} or task.get("type") != "worker" or not 0 <= index < len(workers):
        raise UserError(f"TF_CONFIG: only a cluster of workers is supported (worker 0 is the chief; no chief, evaluator or ps task), like {example}")
    return cfg


def cluster_size() -> int:
    """How many workers train together: the length of ``TF_CONFIG``'s worker list, else 1."""
    cfg = tf_config()
    return len(cfg["cluster"]["worker"]) if cfg else 1


def worker_index() -> int:
    """This worker's place in the cluster (0 when there is no cluster)."""
    cfg = tf_config()
    return int(cfg["task"]["index"]) if cfg else 0


def is_chief() -> bool:
    """Whether this process writes the run folder: worker 0, or a process outside any cluster."""
    return worker_index() == 0


SCRATCH_ENV = "SKIN_LESION_WORKER_SCRATCH"  # where non-chief workers put their temporary run folders (the launcher sets it)


def worker_scratch(index: int) -> Path:
    """A fresh temporary folder for a non-chief worker's copy of the run folder:
    under ``$SKIN_LESION_WORKER_SCRATCH`` when a launcher set it (it removes
    that whole folder at the end, whatever became of the workers), else in $TMPDIR."""
    parent = os.environ.get(SCRATCH_ENV)
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"skin_lesion_worker{index}_", dir=parent or None))


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports on 127.0.0.1 that nothing listens on now (held open together, so distinct)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_config(hosts: Sequence[str], index: int) -> str:
    """The ``TF_CONFIG`` of worker ``index`` in a cluster of ``hosts`` (``host:port`` each)."""
    return json.dumps({"cluster": {"worker": list(hosts)}, "task": {"type": "worker", "index": index}})


def _stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """Terminate every process still running, then kill what is left after ``grace`` seconds."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _exit_reason(code: int) -> str:
    """``exit code 2`` or ``killed by SIGKILL``: how a worker ended, in words."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a worker's log, for the error message."""
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


LAUNCHER_ENV = "SKIN_LESION_LAUNCHER_PID"  # set by the launcher: the pid a worker stops with


def stop_with_launcher() -> None:
    """In a worker that a launcher started: ask Linux for SIGKILL when the
    launcher dies (PR_SET_PDEATHSIG), so that no worker trains on, and writes
    the run folder, after its launcher is gone (a launcher that exits normally
    stops its workers itself, more gently). Set here, in the worker, rather
    than between fork and exec, where the launcher's threads make it unsafe."""
    launcher = os.environ.get(LAUNCHER_ENV)
    if not launcher:
        return
    try:
        import ctypes

        # SIGKILL: a SIGTERM sent this way did not stop a worker in the middle of training (checked by hand).
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: the launcher's own handlers still stop its workers
    if os.getppid() != int(launcher):  # the launcher died before the request was in place
        raise SystemExit(f"worker {worker_index()}: its launcher (pid {launcher}) is gone; stopping")


def exit_on_signal(signum, frame) -> None:
    """A signal handler that exits as Python does on SIGINT, so ``finally`` blocks run."""
    raise SystemExit(128 + signum)


def launch_local_workers(argv: Sequence[str], n: int, log_dir: str | os.PathLike | None = None, poll: float = 0.2) -> None:
    """Run ``python -m skin_lesion train ARGV`` as ``n`` workers on 127.0.0.1 and wait for them.

    Each worker gets free ports and its ``TF_CONFIG``; the chief's output is
    streamed to this process's stdout, and every worker's output is appended to
    ``LOG_DIR/workerI.log``. If any worker stops with an error (or is killed),
    or this launcher is interrupted or terminated, the others are stopped;
    ``WorkerFailed`` names the worker that failed first, with its last lines.
    The non-chief workers' temporary run folders (``LOG_DIR/scratch``) are removed.
    """
    if n < 1:
        raise UserError(f"--local-workers must be at least 1 (got {n})")
    if os.environ.get("TF_CONFIG"):
        raise UserError("--local-workers starts its own cluster; unset TF_CONFIG (or drop --local-workers and run one worker per TF_CONFIG)")
    hosts = [f"127.0.0.1:{p}" for p in free_ports(n)]
    logs = Path(log_dir or tempfile.mkdtemp(prefix="skin_lesion_workers_"))
    logs.mkdir(parents=True, exist_ok=True)
    scratch = logs / "scratch"
    chief_start = (logs / "worker0.log").stat().st_size if (logs / "worker0.log").exists() else 0
    procs, files, failed = [], [], None
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    handlers = {sig: signal.signal(sig, exit_on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)} if main_thread else {}
    try:
        for i in range(n):
            env = {**os.environ, "TF_CONFIG": cluster_config(hosts, i), "PYTHONUNBUFFERED": "1", SCRATCH_ENV: str(scratch), LAUNCHER_ENV: str(os.getpid())}
            f = open(logs / f"worker{i}.log", "a")  # noqa: SIM115  (closed in finally)
            files.append(f)
            procs.append(subprocess.Popen([sys.executable, "-m", "skin_lesion", "train", *argv], env=env, stdout=f, stderr=subprocess.STDOUT))
            print(f"worker {i}: pid {procs[-1].pid}, {hosts[i]}, log {logs / f'worker{i}.log'}", flush=True)
        failed = _watch(procs, logs / "worker0.log", chief_start, poll)
    finally:
        _stop(procs)
        for f in files:
            f.close()
        shutil.rmtree(scratch, ignore_errors=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if failed is not None:
        i, code = failed
        raise WorkerFailed(f"worker {i} of {n} stopped ({_exit_reason(code)}); the other workers were stopped. "
                           f"Its log {logs / f'worker{i}.log'} ends:\n{_tail(logs / f'worker{i}.log')}\n"
                           "Fix the cause, then rerun the same command with --resume to continue from the last finished epoch")


def _first_failure(codes: list[int | None]) -> tuple[int, int] | None:
    """Among the workers found stopped with an error in one look: one killed by a
    signal if any (the others' errors are then its consequence: a collective
    whose peer vanished), else the lowest index."""
    failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
    return min(failed, key=lambda ic: (ic[1] >= 0, ic[0])) if failed else None


def _watch(procs: list[subprocess.Popen], chief_log: Path, start: int, poll: float) -> tuple[int, int] | None:
    """Stream the chief's log (from byte ``start``) to stdout until every worker
    ends (None) or one fails: then (its index, its exit code), before the others are stopped."""
    with open(chief_log, errors="replace") as chief:
        chief.seek(start)
        while True:
            sys.stdout.write(chief.read())
            sys.stdout.flush()
            codes = [p.poll() for p in procs]
            failed = _first_failure(codes)
            if failed is not None or all(c == 0 for c in codes):
                sys.stdout.write(chief.read())
                return failed
            time.sleep(poll)
