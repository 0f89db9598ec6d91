"""Metrics, calibration, operating point and subgroup tables on known inputs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from skin_lesion.calibration import apply_temperature, decide, fit_temperature, mel_threshold
from skin_lesion.data import label_ids, metadata_features, read_labels
from skin_lesion.ensemble import mean_runs
from skin_lesion.evaluate import prediction_table
from skin_lesion.info import CLASSES, MEL, DataError
from skin_lesion.metrics import age_band, binary_auc, classification_metrics, expected_calibration_error, lesion_bootstrap, subgroup_table
from skin_lesion.runs import RunFolder, training_minutes
from skin_lesion.stacking import fit_decision_layer, score_decision_layer
from skin_lesion.study import logit_adjust_scan


def _onehot(pred: np.ndarray, conf: float = 0.9) -> np.ndarray:
    p = np.full((len(pred), len(CLASSES)), (1 - conf) / (len(CLASSES) - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def test_metrics_match_hand_counts():
    y = np.array([0, 0, 1, 1, 4, 4, 4, 5, 5, 5])
    pred = np.array([0, 1, 1, 1, 4, 5, 4, 5, 5, 4])
    m = classification_metrics(y, _onehot(pred))
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["balanced_accuracy"] == pytest.approx(np.mean([0.5, 1.0, 2 / 3, 2 / 3]))
    mel = m["per_class"]["mel"]
    assert mel["recall"] == pytest.approx(2 / 3) and mel["precision"] == pytest.approx(2 / 3)
    assert mel["specificity"] == pytest.approx(6 / 7)  # 7 non-mel, one called mel
    assert np.array(m["confusion_matrix"]).sum() == 10 and m["confusion_matrix"][4][5] == 1


def test_auc_is_scikit_learns_with_ties_and_none_for_one_kind():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for n, levels in ((50, 5), (400, 1000), (2000, 3)):  # few distinct scores: many ties
        positive = rng.random(n) < 0.2
        score = np.round(rng.random(n) + 0.3 * positive, 3) if levels == 1000 else rng.integers(0, levels, n).astype(float)
        assert binary_auc(positive, score) == pytest.approx(roc_auc_score(positive, score), abs=1e-12)
    assert binary_auc(np.array([True, True]), np.array([0.1, 0.9])) is None
    assert binary_auc(np.array([False, True]), np.array([0.1, 0.9])) == 1.0
    assert binary_auc([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.2]) == 1.0  # a 0/1 list is a mask, not positions
    with pytest.raises(ValueError, match="NaN"):
        binary_auc(np.array([False, True]), np.array([0.1, np.nan]))


def test_ece_zero_when_confidence_equals_accuracy_and_temperature_fixes_overconfidence():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 4000)
    right = rng.random(4000) < 0.6
    pred = np.where(right, y, (y + 1) % 7)
    calibrated = _onehot(pred, 0.6)
    assert expected_calibration_error(calibrated, y) < 0.03
    over = _onehot(pred, 0.99)
    t = fit_temperature(over, y)
    assert t > 1.5
    assert expected_calibration_error(apply_temperature(over, t), y) < expected_calibration_error(over, y) / 3


def test_melanoma_threshold_reaches_target_recall_on_its_data():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 7, 2000)
    probs = rng.dirichlet(np.ones(7), 2000)
    probs[y == MEL, MEL] += 0.3
    probs /= probs.sum(1, keepdims=True)
    t = mel_threshold(probs, y, 0.8)
    by_threshold = (probs[y == MEL, MEL] >= t).mean()
    assert 0.8 <= by_threshold < 0.81  # the highest threshold that reaches the target
    assert (decide(probs, t)[y == MEL] == MEL).mean() >= by_threshold  # argmax can only add melanoma calls


def test_confident_threshold_leaves_a_margin_that_grows_with_fewer_melanomas_and_clustered_lesions():
    rng = np.random.default_rng(3)

    def rows(n_mel: int, copies: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n_mel melanomas and 4x as many others; each lesion photographed ``copies`` times."""
        y = np.r_[np.full(n_mel, MEL), rng.choice([c for c in range(len(CLASSES)) if c != MEL], 4 * n_mel)]
        p_mel = np.clip(np.where(y == MEL, rng.normal(0.6, 0.2, len(y)), rng.normal(0.25, 0.15, len(y))), 0.001, 0.999)
        probs = np.column_stack([np.full(len(y), 1.0)] * len(CLASSES))
        probs[:, MEL] = p_mel * (len(CLASSES) - 1) / (1 - p_mel)  # so p(mel) is p_mel after normalising
        probs /= probs.sum(1, keepdims=True)
        return np.repeat(y, copies), np.repeat(probs, copies, axis=0), np.repeat(np.arange(len(y)), copies)

    def recall(probs, y, t):
        return float((probs[y == MEL, MEL] >= t).mean())

    y, probs, groups = rows(100)
    point = mel_threshold(probs, y, 0.8)
    sure = mel_threshold(probs, y, 0.8, groups, confidence=0.95)
    assert sure < point and recall(probs, y, sure) > recall(probs, y, point) >= 0.8
    margin = recall(probs, y, sure) - recall(probs, y, point)
    y_few, probs_few, groups_few = rows(25)
    few = recall(probs_few, y_few, mel_threshold(probs_few, y_few, 0.8, groups_few, 0.95)) - recall(probs_few, y_few, mel_threshold(probs_few, y_few, 0.8))
    assert few > margin  # a quarter of the melanomas: a wider margin
    y4, probs4, groups4 = rows(25, copies=4)  # 100 melanoma images, but only 25 lesions
    as_rows = mel_threshold(probs4, y4, 0.8, np.arange(len(y4)), 0.95)
    as_lesions = mel_threshold(probs4, y4, 0.8, groups4, 0.95)
    assert recall(probs4, y4, as_lesions) > recall(probs4, y4, as_rows)
    assert mel_threshold(probs, y, 0.8, groups, confidence=None) == point


