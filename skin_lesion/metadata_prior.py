"""A metadata prior: p(class | age, sex, body site) learnt on the training
split, combined with a mean ensemble's decision by Bayes' rule.

The decision layer (``stacking``) learns how far to trust age, sex and site
from the validation split's few hundred lesions. This prior learns them from
the run's training split instead (thousands of images): a multinomial
logistic regression on the decision layer's metadata features, not
class-balanced, so that it estimates p(class | metadata) under the training
class mix. The ensemble's decision then moves by

    beta * (log p(class | metadata) - log p(class))

where p(class) is the training class frequency. With beta = 1 that is Bayes'
rule for an image and metadata independent given the class; a smaller beta
discounts what the two share (an image shows the body site and, partly, the
age). It moves labels only, like logit adjustment; the calibrated
probabilities stay the ensemble's. It scores an ensemble's saved predictions
and writes ``metadata_prior.csv`` beside them, and, because it decides partly
by who the patient is, ``metadata_prior_groups.csv``: the test figures by sex
and age band with and without it. ``predict`` does not apply it.
``dx_type`` is never an input (it nearly reveals the label). A prior on
some of the three fields (``parts``: body site alone, say, which decides by
where the lesion is rather than by who the patient is) writes its tables
under names that carry them (``metadata_prior_site.csv``), beside the
full prior's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from skin_lesion.calibration import class_frequency, decide
from skin_lesion.data import METADATA_FILE, METADATA_PARTS, label_ids, metadata_features, read_metadata, resolve_data_dir
from skin_lesion.info import AGE_BANDS, CLASSES, MEL, DataError, UserError
from skin_lesion.metrics import age_band, balanced_accuracy, lesion_interval, macro_auc
from skin_lesion.runs import TEST, RunFolder

PRIOR_FILE = "metadata_prior.csv"
GROUPS_FILE = "metadata_prior_groups.csv"
METADATA_COLUMNS: tuple[str, ...] = ("age", "sex", "localization")


def canonical_parts(parts: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Metadata parts checked and in their usual order (age, sex, site), each once, so that one set
    of fields always gives the same features and the same file names."""
    given = set(parts)
    if not given or given - set(METADATA_PARTS):
        raise UserError(f"metadata-prior: --features takes a comma list of {', '.join(METADATA_PARTS)}; got {','.join(parts)!r}")
    return tuple(p for p in METADATA_PARTS if p in given)


def parse_parts(text: str) -> tuple[str, ...]:
    """``--features``' comma list (``site``, ``sex, site``) as ``canonical_parts``."""
    return canonical_parts([p.strip() for p in text.split(",") if p.strip()])


def table_files(parts: tuple[str, ...]) -> tuple[str, str]:
    """The prior's two table names: ``metadata_prior.csv`` and ``metadata_prior_groups.csv`` for all
    three fields, else with the fields in the name, so that priors on different fields sit side by side."""
    parts = canonical_parts(parts)
    if parts == METADATA_PARTS:
        return PRIOR_FILE, GROUPS_FILE
    tag = "_" + "_".join(parts)
    return PRIOR_FILE.replace(".csv", f"{tag}.csv"), GROUPS_FILE.replace(".csv", f"{tag}.csv")


class MetadataPrior:
    """p(class | metadata) from training rows (age, sex and site, or those of ``parts``),
    as a log-ratio to the training class frequency."""

    def __init__(self, train: pd.DataFrame, C: float = 1.0, parts: tuple[str, ...] = METADATA_PARTS) -> None:
        from sklearn.linear_model import LogisticRegression

        self.parts = canonical_parts(parts)
        y = label_ids(train["dx"])
        self.present = np.unique(y)
        if len(self.present) < 2:
            raise DataError("metadata prior: the training rows hold fewer than two classes; fit it on a run's training split")
        self.estimator = LogisticRegression(C=C, max_iter=2000).fit(metadata_features(train, self.parts), y)
        self.log_frequency = np.log(class_frequency(train["dx"]))

    def log_ratio(self, frame: pd.DataFrame) -> np.ndarray:
        """log p(class | metadata) - log p(class) for each row (rows x CLASSES); 0 for classes absent from training."""
        out = np.zeros((len(frame), len(CLASSES)))
        p = np.clip(self.estimator.predict_proba(metadata_features(frame, self.parts)), 1e-6, 1)
        out[:, self.present] = np.log(p) - self.log_frequency[self.present]
        return out


