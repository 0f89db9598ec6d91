"""Figures readable at a glance: no text on text, no legend on data, counts that
match the panel's metric, age bands in order; and a report page that keeps
wide tables and long lines inside a 1200 px window.

Every figure is drawn (Agg) from realistic synthetic inputs and measured in
window pixels, so a layout change that makes labels collide fails here.
"""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.transforms import Bbox

from skin_lesion import plots
from skin_lesion.info import CLASSES

MODELS = ["smoke_cnn", "smoke_efficientnet_lite0_average", "smoke_efficientnet_lite0_max", "smoke_resnet50_average", "smoke_ensemble", "paper_ensemble", "stacked"]
# Body sites with HAM10000-like image counts and melanomas per site in a test split.
SITES = {"back": (330, 40), "lower extremity": (310, 38), "trunk": (210, 20), "upper extremity": (170, 18), "abdomen": (150, 9), "face": (110, 12),
         "chest": (60, 6), "foot": (48, 3), "neck": (25, 4), "scalp": (19, 2), "hand": (14, 1), "ear": (9, 1), "genital": (7, 0), "acral": (4, 0), "unknown": (35, 3)}


# --------------------------------------------------------------------------- inputs


def model_results() -> dict[str, dict]:
    """Headline metrics of seven models, one without a melanoma recall (None)."""
    rng = np.random.default_rng(0)
    results = {}
    for name in MODELS:
        results[name] = {k: float(rng.uniform(0.55, 0.97)) for k in plots.HEADLINE_METRICS}
    results["smoke_cnn"]["accuracy"] = 1.0  # the longest possible bar, whose label must still fit its panel
    results["stacked"]["mel_recall"] = None
    return results


def subgroup_table() -> pd.DataFrame:
    """A subgroup table like evaluate.subgroup_table's: age bands in groupby's string
    order (not the natural one), groups with 0-2 melanomas whose recall is 1.0 or
    missing with a NaN or zero-width interval, and a tiny site with a degenerate one."""
    rng = np.random.default_rng(1)
    spec = [("sex", "female", 460, 50), ("sex", "male", 540, 70), ("sex", "unknown", 12, 1)]
    spec += [("age_band", g, n, m) for g, n, m in (("30-44", 150, 12), ("45-59", 300, 35), ("60-74", 280, 45), ("75+", 120, 25), ("<30", 90, 2), ("unknown", 10, 0))]
    spec += [("localization", site, n, m) for site, (n, m) in sorted(SITES.items())]
    rows = []
    for by, group, n, mel in spec:
        row = {"by": by, "group": group, "n": n, "melanomas": mel}
        for metric, centre in (("balanced_accuracy", 0.7), ("mel_recall", 0.65), ("ece", 0.06)):
            value = float(np.clip(rng.normal(centre, 0.08), 0.01, 1))
            half = 1.4 / np.sqrt(n) * (0.1 if metric == "ece" else 0.5)
            row.update({metric: value, f"{metric}_lo": max(value - half, 0), f"{metric}_hi": min(value + half, 1)})
        if mel == 0:
            row.update(mel_recall=np.nan, mel_recall_lo=np.nan, mel_recall_hi=np.nan)
        elif mel == 1:
            row.update(mel_recall=1.0, mel_recall_lo=np.nan, mel_recall_hi=np.nan)
        elif mel == 2:
            row.update(mel_recall=1.0, mel_recall_lo=1.0, mel_recall_hi=1.0)
        if n < 5:
            row.update(balanced_accuracy=1.0, balanced_accuracy_lo=1.0, balanced_accuracy_hi=1.0)
        rows.append(row)
    return pd.DataFrame(rows)


