"""Training: profiles, the run folder, two-phase transfer learning, checkpoints and resume.

A run folder (``runs/NAME/``) holds everything needed to rerun and to resume:
``config.json``, ``split.csv``, ``history.csv``, ``state.json`` and
``checkpoint-epochNNN.keras`` (model and optimizer after the last finished
epoch), ``model.keras`` (best on validation balanced accuracy) and, after
evaluation, ``metrics.json``. With ``average_last`` the mean of the last
epochs' weights is a second model in ``average/``, a run folder of its own
(``model.keras``, ``config.json``, ``split.csv``) that ``evaluate``,
``predict`` and ``stack`` take like any run. ``state.json`` is replaced atomically after the
checkpoint it names is complete, so a run killed at any instant resumes with
``train --resume`` from its last finished epoch with nothing lost.

Pretrained models train in two phases: the head alone on a frozen backbone,
then the top of the backbone with a lower learning rate (fine-tuning).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from skin_lesion.data import DataError, Dataset, fold_parts, load_dataset, make_split_table
from skin_lesion.models import DEFAULT_SIZE, LITE_NAMES, MODEL_NAMES, build_model, is_pretrained, lite_stage_first_block, set_backbone_trainable
from skin_lesion.pipeline import label_ids, make_pipeline, sampling_prior

log = logging.getLogger("skin_lesion")

# What each profile costs was measured on the 2-core machine (README, "Profiles").
PROFILES: dict[str, dict] = {
    # Minutes on 2 cores: tiny images, a few images per class, two epochs.
    "smoke": dict(image_size=64, epochs=2, head_epochs=1, batch_size=16, max_per_class=20),
    # All of HAM10000 on 2 cores: the study trains in under an hour (58.8 min
    # measured) and the whole report from scratch takes about 72 minutes.
    "cpu": dict(epochs=12, head_epochs=2, batch_size=32, max_per_class=None),
    # The full-size study on a GPU.
    "gpu": dict(epochs=40, head_epochs=3, batch_size=64, max_per_class=None, unfreeze_from="all", augment_on="model"),
}
# Per (model, profile) overrides: the CNN trains from scratch and costs as many
# FLOPs per pixel as Lite0, so on 2 cores it gets 64 px images to fit the hour.
# EfficientNet-Lite0 on the cpu profile: the square-root class mix, and the
# mean of the last five epochs' weights kept as a second model beside the best
# epoch, both chosen on validation (docs/EXPERIMENTS.md, "The square-root class mix" and
# "Two resolutions and a weight average"); smoke runs the same path in miniature.
# The larger Lite sizes take Lite0's recipe unchanged, so that a comparison
# between sizes is about the backbone alone.
MODEL_PROFILES: dict[tuple[str, str], dict] = {
    ("cnn", "cpu"): dict(image_size=64, epochs=10, batch_size=32),
    **{(name, "cpu"): dict(imbalance="sqrt", average_last=5) for name in LITE_NAMES},
    **{(name, "smoke"): dict(imbalance="sqrt", average_last=1) for name in LITE_NAMES},
}
# The study's second, lower-resolution run of EfficientNet-Lite0 per profile, a
# member of the study's mean ensemble beside the first (none on gpu: not measured).
COMPANION_SIZE: dict[str, int] = {"smoke": 48, "cpu": 160}
# Label smoothing of the study's first (224 px) EfficientNet-Lite0 run on the
# profiles with a mean ensemble: F-LS passed its registered rule on validation
# over seeds 0-2 (docs/EXPERIMENTS.md, "The mean ensemble with the smoothed member"). smoke
# mirrors cpu so the tests train the same kind of study.
STUDY_LABEL_SMOOTHING: dict[str, float] = {"smoke": 0.1, "cpu": 0.1}
PHASE_SEED_STRIDE = 1000  # phase k trains on the pipeline seeded cfg.seed + 1000 k (see train)
# Where augmentation runs: in tf.data (overlapping the train step on the CPU) or as
# the model's first layer (on the accelerator; the pipeline then only decodes,
# caches and batches). README, "Benchmarks", has what each costs.
AUGMENT_ON: tuple[str, ...] = ("pipeline", "model")
# Where fine-tuning starts, per model (the layer name), unless the config says
# otherwise. Every Lite size fine-tunes from its fifth stage (the 112-channel
# one at width 1.0) up: block8 in Lite0, block11 in Lite1 and Lite2.
UNFREEZE_FROM: dict[str, str | None] = {"cnn": "all", "resnet50": "conv4_block1_1_conv", **{name: lite_stage_first_block(name, 4) for name in LITE_NAMES}}


# Values for keys no profile sets; also what a config.json written before these
# keys existed meant by leaving them out.
FALLBACKS: dict = {"imbalance": "oversample", "average_last": 0}
# The sub-folder of a run that holds its weight-averaged model (``average_last``).
AVERAGE_DIR = "average"


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``config.json`` so a run can be redone."""

    model: str = "efficientnet_lite0"
    profile: str = "cpu"
    data: str | None = None
    run: str = "runs/default"
    image_size: int | None = None
    epochs: int | None = None
    head_epochs: int | None = None
    batch_size: int | None = None
    lr: float = 1e-3
    finetune_lr: float = 3e-4
    dropout: float = 0.3
    imbalance: str | None = None  # unset: the profile's, else "oversample"
    augment: float = 1.0
    augment_on: str | None = None  # "pipeline" (tf.data, on the CPU) or "model" (first layer, on the accelerator)
    weights: str = "imagenet"
    unfreeze_from: str | None = None
    max_per_class: int | None = None
    folds: int | None = None
    fold: int | None = None
    split_by: str = "lesion"
    seed: int = 0
    average_last: int | None = None  # >0: also save the mean of the weights after the last N fine-tuning epochs, in average/
    label_smoothing: float = 0.0  # >0: train against (1 - eps) one-hot + eps / classes (SmoothedSparseCrossentropy)
    devices: int = 0  # >1: split the CPU into logical devices (tests MirroredStrategy)
    extra: dict = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """Fill unset fields from the profile and the model's defaults."""
        if self.profile not in PROFILES:
            raise DataError(f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        if self.model not in MODEL_NAMES:
            raise DataError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_NAMES)}")
        prof = {**PROFILES[self.profile], **MODEL_PROFILES.get((self.model, self.profile), {})}
        out = TrainConfig(**asdict(self))
        for key in ("epochs", "head_epochs", "batch_size", "max_per_class", "image_size", "unfreeze_from", "augment_on", "imbalance", "average_last"):
            if getattr(out, key) is None:
                setattr(out, key, prof.get(key, FALLBACKS.get(key)))
        out.image_size = out.image_size or DEFAULT_SIZE[out.model]
        out.augment_on = out.augment_on or "pipeline"
        if out.augment_on not in AUGMENT_ON:
            raise DataError(f"unknown augment_on {out.augment_on!r}; choose one of {', '.join(AUGMENT_ON)}")
        out.unfreeze_from = out.unfreeze_from or UNFREEZE_FROM[out.model]
        if not is_pretrained(out.model, out.weights):
            out.head_epochs = 0  # nothing pretrained to protect
            out.unfreeze_from = "all"
        out.head_epochs = min(out.head_epochs, out.epochs)
        check_label_smoothing(out.label_smoothing)  # fail before any data is read
        return out

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        """Read ``config.json`` (unknown keys are an error, naming the file)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the run config ({e}); pass a config.json written by train or tune") from e
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DataError(f"{path}: unknown config key(s) {unknown}")
        return cls(**{**FALLBACKS, **raw})


# --------------------------------------------------------------------------- run folder


def prepare_split(cfg: TrainConfig, ds: Dataset, run: Path) -> pd.DataFrame:
    """Make (or reuse, on resume) the run's ``split.csv`` and return metadata with a ``split`` column."""
    path = run / "split.csv"
    if path.exists():
        table = pd.read_csv(path, dtype={"image_id": str, "lesion_id": str})
    else:
        meta = subsample(ds.meta, cfg.max_per_class, cfg.seed)
        table = make_split_table(meta, folds=cfg.folds, seed=cfg.seed, by=cfg.split_by)
        table.to_csv(path, index=False)
    if "fold" in table and "split" not in table:
        table["split"] = fold_parts(table, cfg.fold or 0, seed=cfg.seed).to_numpy()
    meta = ds.meta.merge(table[["image_id", "split"]], on="image_id", how="inner")
    if meta.empty:
        raise DataError(f"{path}: its image_ids do not match the data folder {ds.root}; use a fresh --run folder")
    return meta


