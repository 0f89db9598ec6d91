"""What each command of ``python -m skin_lesion`` does, given its parsed options.

``__main__`` builds the options; each ``*_cmd`` here imports what it needs when
it runs, so ``--help`` and quick commands never start TensorFlow.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from skin_lesion.info import DISCLAIMER, UserError


def data_cmd(args) -> int:
    import pandas as pd

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
        table = splits.make_split_table(ds.meta, folds=args.folds, seed=args.seed, by=args.by, holdout_source=args.holdout_source)
        Path(args.out or "split.csv").parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out or "split.csv", index=False)
        col = "fold" if args.folds else "split"
        print(table.groupby(col).agg(images=("image_id", "size"), lesions=("lesion_id", "nunique")).to_string())
        if args.holdout_source:  # which classes the held-out source takes away from training
            print(f"images per class ({len(ds.meta) - len(table)} image(s) of the held-out lesions from other sources left out):")
            print(pd.crosstab(table["dx"], table["split"]).reindex(columns=["train", "val", "test"], fill_value=0).to_string())
    elif args.action == "download":
        out = download.download(args.out or info.DEFAULT_DATA, server=args.server, timeout=args.timeout)
        print(f"HAM10000 is in {out}")
    return 0


def evaluate_and_print(run, tta: int) -> int:
    """Score a trained run (and its weight average, when it has one) on its test split."""
    from skin_lesion.evaluate import evaluate_run
    from skin_lesion.runs import RunFolder

    print_metrics(evaluate_run(run, tta=tta))
    if RunFolder(run).average.has_model():  # --average-last: the mean is a second model
        print_metrics(evaluate_run(RunFolder(run).average.path, tta=tta))
    return 0


def print_headline(c: dict, ece: bool = False) -> None:
    """The calibrated headline metrics (and ECE), one line each (n/a where undefined)."""
    from skin_lesion.metrics import HEADLINE

    for key in (*HEADLINE, "ece") if ece else HEADLINE:
        print(f"  {key:18s} {c[key]:.4f}" if c[key] is not None else f"  {key:18s} n/a")


def print_metrics(m) -> None:
    """Headline numbers of an Evaluation, one line each, and the files it wrote."""
    c, op = m.calibrated, m.mel_operating_point
    views = f"TTA {m.tta_views} views" if m.tta_views else "each member with its own TTA"
    print(f"evaluated on {m.evaluated_on} ({c['n']} images, {views}) -> {', '.join(str(f) for f in m.files)}")
    if m.extra.get("skipped"):
        print(f"  skipped {len(m.extra['skipped'])} labelled image(s) absent from the folder: {', '.join(m.extra['skipped'][:10])}{' ...' if len(m.extra['skipped']) > 10 else ''}")
    print_headline(c)
    print(f"  ECE raw {m.raw['ece']:.4f} -> calibrated {c['ece']:.4f} (T={m.temperature:.2f})")
    print(operating_point_line(op))


def operating_point_line(op: dict) -> str:
    """The melanoma operating point: how it was chosen on validation, what it gives on test."""
    def num(v):
        return "n/a" if v is None else f"{v:.4f}"

    how = f"target {op.get('target_recall_on_val', 0.8)} on validation" + (f" with {op['confidence']:.0%} confidence" if op.get("confidence") else "")
    return (f"  melanoma operating point p>={op['threshold']:.3f} ({how}; validation recall {num(op.get('val_mel_recall'))}): "
            f"recall {num(op['mel_recall'])}, specificity {num(op['mel_specificity'])}")


def operating_point(args) -> dict:
    """The melanoma operating-point options shared by evaluate and stack (confidence 0 = no margin)."""
    return dict(target_mel_recall=args.target_mel_recall, mel_confidence=args.mel_confidence or None)


def evaluate_cmd(args) -> int:
    if bool(args.images) != bool(args.labels):
        raise UserError("evaluate: --images and --labels go together")
    if (args.image_size is None) != (args.out is None):  # --image-size 0 is an error of its own, not "absent"
        raise UserError("evaluate: --image-size and --out go together (the run scored at another size is written to --out)")
    from skin_lesion.evaluate import evaluate_run
    from skin_lesion.inference import resize_run
    from skin_lesion.runs import RunFolder

    manifest = RunFolder(args.run).manifest()
    combination = "a decision layer" if manifest.get("kind") == "decision_layer" else "a mean ensemble" if manifest.get("members") else None
    if combination and (not args.images or args.out):  # scored through its runs, on an external set only
        made_by = "stack" if manifest.get("kind") == "decision_layer" else "ensemble"
        raise UserError(f"evaluate: {args.run} is {combination}; `{made_by}` scored it on its test split, and "
                         "evaluate scores it on an external set (--images and --labels), not at another size")
    if combination == "a decision layer":
        from skin_lesion.stacking import evaluate_stacked_external

        m = evaluate_stacked_external(args.run, args.images, args.labels, tta=args.tta, name=args.name, skip_missing=args.skip_missing)
        print(f"decision layer {' + '.join(m['decision_layer']['models'])} on {m['evaluated_on']} ({m['calibrated']['n']} images) -> {', '.join(m['files'])}")
        print_headline(m["calibrated"], ece=True)
        print(operating_point_line(m["mel_operating_point"]))
        return 0
    if combination == "a mean ensemble":
        from skin_lesion.ensemble import evaluate_ensemble_external

        result = evaluate_ensemble_external(args.run, args.images, args.labels, tta=args.tta, name=args.name, skip_missing=args.skip_missing, **operating_point(args))
    else:
        run = resize_run(args.run, args.image_size, args.out) if args.out else args.run
        result = evaluate_run(run, images=args.images, labels=args.labels, tta=args.tta, name=args.name, skip_missing=args.skip_missing, **operating_point(args))
    print_metrics(result)
    return 0


def make_predictor(args):
    """The bundle's TensorFlow-free predictor (``--model``) or the Keras one (``--run``)."""
    if args.model:
        # The resize's small matrix products run fastest on one BLAS thread (several threads
        # spin-wait against each other and the model); set before NumPy loads.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        from skin_lesion.bundle import Bundle

        return Bundle(args.model)
    from skin_lesion.inference import Predictor

    return Predictor(args.run, tta=args.tta)


