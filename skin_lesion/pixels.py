"""Image files to model inputs without TensorFlow: the bundle's decoder and resize.

JPEGs are decoded by libjpeg-turbo through ``simplejpeg`` with the fast
integer DCT and fancy upsampling, the settings TensorFlow's decoder uses
(Pillow's accurate DCT differs by up to 4 levels); other formats by Pillow
(PNG is lossless, so any decoder agrees). ``resize_like_training`` resizes with
the same antialiased bilinear filter as ``tf.image.resize(antialias=True)``
(a triangle kernel widened by the downscale factor, half-pixel centres),
rounded to whole values as training's decoder does. On real images the result
differs from training's input by at most one level.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path

import numpy as np

from skin_lesion.info import ImageError

MAX_PIXELS = 64_000_000  # larger images are refused: a decompression bomb, not a photograph
# A model's input size: a whole number of pixels for a square input, or (height, width).
Size = int | tuple[int, int]


def hw(size: Size) -> tuple[int, int]:
    """(height, width) of an input size given either way."""
    if isinstance(size, (tuple, list)):
        height, width = size
        return int(height), int(width)
    return int(size), int(size)


def size_key(size: Size) -> Size:
    """The one spelling of an input size that dictionaries are keyed by: a whole number when
    square (as every run before 4:3 inputs wrote it), else (height, width)."""
    height, width = hw(size)
    return height if height == width else (height, width)


def size_text(size: Size) -> str:
    """An input size for people: "224 px" when square, "168x224 px" (height x width) when not."""
    height, width = hw(size)
    return f"{width} px" if height == width else f"{height}x{width} px"


class ImageTooLarge(ImageError):
    """An image with more pixels than a photograph has (a decompression bomb): refused before decoding."""


def decode_rgb(path: str | os.PathLike) -> np.ndarray:
    """A JPEG/PNG file as uint8 RGB (grayscale replicated, alpha and palette dropped, as training's decoder does)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    return decode_bytes(path.read_bytes(), str(path))


def decode_bytes(data: bytes, name: str) -> np.ndarray:
    """An image's bytes (a file's, or an upload's) as uint8 RGB; ``name`` is what error messages call it."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError(f"{name}: the file is empty; pass a JPEG or PNG image")
    if data[:3] == b"\xff\xd8\xff":
        rgb = _decode_jpeg(data, name)
        if rgb is not None:
            return rgb
    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_pixels(im.width, im.height, name)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: keep the high byte, as TensorFlow converts it
                return np.repeat((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8)[..., None], 3, axis=-1)
            return np.asarray(im.convert("RGB"))  # alpha dropped without compositing, palette expanded, as TensorFlow's decoder does
    except Image.DecompressionBombError as e:  # Pillow's own limit, met before ours can look at the size
        raise ImageTooLarge(f"{name}: too large an image ({e}); pass a photograph of at most {MAX_PIXELS // 1_000_000} megapixels") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{name}: not a readable image ({type(e).__name__}: {str(e)[:80]}); pass a JPEG or PNG file") from e


def _check_pixels(width: int, height: int, name: str) -> None:
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"{name}: {width}x{height} pixels is too large an image; pass a photograph of at most {MAX_PIXELS // 1_000_000} megapixels")


def _decode_jpeg(data: bytes, name: str) -> np.ndarray | None:
    """A JPEG decoded as TensorFlow decodes it (fast integer DCT, fancy upsampling); None for what
    simplejpeg cannot read (say, CMYK or a truncated file), which Pillow then decodes or refuses."""
    import simplejpeg

    try:
        width, height, _, _ = simplejpeg.decode_jpeg_header(data)
        _check_pixels(width, height, name)
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


def resize_like_training(rgb: np.ndarray, size: Size) -> np.ndarray:
    """Resize uint8 RGB to ``size`` (square px, or (height, width)) as ``pipeline.decode_resize`` does;
    float32 whole values in [0, 255]."""
    h, w = rgb.shape[:2]
    out_h, out_w = hw(size)
    rows, cols = _resize_weights(h, out_h), _resize_weights(w, out_w)
    img = rgb.astype(np.float32).reshape(h, w * 3)
    out = (rows @ img).reshape(out_h, w, 3)  # rows first: the order that matches TensorFlow most often
    out = cols @ np.ascontiguousarray(out.transpose(1, 0, 2)).reshape(w, out_h * 3)  # then columns, as one contiguous product
    out = out.reshape(out_w, out_h, 3).transpose(1, 0, 2)
    return np.clip(np.round(out), 0, 255).astype(np.float32)


def read_image(path: str | os.PathLike, size: Size) -> np.ndarray:
    """One image file, decoded and resized for a model that takes ``size`` (px, or (height, width))."""
    return resize_like_training(decode_rgb(path), size)


def jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] as RGB in [0, 255] on the jet colour map (piecewise linear; no matplotlib needed)."""
    v = np.clip(values, 0, 1)
    return np.stack([np.clip(1.5 - np.abs(4 * v - 3), 0, 1), np.clip(1.5 - np.abs(4 * v - 2), 0, 1), np.clip(1.5 - np.abs(4 * v - 1), 0, 1)], -1) * 255


def overlay_heatmap(rgb: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A heatmap in [0, 1] drawn over uint8 RGB: upscaled bilinearly to the image, jet colours, ``alpha`` opacity."""
    from PIL import Image

    heat = Image.fromarray(np.uint8(np.clip(heatmap, 0, 1) * 255)).resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.BILINEAR)
    colours = jet(np.asarray(heat, dtype=np.float32) / 255)
    return np.clip(rgb * (1 - alpha) + colours * alpha, 0, 255).astype(np.uint8)


def save_heatmap(path: str | os.PathLike, rgb: np.ndarray, heatmap: np.ndarray) -> Path:
    """The heatmap over the image, written as a PNG."""
    from PIL import Image

    Image.fromarray(overlay_heatmap(rgb, heatmap)).save(path)
    return Path(path)
