"""Training: devices, two-phase transfer learning, checkpoints and resume.

Pretrained models train in two phases: the head alone on a frozen backbone,
then the top of the backbone with a lower learning rate (fine-tuning). A run
writes into its run folder (``runs.RunFolder``) after every epoch, so a run
killed at any instant resumes with ``train --resume`` from its last finished
epoch with nothing lost.
"""

from __future__ import annotations

import logging
import random
import shutil
import signal
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from skin_lesion.bn_statistics import Moments, estimate_statistics, set_statistics
from skin_lesion.callbacks import BalancedAccuracy, EpochLog, EpochSeconds, RunCheckpoint, WeightAverage, cosine_lr
from skin_lesion.config import TrainConfig, check_same_config, is_pretrained
from skin_lesion.data import Dataset, check_images, label_ids, load_dataset
from skin_lesion.distribute import prepare_model, shard_by_data, strategy_for, uses_gpu_path
from skin_lesion.info import DataError
from skin_lesion.losses import make_loss
from skin_lesion.models import build_model, set_backbone_trainable
from skin_lesion.pipeline import make_pipeline, sampling_prior
from skin_lesion.pixels import hw
from skin_lesion.refit import last_epoch, refit_of
from skin_lesion.runs import RunFolder, input_fields
from skin_lesion.splits import make_split_table, read_split_file, subsample, with_split
from skin_lesion.workers import cluster_size, exit_on_signal, is_chief, worker_index, worker_scratch

log = logging.getLogger("skin_lesion")
PHASE_SEED_STRIDE = 1000  # phase k trains on the pipeline seeded cfg.seed + 1000 k (see train)


def compile_model(model: keras.Model, lr: float, label_smoothing: float = 0.0, xla: bool = False, soft_targets: bool = False) -> None:
    """Adam + (optionally smoothed) sparse cross-entropy + accuracy (categorical for
    ``soft_targets``: MixUp's blended labels); with ``xla``
    (the GPU path on one replica: Keras' "auto" leaves XLA off under a
    distribution strategy too), the train step compiled by XLA when every
    layer supports it, as "auto" decides on a GPU (on a CPU "auto" means off):
    not with augmentation inside the model, whose random layers XLA cannot compile."""
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=make_loss(label_smoothing, soft_targets),
        # An object rather than "accuracy": its counters exist now, not first in fit's trace.
        metrics=[(keras.metrics.CategoricalAccuracy if soft_targets else keras.metrics.SparseCategoricalAccuracy)(name="accuracy")],
        jit_compile=xla and all(layer.supports_jit for layer in model._flatten_layers()),
    )
    # The optimizer's slots made now too: a train step whose first trace creates
    # variables is traced a second time by TensorFlow (several seconds a phase on 2 cores).
    model.optimizer.build(model.trainable_variables)


@dataclass(frozen=True)
class Phase:
    """One phase of training: epochs [start, end), its learning rate and where fine-tuning starts (None: head only)."""

    name: str
    start: int
    end: int
    lr: float
    unfreeze_from: str | None


def phases(cfg: TrainConfig) -> list[Phase]:
    """The head phase (pretrained models) and the fine-tuning phase of a resolved config."""
    out = []
    if cfg.head_epochs:
        out.append(Phase("head", 0, cfg.head_epochs, cfg.lr, None))
    if cfg.epochs > cfg.head_epochs:
        lr = cfg.finetune_lr if cfg.head_epochs else cfg.lr
        out.append(Phase("finetune", cfg.head_epochs, cfg.epochs, lr, cfg.unfreeze_from))
    return out


def prepare_split(cfg: TrainConfig, ds: Dataset, run: RunFolder, fresh: bool = True) -> pd.DataFrame:
    """Make (or reuse, on resume) the run's ``split.csv`` and return metadata with a ``split`` column.

    A fresh start makes the table again from its config (or, with ``cfg.split_file``,
    reads and checks that table again), so a start that died before its first epoch
    leaves no stale split behind for a restart with another seed or split option. A
    refit keeps the table its source derived for it (train + validation).
    """
    table = None if fresh and (cfg.split_file or refit_of(run) is None) else run.read_split()
    if table is None:
        if cfg.split_file:
            table = read_split_file(cfg.split_file, ds.meta)
        else:
            meta = subsample(ds.meta, cfg.max_per_class, cfg.seed)
            table = make_split_table(meta, folds=cfg.folds, seed=cfg.seed, by=cfg.split_by, holdout_source=cfg.holdout_source)
        run.write_split(table)
    table = with_split(table, cfg.fold, cfg.seed)
    meta = ds.meta.merge(table[["image_id", "split"]], on="image_id", how="inner")
    if meta.empty:
        raise DataError(f"{run.split_file}: its image_ids do not match the data folder {ds.root}; use a fresh --run folder")
    return meta