def training_rows(run: RunFolder, data: str | os.PathLike | None = None) -> pd.DataFrame:
    """The training rows of ``run``'s ``split.csv`` with their age, sex and site from the
    data folder's metadata (``data``, else the run's own, else ``resolve_data_dir``'s default)."""
    split = run.read_split()
    if split is None:
        raise DataError(f"{run.split_file}: missing; a metadata prior needs the training split of a run (pass `ensemble --out` folders of trained runs)")
    if "split" not in split:
        raise DataError(f"{run.split_file}: no split column (a k-fold run); a metadata prior needs a run with a train split")
    split = split[split["split"] == "train"]
    if split["dx"].nunique() < 2:
        raise DataError(f"{run.split_file}: {len(split)} training row(s) of {split['dx'].nunique()} class(es); a metadata prior needs a run with a train split")
    if data is None and run.config_file.exists():
        data = run.config().data
    root, _ = resolve_data_dir(data)
    meta = read_metadata(root / METADATA_FILE)[["image_id", *METADATA_COLUMNS]]
    train = split[["image_id", "dx"]].merge(meta, on="image_id", how="left", indicator=True)
    absent = train.loc[train["_merge"] != "both", "image_id"].tolist()
    if absent:
        raise DataError(f"{root / METADATA_FILE}: {len(absent)} training image(s) of {run.split_file} are not listed, "
                        f"e.g. {absent[0]}; pass --data to the folder the run was trained on")
    return train.drop(columns="_merge")


def scored_rows(folder: RunFolder, split: str) -> pd.DataFrame:
    """An ensemble's saved predictions on ``split``, which must carry the metadata the prior reads."""
    frame = folder.predictions(split)
    missing = [c for c in METADATA_COLUMNS if c not in frame]
    if missing:
        raise DataError(f"{folder.predictions_file(split)}: no {', '.join(missing)} column(s); "
                        "rebuild the ensemble (`ensemble --out`) from runs evaluated on a data folder whose metadata has them")
    return frame


def fused_labels(probs: np.ndarray, offset: np.ndarray | None, log_ratio: np.ndarray, beta: float) -> np.ndarray:
    """The argmax of log p + the ensemble's logit offset + beta x the prior's log-ratio."""
    base = np.zeros(len(CLASSES)) if offset is None else np.asarray(offset, dtype=float)
    return decide(probs, None, base + beta * log_ratio)


def fused_probabilities(probs: np.ndarray, log_ratio: np.ndarray, beta: float) -> np.ndarray:
    """The ensemble's probabilities moved by beta x the prior's log-ratio and renormalised (for AUC)."""
    z = np.log(np.clip(probs, 1e-12, 1)) + beta * log_ratio
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def split_scores(folder: RunFolder, split: str, prior: MetadataPrior) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """An ensemble's saved rows of ``split``, their label ids, probabilities and the prior's log-ratio."""
    frame = scored_rows(folder, split)
    return frame, label_ids(frame["dx"]), frame[list(CLASSES)].to_numpy(dtype=float), prior.log_ratio(frame)


def paired_interval(y: np.ndarray, a: np.ndarray, b: np.ndarray, groups: np.ndarray | None) -> tuple[float, float]:
    """95% interval of balanced accuracy (labels b) - (labels a), over lesion-grouped resamples of the rows."""
    return lesion_interval(lambda i: balanced_accuracy(y[i], b[i]) - balanced_accuracy(y[i], a[i]), len(y), groups)


Fitted = tuple[MetadataPrior, np.ndarray | None]  # a mean ensemble's prior and its logit offset


def ensemble_prior(folder: RunFolder, data: str | os.PathLike | None = None, parts: tuple[str, ...] = METADATA_PARTS) -> Fitted:
    """The prior (on ``parts``) fitted on the training rows of a mean ensemble's first member, and the ensemble's logit offset."""
    members = folder.members()
    if not members:
        raise DataError(f"{folder.path}: not a mean ensemble (no members in its manifest.json); pass an `ensemble --out` folder")
    return MetadataPrior(training_rows(members[0], data), parts=parts), folder.manifest().get("logit_offset")


