"""Command line: ``sparsediff train | sample | evaluate | export | condense | presets | study |
report``.

Every command prints a line saying what it does and where it writes, progress bars while it
works (stderr) and a short human summary at the end; the full records are files in the run or
study directory (``--json`` also prints them). Errors are one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import sparsediff
from sparsediff.config import list_presets, list_studies, parse_override, study_path
from sparsediff.diffusion.samplers import SAMPLERS

EPILOG = """\
examples:
  sparsediff presets
  sparsediff train ldm-fashion-mnist --set sparse.method=rigl --set sparse.sparsity=0.5
  sparsediff train chirodiff-kanjivg --run-dir runs/kanji --steps 2000 --threads 2
  sparsediff train runs/kanji/config.json --run-dir runs/kanji --resume
  sparsediff sample runs/kanji --num 16 --sampler ddpm
  sparsediff evaluate runs/fmnist --num-samples 1000 --steps 50
  sparsediff export runs/fmnist --out exported/fmnist
  sparsediff condense runs/fmnist-channel --out runs/fmnist-channel-condensed
  sparsediff study quick && sparsediff report studies/quick
"""
# train shortcuts: flag -> config key
SHORTCUTS = {
    "device": "train.device",
    "precision": "train.precision",
    "seed": "seed",
    "batch_size": "train.batch_size",
    "steps": "train.steps",
    "threads": "train.threads",
}


def _at_least(low: int) -> Any:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        return value

    return parse


def _non_negative_float(text: str) -> float:
    """An argparse type: a finite float >= 0 (DDIM's eta)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def _seed_range(text: str) -> tuple[int, int]:
    """An argparse type: ``A:B`` with 0 <= A < B."""
    start, sep, stop = text.partition(":")
    try:
        bounds = int(start), int(stop)
    except ValueError:
        bounds = None
    if not sep or bounds is None or not 0 <= bounds[0] < bounds[1]:
        raise argparse.ArgumentTypeError(f"{text!r} is not A:B with 0 <= A < B (e.g. 0:500)")
    return bounds


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line and exit code 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        """Print ``sparsediff: error: ...`` (the command's usage is one --help away)."""
        self.exit(2, f"sparsediff: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _say(*lines: str) -> None:
    """Print for a person, from one process only (rank 0 under torchrun)."""
    if os.environ.get("RANK", "0") == "0":
        print(*lines, sep="\n", flush=True)


def _default_run_dir(name: str, overrides: dict) -> Path:
    method = overrides.get("sparse.method")
    suffix = f"-{method}" if method else ""
    if "sparse.sparsity" in overrides:
        suffix += f"-s{overrides['sparse.sparsity']}"
    return Path("runs") / f"{name}{suffix}"


def _sampling(args: argparse.Namespace) -> dict:
    """The sampler options shared by ``sample`` and ``evaluate`` (None = the run's config)."""
    return {"sampler": args.sampler, "steps": args.steps, "eta": args.eta}


def _json(args: argparse.Namespace, data: Any) -> None:
    if args.json:
        _say(json.dumps(data, indent=2, default=str))


def cmd_train(args: argparse.Namespace) -> int:
    """Train a run from a preset name, a TOML path or a run's config.json."""
    overrides = dict(parse_override(o) for o in args.set)
    for flag, key in SHORTCUTS.items():
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    from sparsediff.pipelines import load_config  # the pipelines own their config sections
    from sparsediff.workflows import train

    cfg = load_config(args.config, overrides, paths_from_cwd=True)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0

    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(cfg.name, overrides)
    s = cfg.sparse
    what = "dense" if s.method == "dense" else f"{s.method} at sparsity {s.sparsity:g}"
    verb = "resuming" if args.resume else "training"
    steps = cfg.train.steps
    _say(f"{verb} {cfg.name or 'a run'} ({cfg.pipeline}, {what}, {steps} steps) in {run_dir}")
    start = time.perf_counter()
    summary = train(cfg, run_dir, resume=args.resume, overwrite=args.overwrite)
    done = summary["step"] >= cfg.train.steps
    density = summary.get("sparse", {}).get("density")
    _say(
        f"{'finished' if done else 'stopped'} at step {summary['step']} in "
        f"{time.perf_counter() - start:.0f} s"
        + (f"; density {density:.3f}" if density is not None else "")
        + (f"; samples {run_dir / 'samples.png'}" if done else "; resume with --resume")
    )
    _json(args, {"run_dir": str(run_dir), **summary})
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample a grid from a finished run."""
    from sparsediff.workflows import write_samples

    out = args.out or Path(args.run_dir) / f"samples-seed{args.seed}-n{args.num}.png"
    _say(f"sampling {args.num} from {args.run_dir} into {out}")
    path = write_samples(
        args.run_dir,
        out,
        args.num,
        seed=args.seed,
        device=args.device,
        progress=True,
        **_sampling(args),
    )
    _say(f"wrote {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a finished run with the documented protocol."""
    from sparsediff.workflows.evaluation import PartialEvaluation, evaluate

    seeds = args.seed_range
    _say(f"evaluating {args.run_dir} (records go into the run directory)")
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
    if isinstance(record, PartialEvaluation):
        _say(f"samples {seeds[0]}..{seeds[1] - 1} done; shards so far: {record.shards}")
        _json(args, {"partial": True, "protocol": record.protocol, "shards": record.shards})
        return 0
    m = record.metrics
    _say(
        f"FID {m['fid']:.2f}, KID {m['kid_mean']:.4f} ± {m['kid_std']:.4f}, precision "
        f"{m['precision']:.3f}, recall {m['recall']:.3f} ({m['num_fake']} vs "
        f"{m['num_real']} images); record: {record.record}"
    )
    for warning in record.warnings:
        print(f"sparsediff: warning: {warning}", file=sys.stderr)
    _json(args, {**record.to_dict(), "record": record.record})
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a finished run: a diffusers folder (LDM) or weights + config (ChiroDiff)."""
    from sparsediff.workflows.export import export_run

    _say(f"exporting {args.run_dir} into {args.out}")
    compact = args.compact or bool(args.dtype)
    out = export_run(
        args.run_dir, args.out, compact=compact, value_dtype=args.dtype, overwrite=args.overwrite
    )
    _say(f"wrote {out} (model card: {Path(out) / 'README.md'})")
    _json(args, {"out": str(out)})
    return 0


def cmd_condense(args: argparse.Namespace) -> int:
    """Condense a finished channel-sparse run: a smaller dense network, same samples."""
    from sparsediff.workflows.export import condense_run

    _say(f"condensing {args.run_dir} into {args.out}")
    info = condense_run(args.run_dir, args.out, overwrite=args.overwrite)
    _say(
        f"parameters {info['params']:,} -> {info['params_condensed']:,}; FLOPs per network "
        f"evaluation {info['flops_dense']:.3g} -> {info['flops_condensed']:.3g}; sample or "
        f"evaluate it like a run: sparsediff sample {args.out}"
    )
    _json(args, info)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    """List the presets and the studies."""
    for title, items in (
        ("presets (sparsediff train NAME)", list_presets()),
        ("studies (sparsediff study NAME)", list_studies()),
    ):
        width = max(map(len, items), default=0)
        _say(f"{title}:", *(f"  {name:<{width}}  {about}" for name, about in items.items()))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """Run (or resume) a study grid."""
    from sparsediff.study.sweep import run_study

    devices = args.devices.split(",") if args.devices else None
    out = run_study(
        study_path(args.study), Path(args.out) if args.out else None, devices, only=args.cells
    )
    _say(f"study finished: {out} (sparsediff report {out})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write a study's Markdown report and plots."""
    from sparsediff.study.report import write_report

    _say(f"wrote {write_report(Path(args.study_dir))}")
    return 0


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the epilog's layout and show every real default (unset ones say where from)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


Command = Callable[[str, str, Callable[[argparse.Namespace], int]], argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every option documented in ``--help``)."""
    parser = _Parser(
        prog="sparsediff",
        description="Sparse-to-sparse training of diffusion models (Static, RigL, MagRan, dense).",
        epilog=EPILOG,
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=sparsediff.__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = _Parser(add_help=False)
    common.add_argument(
        "--threads",
        type=_at_least(1),
        default=None,
        help="torch CPU threads; unset: half the cores, at most 8 (train: train.threads)",
    )
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument("--json", action="store_true", help="also print the full record")

    def command(name: str, about: str, func: Callable[[argparse.Namespace], int]) -> Any:
        p = sub.add_parser(name, help=about, description=about, parents=[common])
        p.formatter_class = _Help
        p.set_defaults(func=func)
        return p

    for add in (_train_parser, _sample_parser, _export_parser, _condense_parser):
        add(command)
    _evaluate_parser(command)
    command("presets", "list the presets and the studies", cmd_presets)
    _study_parsers(command)
    return parser


def _train_parser(command: Command) -> None:
    p = command("train", "train a run", cmd_train)
    p.add_argument(
        "config", help="preset name (see 'sparsediff presets'), a TOML path or a run's config.json"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted, e.g. sparse.sparsity=0.75); repeatable; every key "
        "and its default: 'sparsediff train PRESET --print-config'",
    )
    p.add_argument("--run-dir", help="run directory (unset: runs/<preset>[-method][-sS])")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its checkpoints, with its own settings",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run's files in --run-dir and start again (refused where the folder "
        "holds anything else)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")
    for flag, key in SHORTCUTS.items():
        if flag != "threads":
            kind = {"device": str, "precision": str}.get(flag, int)
            p.add_argument(f"--{flag.replace('_', '-')}", type=kind, help=f"sets {key}")


def _sample_parser(command: Command) -> None:
    p = command("sample", "write a grid of samples from a finished run", cmd_sample)
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--num", type=_at_least(1), default=16, help="number of samples")
    p.add_argument("--sampler", choices=SAMPLERS, help="sampler (unset: the run's sample.sampler)")
    p.add_argument(
        "--steps", type=_at_least(1), help="sampler steps (unset: the run's sample.steps)"
    )
    p.add_argument("--eta", type=_non_negative_float, help="DDIM eta (unset: the run's sample.eta)")
    p.add_argument("--seed", type=_at_least(0), default=0, help="sampling seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--out", help="output PNG (unset: RUN_DIR/samples-seedS-nN.png); sketches add SVGs"
    )


def _export_parser(command: Command) -> None:
    p = command("export", "export a finished run (diffusers folder, model card)", cmd_export)
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--out", required=True, help="export folder")
    p.add_argument(
        "--compact", action="store_true", help="add model.compact.safetensors (masks + non-zeros)"
    )
    p.add_argument(
        "--dtype",
        choices=("fp16", "bf16"),
        help="compact values in 16 bits (lossy; implies --compact)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an export in --out")


def _condense_parser(command: Command) -> None:
    p = command("condense", "remove dead channels: a smaller network, same samples", cmd_condense)
    p.add_argument("run_dir", help="a finished (channel-sparse) run directory")
    p.add_argument("--out", required=True, help="folder for the condensed model")
    p.add_argument("--overwrite", action="store_true", help="replace a condensed model in --out")


def _evaluate_parser(command: Command) -> None:
    p = command("evaluate", "FID/KID/precision/recall, parameters and FLOPs", cmd_evaluate)
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument(
        "--num-samples", type=_at_least(2), help="generated samples (unset: eval.num_samples)"
    )
    p.add_argument("--sampler", choices=SAMPLERS, help="sampler (unset: eval.sampler)")
    p.add_argument("--steps", type=_at_least(1), help="sampler steps (unset: eval.steps)")
    p.add_argument("--eta", type=_non_negative_float, help="DDIM eta (unset: eval.eta)")
    p.add_argument(
        "--ema",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="sample from the EMA weights or the raw ones (unset: eval.ema)",
    )
    p.add_argument("--seed", type=_at_least(0), help="sampling seed (unset: eval.seed)")
    p.add_argument(
        "--seed-range",
        type=_seed_range,
        metavar="A:B",
        help="only generate samples A..B-1 (split a large evaluation; the metrics come when "
        "the ranges cover all samples)",
    )
    p.add_argument(
        "--batch-size",
        type=_at_least(1),
        help="samples per batch (unset: eval.batch_size); changes speed, never the samples",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _study_parsers(command: Command) -> None:
    p = command("study", "run a sweep: datasets x methods x sparsity x p x seeds", cmd_study)
    p.add_argument("study", help="study name (see 'sparsediff presets') or a study TOML path")
    p.add_argument("--out", help="study directory (unset: the study's out_dir)")
    p.add_argument("--devices", help="comma list, one run per device (cuda:0,...)")
    p.add_argument(
        "--cells",
        action="append",
        metavar="PATTERN",
        help="only the cells whose id matches this glob (e.g. 'kanjivg/*-seed1'); repeatable: "
        "run a study in parts, in several processes or on several machines",
    )
    p = command("report", "write a study's Markdown report, plots and sample grids", cmd_report)
    p.add_argument("study_dir", help="a study directory holding results.jsonl")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sparsediff`` command."""
    args = build_parser().parse_args(argv)
    if args.command != "train":  # a run sets its own threads (train.threads)
        from sparsediff.runtime import set_threads

        set_threads(args.threads or 0)
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
