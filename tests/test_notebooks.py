"""The study end to end: every notebook headless in the smoke profile on the
session's smoke study (the 250-image demo set), and the figures report."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest

from skin_lesion.report import NOTEBOOKS_DIR, ReportError, build_report, notebooks, run_notebook

EDA = ["class_counts", "site_by_class", "age_by_class", "sex_by_class", "images_per_lesion", "dx_type_by_class", "missing_values", "sample_grid"]


@pytest.fixture(scope="module")
def report(demo_dir, smoke_runs, tmp_path_factory) -> Path:
    """The report, on the session's smoke runs: the notebooks reuse them (as a rerun of `make report` does) and evaluate them again."""
    out = tmp_path_factory.mktemp("report")
    return build_report(profile="smoke", data=str(demo_dir), out=out / "reports", runs=smoke_runs, progress=False)


def test_notebooks_are_ordered_parameterised_and_stored_clean():
    names = [p.name for p in notebooks()]
    assert names == ["01_eda.ipynb", "02_train.ipynb", "03_evaluate.ipynb", "04_explain.ipynb", "05_fairness.ipynb"]
    for path in notebooks():
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "profile" in tagged[0].source and "data" in tagged[0].source
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path.name} stored with outputs"


def test_report_holds_every_expected_figure(report, demo_dir):
    html = report.read_text()
    figures = report.parent / "figures"
    names = {p.stem for p in figures.glob("*.png")}
    pretrained = "efficientnet_lite0" if "02_efficientnet_lite0_accuracy_curve" in names else "resnet50"
    expected = [f"01_{n}" for n in EDA]
    for model in ("cnn", pretrained):
        expected += [f"02_{model}_accuracy_curve", f"02_{model}_loss_curve"]
        run = f"smoke_{model}"
        expected += [f"03_{run}_{k}" for k in ("confusion_counts", "confusion_normalised", "per_class", "roc", "reliability")]
        expected += [f"04_{run}_gradcam"] + [f"05_{run}_{m}_by_group" for m in ("balanced_accuracy", "mel_recall", "ece")]
    expected += ["03_model_comparison", "03_smoke_ensemble_confusion_counts", "03_smoke_ensemble_roc", "03_paper_ensemble_confusion_counts"]
    expected += ["03_stacked_confusion_counts", "03_stacked_roc"]
    expected += [f"05_smoke_ensemble_{m}_by_group" for m in ("balanced_accuracy", "mel_recall", "ece")]
    if pretrained == "efficientnet_lite0":  # its second resolution and its weight average, for the decision layer
        expected += ["02_efficientnet_lite0_48_accuracy_curve"]
        expected += [f"03_smoke_efficientnet_lite0_{k}_confusion_counts" for k in ("48", "average")]
    missing = [n for n in expected if n not in names]
    assert not missing, missing
    for n in expected:
        assert f"data-figure='{n}'" in html, n
        assert (figures / f"{n}.png").stat().st_size > 5000
    assert len(re.findall(r"src='data:image/png;base64,", html)) >= len(expected)  # self-contained
    synthetic = (Path(demo_dir) / "SYNTHETIC_DEMO").exists()
    assert ("synthetic-banner" in html) == synthetic


def test_decision_layer_weighs_the_backbone_runs_not_the_cnn(report, smoke_runs):
    import json

    runs = smoke_runs
    stacked = json.loads((runs / "smoke_stacked" / "metrics.json").read_text())
    weighed = {m for c in stacked["candidates"] for m in c["models"].split("+")}
    assert "smoke_cnn" not in weighed
    if (runs / "smoke_efficientnet_lite0").exists():
        assert weighed == {"smoke_efficientnet_lite0", "smoke_efficientnet_lite0/average", "smoke_efficientnet_lite0_48"}