def test_subgroups_have_counts_and_intervals_that_resample_lesions():
    rng = np.random.default_rng(2)
    n = 300
    y = rng.integers(0, 7, n)
    pred = np.where(rng.random(n) < 0.7, y, (y + 1) % 7)
    rows = pd.DataFrame({"image_id": [f"I{i}" for i in range(n)], "lesion_id": [f"L{i}" for i in range(n)], "dx": [CLASSES[i] for i in y],
                         "sex": rng.choice(["male", "female"], n), "age": rng.choice([20, 50, 80, np.nan], n)})
    frame = prediction_table(rows, _onehot(pred), pred)
    frame["age_band"] = age_band(frame["age"])
    assert set(frame["age_band"]) == {"<30", "45-59", "75+", "unknown"}
    table = subgroup_table(frame, "sex")
    assert table["n"].sum() == n and set(table["group"]) == {"male", "female"} and table["melanomas"].sum() == (y == MEL).sum()
    assert (table["balanced_accuracy_lo"] <= table["balanced_accuracy"]).all() and (table["balanced_accuracy"] <= table["balanced_accuracy_hi"]).all()
    for name in ("balanced_accuracy", "mel_recall", "ece"):
        assert (table[f"{name}_lo"] < table[f"{name}_hi"]).all()
    # every image four times: as one lesion's four images the interval stays wide; as independent rows
    # (no lesion_id: the table resamples rows) it narrows, overstating what four copies show
    copies = frame.loc[frame.index.repeat(4)].reset_index(drop=True)

    def width(t: pd.DataFrame) -> np.ndarray:
        return (t["balanced_accuracy_hi"] - t["balanced_accuracy_lo"]).to_numpy()

    as_lesions, as_rows = subgroup_table(copies, "sex"), subgroup_table(copies.drop(columns="lesion_id"), "sex")
    assert list(as_lesions["n"]) == list(4 * table["n"]) and (width(as_lesions) > 1.5 * width(as_rows)).all()


def test_label_files_both_formats_and_errors(tmp_path):
    (tmp_path / "ham.csv").write_text("image_id,dx\nA,mel\nB,nv\n")
    (tmp_path / "isic.csv").write_text("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nA,1,0,0,0,0,0,0\nB,0,0,0,0,0,0,1\n")
    assert read_labels(tmp_path / "ham.csv")["dx"].tolist() == ["mel", "nv"]
    assert read_labels(tmp_path / "isic.csv")["dx"].tolist() == ["mel", "vasc"]
    (tmp_path / "bad.csv").write_text("image_id,dx\nA,mole\n")
    with pytest.raises(DataError, match="unknown dx"):
        read_labels(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="not found"):
        read_labels(tmp_path / "none.csv")
    # what a hand-edited file gets wrong: one line each, naming the file and the data row (1 = first after the header)
    for text, says in [
        ("image_id,dx\nA,mel\nB,\nC,mole\n", r"ham.csv: empty dx in data row\(s\) 2;"),
        ("image_id,dx\nA,mel\n,nv\n", r"empty image_id in data row\(s\) 2;"),
        ("image_id,dx\nA,mel\nA,nv\n", r"\['A'\] labelled more than once"),
        ("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nA,1,0,0,0,0,0,0\nB,x,0,0,0,0,0,1\n", r"must be numbers \(0 or 1\); data row\(s\) 2 hold"),
        ("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nA,1,0,0,0,0,0,0\nB,1,0,0,0,0,0,1\n", r"must sum to 1; data row\(s\) 2 do not"),
    ]:
        (tmp_path / "ham.csv").write_text(text)
        with pytest.raises(DataError, match=says):
            read_labels(tmp_path / "ham.csv")


