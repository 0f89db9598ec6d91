"""Grad-CAM: which pixels pushed the model toward a class.

Follows keras-io's ``examples/vision/grad_cam.py``: a model mapping the input
to (last conv activations, predictions); the gradient of the class score with
respect to those activations, averaged per channel, weights the channels; the
ReLU of the weighted sum is the heatmap. The classifiers are flat functional
models, so the last convolution is reachable by name.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from skin_lesion.info import CLASSES
from skin_lesion.models import HEAD_PREFIX, last_conv_layer


def gradcam_model(model: keras.Model, layer_name: str | None = None) -> keras.Model:
    """A model returning (activations of ``layer_name``, class probabilities)."""
    name = layer_name or last_conv_layer(model)
    return keras.Model(model.inputs, [model.get_layer(name).output, model.output])


def make_gradcam_heatmap(
    images: np.ndarray, model: keras.Model, class_index: int | np.ndarray | None = None, layer_name: str | None = None, score: str = "probability"
) -> np.ndarray:
    """Grad-CAM heatmaps in [0, 1], one per image (at the conv layer's resolution).

    ``class_index``: the class to explain per image; default the predicted one.
    ``score``: the class's ``probability`` (keras-io's choice), or its ``logit``
    (the head's dense output before the softmax): for a head of global pooling
    then one dense layer, Grad-CAM of the logit is the class activation map
    (Zhou et al., 2016) up to scale, which is what an exported bundle draws.
    """
    grad_model = gradcam_model(model, layer_name)
    x = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        conv, preds = grad_model(x, training=False)
        idx = tf.argmax(preds, axis=1) if class_index is None else tf.broadcast_to(tf.cast(class_index, tf.int64), [tf.shape(x)[0]])
        if score == "logit":
            head = model.get_layer(HEAD_PREFIX + "softmax")
            scores = tf.reduce_mean(conv, axis=(1, 2)) @ head.kernel + head.bias
        else:
            scores = preds
        target = tf.gather(scores, idx, axis=1, batch_dims=1)
    grads = tape.gradient(target, conv)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # how much each channel matters
    cam = tf.nn.relu(tf.reduce_sum(weights * conv, axis=-1))
    cam = cam / (tf.reduce_max(cam, axis=(1, 2), keepdims=True) + 1e-8)
    return cam.numpy()


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend a heatmap (jet colours, resized to the image) over an image in [0, 255]; uint8 out."""
    import matplotlib

    h, w = image.shape[:2]
    heat = tf.image.resize(heatmap[..., None], (h, w)).numpy()[..., 0]
    colours = matplotlib.colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
    return np.clip(image * (1 - alpha) + colours * alpha, 0, 255).astype(np.uint8)


def pick_examples(pred: pd.DataFrame) -> pd.DataFrame:
    """For each class, the first correctly and the first wrongly classified image of a
    predictions table (``dx``, ``pred_dx``, probabilities, and ``path`` merged in),
    each with a caption: what a reader compares to see where a model looks."""
    rows = []
    for c in CLASSES:
        of_class = pred[pred["dx"] == c]
        for right in (True, False):
            hit = of_class[(of_class["pred_dx"] == c) == right]
            if len(hit):
                r = hit.iloc[0]
                caption = f"true {c} / pred {r['pred_dx']}\n({'right' if right else 'wrong'}, p={r[r['pred_dx']]:.2f})"
                rows.append({**r.to_dict(), "caption": caption})
    return pd.DataFrame(rows)
