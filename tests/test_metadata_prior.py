"""The metadata prior: p(class | age, sex, site) from a run's training rows, moving a mean ensemble's labels."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import cli

from skin_lesion.calibration import decide
from skin_lesion.data import SITES, label_ids, metadata_features
from skin_lesion.ensemble import mean_runs
from skin_lesion.evaluate import prediction_table
from skin_lesion.info import CLASSES, MEL, DataError, UserError
from skin_lesion.metadata_prior import (
    GROUPS_FILE,
    PRIOR_FILE,
    MetadataPrior,
    fused_labels,
    group_table,
    groups_text,
    leave_one_out,
    parse_parts,
    score_metadata_prior,
    table_files,
    training_rows,
)
from skin_lesion.metrics import age_band, balanced_accuracy, lesion_resamples, percentile_interval
from skin_lesion.runs import RunFolder

SHARES = np.array([0.033, 0.051, 0.11, 0.011, 0.111, 0.67, 0.014])
# each class's typical body site: the metadata says something the (noisy) image scores do not
SITE_OF = dict(akiec="face", bcc="face", bkl="trunk", df="lower extremity", mel="back", nv="abdomen", vasc="upper extremity")


def _metadata(rng, split: str, n: int) -> pd.DataFrame:
    """HAM10000-shaped rows whose site follows the class four times in five, and whose age is older for akiec, bcc and bkl."""
    dx = rng.choice(CLASSES, n, p=SHARES / SHARES.sum())
    site = np.where(rng.random(n) < 0.8, [SITE_OF[d] for d in dx], "unknown")
    age = np.where(np.isin(dx, ["akiec", "bcc", "bkl"]), 70.0, 40.0) + rng.choice([-5.0, 0.0, 5.0], n)
    return pd.DataFrame({"lesion_id": [f"{split}L{i // 2}" for i in range(n)], "image_id": [f"{split}{i}" for i in range(n)], "dx": dx,
                         "dx_type": "histo", "age": age, "sex": rng.choice(["male", "female"], n), "localization": site, "dataset": "synthetic"})


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """A data folder and two seeds' ensembles (one noisy run each, logit-adjusted as the study's)."""
    root = tmp_path_factory.mktemp("prior")
    data, ensembles = root / "data", []
    data.mkdir()
    tables = []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        frames = {s: _metadata(rng, f"s{seed}{s}", n) for s, n in (("train", 3000), ("val", 800), ("test", 800))}
        tables += list(frames.values())
        run = root / f"run{seed}"
        run.mkdir()
        for split in ("val", "test"):
            frame = frames[split]
            z = rng.normal(scale=1.5, size=(len(frame), len(CLASSES))) + np.log(SHARES)
            z[np.arange(len(frame)), label_ids(frame["dx"])] += 2.0
            p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
            prediction_table(frame, p, p.argmax(1)).to_csv(run / ("predictions.csv" if split == "test" else "predictions_val.csv"), index=False)
        pd.concat([f[["image_id", "lesion_id", "dx"]].assign(split=s) for s, f in frames.items()]).to_csv(run / "split.csv", index=False)
        mean_runs([run], root / f"ens{seed}", logit_adjust=0.3)
        ensembles.append(root / f"ens{seed}")
    pd.concat(tables).to_csv(data / "HAM10000_metadata.csv", index=False)
    return data, ensembles


def test_prior_learns_the_site_and_age_signal_from_training_rows():
    rng = np.random.default_rng(3)
    train = _metadata(rng, "t", 3000)
    prior = MetadataPrior(train)
    face_old = pd.DataFrame({"age": [75.0], "sex": ["male"], "localization": ["face"]})
    abdomen_young = pd.DataFrame({"age": [35.0], "sex": ["female"], "localization": ["abdomen"]})
    r_face, r_abdomen = prior.log_ratio(face_old)[0], prior.log_ratio(abdomen_young)[0]
    nv, bcc = CLASSES.index("nv"), CLASSES.index("bcc")
    assert r_face[bcc] > 1 and r_face[nv] < -1  # an old face makes bcc likelier than its share, nv less likely
    assert r_abdomen[nv] > 0 and r_abdomen[bcc] < -1
    # a prior fitted on rows that say nothing (every site unknown, one age) is the class mix itself: log-ratio 0,
    # as it is only when the fit is not class-balanced and the training class share is taken out
    blank = MetadataPrior(train.assign(localization="unknown", age=50.0, sex="male"))
    assert np.abs(blank.log_ratio(face_old)).max() < 0.02
    # a class absent from training (df) stays where the ensemble put it; the others keep their signal
    no_df = MetadataPrior(train[train["dx"] != "df"]).log_ratio(face_old)[0]
    assert no_df[CLASSES.index("df")] == 0 and no_df[bcc] > 1 and no_df[nv] < -1
    with pytest.raises(DataError, match="fewer than two classes"):
        MetadataPrior(train.assign(dx="nv"))


def test_beta_zero_is_the_ensembles_own_labels_and_the_prior_helps_where_metadata_informs(seeds):
    data, ensembles = seeds
    table = score_metadata_prior(ensembles[0], [0.0, 0.5, 1.0], data)
    assert (ensembles[0] / PRIOR_FILE).exists() and list(table["split"].unique()) == ["val", "test"]
    # the prior learns from the training rows alone, with their metadata from the data folder
    train = training_rows(RunFolder(ensembles[0].parent / "run0"), data)
    assert len(train) == 3000 and train["image_id"].str.startswith("s0train").all() and train[["age", "sex", "localization"]].notna().all().all()
    # beta 0 is the ensemble's own record, logit offset included, on validation and test
    record = RunFolder(ensembles[0]).metrics()
    at = table.set_index(["split", "beta"])["balanced_accuracy"]
    assert at[("val", 0.0)] == pytest.approx(record["validation"]["balanced_accuracy"])
    assert at[("test", 0.0)] == pytest.approx(record["calibrated"]["balanced_accuracy"])
    assert at[("val", 1.0)] > at[("val", 0.0)] + 0.05 and at[("test", 1.0)] > at[("test", 0.0)] + 0.05
    test = table[table["split"] == "test"].set_index("beta")
    assert np.isnan(test.loc[0.0, "change_low"]) and 0 < test.loc[1.0, "change_low"] < test.loc[1.0, "change_high"]
    # the interval resamples lesions (two images each here), pairing the two labellings in each draw
    rows = pd.read_csv(ensembles[0] / "predictions.csv")
    y, probs = label_ids(rows["dx"]), rows[list(CLASSES)].to_numpy()
    offset = np.asarray(RunFolder(ensembles[0]).manifest()["logit_offset"])
    ratio = MetadataPrior(train).log_ratio(rows)
    a, b = fused_labels(probs, offset, ratio, 0.0), fused_labels(probs, offset, ratio, 1.0)
    draws = [balanced_accuracy(y[i], b[i]) - balanced_accuracy(y[i], a[i]) for i in lesion_resamples(len(y), rows["lesion_id"].to_numpy())]
    assert (test.loc[1.0, "change_low"], test.loc[1.0, "change_high"]) == pytest.approx(percentile_interval(draws))
    assert list(b) != list(decide(probs, None, offset))

    choice = leave_one_out({str(e): score_metadata_prior(e, [0.0, 0.5, 1.0], data) for e in ensembles})
    assert list(choice["held_out"]) == list(map(str, ensembles)) and (choice["beta"] > 0).all()


def _with_test_rows(ensemble, out, change) -> None:
    """A copy of ``ensemble`` in ``out`` whose test predictions went through ``change`` (members still found)."""
    shutil.copytree(ensemble, out)
    (out / "manifest.json").write_text((ensemble / "manifest.json").read_text().replace("../run", str(ensemble.parent / "run")))
    change(pd.read_csv(out / "predictions.csv")).to_csv(out / "predictions.csv", index=False)


def test_group_table_shows_who_pays_by_sex_and_age_band(seeds, tmp_path):
    data, ensembles = seeds

    def young_and_unknown(rows: pd.DataFrame) -> pd.DataFrame:  # patients under 30, and unknown age and sex, among the test rows
        rows.loc[rows.index % 7 == 0, "age"] = 20.0
        rows.loc[rows.index % 11 == 0, "age"] = np.nan
        rows.loc[rows.index % 13 == 0, "sex"] = np.nan
        return rows

    ens = tmp_path / "ens"
    _with_test_rows(ensembles[0], ens, young_and_unknown)
    table = group_table(ens, 1.0, data)
    assert (ens / GROUPS_FILE).exists() and set(table["by"]) == {"sex", "age_band"}
    rows = pd.read_csv(ens / "predictions.csv")
    y, probs = label_ids(rows["dx"]), rows[list(CLASSES)].to_numpy()
    train = training_rows(RunFolder(ensembles[0].parent / "run0"), data)
    offset = np.asarray(RunFolder(ens).manifest()["logit_offset"])
    moved = fused_labels(probs, offset, MetadataPrior(train).log_ratio(rows), 1.0)
    own = decide(probs, None, offset)  # beta 0: the ensemble's own logit-adjusted labels
    assert (moved != own).any()
    groups = {"sex": rows["sex"].fillna("unknown").to_numpy(), "age_band": age_band(rows["age"]).to_numpy()}
    assert list(table[table["by"] == "age_band"]["group"]) == ["<30", "30-44", "45-59", "60-74", "75+", "unknown"]
    assert list(table[table["by"] == "sex"]["group"]) == ["female", "male", "unknown"]
    for _, r in table.iterrows():
        k = groups[r["by"]] == r["group"]
        assert r["n"] == k.sum() > 0 and r["melanomas"] == (y[k] == MEL).sum()
        assert r["balanced_accuracy_ensemble"] == pytest.approx(balanced_accuracy(y[k], own[k]))
        assert r["balanced_accuracy_prior"] == pytest.approx(balanced_accuracy(y[k], moved[k]))
        assert r["melanomas_found_ensemble"] == ((own == MEL) & (y == MEL) & k).sum()
        assert r["melanomas_found_prior"] == ((moved == MEL) & (y == MEL) & k).sum()
    # over several tables: a group's images and balanced accuracy averaged over the tables that have it,
    # melanomas summed, and the age bands in their own order even where the first table lacks one
    other = group_table(ensembles[1], 1.0, data)
    assert "<30" not in set(other["group"])
    text = groups_text([other, table]).splitlines()
    order = [line.split()[line.split()[0] in ("sex", "age_band")] for line in text[2:]]
    assert order == ["female", "male", "unknown", "<30", "30-44", "45-59", "60-74", "75+", "unknown"]
    both = pd.concat([table, other])
    male = both[both["group"] == "male"]
    line = next(line for line in text if " male " in line)
    found = male[["melanomas_found_ensemble", "melanomas_found_prior", "melanomas"]].sum()
    assert f"{found.iloc[0]} -> {found.iloc[1]} of {found.iloc[2]}" in line
    assert f"{male['balanced_accuracy_prior'].mean():.3f}" in line and f" {round(male['n'].mean())} " in line
    young = next(line for line in text if "<30" in line)
    assert young.split()[2] == "1"  # one table has patients under 30


def _tables(val: dict[float, list[float]]) -> dict[str, pd.DataFrame]:
    """Hand-made per-ensemble tables: validation scores by beta, test = validation + 0.1."""
    out = {}
    for k in range(len(next(iter(val.values())))):
        rows = [dict(split=s, beta=b, balanced_accuracy=v[k] + (0.1 if s == "test" else 0)) for s in ("val", "test") for b, v in val.items()]
        out[f"e{k}"] = pd.DataFrame(rows)
    return out


def test_leave_one_out_chooses_on_the_others_and_the_smaller_beta_on_a_tie():
    # e0's own validation would pick beta 1; the others' mean picks 0.5
    tables = _tables({0.0: [0.70, 0.70, 0.70], 0.5: [0.70, 0.75, 0.75], 1.0: [0.90, 0.72, 0.72]})
    held = leave_one_out(tables).set_index("held_out")
    assert held.loc["e0", "beta"] == 0.5 and held.loc["e0", "val"] == pytest.approx(0.70) and held.loc["e0", "test"] == pytest.approx(0.80)
    # the others tie between 0.5 and 1.0: the smaller wins
    tie = leave_one_out(_tables({0.0: [0.70, 0.70], 0.5: [0.75, 0.75], 1.0: [0.75, 0.75]}))
    assert (tie["beta"] == 0.5).all()


def test_metadata_prior_command_and_its_errors(seeds, tmp_path):
    data, ensembles = seeds
    res = cli("metadata-prior", *map(str, ensembles), "--beta", "0", "1", "--data", str(data))
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "mean balanced accuracy over the 2 ensembles" in out and "beta chosen on all 2 ensembles' validation: 1" in out
    assert "beta chosen on the other ensembles' validation" in out and "predict does not apply" in out
    assert "test by sex and age band at beta 1" in out and (ensembles[1] / GROUPS_FILE).exists()
    # the table's beta can be named (the registered one, say), whatever validation prefers
    res = cli("metadata-prior", *map(str, ensembles), "--beta", "0", "1", "--groups-beta", "0.5", "--data", str(data))
    assert res.returncode == 0 and "test by sex and age band at beta 0.5" in res.stdout
    assert (pd.read_csv(ensembles[0] / GROUPS_FILE)["beta"] == 0.5).all()
    # a member's run (no members in its manifest) is not an ensemble
    res = cli("metadata-prior", str(ensembles[0].parent / "run0"), "--data", str(data))
    assert res.returncode == 2 and "not a mean ensemble" in res.stderr
    # the same ensemble twice would let a seed choose its own beta; a negative beta makes no sense
    for bad in ([str(ensembles[0]), str(ensembles[0]) + "/"], [str(ensembles[0]), "--beta", "-1"]):
        res = cli("metadata-prior", *bad, "--data", str(data))
        assert res.returncode == 2 and "name each ensemble once" in res.stderr
    # predictions without the metadata the prior reads
    bare = tmp_path / "bare"
    shutil.copytree(ensembles[0], bare)
    (bare / "manifest.json").write_text((ensembles[0] / "manifest.json").read_text().replace("../run0", str(ensembles[0].parent / "run0")))
    pd.read_csv(bare / "predictions_val.csv").drop(columns=["sex"]).to_csv(bare / "predictions_val.csv", index=False)
    res = cli("metadata-prior", str(bare), "--data", str(data))
    assert res.returncode == 2 and "predictions_val.csv: no sex column" in res.stderr
    # a data folder that does not list the run's training images
    other = tmp_path / "other"
    other.mkdir()
    pd.read_csv(data / "HAM10000_metadata.csv").iloc[:10].to_csv(other / "HAM10000_metadata.csv", index=False)
    res = cli("metadata-prior", str(ensembles[0]), "--data", str(other))
    assert res.returncode == 2 and "HAM10000_metadata.csv" in res.stderr and "pass --data" in res.stderr


def test_a_prior_on_body_site_alone_reads_only_the_site_and_writes_beside_the_full_one(seeds, tmp_path):
    data, ensembles = seeds
    rows = pd.DataFrame({"age": [20.0, 80.0, np.nan, 80.0], "sex": ["female", "male", None, "male"],
                         "localization": ["face", "face", "face", "abdomen"]})
    assert metadata_features(rows, ("site",)).shape == (4, len(SITES))
    assert (metadata_features(rows, ("age", "sex", "site")) == metadata_features(rows)).all()
    train = training_rows(RunFolder(ensembles[0].parent / "run0"), data)
    site = MetadataPrior(train, parts=("site",)).log_ratio(rows)
    # the same site, whatever the age and sex, moves the labels alike; another site moves them otherwise
    assert np.allclose(site[0], site[1]) and np.allclose(site[0], site[2]) and not np.allclose(site[0], site[3])
    assert site[0, CLASSES.index("bcc")] > 1  # the face still says basal-cell carcinoma
    full = MetadataPrior(train).log_ratio(rows)
    assert not np.allclose(full[0], full[1])  # where the full prior reads the age and sex

    ens = tmp_path / "ens"
    _with_test_rows(ensembles[0], ens, lambda r: r)
    score_metadata_prior(ens, [0.0, 1.0], data)  # the full prior's tables, which the site prior must leave as they are
    group_table(ens, 1.0, data)
    full_tables = [(ens / name).read_bytes() for name in (PRIOR_FILE, GROUPS_FILE)]
    res = cli("metadata-prior", str(ens), "--beta", "0", "1", "--features", "site", "--data", str(data))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("prior on site\n") and table_files(("site",)) == ("metadata_prior_site.csv", "metadata_prior_groups_site.csv")
    assert (ens / "metadata_prior_site.csv").exists() and (ens / "metadata_prior_groups_site.csv").exists()
    assert [(ens / name).read_bytes() for name in (PRIOR_FILE, GROUPS_FILE)] == full_tables  # the full prior's tables are its own
    table = pd.read_csv(ens / "metadata_prior_site.csv").set_index(["split", "beta"])["balanced_accuracy"]
    test = pd.read_csv(ens / "predictions.csv")
    y, probs = label_ids(test["dx"]), test[list(CLASSES)].to_numpy()
    offset = np.asarray(RunFolder(ens).manifest()["logit_offset"])
    moved = fused_labels(probs, offset, MetadataPrior(train, parts=("site",)).log_ratio(test), 1.0)
    assert table[("test", 1.0)] == pytest.approx(balanced_accuracy(y, moved))
    assert table[("test", 0.0)] == pytest.approx(RunFolder(ens).metrics()["calibrated"]["balanced_accuracy"])
    # one set of fields, one name: order, spaces and repeats do not matter
    assert parse_parts(" site, age,site") == ("age", "site") == MetadataPrior(train, parts=("site", "age", "site")).parts
    assert table_files(("site", "age")) == table_files(parse_parts("age,site")) == ("metadata_prior_age_site.csv", "metadata_prior_groups_age_site.csv")
    with pytest.raises(UserError, match="--features takes"):
        table_files(("weight",))
    for bad in ("weight", "site,height", "", ","):
        res = cli("metadata-prior", str(ens), "--features", bad, "--data", str(data))
        assert res.returncode == 2 and "--features takes a comma list of age, sex, site" in res.stderr


def test_the_prior_needs_no_tensorflow():
    """It reads saved predictions: scoring a prior must not pay TensorFlow's start-up."""
    import subprocess
    import sys

    code = "import sys, skin_lesion.metadata_prior; print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
