"""Command line: ``sparsediff train | sample | evaluate | study | report``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparsediff.config import CONFIG_DIR, absolute_paths, load_config, parse_override
from sparsediff.diffusion.samplers import SAMPLERS

EPILOG = """\
examples:
  sparsediff train ldm-fashion-mnist --set sparse.method=rigl --set sparse.sparsity=0.5
  sparsediff train chirodiff-kanjivg --run-dir runs/kanji --resume
  sparsediff sample runs/kanji --num 16 --sampler ddpm --out kanji.png
  sparsediff evaluate runs/fmnist --num-samples 1000 --steps 50
  sparsediff study configs/studies/quick.toml && sparsediff report studies/quick
"""


def _default_run_dir(name: str, overrides: dict) -> Path:
    method = overrides.get("sparse.method")
    suffix = f"-{method}" if method else ""
    if "sparse.sparsity" in overrides:
        suffix += f"-s{overrides['sparse.sparsity']}"
    return Path("runs") / f"{name}{suffix}"


def _sampling(args: argparse.Namespace) -> dict:
    """The sampler options shared by ``sample`` and ``evaluate`` (None = the run's config)."""
    return {"sampler": args.sampler, "steps": args.steps, "eta": args.eta}


def cmd_train(args: argparse.Namespace) -> int:
    """Train a run from a preset name or TOML path."""
    from sparsediff.pipelines import train

    overrides = absolute_paths(dict(parse_override(o) for o in args.set))
    if args.threads is not None:
        overrides["train.threads"] = args.threads
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(cfg.name, overrides)
    summary = train(cfg, run_dir, resume=args.resume, overwrite=args.overwrite)
    print(json.dumps({"run_dir": str(run_dir), **summary}, default=str))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample a grid from a finished run."""
    from sparsediff.pipelines import write_samples

    out = write_samples(
        args.run_dir, args.out, args.num, seed=args.seed, device=args.device, **_sampling(args)
    )
    print(out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a finished run with the documented protocol."""
    from sparsediff.pipelines import evaluate

    seeds = None
    if args.seed_range:
        start, _, stop = args.seed_range.partition(":")
        seeds = (int(start), int(stop))
    record = evaluate(
        args.run_dir,
        args.num_samples,
        ema=args.ema,
        seed=args.seed,
        seed_range=seeds,
        batch_size=args.batch_size,
        device=args.device,
        **_sampling(args),
    )
    print(json.dumps(record.get("metrics", record), indent=2, default=str))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """Run (or resume) a study grid."""
    from sparsediff.study.sweep import run_study

    devices = args.devices.split(",") if args.devices else None
    out = run_study(Path(args.study), Path(args.out) if args.out else None, devices)
    print(out)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write a study's Markdown report and plots."""
    from sparsediff.study.report import write_report

    print(write_report(Path(args.study_dir)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every option documented in ``--help``)."""
    presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
    parser = argparse.ArgumentParser(
        prog="sparsediff",
        description="Sparse-to-sparse training of diffusion models (Static, RigL, MagRan, dense).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: half the cores, at most 8; train: train.threads)",
    )
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")

    p = sub.add_parser(
        "train", help="train a run", description="Train a run from a preset.", parents=[common]
    )
    p.add_argument("config", help=f"preset name or TOML path; presets: {presets}")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted, e.g. sparse.sparsity=0.75); repeatable; "
        "see src/sparsediff/config.py for every key and its default",
    )
    p.add_argument("--run-dir", help="run directory (default runs/<preset>[-method][-sS])")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its checkpoints, with its own settings",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete the run in --run-dir and start again"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample a grid from a finished run", parents=[common])
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--num", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="sampler (default: sample.*)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (network evaluations)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out", default="samples.png", help="output PNG (sketches also write SVGs)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "evaluate", help="FID/KID/precision/recall, parameters and FLOPs", parents=[common]
    )
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--num-samples", type=int, default=None, help="generated samples (eval.*)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="sampler")
    p.add_argument("--steps", type=int, default=None, help="sampler steps")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta")
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample from the EMA weights (default) or the raw ones",
    )
    p.add_argument("--seed", type=int, default=None, help="first sample seed")
    p.add_argument(
        "--seed-range",
        default=None,
        metavar="A:B",
        help="only generate samples A..B-1 (split a large evaluation; the metrics come when "
        "the ranges cover all samples)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="samples per batch (default eval.batch_size); changes speed, never the samples",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "study", help="run a sweep: datasets x methods x sparsity x p x seeds", parents=[common]
    )
    p.add_argument("study", help="study TOML (see configs/studies/)")
    p.add_argument("--out", default=None, help="study directory (default from the TOML)")
    p.add_argument("--devices", default=None, help="comma list, one run per device (cuda:0,...)")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser(
        "report", help="write a study's Markdown report, plots and sample grids", parents=[common]
    )
    p.add_argument("study_dir", help="a study directory holding results.jsonl")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sparsediff`` command."""
    args = build_parser().parse_args(argv)
    if args.command != "train":  # a run sets its own threads (train.threads)
        import torch

        from sparsediff.pipelines.run import default_threads

        torch.set_num_threads(args.threads or default_threads())
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("sparsediff: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line, no traceback (unless --debug): most errors are input
        if args.debug:
            raise
        text = str(err).strip()
        if not isinstance(err, ValueError | OSError):  # ours name the file and the problem
            text = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
            text += " (run with --debug for the traceback)"
        print(f"sparsediff: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
