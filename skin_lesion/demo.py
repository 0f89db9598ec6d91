"""The synthetic demo set: HAM10000-shaped metadata and drawn lesion-like images.

It lets a newcomer run every notebook and command without the real data. It
is marked synthetic in its folder (``SYNTHETIC_DEMO``), in the log, on every
figure and in the report: numbers measured on it say nothing about skin cancer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from skin_lesion.info import CLASSES, COLUMNS, DEFAULT_DEMO, DEMO_MARK, HAM_COUNTS, METADATA_FILE, SITE_COUNTS

log = logging.getLogger("skin_lesion")

# Per class: base RGB colour, border irregularity, texture strength, lesion size,
# a second colour (blue-grey veil, vessels, scale...). Chosen so that the
# classes differ in colour, shape, border and texture, as real lesions do.
_DEMO_STYLE: dict[str, dict] = {
    "nv": dict(rgb=(150, 95, 60), irregular=0.05, texture=0.15, radius=(0.22, 0.32), accent=None),
    "mel": dict(rgb=(70, 40, 30), irregular=0.35, texture=0.55, radius=(0.28, 0.42), accent=(80, 90, 130)),
    "bkl": dict(rgb=(165, 125, 80), irregular=0.15, texture=0.65, radius=(0.25, 0.38), accent=(200, 180, 130)),
    "bcc": dict(rgb=(200, 130, 130), irregular=0.20, texture=0.25, radius=(0.18, 0.30), accent=(225, 210, 210)),
    "akiec": dict(rgb=(190, 90, 70), irregular=0.25, texture=0.45, radius=(0.20, 0.34), accent=(235, 225, 200)),
    "vasc": dict(rgb=(175, 35, 55), irregular=0.08, texture=0.20, radius=(0.14, 0.24), accent=(110, 10, 40)),
    "df": dict(rgb=(135, 85, 65), irregular=0.05, texture=0.10, radius=(0.12, 0.20), accent=(235, 225, 215)),
}
# Each class's look-alikes, as dermatologists confuse them: an image borrows part of a
# neighbour's look (its colour, border, texture, size), so the classes overlap as real
# ones do and no model can be perfect.
_NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "nv": ("mel", "bkl", "df"), "mel": ("nv", "bkl"), "bkl": ("nv", "mel", "akiec"), "bcc": ("akiec", "bkl", "vasc"),
    "akiec": ("bcc", "bkl"), "vasc": ("bcc", "mel"), "df": ("nv", "bkl"),
}
_LOOK_ALIKE = 0.15  # the share of images that look more like a neighbour than like their own class
# Body sites drawn with HAM10000's frequencies; sites rarer than 1 in 1,000 images are left out of a small demo.
_SITES = tuple(s for s, n in SITE_COUNTS.items() if n >= 10)
_SITE_P = np.array([SITE_COUNTS[s] for s in _SITES], float)
_CLASS_AGE = {"nv": (45, 15), "mel": (61, 14), "bkl": (64, 13), "bcc": (67, 12), "akiec": (68, 10), "vasc": (52, 20), "df": (52, 14)}
_DX_TYPE = {"nv": "follow_up", "mel": "histo", "bkl": "histo", "bcc": "histo", "akiec": "histo", "vasc": "consensus", "df": "histo"}


def demo_metadata(n_images: int = 700, seed: int = 0) -> pd.DataFrame:
    """HAM10000-shaped metadata with HAM's class shares (every class present),
    age, sex and site patterns, and one to four images per lesion."""
    rng = np.random.default_rng(seed)
    total = sum(HAM_COUNTS.values())
    rows: list[dict] = []
    lesion_no = 0
    for dx in CLASSES:
        want = max(12, round(n_images * HAM_COUNTS[dx] / total))
        made = 0
        while made < want:
            lesion_no += 1
            n = min(want - made, int(rng.choice([1, 1, 1, 2, 2, 3, 4])))
            mu, sd = _CLASS_AGE[dx]
            age = float(np.clip(round(rng.normal(mu, sd) / 5) * 5, 0, 85))
            sex = str(rng.choice(["male", "female", "unknown"], p=[0.54, 0.455, 0.005]))
            site = str(rng.choice(_SITES, p=_SITE_P / _SITE_P.sum()))
            if dx in ("bcc", "akiec") and rng.random() < 0.4:
                site = "face"
            for _ in range(n):
                rows.append(dict(lesion_id=f"DEMO_L{lesion_no:05d}", dx=dx, dx_type=_DX_TYPE[dx], age=age, sex=sex, localization=site, dataset="synthetic_demo"))
            made += n
    df = pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    df.insert(1, "image_id", [f"DEMO_{i:07d}" for i in range(len(df))])
    df.loc[rng.random(len(df)) < 0.005, "age"] = np.nan
    return df[list(COLUMNS)]


def demo_image(dx: str, rng: np.random.Generator, size: tuple[int, int] = (200, 150)) -> Image.Image:
    """Draw one lesion-like image: skin background, an irregular blob whose
    colour, border and texture depend on the class, hair and vignetting."""
    w, h = size
    style = _blended_style(dx, rng)
    skin = np.array([225, 180, 160]) * rng.uniform(0.8, 1.05) + rng.normal(0, 12, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.ones((h, w, 3)) * skin
    img += rng.normal(0, 4, (h, w, 1))
    cx, cy = w / 2 + rng.normal(0, w * 0.06), h / 2 + rng.normal(0, h * 0.06)
    r0 = rng.uniform(*style["radius"]) * min(w, h) * 1.6
    theta = np.arctan2(yy - cy, xx - cx)
    rad = np.hypot(xx - cx, (yy - cy) * rng.uniform(1.0, 1.4))
    wobble = sum(style["irregular"] * rng.uniform(0.3, 1) * np.sin(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5, 7))
    edge = r0 * (1 + wobble)
    inside = np.clip((edge - rad) / (2 + 10 * style["irregular"]), 0, 1)[..., None]
    colour = np.array(style["rgb"]) + rng.normal(0, 18, 3)
    noise = rng.normal(0, 1, (h // 6 + 1, w // 6 + 1))
    noise = np.kron(noise, np.ones((6, 6)))[:h, :w, None] * 40 * style["texture"]
    lesion = colour + noise
    if style["accent"] is not None:
        blob = np.clip(1 - np.hypot(xx - cx - rng.normal(0, r0 / 3), yy - cy - rng.normal(0, r0 / 3)) / (r0 * 0.5), 0, 1)[..., None]
        lesion = lesion * (1 - 0.7 * blob) + np.array(style["accent"]) * 0.7 * blob
    img = img * (1 - inside) + lesion * inside
    img *= 1 - 0.35 * (np.hypot((xx - w / 2) / w, (yy - h / 2) / h) ** 2)[..., None] * 2
    pic = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    for _ in range(int(rng.integers(0, 5))):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        draw.line([(x0, y0), (x0 + rng.normal(0, 60), y0 + rng.normal(0, 60))], fill=(40, 30, 25), width=1)
    return pic.filter(ImageFilter.GaussianBlur(0.6))


def _blended_style(dx: str, rng: np.random.Generator) -> dict:
    """The class's style moved part of the way towards a neighbour's: a little for most images,
    past half-way for ``_LOOK_ALIKE`` of them."""
    own, other = _DEMO_STYLE[dx], _DEMO_STYLE[str(rng.choice(_NEIGHBOURS[dx]))]
    w = rng.uniform(0.55, 0.9) if rng.random() < _LOOK_ALIKE else rng.uniform(0.0, 0.45)

    def mix(a, b):
        return tuple((1 - w) * np.asarray(a, float) + w * np.asarray(b, float))

    return dict(
        rgb=mix(own["rgb"], other["rgb"]), irregular=float(mix([own["irregular"]], [other["irregular"]])[0]),
        texture=float(mix([own["texture"]], [other["texture"]])[0]), radius=mix(own["radius"], other["radius"]),
        accent=(own if w < 0.5 else other)["accent"],
    )


def make_demo(out: str | os.PathLike = DEFAULT_DEMO, n_images: int = 700, seed: int = 0) -> Path:
    """Write the synthetic demo set (metadata + JPEGs) into ``out``. Deterministic by seed."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    meta = demo_metadata(n_images, seed)
    rng = np.random.default_rng(seed + 1)
    for image_id, dx in zip(meta["image_id"], meta["dx"]):
        demo_image(dx, rng).save(out / "images" / f"{image_id}.jpg", quality=90)
    meta.to_csv(out / METADATA_FILE, index=False)
    (out / DEMO_MARK).write_text("This folder is the SYNTHETIC demo set made by `python -m skin_lesion data demo`; it is not HAM10000.\n")
    (out / "README.md").write_text(
        "# Synthetic demo set\n\nMade by skin_lesion (`python -m skin_lesion data demo`): drawn lesion-like images with "
        "HAM10000-shaped metadata. NOT real dermatoscopy; numbers measured on it say nothing about skin cancer.\n"
    )
    log.warning("Wrote SYNTHETIC demo set: %d images in %s", len(meta), out)
    return out
