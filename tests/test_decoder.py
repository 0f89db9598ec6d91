"""One decoder: the pixels training and evaluation see (the tf.data pipeline)
are the pixels ``predict`` sees (``read_image``), for JPEG and PNG files of
other sizes and modes written by other software than the dataset's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skin_lesion.pipeline import ImageError, make_pipeline, read_image


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth colour image with texture, like a photograph (not flat colour, which any decoder gets right)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / 17 + c) * np.cos(yy / 23 - c) for c in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))


def _files(folder: Path) -> list[Path]:
    """JPEG and PNG files in the modes and sizes users bring."""
    img = _photo(333, 251, 0)
    files = {
        "rgb_q75_420.jpg": lambda p: img.save(p, quality=75, subsampling=2),
        "rgb_q95_444.jpg": lambda p: _photo(640, 480, 1).save(p, quality=95, subsampling=0),
        "gray.jpg": lambda p: img.convert("L").save(p, quality=90),
        "progressive.jpg": lambda p: _photo(200, 150, 2).save(p, quality=85, progressive=True),
        "rgb.png": lambda p: img.save(p),
        "rgba.png": lambda p: img.convert("RGBA").save(p),
        "palette.png": lambda p: img.convert("P", palette=Image.Palette.ADAPTIVE).save(p),
        "gray_alpha.png": lambda p: img.convert("LA").save(p),
        "tiny.png": lambda p: _photo(40, 30, 3).save(p),
    }
    for name, write in files.items():
        write(folder / name)
    return [folder / n for n in files]


@pytest.mark.parametrize("size", [64, 224])
def test_pipeline_and_predict_decode_identical_pixels(tmp_path, size):
    files = _files(tmp_path)
    frame = pd.DataFrame({"path": [str(p) for p in files], "dx": "nv"})
    batches = [x.numpy() for x, _ in make_pipeline(frame, (size, size), batch_size=4, cache=False).dataset]
    trained_on = np.concatenate(batches).astype("float32")
    predicted_on = np.stack([read_image(p, size) for p in files])
    assert trained_on.shape == predicted_on.shape == (len(files), size, size, 3)
    for path, a, b in zip(files, trained_on, predicted_on):
        assert np.array_equal(a, b), f"{path.name}: largest pixel difference {np.abs(a - b).max()}"


def test_real_images_decode_identically(real_dir):
    paths = sorted((real_dir / "images").glob("*.jpg"))[:40]
    frame = pd.DataFrame({"path": [str(p) for p in paths], "dx": "nv"})
    trained_on = np.concatenate([x.numpy() for x, _ in make_pipeline(frame, (224, 224), batch_size=16, cache=False).dataset]).astype("float32")
    assert np.array_equal(trained_on, np.stack([read_image(p, 224) for p in paths]))


def test_unreadable_files_are_one_line_errors(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ("text.jpg", "missing.png"):
        with pytest.raises(ImageError, match=name):
            read_image(tmp_path / name, 64)
