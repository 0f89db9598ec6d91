"""Keras callbacks of a training run: validation balanced accuracy, the weight
average, checkpoints into the run folder, epoch timing and a progress line.

Their order in ``fit`` matters: each ``on_epoch_end`` sees the logs that the
ones before it added (``train.train`` lists them in that order).
"""

from __future__ import annotations

import logging
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from skin_lesion.inference import kept_function
from skin_lesion.metrics import balanced_accuracy
from skin_lesion.runs import RunFolder

log = logging.getLogger("skin_lesion")


def predict_probs(model: keras.Model, dataset: tf.data.Dataset) -> np.ndarray:
    """The model's outputs on ``dataset`` (batches of images, or of images and
    labels), in its order: one compiled forward pass per batch (``forward_pass``),
    outside any distribution strategy.

    In a multi-worker run each worker so scores the whole validation set itself:
    ``predict`` would shard it between the workers and gather the parts back, and
    the validation figures must not depend on how a cluster cuts a partial batch.
    """
    with_labels = isinstance(dataset.element_spec, tuple)  # (images, labels, ...) or images alone
    forward = forward_pass(model, dataset.element_spec[0] if with_labels else dataset.element_spec)
    images = (batch[0] if with_labels else batch for batch in dataset)
    return np.concatenate([keras.ops.convert_to_numpy(forward(x)) for x in images]).astype("float32")


def forward_pass(model: keras.Model, spec: tf.TensorSpec) -> tf.types.experimental.GenericFunction:
    """``model(x, training=False)`` as one graph for batches of any size shaped like
    ``spec``, kept with the model for the epochs that follow (``inference.kept_function``).

    ``predict`` traces its step twice each phase (the full batch, then the partial
    last one, about 2.5 s each on 2 cores); an open batch dimension traces once.
    """
    signature = tf.TensorSpec((None, *spec.shape[1:]), spec.dtype)
    return kept_function(model, ("forward", signature),
                         lambda owner: tf.function(lambda x: owner()(x, training=False), input_signature=[signature]))


def validation_scores(model: keras.Model, dataset: tf.data.Dataset, labels: np.ndarray) -> dict[str, float]:
    """``val_loss``, ``val_accuracy`` and ``val_balanced_accuracy`` of ``model`` on
    ``dataset`` (in ``labels``' order), from one ``predict`` pass.

    The loss is the compiled loss on the predicted probabilities, which Keras
    clips at 1e-7; ``evaluate`` computes it from the softmax's logits where it
    can, so it counts very confident mistakes a little higher. The accuracies are exact.
    """
    probs = predict_probs(model, dataset)
    pred = probs.argmax(1)
    loss = model.loss if isinstance(model.loss, keras.losses.Loss) else keras.losses.get(model.loss)
    # A MixUp run's loss takes a row of target probabilities per image: the labels as one-hot rows.
    targets = np.eye(probs.shape[1], dtype="float32")[labels] if isinstance(loss, keras.losses.CategoricalCrossentropy) else labels
    return {
        "val_loss": float(keras.ops.convert_to_numpy(keras.ops.mean(loss(targets, probs)))),
        "val_accuracy": float(np.mean(pred == labels)),
        "val_balanced_accuracy": balanced_accuracy(labels, pred),
    }


class BalancedAccuracy(keras.callbacks.Callback):
    """Scores the model on validation once per epoch (``validation_scores``), so
    checkpoints keep the best model by the metric the study reports.

    ``fit`` is given no ``validation_data``: its own pass would run the same
    images through the model a second time each epoch only for the loss and
    accuracy computed here.
    """

    def __init__(self, dataset: tf.data.Dataset, labels: np.ndarray):
        super().__init__()
        self.dataset, self.labels = dataset, labels

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logs.update(validation_scores(self.model, self.dataset, self.labels))


def cosine_lr(base: float, start: int, end: int):
    """Per-epoch cosine decay from ``base`` over epochs [start, end): depends only on
    the epoch index, so a resumed run gets the same rates."""

    def schedule(epoch: int, _lr=None) -> float:
        span = max(1, end - start)
        return float(base * 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - start) / span))))

    return schedule


