"""Dataset facts in one table (MedMNIST's ``info.py`` idea) and the error base.

Everything here is a constant about HAM10000 or the project's folders, so any
module can import it without pulling in pandas, Keras or TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
CLASS_DESCRIPTIONS: dict[str, str] = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}
MEL = CLASSES.index("mel")
# Images per class in HAM10000 (the demo set copies these shares).
HAM_COUNTS: dict[str, int] = {"akiec": 327, "bcc": 514, "bkl": 1099, "df": 115, "mel": 1113, "nv": 6705, "vasc": 142}
# Images per body site in HAM10000, most common first, "unknown" last.
SITE_COUNTS: dict[str, int] = {
    "back": 2192, "lower extremity": 2077, "trunk": 1404, "upper extremity": 1118, "abdomen": 1022, "face": 745, "chest": 407, "foot": 319,
    "neck": 168, "scalp": 128, "hand": 90, "ear": 56, "genital": 48, "acral": 7, "unknown": 234,
}
# The known body sites, alphabetical: the metadata features encode these, any other value as no site.
SITES: tuple[str, ...] = tuple(sorted(s for s in SITE_COUNTS if s != "unknown"))
# Age bands of the fairness tables: lower edges in years, and their labels in order.
AGE_EDGES: tuple[int, ...] = (0, 30, 45, 60, 75, 120)
AGE_BANDS: tuple[str, ...] = ("<30", "30-44", "45-59", "60-74", "75+", "unknown")

METADATA_FILE = "HAM10000_metadata.csv"
COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization", "dataset")
REQUIRED_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx")
IMAGE_FOLDERS: tuple[str, ...] = ("images", "HAM10000_images_part_1", "HAM10000_images_part_2")
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")
# ISIC challenge one-hot label columns, in the challenge's order.
ISIC_COLUMNS: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
DEMO_MARK = "SYNTHETIC_DEMO"  # a file in the demo folder that marks it as synthetic
SYNTHETIC_LABEL = "SYNTHETIC DEMO DATA (not HAM10000)"
DISCLAIMER = "Research tool, not a diagnosis: see a dermatologist about any lesion that worries you."

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = PROJECT_ROOT / "data" / "ham10000"
DEFAULT_DEMO = PROJECT_ROOT / "data" / "demo"


class UserError(Exception):
    """Something the user can fix (a file, an option): the CLI prints the message as one line and exits 2."""


class DataError(UserError):
    """A problem with the user's data or options: the message names the file and the fix."""


class ImageError(UserError):
    """An input file that is not a readable image: the message names it."""
