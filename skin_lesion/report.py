"""Run the study's notebooks headless, in order, and export the figures report.

``build_report`` executes ``notebooks/0N_*.ipynb`` with papermill (passing
data folder, run folder, profile, seed and the figures folder as parameters),
keeps the executed copies in ``reports/executed/``, and writes
``reports/report.html``: one self-contained page (figures embedded as base64)
with the notebooks' narrative, outputs and a figure index. The figures
themselves are ``reports/figures/<notebook>_<name>.png``.
"""

from __future__ import annotations

import base64
import html
import logging
import time
from pathlib import Path

from skin_lesion.data import PROJECT_ROOT, resolve_data_dir
from skin_lesion.plots import SYNTHETIC_BANNER

log = logging.getLogger("skin_lesion")
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"


class ReportError(Exception):
    """A notebook failed: the message names the notebook and the cell."""


def notebooks(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The study's notebooks in order (``01_eda.ipynb`` ...)."""
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise ReportError(f"{folder}: no notebooks found")
    return found


def run_notebook(path: Path, out: Path, parameters: dict, progress: bool = True) -> Path:
    """Execute one notebook with papermill; a failing cell raises ReportError naming it."""
    import papermill as pm

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(str(path), str(out), parameters=parameters, cwd=str(path.parent), progress_bar=progress, kernel_name="python3", log_output=False)
    except pm.PapermillExecutionError as e:
        raise ReportError(f"{path.name}: cell {e.exec_count} failed: {e.ename}: {str(e.evalue)[:300]} (executed copy: {out})") from e
    return out


def build_report(profile: str = "smoke", data: str | None = None, out: str | Path = "reports", seed: int = 0, runs: str | Path = "runs", progress: bool = True) -> Path:
    """Run every notebook, then write ``out/report.html``; returns its path."""
    out = Path(out).resolve()
    root, synthetic = resolve_data_dir(data)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for old in figures.glob("*.png"):
        old.unlink()  # a figure left from an earlier run must not pass for this one
    params = dict(data=str(root), runs=str(Path(runs).resolve()), profile=profile, seed=seed, figures_dir=str(figures))
    executed, timings = [], {}
    for nb in notebooks():
        log.info("Running %s (profile %s, data %s)", nb.name, profile, "SYNTHETIC demo" if synthetic else root)
        t0 = time.time()
        executed.append(run_notebook(nb, out / "executed" / nb.name, params, progress))
        timings[nb.name] = time.time() - t0
    page = render_html(executed, figures, synthetic, profile, timings)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    log.info("Wrote %s with %d figures", path, len(list(figures.glob("*.png"))))
    return path


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
.banner{background:#c0392b;color:#fff;font-weight:bold;padding:.7em 1em;border-radius:6px;text-align:center;font-size:1.1em}
.nb{border-top:3px solid #4c72b0;margin-top:2.5em;padding-top:.5em}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;font-size:.85em}
img{max-width:100%} table{border-collapse:collapse;font-size:.85em} td,th{border:1px solid #ccc;padding:2px 6px}
.fig-index img{width:260px;margin:4px;border:1px solid #ddd} .fig-index figure{display:inline-block;margin:4px}
.input{display:none}
"""


def render_html(executed: list[Path], figures: Path, synthetic: bool, profile: str, timings: dict[str, float]) -> str:
    """One self-contained page: banner, run facts, the executed notebooks (markdown
    and outputs; code hidden) and an index of every figure file, embedded."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="basic")
    exporter.exclude_input = True
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>skin-lesion report ({profile})</title><style>{_CSS}</style></head><body>"]
    if synthetic:
        parts.append(f"<div class='banner' id='synthetic-banner'>{SYNTHETIC_BANNER}. Every number and figure below comes from drawn images.</div>")
    parts.append(f"<h1>Skin-lesion classification: the figures report</h1><p>Profile <b>{profile}</b>; generated {time.strftime('%Y-%m-%d %H:%M')}. "
                 "Every split is grouped by lesion_id; every figure was measured in this run.</p><ul>")
    for nb in executed:
        parts.append(f"<li><a href='#{nb.stem}'>{nb.stem}</a> ({timings.get(nb.name, 0):.0f} s)</li>")
    parts.append("</ul>")
    for nb in executed:
        body, _ = exporter.from_notebook_node(nbformat.read(nb, as_version=4))
        parts.append(f"<section class='nb' id='{nb.stem}' data-notebook='{html.escape(nb.name)}'>{body}</section>")
    parts.append("<section class='nb fig-index' id='figures'><h2>Figure files</h2>")
    for png in sorted(figures.glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode()
        parts.append(f"<figure><img alt='{png.stem}' data-figure='{png.stem}' src='data:image/png;base64,{data}'><figcaption>{png.name}</figcaption></figure>")
    parts.append("</section></body></html>")
    return "\n".join(parts)
