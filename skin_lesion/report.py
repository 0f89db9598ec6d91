"""Run the study's notebooks headless, in order, and export the figures report.

``build_report`` executes ``notebooks/0N_*.ipynb`` (papermill injects the
data folder, run folder, profile, seed and figures folder as parameters;
nbclient runs the cells), keeps the executed copies in ``reports/executed/``,
and writes ``reports/report.html``: one self-contained page (figures embedded
as base64) with the notebooks' narrative, outputs and a figure index. The
figures themselves are ``reports/figures/NN_<name>.png``.

While it runs, it prints which notebook and cell it is in and, during
training, each run's epoch lines with the time spent and an estimate of what
is left; TensorFlow's own log stays quiet.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import re
import time
from pathlib import Path

from skin_lesion.data import resolve_data_dir
from skin_lesion.info import PROJECT_ROOT, UserError
from skin_lesion.plots import SYNTHETIC_BANNER

log = logging.getLogger("skin_lesion")
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
# Lines of a kernel's log that a person follows: each epoch's progress line, and a run reused as it is.
PROGRESS_LINE = re.compile(r"run \S+: epoch \d+/\d+|Run \S+ is complete")


class ReportError(UserError):
    """A notebook failed: the message names the notebook and the cell."""


def notebooks(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The study's notebooks in order (``01_eda.ipynb`` ...)."""
    found = sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise ReportError(f"{folder}: no notebooks found")
    return found


def _progress_client(nb, path: Path, progress: bool):
    """An nbclient executor that prints the cell it starts and the kernel's progress lines."""
    from nbclient import NotebookClient

    code = [c for c in nb.cells if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]

    class ProgressClient(NotebookClient):
        def output(self, outs, msg, display_id, cell_index):
            if progress and msg.get("msg_type") == "stream":
                for line in msg["content"].get("text", "").splitlines():
                    if PROGRESS_LINE.search(line):
                        print(f"    {line.strip()}", flush=True)
            return super().output(outs, msg, display_id, cell_index)

    def on_cell_start(cell, cell_index):
        if progress and cell in code:
            first = next((line for line in cell.source.splitlines() if line.strip() and not line.startswith("#")), "")
            print(f"[{path.stem}] cell {code.index(cell) + 1}/{len(code)}: {first[:90]}", flush=True)

    quiet = logging.getLogger("skin_lesion.kernel")  # nbclient's own "Executing notebook" chatter
    quiet.setLevel(logging.WARNING)
    client = ProgressClient(nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}, on_cell_start=on_cell_start, log=quiet)
    return client, code


def run_notebook(path: Path, out: Path, parameters: dict, progress: bool = True) -> Path:
    """Execute one notebook with ``parameters`` injected; a failing cell raises ReportError naming
    the notebook and the cell (counted among the notebook's own code cells)."""
    import nbformat
    from nbclient.exceptions import CellExecutionError
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    out.parent.mkdir(parents=True, exist_ok=True)
    nb = load_notebook_node(str(path))  # papermill's reader: every cell gets the metadata its parameterizer expects
    if parameters:
        nb = parameterize_notebook(nb, parameters)
    client, code = _progress_client(nb, path, progress)
    previous = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    # the kernel inherits it: TensorFlow's C++ log (CUDA probes on a CPU machine, oneDNN notes) stays quiet; errors still raise
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    kernel_log = out.with_suffix(".kernel.log")
    try:
        # The kernel process's own stderr (TensorFlow's C++ start-up lines, Jupyter's transport note) goes to a
        # log beside the executed notebook; cell output and errors travel by Jupyter messages and are kept.
        with kernel_log.open("w") as stderr:
            client.execute(stderr=stderr)
    except CellExecutionError as e:
        failed = next((i for i, c in enumerate(code, 1) if any(o.get("output_type") == "error" for o in c.get("outputs", []))), "?")
        nbformat.write(nb, out)
        raise ReportError(f"{path.name}: cell {failed} failed: {e.ename}: {str(e.evalue)[:300]} (executed copy: {out})") from e
    finally:
        if previous is None:
            os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
        else:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = previous
    nbformat.write(nb, out)
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
        log.info("%s done in %.0f s", nb.name, timings[nb.name])
    page = render_html(executed, figures, synthetic, profile, timings)
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    log.info("Wrote %s with %d figures", path, len(list(figures.glob("*.png"))))
    return path


# The page must not scroll sideways in a 1200 px window: the column is 1100 px, and
# whatever can be wider (a DataFrame, a printed line, an image, a long path) shrinks,
# wraps, or scrolls inside its own box. nbconvert's basic template puts rich output in
# div.output_html (classic) or .jp-RenderedHTMLCommon (lab), printed text in pre.
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;overflow-wrap:anywhere}
.banner{background:#c0392b;color:#fff;font-weight:bold;padding:.7em 1em;border-radius:6px;text-align:center;font-size:1.1em}
.nb{border-top:3px solid #4c72b0;margin-top:2.5em;padding-top:.5em}
.nb,.output_area,.output_subarea{min-width:0;max-width:100%}
.output_html,.jp-RenderedHTMLCommon,.jp-OutputArea-output{max-width:100%;overflow-x:auto}
pre{background:#f6f8fa;padding:.6em;max-width:100%;overflow-x:auto;font-size:.85em;overflow-wrap:normal}
img{max-width:100%;height:auto}
table{border-collapse:collapse;font-size:.85em} td,th{border:1px solid #ccc;padding:2px 6px;overflow-wrap:normal}
.nb table{display:block;width:max-content;max-width:100%;overflow-x:auto}
.fig-index img{width:260px;margin:4px;border:1px solid #ddd} .fig-index figure{display:inline-block;margin:4px;max-width:100%}
.input{display:none}
"""


def render_html(executed: list[Path], figures: Path, synthetic: bool, profile: str, timings: dict[str, float]) -> str:
    """One self-contained page: banner, run facts, the executed notebooks (markdown
    and outputs; code hidden) and an index of every figure file, embedded."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="basic")
    exporter.log.setLevel(logging.ERROR)  # its per-notebook note on images without alt text: the figure index below names every figure
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