def _stacking_frame(n: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows with a label, lesion ids (2 images each) and metadata, where body site
    carries information about the label that the image models miss."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n // 2).repeat(2)
    site = np.where(y == CLASSES.index("bkl"), "face", "back")
    frame = pd.DataFrame(
        {"image_id": [f"I{seed}_{i}" for i in range(n)], "lesion_id": [f"L{seed}_{i // 2}" for i in range(n)], "dx": [CLASSES[i] for i in y],
         "age": rng.integers(20, 80, n).astype(float), "sex": rng.choice(["male", "female"], n), "localization": site}
    )
    return frame, y


def _noisy_probs(y: np.ndarray, skill: float, seed: int, confuse: tuple[int, int] | None = None) -> np.ndarray:
    """Softmax of label evidence ``skill`` plus noise; ``confuse`` makes two classes look alike."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(len(y), len(CLASSES)))
    z[np.arange(len(y)), y] += skill
    if confuse:
        a, b = confuse
        both = np.isin(y, confuse)
        z[both, a] = z[both, b] = np.maximum(z[both, a], z[both, b])
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def test_decision_layer_keeps_what_helps_on_validation_and_scores_test():
    bkl, nv = CLASSES.index("bkl"), CLASSES.index("nv")
    val, yv = _stacking_frame(700, 0)
    test, yt = _stacking_frame(700, 1)
    # "good" separates every class but bkl from nv; "noise" knows nothing; the site does.
    probs_val = {"good": _noisy_probs(yv, 3.0, 0, (bkl, nv)), "noise": _noisy_probs(yv, 0.0, 1)}
    probs_test = {"good": _noisy_probs(yt, 3.0, 2, (bkl, nv)), "noise": _noisy_probs(yt, 0.0, 3)}
    layer = fit_decision_layer(probs_val, val)
    assert layer.metadata and "good" in layer.models
    assert {"good", "noise", "good+noise"} == {c["models"] for c in layer.candidates}
    assert len(layer.candidates) == 3 * 2 * 3
    result = score_decision_layer(layer, probs_test, test)
    alone = classification_metrics(yt, probs_test["good"])
    assert result["calibrated"]["balanced_accuracy"] > alone["balanced_accuracy"] + 0.05
    assert result["calibrated"]["per_class"]["bkl"]["recall"] > alone["per_class"]["bkl"]["recall"]
    p = layer.probs(probs_test, test)
    assert p.shape == (len(test), len(CLASSES)) and np.allclose(p.sum(1), 1)
    assert 0 < result["mel_operating_point"]["threshold"] < 1


def test_decision_layer_weighs_every_subset_of_three_models():
    val, yv = _stacking_frame(500, 0)
    probs_val = {"a": _noisy_probs(yv, 1.5, 0), "b": _noisy_probs(yv, 1.5, 1), "noise": _noisy_probs(yv, 0.0, 2)}
    layer = fit_decision_layer(probs_val, val, Cs=(0.1,))
    assert {c["models"] for c in layer.candidates} == {"a", "b", "noise", "a+b", "a+noise", "b+noise", "a+b+noise"}
    score = {(c["models"], c["metadata"]): c["cv_balanced_accuracy"] for c in layer.candidates}
    assert score["a+b", False] > max(score["a", False], score["b", False]) + 0.05  # two independent views beat either alone
    assert {"a", "b"} <= set(layer.models)


def test_decision_layer_without_a_class_in_validation_still_returns_every_column():
    val, yv = _stacking_frame(400, 0)
    keep = yv != CLASSES.index("df")
    val, yv = val[keep].reset_index(drop=True), yv[keep]
    test, yt = _stacking_frame(200, 1)
    layer = fit_decision_layer({"m": _noisy_probs(yv, 3.0, 0)}, val, Cs=(1.0,))
    p = layer.probs({"m": _noisy_probs(yt, 3.0, 1)}, test)
    assert p.shape == (len(test), len(CLASSES)) and (p[:, CLASSES.index("df")] == 0).all()


def test_metadata_features_never_use_dx_type_and_handle_missing_values():
    frame = pd.DataFrame({"age": [np.nan, 40.0], "sex": ["unknown", "female"], "localization": ["acral", "nowhere"], "dx_type": ["histo", "follow_up"]})
    x = metadata_features(frame)
    changed = metadata_features(frame.assign(dx_type=["consensus", "confocal"]))
    assert np.array_equal(x, changed) and x.shape[0] == 2 and np.isfinite(x).all()
    assert x[0, 2] == 1 and x[1, 2] == 0  # the missing-age flag


def test_lesion_bootstrap_intervals_bracket_the_estimate_and_widen_for_duplicated_lesions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(CLASSES), 400)
    pred = np.where(rng.random(400) < 0.7, y, rng.integers(0, len(CLASSES), 400))
    probs = _onehot(pred, 0.6)
    point = classification_metrics(y, probs)["balanced_accuracy"]
    lo, hi = lesion_bootstrap(y, probs, np.arange(400))["balanced_accuracy"]
    assert lo < point < hi and hi - lo < 0.2
    # the same 400 rows as 100 lesions of 4 identical images: fewer independent units, wider interval
    y4, probs4 = np.repeat(y[:100], 4), np.repeat(probs[:100], 4, axis=0)
    lo4, hi4 = lesion_bootstrap(y4, probs4, np.repeat(np.arange(100), 4))["balanced_accuracy"]
    lo1, hi1 = lesion_bootstrap(y4, probs4, np.arange(400))["balanced_accuracy"]
    assert hi4 - lo4 > 1.5 * (hi1 - lo1)


# HAM10000-like class shares (akiec, bcc, bkl, df, mel, nv, vasc)
_HAM_SHARES = np.array([0.033, 0.051, 0.11, 0.011, 0.111, 0.67, 0.014])


def _prior_biased_run(folder, frames: dict[str, pd.DataFrame], seed: int) -> None:
    """A run folder holding saved predictions from a model that leans towards common
    classes (its scores carry the log class shares), and a split.csv with a training part."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, frame in frames.items():
        y = label_ids(frame["dx"])
        z = rng.normal(size=(len(y), len(CLASSES))) + np.log(_HAM_SHARES)
        z[np.arange(len(y)), y] += 2.0
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        name = "predictions.csv" if split == "test" else "predictions_val.csv"
        prediction_table(frame, p, p.argmax(1)).to_csv(folder / name, index=False)
    train = pd.DataFrame({"image_id": [f"T{i}" for i in range(1000)], "lesion_id": [f"TL{i}" for i in range(1000)],
                          "dx": np.repeat(CLASSES, np.round(_HAM_SHARES * 1000).astype(int))[:1000], "split": "train"})
    parts = [train] + [f[["image_id", "lesion_id", "dx"]].assign(split=s) for s, f in frames.items()]
    pd.concat(parts).to_csv(folder / "split.csv", index=False)


def test_logit_adjusted_ensemble_moves_labels_to_rare_classes_not_probabilities(tmp_path):
    rng = np.random.default_rng(5)
    frames = {}
    for split, n in (("val", 3000), ("test", 3000)):
        dx = rng.choice(CLASSES, n, p=_HAM_SHARES / _HAM_SHARES.sum())
        frames[split] = pd.DataFrame({"image_id": [f"{split}{i}" for i in range(n)], "lesion_id": [f"{split}L{i}" for i in range(n)], "dx": dx})
    runs = [tmp_path / "a", tmp_path / "b"]
    for seed, run in enumerate(runs):
        _prior_biased_run(run, frames, seed)
    plain = mean_runs(runs, tmp_path / "plain")
    adjusted = mean_runs(runs, tmp_path / "adjusted", logit_adjust=0.3)

    rec = adjusted.as_dict()["logit_adjust"]
    counts = pd.read_csv(runs[0] / "split.csv").query("split == 'train'")["dx"].value_counts()
    freq = np.array([counts[c] for c in CLASSES]) / counts.sum()
    np.testing.assert_allclose(rec["train_class_frequency"], freq)
    np.testing.assert_allclose(rec["offset"], -0.3 * np.log(freq))
    assert rec["tau"] == 0.3 and "logit_adjust" not in plain.as_dict()
    # what predict follows is the manifest: the members, relative to the ensemble's folder, and the offset
    manifest = RunFolder(tmp_path / "adjusted").manifest()
    assert manifest["kind"] == "mean_ensemble" and [m.path.resolve() for m in RunFolder(tmp_path / "adjusted").members()] == [r.resolve() for r in runs]
    np.testing.assert_allclose(manifest["logit_offset"], rec["offset"])
    assert RunFolder(tmp_path / "plain").manifest()["logit_offset"] is None
    assert manifest["temperature"] == adjusted.temperature and manifest["mel_threshold"] == adjusted.mel_operating_point["threshold"]
    # the probabilities are the plain mean's, so AUC and ECE do not move ...
    p0, p1 = (pd.read_csv(tmp_path / d / "predictions.csv") for d in ("plain", "adjusted"))
    np.testing.assert_allclose(p1[list(CLASSES)].to_numpy(), p0[list(CLASSES)].to_numpy())
    for key in ("macro_auc", "ece"):
        assert adjusted.calibrated[key] == pytest.approx(plain.calibrated[key])
    # ... while the labels are the argmax of log p + offset, which calls rare classes more often
    y, probs = label_ids(p1["dx"]), p1[list(CLASSES)].to_numpy()
    labels = decide(probs, None, np.array(rec["offset"]))
    assert adjusted.calibrated["balanced_accuracy"] == pytest.approx(classification_metrics(y, probs, labels)["balanced_accuracy"])
    assert adjusted.calibrated["balanced_accuracy"] > plain.calibrated["balanced_accuracy"] + 0.02
    assert (labels != CLASSES.index("nv")).sum() > (probs.argmax(1) != CLASSES.index("nv")).sum()
    thr = adjusted.mel_operating_point["threshold"]
    assert list(p1["pred_dx"]) == [CLASSES[i] for i in decide(probs, thr, np.array(rec["offset"]))]

    # a folder without split.csv cannot say which classes were rare in training
    (runs[0] / "split.csv").unlink()
    with pytest.raises(DataError, match=r"split.csv: missing"):
        mean_runs(runs, tmp_path / "again", logit_adjust=0.3)


def test_logit_adjust_scan_scores_each_tau_and_holds_each_ensemble_out(tmp_path):
    ensembles, plain = [], []
    for k in range(3):
        rng = np.random.default_rng(10 + k)
        frames = {}
        for split in ("val", "test"):
            dx = rng.choice(CLASSES, 1000, p=_HAM_SHARES / _HAM_SHARES.sum())
            frames[split] = pd.DataFrame({"image_id": [f"{split}{i}" for i in range(1000)], "lesion_id": [f"{split}L{i}" for i in range(1000)], "dx": dx})
        _prior_biased_run(tmp_path / f"run{k}", frames, 20 + k)
        ensembles.append(tmp_path / f"ens{k}")
        plain.append(mean_runs([tmp_path / f"run{k}"], ensembles[-1]))
    table, held_out = logit_adjust_scan(ensembles, [-0.0, 0.5, 1.0])
    assert list(table.index) == [0.0, 0.5, 1.0] and list(table.columns) == [*map(str, ensembles), "mean"]
    # tau 0 is each ensemble's own validation score; these scores lean to common classes, so tau > 0 wins
    for k, folder in enumerate(ensembles):
        assert table.loc[0.0, str(folder)] == pytest.approx(plain[k].validation["balanced_accuracy"])
    assert table["mean"].idxmax() > 0
    assert list(held_out["held_out"]) == list(map(str, ensembles)) and (held_out["tau"] > 0).all()
    assert (held_out["balanced_accuracy"] > held_out["at_tau_0"]).all()
    with pytest.raises(DataError, match="not a mean ensemble"):  # a run's manifest lists no members
        logit_adjust_scan([tmp_path / "run0"], [0.0])


def test_training_minutes_sums_each_training_run_once(tmp_path):
    """A weight average costs nothing beyond its run; an ensemble sums its distinct runs."""
    a, b, old = tmp_path / "a", tmp_path / "b", tmp_path / "old"
    for run, seconds in ((a, [60.0, 120.0]), (b, [30.0, 30.0])):
        (run / "average").mkdir(parents=True)
        pd.DataFrame({"loss": [1.0, 0.5], "epoch_seconds": seconds}).to_csv(run / "history.csv", index=False)
    old.mkdir()
    pd.DataFrame({"loss": [1.0, 0.5]}).to_csv(old / "history.csv", index=False)  # before epoch_seconds existed
    assert training_minutes(a) == pytest.approx(3.0)
    assert training_minutes(a / "average") == pytest.approx(3.0)
    ens = tmp_path / "ens"
    ens.mkdir()
    (ens / "manifest.json").write_text(json.dumps({"kind": "mean_ensemble", "members": ["../a", "../a/average", "../b"]}))
    assert training_minutes(ens) == pytest.approx(4.0)
    (ens / "manifest.json").write_text(json.dumps({"kind": "mean_ensemble", "members": ["../a", "../old"]}))
    assert np.isnan(training_minutes(ens)) and np.isnan(training_minutes(old))