def metadata(n: int = 3000) -> pd.DataFrame:
    """HAM10000-shaped metadata: class shares, sites, ages (some missing), sexes, lesions."""
    rng = np.random.default_rng(2)
    shares = np.array([327, 514, 1099, 115, 1113, 6705, 142], float)
    sites = list(SITES)
    weights = np.array([n for n, _ in SITES.values()], float)
    return pd.DataFrame({
        "lesion_id": [f"HAM_{i // 2:07d}" if i % 3 else f"HAM_{i:07d}x" for i in range(n)],
        "image_id": [f"ISIC_{i:07d}" for i in range(n)],
        "dx": rng.choice(CLASSES, n, p=shares / shares.sum()),
        "dx_type": rng.choice(["histo", "follow_up", "consensus", "confocal"], n, p=[0.53, 0.37, 0.09, 0.01]),
        "age": np.where(rng.random(n) < 0.01, np.nan, rng.integers(1, 18, n) * 5.0),
        "sex": rng.choice(["male", "female", "unknown"], n, p=[0.54, 0.455, 0.005]),
        "localization": rng.choice(sites, n, p=weights / weights.sum()),
    })


def predictions(n: int = 1500) -> pd.DataFrame:
    """A predictions table (dx and one probability column per class) from a middling model
    that scores one rare class worse than chance, as a smoke run can: its ROC curve
    runs below the diagonal, through the lower right."""
    rng = np.random.default_rng(3)
    meta = metadata(n)
    y = np.array([CLASSES.index(d) for d in meta["dx"]])
    logits = rng.normal(0, 1, (n, len(CLASSES)))
    logits[np.arange(n), y] += rng.uniform(0, 3.5, n)
    df = CLASSES.index("df")
    logits[y == df, df] -= 4.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return pd.concat([meta[["dx"]], pd.DataFrame(probs, columns=list(CLASSES))], axis=1)


def per_class_metrics() -> dict:
    """A metrics dict with per-class precision, recall, specificity and F1."""
    rng = np.random.default_rng(4)
    return {"per_class": {c: {k: float(rng.uniform(0.3, 1.0)) for k in ("precision", "recall", "specificity", "f1")} for c in CLASSES}}


def history(epochs: int = 12) -> pd.DataFrame:
    """A Keras history table whose curves reach every corner of the axes: training rises
    (accuracy) or falls (loss) steadily, validation jumps about as on a small split."""
    t = np.linspace(0, 1, epochs)
    jump = np.resize([0.3, -0.3], epochs)
    return pd.DataFrame({"accuracy": 0.3 + 0.65 * t, "val_accuracy": np.clip(0.55 + jump * (1 - t), 0, 1), "val_balanced_accuracy": np.clip(0.5 - jump * (1 - 0.5 * t), 0, 1),
                         "loss": 1.9 - 1.6 * t, "val_loss": 1.0 + jump * 2 * (1 - 0.5 * t)})


# --------------------------------------------------------------------------- measuring a drawn figure


def _shown(t) -> bool:
    return t is not None and t.get_visible() and bool(t.get_text().strip())


