"""Where training runs: the distribution strategy, mixed precision, and what
Keras needs to train across worker processes.

One process trains on the default strategy, on MirroredStrategy over its GPUs
(or over logical CPUs, for tests), and a cluster named by ``TF_CONFIG`` on
``MultiWorkerMirroredStrategy`` (``workers``). Keras 3's ``fit`` does not yet
run under that strategy (keras-team/keras#20585): ``multi_worker_fit`` adapts
it in two places, both about bookkeeping around the train step, never the
gradients, which the strategy all-reduces itself.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from skin_lesion.config import TrainConfig
from skin_lesion.workers import cluster_size


def uses_gpu_path(cfg: TrainConfig) -> bool:
    """Whether the run takes the accelerator's code path (mixed precision, XLA):
    on a GPU, or anywhere when the config asks (``gpu_path``, how the tests reach it on a CPU)."""
    return bool(cfg.gpu_path) if cfg.gpu_path is not None else bool(tf.config.list_physical_devices("GPU"))


def strategy_for(devices: int = 0, mixed_precision: bool = False) -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy when ``TF_CONFIG`` names a cluster of several
    workers; else MirroredStrategy over all GPUs, or over ``devices`` logical CPUs
    (for tests); else the default strategy. With ``mixed_precision``, layers
    compute in float16 and keep float32 weights."""
    # Set either way: a process that trains several runs (a notebook) must not keep an earlier run's policy.
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed_precision else "float32")
    gpus = tf.config.list_physical_devices("GPU")
    if cluster_size() > 1:
        # Gradients are all-reduced between workers by TensorFlow's collectives (NCCL between GPUs, ring otherwise).
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.NCCL if gpus else tf.distribute.experimental.CommunicationImplementation.RING
        )
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if gpus:
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


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Every worker builds the same seeded stream of global batches and keeps its
    own slice of each (tf.data's DATA auto-sharding): the class mix and the
    augmentation are those of a single-process run with the same global batch."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether ``strategy`` spans several worker processes."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode()


def prepare_model(model: keras.Model, strategy: tf.distribute.Strategy, labels: tf.TensorSpec | None = None) -> keras.Model:
    """Make ``model.fit`` run under a multi-worker ``strategy`` (else return it unchanged).

    Before its first step ``fit`` builds the compiled loss and metrics from a
    first batch that it averages across replicas, which this strategy refuses
    (and which would consume that batch); they are built from one zero image of
    the input's shape and one zero label of the training data's ``labels`` spec
    instead (class ids, or MixUp's rows of target probabilities; class ids when
    not given). ``multi_worker_fit`` handles the per-step logs.
    """
    if not is_multi_worker(strategy):
        return model
    multi_worker_fit()
    label_shape, label_dtype = ((1, *labels.shape[1:]), labels.dtype) if labels is not None else ((1,), tf.int32)

    def build_from_shapes(iterator=None, data_batch=None):
        with strategy.scope():
            model._symbolic_build(data_batch=(tf.zeros((1, *model.input_shape[1:])), tf.zeros(label_shape, label_dtype)))

    model._maybe_symbolic_build = build_from_shapes
    return model


def multi_worker_fit() -> None:
    """Average each step's logs (scalar loss and metrics) across workers over no axis.

    Keras reduces them with ``strategy.reduce("MEAN", value, axis=0)``, which
    a multi-worker strategy applies to each scalar and fails; ``axis=None``
    is the mean over replicas that every other strategy computes. Other
    reductions (predict's concatenation) are left to Keras.
    """
    from keras.src.backend.tensorflow import trainer

    if getattr(trainer.reduce_per_replica, "multi_worker", False):
        return
    keras_reduce = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if is_multi_worker(strategy) and reduction in ("auto", "mean"):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return keras_reduce(values, strategy, reduction)

    reduce_per_replica.multi_worker = True
    trainer.reduce_per_replica = reduce_per_replica
