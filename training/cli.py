"""``dr-train``: prepare (cache), train, evaluate, interpolate, fit the grader and the intake checks (gradability, laterality),
export, demo. Thin: parsing and messages only."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from training.common import also_after_subcommands
from training.config import ConfigError, TrainingConfig, load_training_config

OPTION_OF = {"image_size": "--image-size", "backbone": "--backbone", "epochs": "--epochs", "batch_size": "--batch-size",
             "max_steps_per_epoch": "--max-steps-per-epoch", "lr": "--lr", "device": "--device", "out_dir": "--out-dir"}


def _cfg(args: argparse.Namespace) -> TrainingConfig:
    """The config file's settings with the command line's overrides, validated as the file's are (a copy with
    updates skips validation: --epochs 0 and --image-size 100 were taken, and failed later or silently)."""
    from pydantic import ValidationError

    cfg = load_training_config(args.config)
    updates = {}
    for key in ("epochs", "batch_size", "max_steps_per_epoch", "lr", "device"):
        value = getattr(args, key, None)
        if value is not None:
            updates[key] = value
    if getattr(args, "out_dir", None):
        updates["out_dir"] = Path(args.out_dir).resolve()
    model_updates = {"image_size": args.image_size} if getattr(args, "image_size", None) else {}
    if getattr(args, "backbone", None):
        model_updates["backbone"] = args.backbone
    try:
        return TrainingConfig.model_validate({**cfg.model_dump(), "train": {**cfg.train.model_dump(), **updates},
                                              "model": {**cfg.model.model_dump(), **model_updates}})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = str(err["loc"][-1]) if err["loc"] else ""
            option = OPTION_OF.get(key, key)
            problems.append(f"{option} {err.get('input')!r}: {err['msg']}" if key in {**updates, **model_updates}
                            else f"{'.'.join(map(str, err['loc']))}: {err['msg']}")
        raise ConfigError("; ".join(problems)) from None


def cmd_prepare(args: argparse.Namespace) -> int:
    from training.data.cache import build_cache
    from training.data.sources import load_all
    from training.data.split import configured_split
    from training.train import data_summary

    cfg = _cfg(args)
    records = load_all(cfg.data)
    build_cache(records, cfg.model.image_size, cfg.data.cache_dir)
    splits = configured_split(cfg.data, records)
    print(json.dumps(data_summary(splits), indent=1))
    print(f"cached {len(records)} images at {cfg.model.image_size}px in {cfg.data.cache_dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training.train import run_training

    cfg = _cfg(args)
    state = run_training(cfg, kind="real", resume=not args.restart, command="dr-train " + " ".join(sys.argv[1:]))
    print(f"done: {state.epoch} epochs, best validation score {state.best_score:.4f}; checkpoints in {cfg.train.out_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_checkpoint

    cfg = _cfg(args)
    result = evaluate_checkpoint(cfg, Path(args.checkpoint), args.split, Path(args.out) if args.out else None,
                                 tta=args.tta, bootstrap=args.bootstrap)
    summary = dict(result["summary"])
    table = summary.pop("table", [])
    print(json.dumps(summary, indent=1))
    print("\n".join(table))
    print(f"metrics and plots written to {result['out_dir']}")
    return 0


def cmd_fit_grader(args: argparse.Namespace) -> int:
    from training.evaluate import fit_grader_for_checkpoint

    result = fit_grader_for_checkpoint(_cfg(args), Path(args.checkpoint), Path(args.output), args.c, args.with_segmentation)
    print(json.dumps(result, indent=1))
    return 0


def cmd_blend_grader(args: argparse.Namespace) -> int:
    from training.evaluate import blend_grader_for_checkpoint

    result = blend_grader_for_checkpoint(_cfg(args), Path(args.checkpoint), Path(args.grader_from), Path(args.output),
                                         args.heads_weight)
    print(json.dumps(result, indent=1, default=float))
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    from training.interpolate import interpolate_checkpoints

    result = interpolate_checkpoints(_cfg(args), Path(args.start), Path(args.end), args.alpha, Path(args.output),
                                     reset_bn=args.reset_bn)
    print(json.dumps(result, indent=1, default=float))
    print(f"next: dr-train blend-grader --checkpoint {args.output} ... (tempers, blends and calibrates it on validation)")
    return 0


def cmd_grade_heads(args: argparse.Namespace) -> int:
    from training.grading import run_grading_stage

    cfg = _cfg(args)
    out = Path(args.out) if args.out else cfg.train.out_dir
    summary = run_grading_stage(cfg, Path(args.init_from), out, epochs=args.epochs)
    print(json.dumps({k: v for k, v in summary.items() if k != "grid"}, indent=1, default=float))
    return 0


def cmd_fit_quality(args: argparse.Namespace) -> int:
    from training.fit_quality import fit_quality

    metrics = fit_quality(_cfg(args), Path(args.output), per_source=args.per_source,
                          target_false_ungradable=args.target_false_ungradable, seed=args.seed)
    test = metrics["test"]
    print(json.dumps({"test": {k: test[k] for k in ("gradable_called_ungradable", "degraded_caught", "not_fundus_refused")},
                      "thresholds": test["thresholds"]}, indent=1))
    print(f"gradability model written to {args.output} (all metrics in {Path(args.output).with_suffix('.metrics.json')})")
    return 0


def cmd_fit_laterality(args: argparse.Namespace) -> int:
    from training.fit_laterality import fit_laterality

    metrics = fit_laterality(_cfg(args), Path(args.output), target_accuracy=args.target_accuracy,
                             chirality_epochs=args.chirality_epochs, upright_sources=args.upright_source,
                             init=Path(args.init) if args.init else None, chirality_networks=args.chirality_networks)
    print(json.dumps(metrics["test"], indent=1))
    print(f"laterality model written to {args.output} (all metrics in {Path(args.output).with_suffix('.metrics.json')})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.checkpoint import export_checkpoint

    src, dst = Path(args.checkpoint), Path(args.output)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise ConfigError(f"export {src} {dst}: the output is the input; exporting strips the optimizer state, so the "
                          "run could no longer be resumed. Give the shipped file another name")
    replaced = dst.is_file()
    test = None
    if args.test_metrics:
        try:
            test = json.loads(Path(args.test_metrics).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--test-metrics {args.test_metrics}: not JSON ({exc}); give the metrics.json that "
                              "`dr-train evaluate --split test` wrote") from None
    out = export_checkpoint(src, dst, half=not args.full_precision, test_metrics=test)
    print(f"exported {src} -> {out} ({out.stat().st_size / 1e6:.1f} MB)" + (" (replaced the file there)" if replaced else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from training.demo import train_demo_model

    path = train_demo_model(Path(args.output), Path(args.work), minutes=args.minutes)
    print(f"demo model (synthetic data, not for clinical use) written to {path}")
    return 0


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dr-train", description="Build and validate the DR multi-task model.")
    p.add_argument("--config", default="config.toml", help="settings file (default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)

    def overrides(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--image-size", type=int, help="override [model] image_size")
        sp.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50"], help="override [model] backbone")

    sp = sub.add_parser("grade-heads", help="grading stage: fit the DR/DME evidence heads on a frozen trunk (resumable)")
    sp.add_argument("--init-from", required=True, help="checkpoint whose encoder, decoder and lesion head are kept")
    sp.add_argument("--out", help="output folder (default: [train] out_dir)")
    sp.add_argument("--epochs", type=int, default=150, help="epochs per grid point on the cached vectors")
    sp.set_defaults(func=cmd_grade_heads)

    sp = sub.add_parser("prepare", help="read all sources, check them and build the preprocessing cache")
    overrides(sp)
    sp.set_defaults(func=cmd_prepare)

    sp = sub.add_parser("train", help="train; resumes from <out_dir>/last.pt when present")
    overrides(sp)
    sp.add_argument("--epochs", type=int)
    sp.add_argument("--batch-size", type=int)
    sp.add_argument("--lr", type=float)
    sp.add_argument("--max-steps-per-epoch", type=int)
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"])
    sp.add_argument("--out-dir", help="override [train] out_dir")
    sp.add_argument("--restart", action="store_true", help="ignore last.pt and start from scratch")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("evaluate", help="metrics (JSON) and plots (PNG) of a checkpoint on a split")
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--split", choices=["train", "val", "test"], default="val")
    sp.add_argument("--out", help="output folder (default: beside the checkpoint, eval-<split>)")
    sp.add_argument("--tta", action="store_true", help="average with a horizontally flipped pass")
    sp.add_argument("--bootstrap", type=_count, default=1000, help="bootstrap resamples for 95%% intervals (0: none)")
    sp.add_argument("--device", choices=["auto", "cpu", "cuda"])
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("fit-grader", help="fit the lesion-evidence grader (train split) and the referral threshold (val)")
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--output", required=True)
    sp.add_argument("--c", type=float, default=1.0, help="inverse regularisation strength (default %(default)s)")
    sp.add_argument("--with-segmentation", action="store_true",
                    help="use the network's lesion maps as evidence too (one forward per training image)")
    sp.set_defaults(func=cmd_fit_grader)

    sp = sub.add_parser("blend-grader", help="ensemble: a network checkpoint's heads blended with another checkpoint's "
                        "lesion-evidence regression, recalibrated and thresholded on validation")
    sp.add_argument("--checkpoint", required=True, help="the network (its DR/DME heads grade), without a grader")
    sp.add_argument("--grader-from", required=True, help="a checkpoint carrying the regression (`dr-train fit-grader`)")
    sp.add_argument("--output", required=True)
    sp.add_argument("--heads-weight", type=float,
                    help="the heads' share, 0-1 (default: chosen by patient-grouped cross-validation on validation)")
    sp.set_defaults(func=cmd_blend_grader)

    sp = sub.add_parser("interpolate", help="weight-space ensemble (WiSE-FT): (1 - alpha) x start + alpha x end, where "
                        "end was fine-tuned from start; threshold chosen on validation")
    sp.add_argument("--start", required=True, help="the exact checkpoint the fine-tuning started from")
    sp.add_argument("--end", required=True, help="the fine-tuned checkpoint (a blend-grader's temperature is undone)")
    sp.add_argument("--alpha", type=float, required=True, help="the fine-tuned network's share, 0-1")
    sp.add_argument("--output", required=True)
    sp.add_argument("--reset-bn", type=int, default=0, metavar="N",
                    help="re-measure batch-norm statistics on N graded training photos (default 0: averaged)")
    sp.set_defaults(func=cmd_interpolate)

    sp = sub.add_parser("fit-quality", help="fit the gradability model on real photos, their degradations and non-fundus pictures")
    sp.add_argument("--output", default="models/quality.pt")
    sp.add_argument("--per-source", type=int, default=800, help="photos drawn from each source (default %(default)s)")
    sp.add_argument("--target-false-ungradable", type=float, default=0.015,
                    help="most real gradable validation photos called ungradable (default %(default)s)")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_fit_quality)

    sp = sub.add_parser("fit-laterality", help="fit the eye-from-the-photo model on the sources that name the eye")
    sp.add_argument("--output", default="models/laterality.pt")
    sp.add_argument("--target-accuracy", type=float, default=0.97,
                    help="accuracy the confident train+validation photos must reach (default %(default)s)")
    sp.add_argument("--chirality-epochs", type=int, default=0,
                    help="also train the chirality network for this many epochs (0: the landmarks alone; E12)")
    sp.add_argument("--upright-source", action="append", default=[], metavar="SOURCE",
                    help="a source whose cameras show upright photos: its unnamed train/val photos teach the network "
                         "with the disc's side as their eye (repeat; e.g. idrid-grading, manifest:messidor2)")
    sp.add_argument("--init", default="", help="grading checkpoint whose encoder starts the network (e.g. models/baseline.pt)")
    sp.add_argument("--chirality-networks", type=int, default=1, metavar="N",
                    help="train N chirality networks alike (seeds 0..N-1) and join their mean logit (default 1; E13)")
    sp.set_defaults(func=cmd_fit_laterality)

    sp = sub.add_parser("export", help="strip optimizer state and store half-precision weights for shipping")
    sp.add_argument("checkpoint")
    sp.add_argument("output")
    sp.add_argument("--full-precision", action="store_true")
    sp.add_argument("--test-metrics", help="metrics.json of `evaluate --split test`, summarised into the checkpoint")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("demo", help="train a small demo model on synthetic fundus images (not for clinical use)")
    sp.add_argument("--output", default="models/demo.pt")
    sp.add_argument("--work", default=".cache/demo")
    sp.add_argument("--minutes", type=float, default=3.0)
    sp.set_defaults(func=cmd_demo)
    also_after_subcommands(p, "--config")  # `dr-train evaluate --config other.toml` too
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        command: Callable[[argparse.Namespace], int] = args.func
        return command(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output path that is a file, a full disk: the path and the system's reason, no traceback
        if exc.filename:
            print(f"error: {exc.filename}: {exc.strerror or exc}; check the path given on the command line or in the "
                  "config", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