def subsample(meta: pd.DataFrame, max_per_class: int | None, seed: int) -> pd.DataFrame:
    """Keep whole lesions until each class has about ``max_per_class`` images (smoke runs)."""
    if not max_per_class:
        return meta
    rng = np.random.default_rng(seed)
    keep = []
    for _, group in meta.groupby("dx"):
        lesions = np.array(group["lesion_id"].unique())
        rng.shuffle(lesions)
        counts = group.groupby("lesion_id").size()
        total = 0
        for lesion in lesions:
            if total >= max_per_class:
                break
            keep.append(lesion)
            total += counts[lesion]
    return meta[meta["lesion_id"].isin(set(keep))].reset_index(drop=True)


def run_state(run: Path) -> dict:
    """The run's ``state.json``: epochs done, its checkpoint, best score, history rows."""
    path = Path(run) / "state.json"
    return json.loads(path.read_text()) if path.exists() else {"epochs_done": 0, "checkpoint": None, "best_score": None, "best_epoch": None, "history": []}


def completed_epochs(run: Path) -> int:
    """Epochs finished so far (0 for a new run)."""
    return int(run_state(run)["epochs_done"])


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- callbacks


class BalancedAccuracy(keras.callbacks.Callback):
    """Scores the model on validation once per epoch: adds ``val_loss``,
    ``val_accuracy`` and ``val_balanced_accuracy`` (mean per-class recall, the
    ISIC metric) to the logs, so checkpoints keep the best model by the metric
    the study reports.

    All three come from one ``predict`` pass. ``fit`` is given no
    ``validation_data``: its own pass would run the same 1.5k images through
    the model a second time each epoch (about 19 s of a 210 s epoch at 224 px
    on 2 cores), only for the loss and accuracy computed here.
    """

    def __init__(self, dataset: tf.data.Dataset, labels: np.ndarray):
        super().__init__()
        self.dataset, self.labels = dataset, labels

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logs.update(validation_scores(self.model, self.dataset, self.labels))


