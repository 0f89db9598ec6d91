"""The exported model bundle, run without TensorFlow: LiteRT, NumPy and Pillow only.

A bundle (``export --run RUN --out DIR``) is a folder a user can hand to a
colleague: one ``.tflite`` file per member model, ``manifest.json`` with
everything ``predict`` needs to reproduce the run's predictions (class order,
input sizes, the resize rule, temperatures, an ensemble's logit adjustment,
the melanoma threshold), and ``MODEL_CARD.md``. This module loads and runs
one; it imports neither TensorFlow nor Keras, so a cold ``predict`` starts in
a fraction of a second.

Pixels: JPEGs are decoded by libjpeg-turbo through ``simplejpeg`` with the
fast integer DCT and fancy upsampling, the settings TensorFlow's decoder uses
(Pillow's accurate DCT differs by up to 4 levels); other formats by Pillow
(PNG is lossless, so any decoder agrees). ``resize_like_training`` resizes with
the same antialiased bilinear filter as ``tf.image.resize(antialias=True)``
(a triangle kernel widened by the downscale factor, half-pixel centres),
rounded to whole values as training's decoder does.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from skin_lesion.calibration import apply_temperature, decide
from skin_lesion.info import CLASSES, ImageError, UserError

BUNDLE_FORMAT = "skin_lesion.bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
MAX_PIXELS = 64_000_000  # larger images are refused: a decompression bomb, not a photograph


class BundleError(UserError):
    """A bundle that cannot be used: missing, corrupt, or not matching its manifest."""


# --------------------------------------------------------------------------- pixels


def decode_rgb(path: str | os.PathLike) -> np.ndarray:
    """A JPEG/PNG file as uint8 RGB (grayscale replicated, alpha and palette dropped, as training's decoder does)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    data = path.read_bytes()
    if data[:3] == b"\xff\xd8\xff":
        rgb = _decode_jpeg(data, path)
        if rgb is not None:
            return rgb
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ImageError(f"{path}: {im.width}x{im.height} pixels is too large an image; pass a photograph of at most {MAX_PIXELS // 1_000_000} megapixels")
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: keep the high byte, as TensorFlow converts it
                return np.repeat((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8)[..., None], 3, axis=-1)
            return np.asarray(im.convert("RGB"))  # alpha dropped without compositing, palette expanded, as TensorFlow's decoder does
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}); pass a JPEG or PNG file") from e


def _decode_jpeg(data: bytes, path: Path) -> np.ndarray | None:
    """A JPEG decoded as TensorFlow decodes it (fast integer DCT, fancy upsampling); None for what
    simplejpeg cannot read (say, CMYK), which Pillow then decodes."""
    import simplejpeg

    try:
        width, height, _, _ = simplejpeg.decode_jpeg_header(data)
        if width * height > MAX_PIXELS:
            raise ImageError(f"{path}: {width}x{height} pixels is too large an image; pass a photograph of at most {MAX_PIXELS // 1_000_000} megapixels")
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
    except ValueError:
        return None


@functools.lru_cache(maxsize=64)
def _resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """The (out, in) matrix of TensorFlow's antialiased bilinear resampling along one axis
    (``ScaleAndTranslate`` with a triangle kernel, in float32 as it computes it)."""
    inv_scale = np.float32(in_size) / np.float32(out_size)
    kernel_scale = max(float(inv_scale), 1.0)
    weights = np.zeros((out_size, in_size), np.float32)
    for x in range(out_size):
        sample = np.float32(x + 0.5) * inv_scale
        if sample < 0 or sample > in_size:
            continue
        start = int(np.clip(np.ceil(sample - kernel_scale - 0.5), 0, in_size - 1))
        end = int(np.clip(np.floor(sample + kernel_scale - 0.5), 0, in_size - 1)) + 1
        source = np.arange(start, end, dtype=np.float32)
        w = np.maximum(np.float32(0), np.float32(1) - np.abs((source + np.float32(0.5) - sample) * np.float32(1 / kernel_scale))).astype(np.float32)
        total = w.sum(dtype=np.float32)
        if total > 0:
            weights[x, start:end] = w * np.float32(1 / total)
    return weights