def heatmap_path(target: str, image: str, many: bool) -> Path:
    """Where an image's heatmap goes: ``target`` itself for one image, ``target/<name>_heatmap.png`` for several."""
    if not many:
        return Path(target)
    Path(target).mkdir(parents=True, exist_ok=True)
    return Path(target) / f"{Path(image).stem}_heatmap.png"


def predict_one(predictor, path: str, args, many: bool) -> dict:
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
        record["heatmap"] = str(save_heatmap(heatmap_path(args.heatmap, path, many), rgb, analysis.heatmap))
    return record


def predict_line(r: dict) -> str:
    """One image's answer as a line of text."""
    refused = f"{r['message']} (guard score {r['guard_score']:.2f}; above 1 is refused)" if r["recognised"] is False else ""
    if "top3" not in r:
        return f"{r['image']}: {refused}"
    top = ", ".join(f"{t['dx']} {t['probability']:.1%}" for t in r["top3"])
    mel = "" if r["melanoma_above_threshold"] is None else "; melanoma above its operating threshold" if r["melanoma_above_threshold"] else ""
    return (f"{r['image']}: {r['label']}, {r['label_name']} ({top}){mel}" + (f" -> {r['heatmap']}" if r.get("heatmap") else "")
            + (f" [scored anyway: {refused}]" if refused else ""))