def validation_scores(model: keras.Model, dataset: tf.data.Dataset, labels: np.ndarray) -> dict[str, float]:
    """``val_loss``, ``val_accuracy`` and ``val_balanced_accuracy`` of ``model`` on
    ``dataset`` (in ``labels``' order).

    The loss is the compiled loss on the predicted probabilities, which Keras
    clips at 1e-7. ``evaluate`` computes it from the softmax's logits where it
    can, so it counts very confident mistakes a little higher (0.0007 to 0.0015
    of 0.69 to 0.73 in the last epochs of a 160 px run); the accuracies are
    exact.
    """
    from sklearn.metrics import balanced_accuracy_score

    probs = model.predict(dataset, verbose=0)
    pred = probs.argmax(1)
    loss = model.loss if isinstance(model.loss, keras.losses.Loss) else keras.losses.get(model.loss)
    return {
        "val_loss": float(keras.ops.convert_to_numpy(keras.ops.mean(loss(labels, probs)))),
        "val_accuracy": float(np.mean(pred == labels)),
        "val_balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
    }


class EpochSeconds(keras.callbacks.Callback):
    """Adds ``epoch_seconds`` (the epoch's wall time, its validation pass
    included) to the logs, so each run's ``history.csv`` records what it cost."""

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = round(time.time() - self._t, 1)


class EpochLog(keras.callbacks.Callback):
    """A one-line summary per epoch in the log, beside Keras' progress bar."""

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = " ".join(f"{k}={v:.4f}" for k, v in sorted(logs.items()) if isinstance(v, float) and k != "epoch_seconds")
        log.info("epoch %d done in %.0fs: %s", epoch + 1, logs.get("epoch_seconds", float("nan")), parts)