def resize_like_training(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 RGB to (size, size, 3) as ``pipeline.decode_resize`` does; float32 whole values in [0, 255]."""
    h, w = rgb.shape[:2]
    rows, cols = _resize_weights(h, size), _resize_weights(w, size)
    img = rgb.astype(np.float32).reshape(h, w * 3)
    out = (rows @ img).reshape(size, w, 3)  # rows first: the order that matches TensorFlow most often
    out = cols @ np.ascontiguousarray(out.transpose(1, 0, 2)).reshape(w, size * 3)  # then columns, as one contiguous product
    out = out.reshape(size, size, 3).transpose(1, 0, 2)
    return np.clip(np.round(out), 0, 255).astype(np.float32)


def read_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """One image file, decoded and resized for a model that takes ``size`` px."""
    return resize_like_training(decode_rgb(path), size)


# --------------------------------------------------------------------------- the bundle


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (the manifest records one per model file, so a damaged copy is caught)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class BundleMember:
    """One model of a bundle: its LiteRT runner, input size, temperature and head weights (for heatmaps)."""

    name: str
    image_size: int
    temperature: float
    runner: Any
    head: np.ndarray | None  # (channels + 1, classes): the dense head's kernel and bias


def _read_manifest(folder: Path) -> dict:
    """The bundle's manifest, checked for what ``Bundle`` needs."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder}: bundle folder not found; make one with `python -m skin_lesion export --run RUN --out {folder}`")
    if not path.exists():
        raise BundleError(f"{path}: missing; a bundle is a folder written by `python -m skin_lesion export`")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise BundleError(f"{path}: not valid JSON ({e}); export the bundle again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a skin_lesion bundle manifest; export the bundle again")
    if manifest.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{path}: bundle format version {manifest.get('version')}, this skin_lesion reads version {BUNDLE_VERSION}; export it again")
    if manifest.get("classes") != list(CLASSES):
        raise BundleError(f"{path}: its classes {manifest.get('classes')} are not {list(CLASSES)}; it was exported for another label set")
    if not manifest.get("members"):
        raise BundleError(f"{path}: lists no member models; export the bundle again")
    return manifest


def _load_member(folder: Path, entry: dict, threads: int) -> BundleMember:
    """One member's LiteRT interpreter, after checking its file against the manifest."""
    from ai_edge_litert.interpreter import Interpreter

    path = folder / entry["file"]
    if not path.exists():
        raise BundleError(f"{path}: missing; the bundle's manifest lists it: copy the whole bundle folder")
    if file_sha256(path) != entry["sha256"]:
        raise BundleError(f"{path}: damaged or replaced (its SHA-256 does not match the manifest); copy or export the bundle again")
    try:
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        runner = interpreter.get_signature_runner()
    except (ValueError, RuntimeError) as e:
        raise BundleError(f"{path}: not a loadable LiteRT model ({str(e).splitlines()[0][:150]}); export the bundle again") from e
    size = int(entry["image_size"])
    shape = list(interpreter.get_input_details()[0]["shape"])
    if shape != [1, size, size, 3]:
        raise BundleError(f"{path}: takes inputs {shape}, but the manifest says {size} px; the bundle mixes files of two exports")
    head = None
    if entry.get("head"):
        with np.load(folder / entry["head"]) as f:
            head = np.vstack([f["kernel"], f["bias"][None]])
    return BundleMember(entry["run"], size, float(entry["temperature"]), runner, head)


class Bundle:
    """A loaded bundle: calibrated probabilities, the decided label and heatmaps for image files.

    For a mean ensemble each member scores the image at its own input size,
    the mean of their calibrated probabilities gets the ensemble's temperature,
    and the label comes from its decision rule: exactly what ``predict --run``
    does with the Keras models.
    """

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder)
        threads = threads or min(4, os.cpu_count() or 1)
        self.members = [_load_member(self.folder, entry, threads) for entry in self.manifest["members"]]
        self.temperature = float(self.manifest.get("temperature", 1.0))
        offset = self.manifest.get("logit_offset")
        self.offset = np.asarray(offset, dtype=float) if offset is not None else None
        self.mel_threshold = self.manifest.get("mel_threshold")
        self.sizes = sorted({m.image_size for m in self.members})

    def _run(self, member: BundleMember, image: np.ndarray) -> dict[str, np.ndarray]:
        return member.runner(image=image[None].astype(np.float32))

    def probs_sized(self, images: dict[int, np.ndarray]) -> np.ndarray:
        """Calibrated probabilities from one preprocessed (size, size, 3) image per input size the members take."""
        out = [apply_temperature(self._run(m, images[m.image_size])["output_0"].astype(np.float64), m.temperature) for m in self.members]
        return apply_temperature(np.mean(out, axis=0), self.temperature)[0]

    def probs_file(self, path: str | os.PathLike) -> np.ndarray:
        """Calibrated class probabilities for one image file (decoded once, resized once per input size)."""
        rgb = decode_rgb(path)
        return self.probs_sized({s: resize_like_training(rgb, s) for s in self.sizes})

    def label(self, probs: np.ndarray) -> str:
        """The decided class: the argmax, or for an ensemble with logit adjustment the adjusted argmax."""
        return CLASSES[int(decide(np.asarray(probs)[None], None, self.offset)[0])]

    def mel_flag(self, probs: np.ndarray) -> bool | None:
        """Whether p(melanoma) reaches the operating threshold chosen on validation (None without one)."""
        return None if self.mel_threshold is None else bool(probs[CLASSES.index("mel")] >= self.mel_threshold)

    def heatmap_file(self, path: str | os.PathLike, class_index: int | None = None) -> np.ndarray:
        """A class activation map in [0, 1] over the image, for the decided class by default.

        From the first member that exported its last convolution: the head's
        weights for the class times the feature maps, summed over channels,
        negatives set to zero. For a head of global pooling then one dense
        layer this equals Grad-CAM of the class's logit up to scale.
        """
        member = next((m for m in self.members if m.head is not None), None)
        if member is None:
            raise BundleError(f"{self.folder}: no member exported its feature maps; export the bundle again")
        rgb = decode_rgb(path)
        probs = self.probs_sized({s: resize_like_training(rgb, s) for s in self.sizes})
        c = CLASSES.index(self.label(probs)) if class_index is None else class_index
        features = self._run(member, resize_like_training(rgb, member.image_size))["output_1"][0]
        cam = np.maximum(features @ member.head[:-1, c], 0)
        return cam / (cam.max() + 1e-8)

    def predict_file(self, path: str | os.PathLike, top: int = 3) -> list[tuple[str, float]]:
        """Top ``top`` (class, probability) for one image file."""
        probs = self.probs_file(path)
        order = np.argsort(-probs)[:top]
        return [(CLASSES[i], float(probs[i])) for i in order]


def save_heatmap(path: str | os.PathLike, image_path: str | os.PathLike, heatmap: np.ndarray, alpha: float = 0.45) -> Path:
    """The heatmap over the image, as a PNG (jet colours, nearest-free bilinear upscaling by Pillow)."""
    from PIL import Image

    rgb = decode_rgb(image_path)
    heat = Image.fromarray(np.uint8(np.clip(heatmap, 0, 1) * 255)).resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.BILINEAR)
    h = np.asarray(heat, dtype=np.float32) / 255
    # the jet colour map, piecewise linear (matplotlib is not needed to draw it)
    colours = np.stack([np.clip(1.5 - np.abs(4 * h - 3), 0, 1), np.clip(1.5 - np.abs(4 * h - 2), 0, 1), np.clip(1.5 - np.abs(4 * h - 1), 0, 1)], -1) * 255
    out = np.clip(rgb * (1 - alpha) + colours * alpha, 0, 255).astype(np.uint8)
    Image.fromarray(out).save(path)
    return Path(path)