def _start_run(cfg: TrainConfig, resume: bool) -> tuple[TrainConfig, RunFolder]:
    """The resolved config and the run folder: a new run writes its config, a resumed one reads it."""
    run = RunFolder(cfg.run)
    if resume:
        if not run.config_file.exists():
            raise DataError(f"{run.path}: nothing to resume (no config.json); start it without --resume")
        return run.config(), run
    if run.history_file.exists():
        raise DataError(f"{run.path}: the run folder already holds a run; pass --resume to continue it or choose a new --run")
    cfg = cfg.resolved()
    run.write_config(cfg)
    run.update_manifest(kind="run", **input_fields(cfg))
    return cfg, run


def worker_run(run: RunFolder, resume: bool) -> Path:
    """A non-chief worker's run folder: a temporary folder, holding a copy of the
    chief's (config, split, state, last checkpoint) when resuming."""
    scratch = worker_scratch(worker_index())
    if resume and run.path.is_dir():
        shutil.copytree(run.path, scratch, dirs_exist_ok=True)
    return scratch


def train(cfg: TrainConfig, resume: bool = False, verbose: int | str = "auto") -> Path:
    """Train per ``cfg`` into its run folder; with ``resume`` continue a stopped run.

    Returns the run folder. ``model.keras`` there is the best epoch by
    validation balanced accuracy; with ``average_last`` the mean of the last
    fine-tuning epochs' weights is in ``average/`` (see ``WeightAverage``).
    In a multi-worker cluster (``TF_CONFIG``) every worker calls this; the
    others' temporary folders are removed when they finish.
    """
    requested = RunFolder(cfg.run).path
    if cluster_size() > 1 and threading.current_thread() is threading.main_thread():  # a worker told to stop still removes its scratch copy
        signal.signal(signal.SIGTERM, exit_on_signal)
    scratch = None
    try:
        if not is_chief():  # only the chief writes the run folder; the others train into a scratch copy
            scratch = worker_run(RunFolder(cfg.run), resume)
            cfg = replace(cfg, run=str(scratch))
        cfg, run = _start_run(cfg, resume)
        _train(cfg, run, verbose, fresh=not resume)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return requested


def _train(cfg: TrainConfig, run: RunFolder, verbose: int | str, fresh: bool = True) -> None:
    """The epochs of a started run (``train``); ``fresh``: not a resumed one."""
    gpu_path = uses_gpu_path(cfg)
    strategy = strategy_for(cfg.devices, mixed_precision=gpu_path)  # first: logical devices must be set before TensorFlow starts
    workers = cluster_size()
    name = "MultiWorkerMirroredStrategy" if workers > 1 else type(strategy).__name__  # its class is CollectiveAllReduceStrategy
    log.info("Strategy: %s with %d replica(s)%s", name, strategy.num_replicas_in_sync,
             f" on {workers} workers (this is worker {worker_index()})" if workers > 1 else "")
    keras.utils.set_random_seed(cfg.seed)
    ds = load_dataset(cfg.data)
    meta = prepare_split(cfg, ds, run, fresh)
    if fresh:  # a corrupt file the run reads is named now, not as a TensorFlow error mid-epoch
        check_images(meta["path"])
    parts = {name: meta[meta["split"] == name] for name in ("train", "val")}
    size = hw(cfg.input_size)
    in_pipeline = cfg.augment if cfg.augment_on == "pipeline" else False
    batch = cfg.batch_size * workers  # the global batch: each worker's share is cfg.batch_size
    refit = refit_of(run)
    stop = last_epoch(cfg, refit)
    has_val = refit is None or not parts["val"].empty  # a refit on all of validation has none left; other runs need it (an empty one is refused)
    val_pipe = make_pipeline(parts["val"], size, cfg.batch_size) if has_val else None
    val_labels = label_ids(parts["val"]["dx"])
    prior = sampling_prior(label_ids(parts["train"]["dx"]), cfg.imbalance)
    log.info("Run %s: %s on %s; %d train / %d val images (%s)", run.path, cfg.model, ds.label, len(parts["train"]), len(parts["val"]), cfg.imbalance)

    done = run.completed_epochs()
    for k, phase in enumerate(phases(cfg)):
        end = min(phase.end, stop)  # a refit stops at the epoch it keeps, on its source's schedule
        if phase.start >= stop or done >= end:
            continue
        # A fresh pipeline per phase, seeded by the phase: a dataset's shuffles reseed
        # from state its earlier iterators advanced, as far as they ran ahead (thread
        # timing), so a second iterator over one dataset would not reproduce.
        train_pipe = make_pipeline(
            parts["train"], size, batch, training=True, imbalance=cfg.imbalance, augment=in_pipeline, seed=cfg.seed + PHASE_SEED_STRIDE * k,
            colour_augment=cfg.colour_augment, mixup=cfg.mixup,
        )
        dataset = shard_by_data(train_pipe.dataset) if workers > 1 else train_pipe.dataset
        checkpoint = run.state()["checkpoint"]
        # Measured once, before the first epoch: later phases and resumed runs take them from the checkpoint.
        moments = training_moments(cfg, parts["train"], prior) if cfg.bn_statistics == "training" and not checkpoint else None
        with strategy.scope():
            if done > phase.start and checkpoint:
                model = keras.models.load_model(run.path / checkpoint, safe_mode=True)  # mid-phase: optimizer state kept
            else:
                model = _phase_model(cfg, run, checkpoint, prior, training_steps=train_pipe.steps * cfg.epochs, moments=moments)
                set_backbone_trainable(model, phase.unfreeze_from, freeze_batchnorm=is_pretrained(cfg.model, cfg.weights))
                compile_model(model, phase.lr, cfg.label_smoothing, xla=gpu_path and strategy.num_replicas_in_sync == 1, soft_targets=cfg.mixup > 0)
        model = prepare_model(model, strategy, train_pipe.dataset.element_spec[1])
        schedule = f" (a refit: it stops at its source's kept epoch, on a schedule to epoch {phase.end})" if end < phase.end else ""
        log.info("Phase %s: epochs %d-%d%s, lr %.2g, %d trainable weights", phase.name, phase.start + 1, end, schedule, phase.lr, len(model.trainable_weights))
        averaging = cfg.average_last > 0 and phase.end == cfg.epochs
        callbacks = [  # in this order: each on_epoch_end sees the logs the ones before it added
            *([BalancedAccuracy(val_pipe.dataset, val_labels)] if has_val else []),
            keras.callbacks.LearningRateScheduler(cosine_lr(phase.lr, phase.start, phase.end)),
            *([WeightAverage(run, max(phase.start, phase.end - cfg.average_last), phase.end, val_pipe and val_pipe.dataset, val_labels)] if averaging else []),
            EpochSeconds(),  # its clock starts at the epoch's start, wherever it sits; it stops after validation
            RunCheckpoint(run, keep_epoch=refit.epoch if refit else None),
            EpochLog(run, stop),
        ]
        model.fit(
            dataset,
            steps_per_epoch=train_pipe.steps,
            epochs=end,
            initial_epoch=done,
            class_weight=train_pipe.class_weight,
            callbacks=callbacks,
            shuffle=False,  # the pipeline shuffles; tf.data input ignores this anyway
            verbose=verbose,
        )
        done = end