def cosine_lr(base: float, start: int, end: int):
    """Per-epoch cosine decay from ``base`` over epochs [start, end): depends only on
    the epoch index, so a resumed run gets the same rates."""

    def schedule(epoch: int, _lr=None) -> float:
        span = max(1, end - start)
        return float(base * 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - start) / span))))

    return schedule


# --------------------------------------------------------------------------- devices


def strategy_for(devices: int = 0) -> tf.distribute.Strategy:
    """MirroredStrategy over all GPUs, or over ``devices`` logical CPUs (for tests);
    else the default strategy. On a GPU, mixed precision is switched on too."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        keras.mixed_precision.set_global_policy("mixed_float16")
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
        except RuntimeError:
            pass  # already initialised: keep what exists
        logical = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(logical)
    return tf.distribute.get_strategy()


# --------------------------------------------------------------------------- training


@keras.saving.register_keras_serializable(package="skin_lesion")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy against smoothed targets, (1 - eps) one-hot + eps / K, for
    integer labels (Szegedy et al., 2016).

    The pipeline yields class ids, and Keras' sparse cross-entropy has no
    smoothing, so the ids are one-hot encoded here. Smoothing stops the
    softmax from chasing certainty on the few rare-class images a model sees
    again and again (without smoothing it reached 0.92 training accuracy
    against 0.75 on validation); calibration is refitted on validation afterwards anyway.
    """

    def __init__(self, label_smoothing: float = 0.1, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        ops = keras.ops
        n_classes = ops.shape(y_pred)[-1]
        onehot = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), n_classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(onehot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def check_label_smoothing(label_smoothing: float) -> float:
    """``label_smoothing`` itself if it is in [0, 1), else a DataError (a user's option or config value)."""
    if not 0 <= label_smoothing < 1:
        raise DataError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return label_smoothing


def make_loss(label_smoothing: float = 0.0) -> str | keras.losses.Loss:
    """The training loss: plain sparse cross-entropy, or its smoothed form for ``label_smoothing`` > 0."""
    if check_label_smoothing(label_smoothing):
        return SmoothedSparseCrossentropy(label_smoothing)
    return "sparse_categorical_crossentropy"


def compile_model(model: keras.Model, lr: float, label_smoothing: float = 0.0) -> None:
    """Adam + (optionally smoothed) sparse cross-entropy + accuracy; on a GPU, XLA
    where every layer supports it (Keras' "auto": not with augmentation inside the model)."""
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=make_loss(label_smoothing),
        metrics=["accuracy"],
        jit_compile="auto" if tf.config.list_physical_devices("GPU") else False,
    )


def phases(cfg: TrainConfig) -> list[tuple[str, int, int, float, str | None]]:
    """(name, first epoch, end epoch, learning rate, unfreeze_from) for each phase."""
    out = []
    if cfg.head_epochs:
        out.append(("head", 0, cfg.head_epochs, cfg.lr, None))
    if cfg.epochs > cfg.head_epochs:
        lr = cfg.finetune_lr if cfg.head_epochs else cfg.lr
        out.append(("finetune", cfg.head_epochs, cfg.epochs, lr, cfg.unfreeze_from))
    return out


