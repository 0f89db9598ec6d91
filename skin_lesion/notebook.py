"""The notebooks' shared setup: parameters in, logging on, data loaded, figures saved.

Every notebook starts with the same cell (``study = notebook.setup(data, figures_dir)``),
so the notebooks teach the method and leave plumbing here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from skin_lesion.data import Dataset, load_dataset


@dataclass
class NotebookContext:
    """What a notebook works with: the dataset, whether it is synthetic, and where figures go."""

    ds: Dataset
    figures_dir: Path | None

    @property
    def meta(self) -> pd.DataFrame:
        return self.ds.meta

    @property
    def synthetic(self) -> bool:
        return self.ds.synthetic

    def save(self, fig, name: str) -> None:
        """Save a figure as ``figures_dir/name.png`` for the report (nothing without a folder); the notebook shows it anyway."""
        from skin_lesion.plots import save_figure

        save_figure(fig, name, self.figures_dir)


def setup(data: str | os.PathLike | None = None, figures_dir: str | os.PathLike | None = None) -> NotebookContext:
    """Log to the notebook, load the dataset (real HAM10000, else the synthetic demo set) and say which it is."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    ds = load_dataset(data)
    print("Data:", ds.label, "|", len(ds.meta), "images,", ds.meta["lesion_id"].nunique(), "lesions")
    return NotebookContext(ds, Path(figures_dir) if figures_dir else None)