def score_metadata_prior(ensemble: str | os.PathLike, betas: list[float], data: str | os.PathLike | None = None,
                         fitted: Fitted | None = None) -> pd.DataFrame:
    """A mean ensemble's validation and test balanced accuracy (and macro AUC) with the prior at each beta.

    The prior is fitted on the training rows of the ensemble's first member;
    beta = 0 gives the ensemble's own labels. Test rows carry the paired 95%
    interval of the change against beta = 0. Written to ``metadata_prior.csv`` in the ensemble's
    folder. ``fitted``: the ensemble's ``ensemble_prior``, when already fitted; a prior on fewer
    fields comes that way, and its table is named by them (``table_files``).
    """
    folder = RunFolder(ensemble)
    prior, offset = fitted or ensemble_prior(folder, data)
    rows = []
    for split in ("val", TEST):
        frame, y, probs, ratio = split_scores(folder, split, prior)
        groups = frame["lesion_id"].to_numpy() if "lesion_id" in frame else None
        own = fused_labels(probs, offset, ratio, 0.0)
        for beta in betas:
            labels = fused_labels(probs, offset, ratio, beta)
            low, high = paired_interval(y, own, labels, groups) if split == TEST and beta else (np.nan, np.nan)
            rows.append(dict(split=split, beta=beta, n=len(y), balanced_accuracy=balanced_accuracy(y, labels),
                             macro_auc=macro_auc(y, fused_probabilities(probs, ratio, beta)), change_low=low, change_high=high))
    table = pd.DataFrame(rows)
    folder.write_table(folder.path / table_files(prior.parts)[0], table)
    return table


def group_table(ensemble: str | os.PathLike, beta: float, data: str | os.PathLike | None = None, fitted: Fitted | None = None) -> pd.DataFrame:
    """Test balanced accuracy and melanomas labelled melanoma (at the argmax) by sex and by age band,
    the ensemble's own labels against the prior's at ``beta``: who pays for an overall gain, since
    the prior moves a label towards what is common for the patient. Unknown sex or age is a group of
    its own. Written to ``metadata_prior_groups.csv``; ``fitted`` (and the name) as in ``score_metadata_prior``."""
    folder = RunFolder(ensemble)
    prior, offset = fitted or ensemble_prior(folder, data)
    frame, y, probs, ratio = split_scores(folder, TEST, prior)
    labels = {"ensemble": fused_labels(probs, offset, ratio, 0.0), "prior": fused_labels(probs, offset, ratio, beta)}
    groupings = {"sex": frame["sex"].fillna("unknown").astype(str).to_numpy(), "age_band": age_band(frame["age"]).to_numpy()}
    rows = []
    for by, values in groupings.items():
        order = AGE_BANDS if by == "age_band" else sorted(set(values))
        for group in (g for g in order if (values == g).any()):
            k = values == group
            row = dict(beta=beta, by=by, group=group, n=int(k.sum()), melanomas=int((y[k] == MEL).sum()))
            for name, lab in labels.items():
                row[f"balanced_accuracy_{name}"] = balanced_accuracy(y[k], lab[k])
                row[f"melanomas_found_{name}"] = int((lab[k][y[k] == MEL] == MEL).sum())
            rows.append(row)
    table = pd.DataFrame(rows)
    folder.write_table(folder.path / table_files(prior.parts)[1], table)
    return table


def groups_text(tables: list[pd.DataFrame]) -> str:
    """Several ensembles' group tables as one: images and balanced accuracy per group averaged over the
    ensembles that have the group (counted in ``ensembles``), melanomas summed; sexes, then age bands in order."""
    both = pd.concat(tables)
    g = both.groupby(["by", "group"])
    out = pd.DataFrame({"ensembles": g.size(), "images": g["n"].mean().round().astype(int),
                        "ensemble": g["balanced_accuracy_ensemble"].mean(), "prior": g["balanced_accuracy_prior"].mean()})
    out["change"] = out["prior"] - out["ensemble"]
    found = g[["melanomas_found_ensemble", "melanomas_found_prior", "melanomas"]].sum()
    out["melanomas found (ensemble -> prior, of)"] = [f"{a} -> {b} of {n}" for a, b, n in found.to_numpy()]
    keys = sorted(out.index, key=lambda k: (k[0] != "sex", AGE_BANDS.index(k[1]) if k[0] == "age_band" else 0, k[1]))
    return out.loc[keys].to_string(float_format=lambda x: f"{x:.3f}")


def check_request(ensembles: list[str], betas: list[float], groups_beta: float | None = None) -> None:
    """Each ensemble named once (else a seed would choose its own beta), and betas and the groups beta of 0 or more."""
    if groups_beta is not None and groups_beta < 0:
        raise UserError("metadata-prior: give a --groups-beta of 0 or more")
    folders = [Path(e).resolve() for e in ensembles]
    if len(set(folders)) < len(folders) or min(betas) < 0:
        raise UserError("metadata-prior: name each ensemble once, and give betas of 0 or more")