def train(cfg: TrainConfig, resume: bool = False, verbose: int | str = "auto") -> Path:
    """Train per ``cfg`` into its run folder; with ``resume`` continue a stopped run.

    Returns the run folder. ``model.keras`` there is the best epoch by
    validation balanced accuracy; with ``average_last`` the mean of the last
    fine-tuning epochs' weights is in ``average/`` (see ``WeightAverage``).
    """
    run = Path(cfg.run)
    if resume:
        if not (run / "config.json").exists():
            raise DataError(f"{run}: nothing to resume (no config.json); start it without --resume")
        cfg = TrainConfig.load(run / "config.json")
    else:
        if (run / "history.csv").exists():
            raise DataError(f"{run}: the run folder already holds a run; pass --resume to continue it or choose a new --run")
        cfg = cfg.resolved()
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    strategy = strategy_for(cfg.devices)  # first: logical devices must be set before TensorFlow starts
    log.info("Strategy: %s with %d replica(s)", type(strategy).__name__, strategy.num_replicas_in_sync)
    keras.utils.set_random_seed(cfg.seed)
    ds = load_dataset(cfg.data)
    meta = prepare_split(cfg, ds, run)
    parts = {name: meta[meta["split"] == name] for name in ("train", "val")}
    size = (cfg.image_size, cfg.image_size)
    in_pipeline = cfg.augment if (cfg.augment_on or "pipeline") == "pipeline" else False  # runs from before augment_on: tf.data
    val_pipe = make_pipeline(parts["val"], size, cfg.batch_size)
    val_labels = label_ids(parts["val"]["dx"])
    prior = sampling_prior(label_ids(parts["train"]["dx"]), cfg.imbalance)
    log.info("Run %s: %s on %s; %d train / %d val images (%s)", run, cfg.model, ds.label, len(parts["train"]), len(parts["val"]), cfg.imbalance)

    done = completed_epochs(run)
    for k, (name, start, end, lr, unfreeze) in enumerate(phases(cfg)):
        if done >= end:
            continue
        # A fresh pipeline per phase, seeded by the phase: a dataset's shuffles reseed
        # from state its earlier iterators advanced, as far as they ran ahead (thread
        # timing), so a second iterator over one dataset would not reproduce.
        train_pipe = make_pipeline(parts["train"], size, cfg.batch_size, training=True, imbalance=cfg.imbalance, augment=in_pipeline, seed=cfg.seed + PHASE_SEED_STRIDE * k)
        with strategy.scope():
            checkpoint = run_state(run)["checkpoint"]
            if done > start and checkpoint:
                model = keras.models.load_model(run / checkpoint, safe_mode=True)  # mid-phase: optimizer state kept
            else:
                model = _phase_model(cfg, run, prior)
                set_backbone_trainable(model, unfreeze, freeze_batchnorm=is_pretrained(cfg.model, cfg.weights))
                compile_model(model, lr, cfg.label_smoothing)
        log.info("Phase %s: epochs %d-%d, lr %.2g, %d trainable weights", name, start + 1, end, lr, len(model.trainable_weights))
        averaging = cfg.average_last > 0 and end == cfg.epochs
        callbacks = [  # in this order: each on_epoch_end sees the logs the ones before it added
            BalancedAccuracy(val_pipe.dataset, val_labels),
            keras.callbacks.LearningRateScheduler(cosine_lr(lr, start, end)),
            *([WeightAverage(run, max(start, end - cfg.average_last), end, val_pipe.dataset, val_labels)] if averaging else []),
            EpochSeconds(),  # its clock starts at the epoch's start, wherever it sits; it stops after validation
            RunCheckpoint(run),
            EpochLog(),
        ]
        model.fit(
            train_pipe.dataset,
            steps_per_epoch=train_pipe.steps,
            epochs=end,
            initial_epoch=done,
            class_weight=train_pipe.class_weight,
            callbacks=callbacks,
            shuffle=False,  # the pipeline shuffles; tf.data input ignores this anyway
            verbose=verbose,
        )
        done = end
    return run


def _phase_model(cfg: TrainConfig, run: Path, prior: np.ndarray | None = None) -> keras.Model:
    """A fresh model for a new phase: from the last checkpoint's weights when one exists."""
    in_model = cfg.augment if cfg.augment_on == "model" else 0.0
    model = build_model(cfg.model, cfg.image_size, weights=cfg.weights, dropout=cfg.dropout, augment=in_model, prior=prior)
    checkpoint = run_state(run)["checkpoint"]
    if checkpoint:
        model.set_weights(keras.models.load_model(run / checkpoint, safe_mode=True, compile=False).get_weights())
    return model


