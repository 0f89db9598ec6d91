"""The README's library example runs as printed, on the synthetic demo set."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    """The code between the README's library-example markers."""
    block = re.search(r"<!-- library-example -->\s*```python\n(.*?)```\s*<!-- /library-example -->", README.read_text(), re.S)
    assert block, "README.md has no library example between its markers"
    return block.group(1)


def test_readme_library_example_runs(demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SKIN_LESION_DATA", str(demo_dir))
    monkeypatch.chdir(tmp_path)
    meta = pd.read_csv(demo_dir / "HAM10000_metadata.csv").head(12)
    (tmp_path / "my_images").mkdir()
    for image_id in meta["image_id"]:
        shutil.copy(demo_dir / "images" / f"{image_id}.jpg", tmp_path / "my_images")
    shutil.copy(demo_dir / "images" / f"{meta['image_id'].iloc[0]}.jpg", tmp_path / "my_images" / "lesion1.jpg")
    meta[["image_id", "dx"]].to_csv(tmp_path / "my_labels.csv", index=False)
    exec(compile(readme_example(), str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "balanced accuracy" in out and "metrics.json" in out
    assert (tmp_path / "runs" / "my_cnn" / "metrics_my_images.json").exists()
    assert len(readme_example().strip().splitlines()) <= 25