def _build(cfg: TrainConfig, prior: np.ndarray | None = None, training_steps: int | None = None) -> keras.Model:
    """The run's model as ``build_model`` makes it, before any training."""
    in_model = cfg.augment if cfg.augment_on == "model" else 0.0
    return build_model(cfg.model, cfg.input_size, weights=cfg.weights, dropout=cfg.dropout, augment=in_model, prior=prior, training_steps=training_steps,
                       colour_constancy=cfg.colour_constancy, colour_augment=cfg.colour_augment)


def training_moments(cfg: TrainConfig, train_part, prior: np.ndarray | None = None) -> Moments:
    """The BatchNormalization statistics of the run's training images (``--bn-statistics
    training``), measured on a model built outside any distribution strategy: a plain
    forward pass, the same on every worker (same images, same order).

    Building that model draws seeds (Keras seeds its initializers and dropout from
    Python's ``random``), so the generators' states are put back afterwards: the run's
    own model starts from the same head weights and dropout draws as without the option.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        moments = estimate_statistics(_build(cfg, prior), train_part, cfg.input_size, cfg.batch_size, seed=cfg.seed)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return moments


def _phase_model(cfg: TrainConfig, run: RunFolder, checkpoint: str | None, prior: np.ndarray | None = None, training_steps: int | None = None,
                 moments: Moments | None = None) -> keras.Model:
    """A fresh model for a new phase: from the weights of the run's last ``checkpoint``
    when there is one, else the built one, with the training images' ``moments`` when given."""
    model = _build(cfg, prior, training_steps)
    if checkpoint:
        model.set_weights(keras.models.load_model(run.path / checkpoint, safe_mode=True, compile=False).get_weights())
    elif moments is not None:
        shift = set_statistics(model, moments)
        log.info("BatchNormalization statistics replaced by the training images' (mean shift %.2f pretrained sd)", shift)
    return model


def train_or_resume(cfg: TrainConfig, verbose: int | str = "auto") -> Path:
    """Train a run, resume it if it stopped part-way, or return it as it is when
    finished: what notebooks call, so rerunning the study redoes nothing."""
    run = RunFolder(cfg.run)
    if not run.config_file.exists():
        return train(cfg, verbose=verbose)
    saved = run.config().resolved()
    check_same_config(saved, cfg.resolved(), run.path)
    if run.completed_epochs() < last_epoch(saved, refit_of(run)):
        return train(cfg, resume=True, verbose=verbose)
    log.info("Run %s is complete: reusing it", run.path)
    return run.path