class WeightAverage(keras.callbacks.Callback):
    """Stochastic weight averaging (Izmailov et al., 2018): the running mean of the
    weights after each epoch in [first, end), 0-based; after the last one the mean
    is scored on validation and saved in ``average/``, a run folder of its own.

    Single epochs of fine-tuning swing by several points of validation balanced
    accuracy (a few rare-class images flip); their mean sits in a flatter spot.
    The mean so far is kept as ``average-epochNNN.npz`` (written before the
    epoch's checkpoint, removed with it), so a resumed run continues it. Batch
    normalisation statistics are averaged too; they are frozen in fine-tuning.
    The run's ``model.keras`` stays the best epoch: the mean is a second model,
    a member of the study's mean ensemble beside it (docs/EXPERIMENTS.md, "Two resolutions
    and a weight average").
    """

    def __init__(self, run: Path, first: int, end: int, val_dataset: tf.data.Dataset, val_labels: np.ndarray):
        super().__init__()
        self.run, self.first, self.end = Path(run), first, end
        self.val_dataset, self.val_labels = val_dataset, val_labels

    def on_epoch_end(self, epoch, logs=None):
        if epoch < self.first:
            return
        weights = self.model.get_weights()
        previous = self.run / f"average-epoch{epoch:03d}.npz"
        if epoch > self.first and previous.exists():
            with np.load(previous) as f:
                n, mean = int(f["n"]), [f[f"w{i}"] for i in range(len(weights))]
            mean = [m + (w - m) / (n + 1) if np.issubdtype(w.dtype, np.floating) else w for m, w in zip(mean, weights)]
            n += 1
        else:
            n, mean = 1, weights
        tmp = self.run / "average.tmp.npz"
        np.savez(tmp, n=n, **{f"w{i}": m for i, m in enumerate(mean)})
        os.replace(tmp, self.run / f"average-epoch{epoch + 1:03d}.npz")
        if epoch + 1 == self.end:
            self._save_mean(mean, n, logs if logs is not None else {})
            self.model.set_weights(weights)  # the checkpoint keeps the last epoch's own weights

    def _save_mean(self, mean: list[np.ndarray], n: int, logs: dict) -> None:
        """Score the mean on validation (into the logs) and save it as the run ``average/``."""
        from sklearn.metrics import balanced_accuracy_score

        self.model.set_weights(mean)
        pred = self.model.predict(self.val_dataset, verbose=0).argmax(1)
        logs["val_balanced_accuracy_average"] = float(balanced_accuracy_score(self.val_labels, pred))
        out = self.run / AVERAGE_DIR
        out.mkdir(exist_ok=True)
        tmp = out / "model.tmp.keras"
        self.model.save(tmp)
        os.replace(tmp, out / "model.keras")
        write_derived_run(self.run, out)
        log.info("%s: mean of the last %d epochs' weights, validation balanced accuracy %.4f", out / "model.keras", n, logs["val_balanced_accuracy_average"])


def write_derived_run(run: Path, out: Path, **changes) -> None:
    """Make ``out`` a run folder of its own, derived from ``run`` (a weight
    average, a resized copy): ``run``'s config pointing at ``out``, with
    ``changes`` to its fields, and ``run``'s split."""
    config = run / "config.json"
    if config.exists():  # absent only where WeightAverage is used outside ``train``
        raw = json.loads(config.read_text())
        _write_atomic(out / "config.json", json.dumps({**raw, "run": str(out), **changes}, indent=2))
    if (run / "split.csv").exists():
        shutil.copyfile(run / "split.csv", out / "split.csv")


class RunCheckpoint(keras.callbacks.Callback):
    """After every epoch, in this order: ``model.keras`` if validation
    balanced accuracy improved; ``checkpoint-epochNNN.keras`` (model + optimizer);
    ``state.json`` (epochs done, that checkpoint, best score, history) replaced
    atomically; ``history.csv`` rewritten from it; older checkpoints removed.

    Whatever instant the process dies at, ``state.json`` names a complete
    checkpoint and the history of exactly the epochs in it.
    """

    def __init__(self, run: Path):
        super().__init__()
        self.run = Path(run)

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        state = run_state(self.run)
        score = logs.get("val_balanced_accuracy", -1.0)
        if state["best_score"] is None or score > state["best_score"]:
            tmp = self.run / "best.tmp.keras"
            self.model.save(tmp)
            os.replace(tmp, self.run / "model.keras")
            state.update(best_score=score, best_epoch=epoch + 1)
        name = f"checkpoint-epoch{epoch + 1:03d}.keras"
        self.model.save(self.run / name)
        state["history"] = state["history"][:epoch] + [{"epoch": epoch, **logs}]
        state.update(epochs_done=epoch + 1, checkpoint=name)
        _write_atomic(self.run / "state.json", json.dumps(state, indent=1))
        _write_atomic(self.run / "history.csv", pd.DataFrame(state["history"]).to_csv(index=False))
        for old in [*self.run.glob("checkpoint-epoch*.keras"), *self.run.glob("average-epoch*.npz")]:
            if old.name not in (name, f"average-epoch{epoch + 1:03d}.npz"):
                old.unlink()