class WeightAverage(keras.callbacks.Callback):
    """Stochastic weight averaging (Izmailov et al., 2018): the running mean of the
    weights after each epoch in [first, end), 0-based; after the last one the mean
    is scored on validation and saved in ``average/``, a run folder of its own.

    Single epochs of fine-tuning swing by several points of validation balanced
    accuracy (a few rare-class images flip); their mean sits in a flatter spot.
    The mean so far is kept as ``average-epochNNN.npz`` (written before the
    epoch's checkpoint, removed with it), so a resumed run continues it. Batch
    normalisation statistics are averaged too; they are frozen in fine-tuning.
    The run's ``model.keras`` stays the best epoch: the mean is a second model.
    """

    def __init__(self, run: RunFolder, first: int, end: int, val_dataset: tf.data.Dataset | None, val_labels: np.ndarray):
        super().__init__()
        self.run, self.first, self.end = RunFolder(run), first, end
        self.val_dataset, self.val_labels = val_dataset, val_labels

    def on_epoch_end(self, epoch, logs=None):
        if epoch < self.first:
            return
        weights = self.model.get_weights()
        previous = self.run.average_file(epoch)
        if epoch > self.first and previous.exists():
            with np.load(previous) as f:
                n, mean = int(f["n"]), [f[f"w{i}"] for i in range(len(weights))]
            mean = [m + (w - m) / (n + 1) if np.issubdtype(w.dtype, np.floating) else w for m, w in zip(mean, weights)]
            n += 1
        else:
            n, mean = 1, weights
        tmp = self.run.path / "average.tmp.npz"
        np.savez(tmp, n=n, **{f"w{i}": m for i, m in enumerate(mean)})
        os.replace(tmp, self.run.average_file(epoch + 1))
        if epoch + 1 == self.end:
            self._save_mean(mean, n, logs if logs is not None else {})
            self.model.set_weights(weights)  # the checkpoint keeps the last epoch's own weights

    def _save_mean(self, mean: list[np.ndarray], n: int, logs: dict) -> None:
        """Score the mean on validation, when the run has any (into the logs), and save it as the run ``average/``."""
        self.model.set_weights(mean)
        if self.val_dataset is not None:
            pred = predict_probs(self.model, self.val_dataset).argmax(1)
            logs["val_balanced_accuracy_average"] = balanced_accuracy(self.val_labels, pred)
        out = self.run.derive(self.run.average.path)
        tmp = out.path / "model.tmp.keras"
        self.model.save(tmp)
        os.replace(tmp, out.model_file)
        scored = f", validation balanced accuracy {logs['val_balanced_accuracy_average']:.4f}" if "val_balanced_accuracy_average" in logs else ""
        log.info("%s: mean of the last %d epochs' weights%s", out.model_file, n, scored)


class RunCheckpoint(keras.callbacks.Callback):
    """After every epoch, in this order: ``model.keras`` if validation
    balanced accuracy improved (with ``keep_epoch``, at that epoch alone: a
    refit keeps the epoch its source chose); ``checkpoint-epochNNN.keras`` (model + optimizer);
    ``state.json`` (epochs done, that checkpoint, best score, history) replaced
    atomically; ``history.csv`` rewritten from it; older checkpoints removed.

    Whatever instant the process dies at, ``state.json`` names a complete
    checkpoint and the history of exactly the epochs in it.
    """

    def __init__(self, run: RunFolder, keep_epoch: int | None = None):
        super().__init__()
        self.run, self.keep_epoch = RunFolder(run), keep_epoch

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        state = self.run.state()
        score = logs.get("val_balanced_accuracy", -1.0)
        if self.keep_epoch is not None:
            keep = epoch + 1 == self.keep_epoch
        else:
            keep = state["best_score"] is None or score > state["best_score"]
        if keep:
            tmp = self.run.path / "best.tmp.keras"
            self.model.save(tmp)
            os.replace(tmp, self.run.model_file)
            state.update(best_score=score, best_epoch=epoch + 1)
        checkpoint = self.run.checkpoint_file(epoch + 1)
        self.model.save(checkpoint)
        state["history"] = state["history"][:epoch] + [{"epoch": epoch, **logs}]
        state.update(epochs_done=epoch + 1, checkpoint=checkpoint.name)
        self.run.write_state(state)
        keep = {checkpoint.name, self.run.average_file(epoch + 1).name}
        for old in self.run.partial_files():
            if old.name not in keep:
                old.unlink()


class EpochSeconds(keras.callbacks.Callback):
    """Adds ``epoch_seconds`` (the epoch's wall time, its validation pass
    included) to the logs, so each run's ``history.csv`` records what it cost."""

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epoch_seconds"] = round(time.time() - self._t, 1)


def duration(seconds: float) -> str:
    """``1 h 02 min``, ``3 min 05 s`` or ``42 s``: a duration a person reads at a glance."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class EpochLog(keras.callbacks.Callback):
    """One progress line per epoch: the run, the epoch out of all, its time and
    validation scores, the time spent so far and an estimate of what is left
    (the mean epoch so far times the epochs to go). Runs after ``RunCheckpoint``,
    whose ``state.json`` holds every epoch so far, resumed ones included."""

    def __init__(self, run: RunFolder, total_epochs: int):
        super().__init__()
        self.run, self.total = RunFolder(run), total_epochs

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        spent = [float(h.get("epoch_seconds") or 0) for h in self.run.state()["history"]]
        elapsed = sum(spent)
        left = elapsed / max(len(spent), 1) * (self.total - epoch - 1)
        scores = ", ".join(f"{k.removeprefix('val_').replace('_', ' ')} {logs[k]:.4f}" for k in ("val_balanced_accuracy", "val_loss") if k in logs)
        log.info("run %s: epoch %d/%d done in %s (validation %s); %s so far, about %s left",
                 self.run.label, epoch + 1, self.total, duration(logs.get("epoch_seconds", 0)), scores, duration(elapsed), duration(left))
