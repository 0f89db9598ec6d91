"""The ``train`` command: the run's config from its options (or ``--config``),
the checks of ``--split``, ``--refit-from`` and ``--resume`` before TensorFlow
starts, and the local worker processes."""

from __future__ import annotations

import logging
from pathlib import Path

from skin_lesion.commands import evaluate_and_print
from skin_lesion.info import UserError

log = logging.getLogger("skin_lesion")


def train_config(args):
    """The run's TrainConfig: ``--config`` (if any) overridden by the options given."""
    from skin_lesion.config import TrainConfig

    if args.config:
        base = TrainConfig.load(Path(args.config))
        base.run, base.data = args.run or base.run, args.data or base.data
    else:
        base = TrainConfig()
    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None and k not in ("run", "data")}
    if getattr(args, "split_file", None):
        overrides["split_file"] = str(Path(args.split_file).resolve())  # config.json says which file, wherever it is read from
        if args.max_per_class is None:
            overrides["max_per_class"] = None  # a saved config's profile cap; the table decides the images
    return TrainConfig(**{**base.__dict__, **overrides, "run": args.run or base.run, "data": args.data or base.data})


def check_split_file(cfg, evaluate: bool) -> None:
    """Check ``train --split``'s table (and the options beside it) before any worker or
    TensorFlow starts, so a problem is one line; ``evaluate``: the run will be scored on its test rows."""
    from skin_lesion.data import load_dataset
    from skin_lesion.info import DataError
    from skin_lesion.splits import read_split_file

    cfg.resolved()
    table = read_split_file(cfg.split_file, load_dataset(cfg.data).meta)
    if evaluate and not (table["split"] == "test").any():
        raise DataError(f"{cfg.split_file}: no test rows to score the run on; add some, or pass --no-eval")


def worker_argv(argv: list[str]) -> list[str]:
    """A worker's ``train`` options: the launcher's, less ``--local-workers N``, plus ``--no-eval``
    (the launcher evaluates once every worker is done)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--local-workers":
            skip = True
        elif not a.startswith("--local-workers="):
            out.append(a)
    return [*out, "--no-eval"] if "--no-eval" not in out else out


REFIT_KEEPS = ("run", "data", "devices", "gpu_path")  # the TrainConfig options a refit takes from the command line
OPTION_FLAGS = {"split_file": "split"}  # TrainConfig fields whose option is not the field's name


def typed_options(args, keep: tuple[str, ...] = REFIT_KEEPS) -> dict:
    """The TrainConfig options typed on the command line, less ``keep`` (by default those a refit takes anew)."""
    from skin_lesion.config import TrainConfig

    return {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None and k not in keep}


def warn_resume_ignores(args, cfg) -> None:
    """``train --resume`` continues a run on its own config.json: name each option typed beside it that differs, so none is lost silently."""
    from skin_lesion.runs import RunFolder

    run = RunFolder(cfg.run)
    if not run.config_file.exists():
        return  # train says there is nothing to resume
    saved = run.config().__dict__
    typed = {k: getattr(cfg, k) for k in typed_options(args, keep=("run",))}  # as train_config read them (--split resolved)
    differ = [f"--{OPTION_FLAGS.get(k, k.replace('_', '-'))} {v} (the run has {'none' if saved[k] is None else saved[k]})"
              for k, v in typed.items() if v != saved[k]]
    if differ:
        log.warning("train --resume: %s continues with its own config.json; ignoring %s", run.path, ", ".join(differ))


def refit_config(args):
    """The refit run's config (``refit.start_refit``), refusing options that would
    change the source run's recipe: a refit repeats it on more images."""
    from dataclasses import replace

    from skin_lesion.refit import start_refit

    given = sorted(typed_options(args))
    clash = [*given, *(["config"] if args.config else []), *(["resume"] if args.resume else []), *(["local_workers"] if args.local_workers else [])]
    if clash:
        flags = [OPTION_FLAGS.get(c, c.replace("_", "-")) for c in clash]
        raise UserError(f"train --refit-from: repeats {args.refit_from}'s own config; drop --{', --'.join(flags)} "
                         "(a stopped refit resumes with `train --resume --run OUT` alone)")
    if not args.run:
        raise UserError("train --refit-from: name the new run folder with --run")
    from skin_lesion.workers import cluster_size

    if cluster_size() > 1:
        raise UserError("train --refit-from: start the refit on one machine without TF_CONFIG (stop it after its first epoch line), "
                         "then run `train --resume --run OUT` on every worker")
    cfg = start_refit(args.refit_from, args.run, args.refit_half)
    return replace(cfg, data=args.data or cfg.data, devices=args.devices or cfg.devices, gpu_path=args.gpu_path if args.gpu_path is not None else cfg.gpu_path)


def train_cmd(args) -> int:
    from skin_lesion.workers import cluster_size, is_chief, launch_local_workers, stop_with_launcher

    if args.refit_half is not None and not args.refit_from:
        raise UserError("train --refit-half: goes with --refit-from RUN")
    cfg = refit_config(args) if args.refit_from else train_config(args)
    if args.resume and not args.refit_from and is_chief():
        warn_resume_ignores(args, cfg)
    if cfg.split_file and not args.resume and is_chief():
        check_split_file(cfg, evaluate=not args.no_eval)
    stop_with_launcher()
    if (args.local_workers or cluster_size() > 1) and args.folds and args.fold is None:
        raise UserError("train: several workers train one run; for k-fold CV pass --fold I to each fold's run")
    if args.local_workers:
        launch_local_workers(worker_argv(args.argv[1:]), args.local_workers, log_dir=Path(cfg.run).with_name(Path(cfg.run).name + ".workers"))
        return 0 if args.no_eval else evaluate_and_print(cfg.run, args.tta)
    if args.folds and args.fold is None:
        from skin_lesion.study import cross_validate

        out = cross_validate(cfg, args.folds, tta=args.tta)
        for k, v in out["summary"].items():
            print(f"{k}: {v['mean']:.4f} +/- {v['sd']:.4f}")
        return 0
    from skin_lesion.train import train

    run = train(cfg, resume=args.resume)
    return 0 if args.no_eval or not is_chief() else evaluate_and_print(run, args.tta)