def study_runs(profile: str, pretrained: str) -> dict[str, dict]:
    """The runs the notebooks train on ``profile``: folder name -> TrainConfig
    fields. The custom CNN, the pretrained backbone and, for EfficientNet-Lite0
    on profiles in ``COMPANION_SIZE``, the backbone again at a lower resolution,
    oversampled, best epoch only: the study's mean ensemble (and the decision
    layer) combine it with the first run and that run's weight average, the
    first run trained with ``STUDY_LABEL_SMOOTHING``. Those models and that
    combination won on validation over three seeds (docs/EXPERIMENTS.md, "Two resolutions
    and a weight average", "The mean ensemble" and "Label smoothing")."""
    runs = {f"{profile}_cnn": dict(model="cnn"), f"{profile}_{pretrained}": dict(model=pretrained)}
    if pretrained in LITE_NAMES and profile in COMPANION_SIZE:
        runs[f"{profile}_{pretrained}"]["label_smoothing"] = STUDY_LABEL_SMOOTHING.get(profile, 0.0)
        size = COMPANION_SIZE[profile]
        runs[f"{profile}_{pretrained}_{size}"] = dict(model=pretrained, image_size=size, imbalance="oversample", average_last=0)
    return runs


def study_run_dirs(runs: str | Path, profile: str) -> list[Path]:
    """The study's trained runs for ``profile`` under ``runs`` (as ``study_runs``
    names them), each followed by its weight-averaged sub-run when it has one."""
    names = dict.fromkeys(n for m in MODEL_NAMES if m != "cnn" for n in study_runs(profile, m))
    out = []
    for name in names:
        run = Path(runs) / name
        out += [r for r in (run, run / AVERAGE_DIR) if (r / "model.keras").exists()]
    return out


# Fields that may differ between a run folder's config and a request to reuse
# it: where things are (the same data can sit elsewhere) and how it ran.
REUSE_IGNORES: tuple[str, ...] = ("run", "data", "devices", "extra")


def check_same_config(saved: TrainConfig, wanted: TrainConfig, run: str | Path) -> None:
    """Raise a DataError naming the differing fields when the run in ``run`` was
    trained with another config than ``wanted``: reusing it would silently give
    an older study (say, a run from before the study changed a setting)."""
    names = [f.name for f in fields(TrainConfig) if f.name not in REUSE_IGNORES]
    diff = [f"{n} {getattr(saved, n)!r} (wanted {getattr(wanted, n)!r})" for n in names if getattr(saved, n) != getattr(wanted, n)]
    if diff:
        raise DataError(f"{run}: holds a run trained with {', '.join(diff)}; move that folder away (or point runs elsewhere) to train the one asked for")


def train_or_resume(cfg: TrainConfig, verbose: int | str = "auto") -> Path:
    """Train a run, resume it if it stopped part-way, or return it as it is when
    finished: what notebooks call, so rerunning the study redoes nothing."""
    run = Path(cfg.run)
    if not (run / "config.json").exists():
        return train(cfg, verbose=verbose)
    saved = TrainConfig.load(run / "config.json").resolved()
    check_same_config(saved, cfg.resolved(), run)
    if completed_epochs(run) < saved.epochs:
        return train(cfg, resume=True, verbose=verbose)
    log.info("Run %s is complete: reusing it", run)
    return run