def test_study_ensemble_is_the_mean_of_every_run_and_predicts_like_them(report, demo_dir, smoke_runs):
    import json

    import numpy as np
    import pandas as pd

    from skin_lesion.calibration import apply_temperature, decide
    from skin_lesion.inference import Predictor
    from skin_lesion.info import CLASSES
    from skin_lesion.runs import RunFolder
    from skin_lesion.study import STUDY_LOGIT_ADJUST

    runs = smoke_runs
    folder = runs / "smoke_ensemble"
    members = [m.path for m in RunFolder(folder).members()]
    assert members[-1].resolve() == (runs / "smoke_cnn").resolve()  # every run is a member, the CNN last
    if (runs / "smoke_efficientnet_lite0").exists():  # both resolutions, the weight average and the CNN
        expected = [runs / "smoke_efficientnet_lite0", runs / "smoke_efficientnet_lite0" / "average", runs / "smoke_efficientnet_lite0_48", runs / "smoke_cnn"]
        assert [m.resolve() for m in members] == [e.resolve() for e in expected]
    # its test probabilities: the members' calibrated probabilities averaged, then its own temperature
    metrics = json.loads((folder / "metrics.json").read_text())
    mine = pd.read_csv(folder / "predictions.csv")
    theirs = [pd.read_csv(m / "predictions.csv").set_index("image_id").loc[mine["image_id"], list(CLASSES)].to_numpy() for m in members]
    np.testing.assert_allclose(mine[list(CLASSES)].to_numpy(), apply_temperature(np.mean(theirs, 0), metrics["temperature"]), atol=1e-6)
    # the study's logit adjustment decides the labels (melanoma threshold first), not the probabilities
    assert metrics["logit_adjust"]["tau"] == STUDY_LOGIT_ADJUST
    offset, thr = np.array(metrics["logit_adjust"]["offset"]), metrics["mel_operating_point"]["threshold"]
    assert list(mine["pred_dx"]) == [CLASSES[i] for i in decide(mine[list(CLASSES)].to_numpy(), thr, offset)]
    # predict scores a file the same way, each member at its own input size
    image = next(p for p in sorted((Path(demo_dir) / "images").iterdir()) if p.stem == mine["image_id"].iloc[0])
    p = Predictor(folder).probs_file(image)
    singles = [Predictor(m).probs_file(image) for m in members]
    np.testing.assert_allclose(p, apply_temperature(np.mean(singles, 0)[None], metrics["temperature"])[0], atol=1e-5)
    assert p.sum() == pytest.approx(1.0, abs=1e-5)


def test_executed_notebooks_ran_every_cell(report):
    for path in sorted((report.parent / "executed").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.get("execution_count") for c in code), path.name
        assert not [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"], path.name


def test_a_failing_cell_names_the_notebook_and_cell(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise ValueError('broken on purpose')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "09_broken.ipynb"
    nbformat.write(nb, src)
    with pytest.raises(ReportError) as err:
        run_notebook(src, tmp_path / "out" / src.name, {}, progress=False)
    assert "09_broken.ipynb" in str(err.value) and "cell 2" in str(err.value) and "broken on purpose" in str(err.value)


def test_notebooks_hold_no_model_or_metric_code():
    """Notebooks narrate and call helpers: no layers, no fit loops, no sklearn metrics."""
    for path in NOTEBOOKS_DIR.glob("*.ipynb"):
        source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        for banned in ("keras.layers", "Conv2D", "model.fit(", "sklearn.metrics", "plt.subplots"):
            assert banned not in source, f"{path.name} contains {banned}"


def test_executed_notebooks_show_the_kernel_log_apart(report):
    """TensorFlow's start-up lines go to a log beside each executed notebook, not into the console or the report."""
    logs = sorted((report.parent / "executed").glob("*.kernel.log"))
    assert len(logs) == 5
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", report.read_text())  # the page's words, not its embedded figures
    for noise in ("oneDNN", "cuda", "absl::InitializeLog", "I0000"):
        assert noise not in text, noise


def test_no_dates_or_commit_hashes_in_code_or_notebook_prose():
    """The lab record keeps the history; code comments and notebooks explain the present."""
    pattern = re.compile(r"\b20\d\d-\d\d-\d\d\b|\bcommit [0-9a-f]{7}|registered before")
    package = Path(__file__).resolve().parent.parent / "skin_lesion"
    for path in [*package.rglob("*.py"), *NOTEBOOKS_DIR.glob("*.ipynb")]:
        hits = pattern.findall(path.read_text())
        assert not hits, f"{path.name}: {hits}"


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="Chromium not installed (apt-get install -y chromium; .ci/run installs it)")
def test_report_page_fits_a_1200_px_window(report):
    """The report opened in a real browser 1200 px wide does not scroll sideways (wide tables scroll in their own box)."""
    pytest.importorskip("playwright", reason="playwright not installed (make setup installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or shutil.which("chromium-browser"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(report.resolve().as_uri())
        scroll, window = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        browser.close()
    assert scroll <= window, (scroll, window)