def texts(fig: Figure) -> list[tuple[str, Bbox]]:
    """Every visible text of the drawn figure with its window extent: figure texts
    (banner, suptitle), and per axes its titles, axis labels, the tick labels of
    ticks inside the view, value labels and legend texts."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found: list[tuple[str, Bbox]] = []
    seen: set[int] = set()

    def add(t, where: str) -> None:
        if _shown(t) and id(t) not in seen:  # the suptitle is also among the figure's texts
            seen.add(id(t))
            found.append((f"{where} {t.get_text()!r}", t.get_window_extent(renderer)))

    for t in [*fig.texts, getattr(fig, "_suptitle", None)]:
        add(t, "figure")
    for i, ax in enumerate(fig.axes):
        for t in (ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts):
            add(t, f"axes {i}")
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            span = (hi - lo) * 1e-6
            for tick in axis.get_major_ticks():
                if lo - span <= tick.get_loc() <= hi + span:
                    add(tick.label1, f"axes {i} tick")
                    add(tick.label2, f"axes {i} tick")
        if ax.get_legend():
            for t in [ax.get_legend().get_title(), *ax.get_legend().get_texts()]:
                add(t, f"axes {i} legend")
    return found


def overlapping_texts(fig: Figure) -> list[str]:
    """Pairs of texts whose extents share more than a pixel each way."""
    found = texts(fig)
    clashes = []
    for i, (a, box_a) in enumerate(found):
        for b, box_b in found[i + 1:]:
            if min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0) > 1 and min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0) > 1:
                clashes.append(f"{a} / {b}")
    return clashes


def data_points(fig: Figure) -> tuple[list[Bbox], np.ndarray]:
    """The drawn data of every axes in window pixels: bar rectangles, and points
    along every line (densified, so a segment that crosses a box counts), marker
    and collection offsets, and error-bar segments."""
    renderer = fig.canvas.get_renderer()
    bars = [p.get_window_extent(renderer) for ax in fig.axes for p in ax.patches
            if isinstance(p, Rectangle) and p.get_visible() and p.get_width() * p.get_height() != 0]
    points = [np.empty((0, 2))]
    for ax in fig.axes:
        for line in ax.lines:
            xy = np.asarray(line.get_xydata(), float)
            xy = xy[np.isfinite(xy).all(1)]
            if len(xy) > 1 and line.get_linestyle() not in ("None", "", " "):
                xy = np.concatenate([np.linspace(a, b, 25) for a, b in zip(xy[:-1], xy[1:])])
            if len(xy):
                points.append(line.get_transform().transform(xy))
        for coll in ax.collections:
            if hasattr(coll, "get_segments"):
                for seg in coll.get_segments():
                    if len(seg) > 1:
                        points.append(coll.get_transform().transform(np.concatenate([np.linspace(a, b, 25) for a, b in zip(seg[:-1], seg[1:])])))
            if isinstance(coll, PathCollection) and len(coll.get_offsets()):
                points.append(coll.get_offset_transform().transform(np.asarray(coll.get_offsets(), float)))
    return bars, np.concatenate(points)


def legend_on_data(fig: Figure) -> list[str]:
    """Legends whose box covers a bar or a drawn point (markers count with a few pixels' radius)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bars, points = data_points(fig)
    problems = []
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent(renderer)
        if any(box.overlaps(bar) and min(box.x1, bar.x1) - max(box.x0, bar.x0) > 1 and min(box.y1, bar.y1) - max(box.y0, bar.y0) > 1 for bar in bars):
            problems.append(f"legend {[t.get_text() for t in legend.get_texts()]} covers a bar")
        pad = 3
        inside = (points[:, 0] > box.x0 - pad) & (points[:, 0] < box.x1 + pad) & (points[:, 1] > box.y0 - pad) & (points[:, 1] < box.y1 + pad)
        if inside.any():
            problems.append(f"legend {[t.get_text() for t in legend.get_texts()]} covers {inside.sum()} data point(s)")
    return problems


def assert_readable(fig: Figure) -> None:
    """No text on text and no legend on data."""
    assert overlapping_texts(fig) == []
    assert legend_on_data(fig) == []


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --------------------------------------------------------------------------- the measuring itself


def test_the_checks_catch_what_they_look_for():
    """The old grouped bars with bar_label values and an in-axes legend fail both checks,
    so a pass below means the layout, not a blind check."""
    table = pd.DataFrame({n: {k: v or 0.0 for k, v in m.items()} for n, m in model_results().items()})
    fig, ax = plt.subplots(figsize=(8, 4))
    table.plot.bar(ax=ax, rot=0, width=0.8)
    for cont in ax.containers:
        ax.bar_label(cont, fmt="%.2f", fontsize=7)
    ax.set(ylim=(0, 1.1))
    assert overlapping_texts(fig)
    assert legend_on_data(fig)


# --------------------------------------------------------------------------- model comparison


def test_model_comparison_reads_at_a_glance_with_seven_models():
    results = model_results()
    fig = plots.model_comparison(results, synthetic=True)
    assert_readable(fig)
    panels = fig.axes
    assert len(panels) == len(plots.HEADLINE_METRICS)
    assert all(ax.get_legend() is None for ax in panels)
    assert [t.get_text() for t in panels[0].get_yticklabels()] == MODELS  # one shared order, first model on top
    bottom, top = panels[0].get_ylim()
    assert bottom > top
    renderer = fig.canvas.get_renderer()
    for ax, key in zip(panels, plots.HEADLINE_METRICS):
        values = [results[m][key] for m in MODELS]
        labels = [t.get_text() for t in ax.texts]
        assert labels == [f"{v:.3f}" if v is not None else "n/a" for v in values]  # one label per bar, a missing value says so
        assert len([p for p in ax.patches if p.get_width() > 0]) == sum(v is not None for v in values)  # no zero bar stands for n/a
        inside = ax.get_window_extent(renderer)
        assert all(t.get_window_extent(renderer).x1 <= inside.x1 for t in ax.texts), f"{key}: a value label runs into the next panel"
    assert any(t.get_text() == plots.SYNTHETIC_BANNER for t in fig.texts)


def test_model_comparison_without_the_banner_for_real_data():
    fig = plots.model_comparison(model_results(), synthetic=False)
    assert_readable(fig)
    assert not any(t.get_text() == plots.SYNTHETIC_BANNER for t in fig.texts)


# --------------------------------------------------------------------------- subgroups


def panel(fig: Figure, title: str):
    """The subgroup panel titled ``title``."""
    return next(ax for ax in fig.axes if ax.get_title(loc="left") == title)


def ticks(ax) -> list[str]:
    return [t.get_text() for t in ax.get_yticklabels()]


@pytest.mark.parametrize("metric", ["balanced_accuracy", "mel_recall", "ece"])
def test_subgroup_plot_is_readable(metric):
    fig = plots.subgroup_plot(subgroup_table(), metric, synthetic=True, title=f"smoke_ensemble: {metric.replace('_', ' ')} by group (95% CI)")
    assert_readable(fig)
    assert fig.axes[0].get_legend() is not None


@pytest.mark.parametrize("metric", ["balanced_accuracy", "mel_recall", "ece"])
def test_subgroup_age_bands_in_natural_order(metric):
    fig = plots.subgroup_plot(subgroup_table(), metric)
    groups = [label.split(" (")[0] for label in ticks(panel(fig, "age band"))]
    assert groups == ["<30", "30-44", "45-59", "60-74", "75+", "unknown"]


def test_subgroup_other_groupings_largest_first_unknown_last():
    fig = plots.subgroup_plot(subgroup_table(), "balanced_accuracy")
    sites = [label.split(" (")[0] for label in ticks(panel(fig, "body site"))]
    expected = sorted((s for s in SITES if s != "unknown"), key=lambda s: -SITES[s][0]) + ["unknown"]
    assert sites == expected
    assert [label.split(" (")[0] for label in ticks(panel(fig, "sex"))] == ["male", "female", "unknown"]


def test_subgroup_counts_match_the_metric():
    """Melanoma recall quotes each group's melanomas; the other metrics its images."""
    table = subgroup_table()
    sites = table[table["by"] == "localization"].set_index("group")
    for metric, column, prefix in (("mel_recall", "melanomas", "mel n="), ("balanced_accuracy", "n", "n=")):
        fig = plots.subgroup_plot(table, metric)
        for label in ticks(panel(fig, "body site")):
            group, count = re.fullmatch(r"(.+) \((mel n=|n=)(\d+)\).*", label).group(1, 3)
            assert label.startswith(f"{group} ({prefix}")
            assert int(count) == sites.loc[group, column], label
        plt.close(fig)


def markers_by_row(ax) -> dict[int, tuple]:
    """Row -> (face colour, edge colour) of the point drawn on that row."""
    found = {}
    for line in ax.lines:
        if line.get_marker() == "o" and len(line.get_ydata()) == 1:
            found[int(round(line.get_ydata()[0]))] = (matplotlib.colors.to_rgba(line.get_markerfacecolor()), matplotlib.colors.to_rgba(line.get_markeredgecolor()))
    return found


def test_subgroup_small_groups_are_not_drawn_as_certain():
    """One or two melanomas (recall 1.0, interval NaN or zero wide) and groups under five
    melanomas get a hollow point and a label that says why; a group with none gets no point."""
    fig = plots.subgroup_plot(subgroup_table(), "mel_recall")
    ax = panel(fig, "body site")
    labels = ticks(ax)
    points = markers_by_row(ax)
    white = matplotlib.colors.to_rgba("white")
    for row, label in enumerate(labels):
        mel = int(re.search(r"mel n=(\d+)", label).group(1))
        if mel == 0:
            assert row not in points and "no melanomas" in label
        elif mel <= 2:
            assert points[row][0] == white and "too few to bound" in label, label
        elif mel < plots.MIN_MELANOMAS:
            assert points[row][0] == white and f"under {plots.MIN_MELANOMAS} melanomas" in label, label
        else:
            assert points[row][0] != white and ":" not in label, label
    # a degenerate interval on the other metrics too (a site of 4 images scoring 1.0 +- 0)
    fig = plots.subgroup_plot(subgroup_table(), "balanced_accuracy")
    ax = panel(fig, "body site")
    row = next(i for i, label in enumerate(ticks(ax)) if label.startswith("acral"))
    assert "too few to bound" in ticks(ax)[row] and markers_by_row(ax)[row][0] == white


# --------------------------------------------------------------------------- every other figure


FIGURES = {
    "class_counts": lambda: plots.class_counts(metadata(), synthetic=True),
    "site_by_class": lambda: plots.site_by_class(metadata(), synthetic=True),
    "age_by_class": lambda: plots.age_by_class(metadata(), synthetic=True),
    "sex_by_class": lambda: plots.sex_by_class(metadata(), synthetic=True),
    "images_per_lesion": lambda: plots.images_per_lesion(metadata(), synthetic=True),
    "dx_type_by_class": lambda: plots.dx_type_by_class(metadata(), synthetic=True),
    "missing_values": lambda: plots.missing_values(metadata(), synthetic=True),
    "training_accuracy": lambda: plots.training_curves(history(), "accuracy", synthetic=True, title="smoke_efficientnet_lite0_average: accuracy"),
    "training_loss": lambda: plots.training_curves(history(), "loss", synthetic=False),
    "confusion": lambda: plots.confusion(np.random.default_rng(5).integers(0, 300, (7, 7)), True, synthetic=True),
    "per_class_bars": lambda: plots.per_class_bars(per_class_metrics(), synthetic=True, title="smoke_ensemble: per-class metrics"),
    "roc_curves": lambda: plots.roc_curves(predictions(), synthetic=True),
    "reliability_diagram": lambda: plots.reliability_diagram(predictions(), synthetic=True),
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_every_figure_is_readable(name):
    assert_readable(FIGURES[name]())


def test_reliability_counts_stay_clear_of_the_legend_at_full_accuracy():
    """A bin at accuracy 1.0 writes its count above the bar; it must not reach the legend."""
    pred = predictions()
    probs = pred[list(CLASSES)].to_numpy()
    sure = probs.max(1) > 0.9
    pred.loc[sure, "dx"] = np.array(CLASSES)[probs[sure].argmax(1)]
    assert_readable(plots.reliability_diagram(pred, synthetic=True))


# --------------------------------------------------------------------------- the report page


def css_rules(css: str) -> list[tuple[str, dict[str, str]]]:
    """(selector, declarations) of each rule of a flat style sheet."""
    rules = []
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", css):
        declarations = dict((k.strip(), v.strip()) for k, v in (d.split(":", 1) for d in body.split(";") if ":" in d))
        rules += [(s.strip(), declarations) for s in selectors.split(",")]
    return rules


def styled(soup, rules, element, prop: str, values: tuple[str, ...]) -> bool:
    """Whether a rule matching ``element`` sets ``prop`` to one of ``values``."""
    return any(decl.get(prop) in values and element in soup.select(sel) for sel, decl in rules if prop in decl)


def scrolls_in_place(soup, rules, element) -> bool:
    """Whether ``element`` or an ancestor inside its section is a box of at most the
    page's width that scrolls sideways on its own."""
    for node in [element, *element.parents]:
        if node.name in ("section", "body", "[document]"):
            return False
        if styled(soup, rules, node, "overflow-x", ("auto", "scroll")) or styled(soup, rules, node, "overflow", ("auto", "scroll")):
            return node.name != "table" or styled(soup, rules, node, "display", ("block",))
    return False


def test_report_page_stays_within_a_1200px_window(tmp_path):
    """A notebook with a wide DataFrame, a long printed line, a long path and a figure,
    rendered as the report renders it: each wide thing scrolls in its own box,
    images shrink, long words wrap, and the page itself is narrower than 1200 px."""
    nbformat = pytest.importorskip("nbformat")
    bs4 = pytest.importorskip("bs4")
    from nbformat import v4

    from skin_lesion.report import _CSS, render_html

    wide = pd.DataFrame(np.random.default_rng(6).random((3, 40)), columns=[f"balanced_accuracy_hi_{i}" for i in range(40)])
    png = tmp_path / "figures" / "03_model_comparison.png"
    png.parent.mkdir()
    fig = plots.model_comparison(model_results())
    fig.savefig(png, dpi=60)
    nb = v4.new_notebook(cells=[
        v4.new_markdown_cell("# Wide things\n\nRuns live in /work/main/runs/" + "smoke_efficientnet_lite0_average_seed0_" * 8 + "predictions.csv"),
        v4.new_code_cell("wide", execution_count=1, outputs=[v4.new_output("execute_result", execution_count=1, data={"text/html": wide._repr_html_(), "text/plain": "wide"})]),
        v4.new_code_cell("print(x)", outputs=[v4.new_output("stream", name="stdout", text="epoch 1/12 " + "loss 0.1234 - " * 60 + "\n")]),
    ])
    path = tmp_path / "executed" / "01_wide.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    page = render_html([path], png.parent, synthetic=True, profile="smoke", timings={path.name: 1.0})
    soup = bs4.BeautifulSoup(page, "html.parser")
    rules = css_rules(_CSS)

    table = soup.select_one("section.nb table.dataframe")
    assert table is not None and scrolls_in_place(soup, rules, table), "a wide DataFrame would widen the page"
    html_output = table.find_parent(class_=re.compile(r"output_html|jp-RenderedHTMLCommon"))
    assert html_output is not None and styled(soup, rules, html_output, "overflow-x", ("auto", "scroll")), "nbconvert's HTML output box must scroll in place"
    pre = soup.select_one("section.nb pre")
    assert pre is not None and scrolls_in_place(soup, rules, pre), "a long printed line would widen the page"
    for img in soup.select("img"):
        assert styled(soup, rules, img, "max-width", ("100%",)), "an image wider than the page would widen it"
    words = soup.find(string=re.compile("predictions.csv")).parent
    assert any(styled(soup, rules, node, "overflow-wrap", ("anywhere", "break-word")) for node in [words, *words.parents] if node.name), "a long path would widen the page"
    body = dict(css_rules(_CSS))["body"]
    width = int(re.match(r"(\d+)px", body["max-width"]).group(1))
    assert width + 2 * 16 + 20 <= 1200, "the page's column (with padding and a scrollbar) must fit 1200 px"
