"""What a training run is: ``TrainConfig``, the profiles and the model choices.

This module imports no Keras or TensorFlow, so the command line builds its
options (and ``--help``) from these tables in a fraction of a second, and a
run's ``config.json`` can be read anywhere.

Profiles trade cost for fidelity (their measured costs are in
docs/benchmarks.md): ``smoke`` trains a few images per class for two epochs
(the tests), ``cpu`` trains on all of HAM10000 within about an hour on 2 cores,
``gpu`` is the full-size study.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from skin_lesion.info import DataError

LITE_NAMES: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
MODEL_NAMES: tuple[str, ...] = ("cnn", "resnet50", *LITE_NAMES)
# Every model trains at 224 px unless told otherwise (the CNN at 128), the larger
# Lite sizes too (native 240 and 260 px), so that sizes compare at equal input.
DEFAULT_SIZE: dict[str, int] = {"cnn": 128, "resnet50": 224, **dict.fromkeys(LITE_NAMES, 224)}
# Where fine-tuning starts, per model (a layer name). Every Lite size fine-tunes
# from its fifth stage (112 channels at width 1.0) up; ``models.lite.lite_stage_first_block``
# derives these names and a test checks that they agree.
UNFREEZE_FROM: dict[str, str | None] = {
    "cnn": "all", "resnet50": "conv4_block1_1_conv",
    "efficientnet_lite0": "block8_expand_conv", "efficientnet_lite1": "block11_expand_conv", "efficientnet_lite2": "block11_expand_conv",
}
IMBALANCE_METHODS: tuple[str, ...] = ("none", "oversample", "sqrt", "undersample", "class_weight")
# Where a pretrained backbone's frozen BatchNormalization statistics come from: its own
# pretraining, or the run's training images, measured once before the first epoch
# (``bn_statistics.estimate_statistics``).
BN_STATISTICS: tuple[str, ...] = ("pretrained", "training")
# Where augmentation runs: in tf.data (overlapping the train step on the CPU) or as
# the model's first layer (on the accelerator; the pipeline then only decodes,
# caches and batches).
AUGMENT_ON: tuple[str, ...] = ("pipeline", "model")
# Colour constancy inside the model, before its own scaling (``models.layers.ShadesOfGray``).
COLOUR_CONSTANCY: tuple[str, ...] = ("none", "shades_of_gray")
# A model's input frame: square, or 4:3 like HAM10000's 200x150 frames (height three
# quarters of ``image_size``, so a frame is resized without being squeezed).
ASPECTS: dict[str, tuple[int, int]] = {"1:1": (1, 1), "4:3": (4, 3)}
# The bound of augment, colour_augment and their product (the colour jitter's strength):
# above about 6.7 the contrast jitter could turn an image negative, and the zoom
# (from 1 - 0.1 x augment) reaches zero at 10.
MAX_AUGMENT = 5.0

PROFILES: dict[str, dict] = {
    # Minutes on 2 cores: tiny images, a few images per class, two epochs.
    "smoke": dict(image_size=64, epochs=2, head_epochs=1, batch_size=16, max_per_class=20),
    # All of HAM10000 on 2 cores: the study trains within the hour.
    "cpu": dict(epochs=12, head_epochs=2, batch_size=32, max_per_class=None),
    # The full-size study on a GPU.
    "gpu": dict(epochs=40, head_epochs=3, batch_size=64, max_per_class=None, unfreeze_from="all", augment_on="model"),
}
# Per (model, profile) overrides. The CNN trains from scratch and costs as many
# FLOPs per pixel as Lite0, so on 2 cores it gets 64 px images to fit the hour.
# The Lite sizes draw classes by the square root of their counts and keep the
# mean of their last five epochs' weights as a second model (both chosen on
# validation: docs/EXPERIMENTS.md, "The square-root class mix" and "Two
# resolutions and a weight average"); smoke runs the same path in miniature.
MODEL_PROFILES: dict[tuple[str, str], dict] = {
    ("cnn", "cpu"): dict(image_size=64, epochs=10, batch_size=32),
    **{(name, "cpu"): dict(imbalance="sqrt", average_last=5) for name in LITE_NAMES},
    **{(name, "smoke"): dict(imbalance="sqrt", average_last=1) for name in LITE_NAMES},
}
# Values for keys no profile sets.
FALLBACKS: dict = {"imbalance": "oversample", "average_last": 0}
_PROFILE_KEYS = ("epochs", "head_epochs", "batch_size", "max_per_class", "image_size", "unfreeze_from", "augment_on", "imbalance", "average_last")


def input_size(image_size: int, aspect: str = "1:1") -> int | tuple[int, int]:
    """A model's input for ``image_size`` px wide frames of ``aspect``: the whole number
    itself when square, else (height, width); ``pixels.hw`` reads either."""
    if aspect not in ASPECTS:
        raise DataError(f"unknown aspect {aspect!r}; choose one of {', '.join(ASPECTS)}")
    across, down = ASPECTS[aspect]
    return image_size if across == down else (round(image_size * down / across), image_size)


def is_pretrained(model_name: str, weights: str | None) -> bool:
    """Whether the model starts from trained weights (ImageNet or a local file)
    rather than from scratch: the custom CNN never does, and ``weights`` ``none`` means scratch."""
    return model_name != "cnn" and weights not in (None, "none")


def check_label_smoothing(label_smoothing: float) -> float:
    """``label_smoothing`` itself if it is in [0, 1), else a DataError (a user's option or config value)."""
    if not 0 <= label_smoothing < 1:
        raise DataError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return label_smoothing


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``config.json`` so a run can be redone."""

    model: str = "efficientnet_lite0"
    profile: str = "cpu"
    data: str | None = None
    run: str = "runs/default"
    image_size: int | None = None  # the input's width in px (and its height when ``aspect`` is 1:1)
    aspect: str = "1:1"  # "4:3": inputs of HAM10000's frame shape, height three quarters of image_size
    epochs: int | None = None
    head_epochs: int | None = None
    batch_size: int | None = None
    lr: float = 1e-3
    finetune_lr: float = 3e-4
    dropout: float = 0.3
    imbalance: str | None = None  # unset: the profile's, else "oversample"
    augment: float = 1.0
    augment_on: str | None = None  # "pipeline" (tf.data, on the CPU) or "model" (first layer, on the accelerator)
    colour_augment: float = 1.0  # scales the augmentation's colour jitter; above 1 it also shifts each channel's gain
    colour_constancy: str = "none"  # "shades_of_gray": each image's colour normalised inside the model
    weights: str = "imagenet"
    unfreeze_from: str | None = None
    max_per_class: int | None = None
    folds: int | None = None
    fold: int | None = None
    split_by: str = "lesion"
    holdout_source: str | None = None  # a source (dataset column) held out as the whole test part
    split_file: str | None = None  # a split table to train on (image_id, lesion_id, dx, split) instead of making one
    seed: int = 0
    average_last: int | None = None  # >0: also save the mean of the weights after the last N fine-tuning epochs, in average/
    label_smoothing: float = 0.0  # >0: train against (1 - eps) one-hot + eps / classes (losses.SmoothedSparseCrossentropy)
    bn_statistics: str = "pretrained"  # "training": the frozen BatchNormalization statistics re-measured on the training images
    mixup: float = 0.0  # >0: MixUp, each training image and label blended with another by a Beta(mixup, mixup) weight (augment.mixup_batch)
    devices: int = 0  # >1: split the CPU into logical devices (tests MirroredStrategy)
    gpu_path: bool | None = None  # mixed precision and XLA; None: when a GPU is present (True reaches that code on a CPU)
    extra: dict = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """Fill unset fields from the profile and the model's defaults."""
        if self.profile not in PROFILES:
            raise DataError(f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
        if self.model not in MODEL_NAMES:
            raise DataError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_NAMES)}")
        if self.fold is not None and not (self.folds and 0 <= self.fold < self.folds):
            raise DataError(f"--fold {self.fold} needs --folds K with K above it (folds are numbered 0 to K-1)")
        if self.split_file and (self.folds or self.holdout_source or self.split_by != "lesion" or self.max_per_class):
            raise DataError("--split trains on the table's own parts; it does not combine with --folds, --holdout-source, --split-by image or --max-per-class")
        prof = {**PROFILES[self.profile], **MODEL_PROFILES.get((self.model, self.profile), {})}
        out = TrainConfig(**asdict(self))
        for key in _PROFILE_KEYS:
            if getattr(out, key) is None:
                setattr(out, key, prof.get(key, FALLBACKS.get(key)))
        if out.split_file:
            out.max_per_class = None  # the table says which images a run uses, not the profile's cap
        out.image_size = out.image_size or DEFAULT_SIZE[out.model]
        input_size(out.image_size, out.aspect)  # an unknown aspect fails here, before any data is read
        out.augment_on = out.augment_on or "pipeline"
        if out.augment_on not in AUGMENT_ON:
            raise DataError(f"unknown augment_on {out.augment_on!r}; choose one of {', '.join(AUGMENT_ON)}")
        if out.colour_constancy not in COLOUR_CONSTANCY:
            raise DataError(f"unknown colour_constancy {out.colour_constancy!r}; choose one of {', '.join(COLOUR_CONSTANCY)}")
        if not 0 <= out.augment <= MAX_AUGMENT:
            raise DataError(f"augment must be in [0, {MAX_AUGMENT:g}] (0 = off), got {out.augment}")
        if not 0 <= out.colour_augment <= MAX_AUGMENT:
            raise DataError(f"colour_augment must be in [0, {MAX_AUGMENT:g}], got {out.colour_augment}")
        if out.augment * out.colour_augment > MAX_AUGMENT:
            raise DataError(f"the colour jitter's strength, augment x colour_augment = {out.augment * out.colour_augment:g}, "
                            f"must be at most {MAX_AUGMENT:g}; lower one of them")
        if not math.isfinite(out.mixup) or out.mixup < 0:
            raise DataError(f"mixup must be 0 (off) or a positive Beta parameter, got {out.mixup}")
        if out.mixup > 0 and out.imbalance == "class_weight":
            # Keras weighs a soft target by its larger class alone: a blend would carry one class's weight.
            raise DataError("mixup does not combine with imbalance class_weight; choose oversample or sqrt for a MixUp run")
        if out.bn_statistics not in BN_STATISTICS:
            raise DataError(f"unknown bn_statistics {out.bn_statistics!r}; choose one of {', '.join(BN_STATISTICS)}")
        if out.bn_statistics == "training" and not is_pretrained(out.model, out.weights):
            raise DataError(f"bn_statistics training re-measures a pretrained backbone's frozen statistics; {out.model} with weights {out.weights} "
                            "trains its own: drop the option")
        if out.imbalance not in IMBALANCE_METHODS:
            raise DataError(f"unknown imbalance method {out.imbalance!r}; choose one of {', '.join(IMBALANCE_METHODS)}")
        out.unfreeze_from = out.unfreeze_from or UNFREEZE_FROM[out.model]
        if not is_pretrained(out.model, out.weights):
            out.head_epochs = 0  # nothing pretrained to protect
            out.unfreeze_from = "all"
        out.head_epochs = min(out.head_epochs, out.epochs)
        check_label_smoothing(out.label_smoothing)  # fail before any data is read
        return out

    @property
    def input_size(self) -> int | tuple[int, int]:
        """The model's input: ``image_size`` px square, or (height, width) for another aspect."""
        return input_size(self.image_size or DEFAULT_SIZE[self.model], self.aspect)

    def to_json(self) -> str:
        """The config as ``config.json`` holds it."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read ``config.json`` (unknown keys are an error, naming the file)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the run config ({e}); pass a config.json written by train or tune") from e
        if not isinstance(raw, dict):
            raise DataError(f"{path}: not a run config (a JSON object is expected)")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DataError(f"{path}: unknown config key(s) {unknown}")
        return cls(**raw)


# Fields that may differ between a run folder's config and a request to reuse
# it: where things are (the same data can sit elsewhere) and how it ran.
REUSE_IGNORES: tuple[str, ...] = ("run", "data", "devices", "gpu_path", "extra")


def check_same_config(saved: TrainConfig, wanted: TrainConfig, run: str | Path) -> None:
    """Raise a DataError naming the differing fields when the run in ``run`` was
    trained with another config than ``wanted``: reusing it would silently give
    an older study (say, a run from before the study changed a setting)."""
    names = [f.name for f in fields(TrainConfig) if f.name not in REUSE_IGNORES]
    diff = [f"{n} {getattr(saved, n)!r} (wanted {getattr(wanted, n)!r})" for n in names if getattr(saved, n) != getattr(wanted, n)]
    if diff:
        raise DataError(f"{run}: holds a run trained with {', '.join(diff)}; move that folder away (or point runs elsewhere) to train the one asked for")