def predict_cmd(args) -> int:
    if bool(args.run) == bool(args.model):
        raise UserError("predict: pass --model BUNDLE (an exported bundle, no TensorFlow) or --run RUN (a run folder)")
    if (args.heatmap or args.show_anyway) and not args.model:
        raise UserError("predict: --heatmap and --show-anyway work on an exported bundle; pass --model BUNDLE (`export --run RUN --out BUNDLE` makes one)")
    from skin_lesion.info import ImageError

    predictor = make_predictor(args)
    failed, results = 0, []
    for path in args.images:
        try:
            record = predict_one(predictor, path, args, many=len(args.images) > 1)
        except ImageError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        results.append(record)
        if not args.json:
            print(predict_line(record))
    if args.json:
        print(json.dumps({"predictions": results, "note": DISCLAIMER}, indent=2))
    else:
        print(DISCLAIMER)
    return 1 if failed else 0


def serve_cmd(args) -> int:
    from skin_lesion.serve import serve

    serve(args.model, host=args.host, port=args.port)
    return 0


def export_cmd(args) -> int:
    from skin_lesion.export import export_bundle

    out = export_bundle(args.run, args.out)
    print(f"bundle: {out} ({', '.join(sorted(p.name for p in out.iterdir()))}); predict with `python -m skin_lesion predict --model {out} IMAGE`")
    return 0


def stack_cmd(args) -> int:
    from skin_lesion.stacking import stack_runs

    m = stack_runs(args.runs, args.out, **operating_point(args))
    layer, c, op = m["decision_layer"], m["calibrated"], m["mel_operating_point"]
    print(f"decision layer: {' + '.join(layer['models'])}{' + metadata' if layer['metadata'] else ''}, C={layer['C']} "
          f"(validation CV balanced accuracy {layer['cv_balanced_accuracy']:.4f}) -> {Path(args.out) / 'metrics.json'}")
    print_headline(c, ece=True)
    print(operating_point_line(op))
    return 0


def ensemble_cmd(args) -> int:
    from skin_lesion.ensemble import mean_runs

    m = mean_runs(args.runs, args.out, logit_adjust=args.logit_adjust, **operating_point(args))
    adjusted = f", logit adjustment tau={args.logit_adjust:g}" if args.logit_adjust else ""
    print(f"mean ensemble of {len(args.runs)} runs{adjusted} (validation balanced accuracy {m.validation['balanced_accuracy']:.4f}) -> {', '.join(str(f) for f in m.files)}")
    print_headline(m.calibrated, ece=True)
    print(operating_point_line(m.mel_operating_point))
    return 0


def metadata_prior_cmd(args) -> int:
    from skin_lesion.metadata_prior import measure, parse_parts

    print(measure(args.ensembles, args.beta, args.data, args.groups_beta, parse_parts(args.features)))
    return 0


def summarize_cmd(args) -> int:
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


def refuse_cluster(command: str) -> None:
    """Stop a command that trains in one process when TF_CONFIG names a cluster of workers."""
    from skin_lesion.workers import cluster_size

    if cluster_size() > 1:
        raise UserError(f"{command}: trains in one process; unset TF_CONFIG (several workers train one run at a time with `train`)")


def report_cmd(args) -> int:
    refuse_cluster("report")
    from skin_lesion.report import build_report

    out = build_report(profile=args.profile, data=args.data, out=args.out, seed=args.seed, runs=args.runs)
    print(f"report: {out}")
    return 0


def tune_cmd(args) -> int:
    from skin_lesion.tune import tune

    best = tune(args.run, data=args.data, trials=args.trials, epochs=args.epochs, model=args.model, max_per_class=args.max_per_class, seed=args.seed)
    print(f"best config: {best}")
    return 0


def study_cmd(args) -> int:
    refuse_cluster("study")
    from skin_lesion.study import evaluate_study, shift_table, train_study

    train_study(args.runs, args.profile, args.data, seed=args.seed, pretrained=args.backbone, holdout_source=args.holdout_source)
    table = shift_table(evaluate_study(args.runs, args.profile))
    out = Path(args.runs) / "study_metrics.csv"
    table.to_csv(out)
    tested_on = f"the held-out source {args.holdout_source}" if args.holdout_source else "the lesion-grouped test split"
    print(f"the study ({args.profile}, seed {args.seed}) on {tested_on} -> {out}")
    print(table.round(3).to_string())
    return 0