def score_ensembles(ensembles: list[str], betas: list[float], data: str | os.PathLike | None = None,
                    fitted: dict[str, Fitted] | None = None) -> dict[str, pd.DataFrame]:
    """``score_metadata_prior`` for each of several distinct ensembles (one per seed, say), each beta once
    (``fitted``: their priors by ensemble, when already fitted)."""
    check_request(ensembles, betas)
    return {e: score_metadata_prior(e, sorted(set(betas)), data, (fitted or {}).get(e)) for e in ensembles}


def chosen_beta(validation: pd.Series) -> float:
    """The beta with the highest mean validation balanced accuracy (index: beta); the smaller on a tie."""
    return float(validation.sort_index().round(12).idxmax())


def deployed_beta(tables: dict[str, pd.DataFrame]) -> float:
    """The beta the study would deploy: the best on all the ensembles' mean validation (the smaller on a tie)."""
    return chosen_beta(validation_table(tables).mean(axis=1))


def validation_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Validation balanced accuracy, one row per beta, one column per ensemble."""
    return pd.DataFrame({name: t[t["split"] == "val"].set_index("beta")["balanced_accuracy"] for name, t in tables.items()}).sort_index()


def leave_one_out(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """For each ensemble (a seed, say), the beta best on the others' mean validation
    balanced accuracy (the smaller beta on a tie), and what it scores on the held-out
    ensemble's validation and test: how a beta chosen this way does where it was not chosen."""
    val = validation_table(tables)
    rows = []
    for name, table in tables.items():
        beta = chosen_beta(val.drop(columns=name).mean(axis=1) if len(val.columns) > 1 else val[name])
        scores = table[table["beta"] == beta].set_index("split")["balanced_accuracy"]
        rows.append(dict(held_out=name, beta=beta, val=float(scores["val"]), test=float(scores[TEST])))
    return pd.DataFrame(rows)


def summary_text(tables: dict[str, pd.DataFrame]) -> str:
    """What ``metadata-prior`` prints over several ensembles: the mean at each beta, the beta
    all of their validation chooses, and the leave-one-out choice."""
    def fmt(frame: pd.DataFrame, index: bool = True) -> str:
        return frame.to_string(index=index, float_format=lambda x: f"{x:.4f}")

    mean = pd.concat(tables.values()).groupby(["beta", "split"])["balanced_accuracy"].mean().unstack()[["val", TEST]]
    held = leave_one_out(tables)
    return (f"mean balanced accuracy over the {len(tables)} ensembles:\n{fmt(mean)}\n"
            f"beta chosen on all {len(tables)} ensembles' validation: {deployed_beta(tables):g}\n"
            f"beta chosen on the other ensembles' validation (held-out mean: validation {held['val'].mean():.4f}, test {held['test'].mean():.4f}):\n"
            f"{fmt(held, index=False)}")


def measure(ensembles: list[str], betas: list[float], data: str | os.PathLike | None = None, groups_beta: float | None = None,
            parts: tuple[str, ...] = METADATA_PARTS) -> str:
    """What ``metadata-prior`` does and prints: each ensemble's table, over several the mean and the
    choices of beta, and the test figures by sex and age band at ``groups_beta`` (default: the deployed
    beta, the best on these ensembles' validation), each table written beside its ensemble; the
    prior on ``parts`` of age, sex and site."""
    check_request(ensembles, betas, groups_beta)  # before any prior is fitted
    parts = canonical_parts(parts)
    fitted = {e: ensemble_prior(RunFolder(e), data, parts) for e in ensembles}  # each prior fitted once, for both tables
    tables = score_ensembles(ensembles, betas, data, fitted)
    prior_file, groups_file = table_files(parts)
    out = [f"prior on {', '.join(parts)}"]
    out += [f"{e} -> {Path(e) / prior_file}\n{t.to_string(index=False, float_format=lambda x: f'{x:.4f}')}" for e, t in tables.items()]
    if len(tables) > 1:
        out.append(summary_text(tables))
    beta = deployed_beta(tables) if groups_beta is None else groups_beta
    groups = [group_table(e, beta, data, fitted[e]) for e in tables]
    out.append(f"test by sex and age band at beta {beta:g} (balanced accuracy: mean over the ensembles; "
               f"melanomas labelled melanoma at the argmax: summed; each in {groups_file}):\n{groups_text(groups)}")
    return "\n".join(out) + "\n(a lab measurement: predict does not apply the prior)"
