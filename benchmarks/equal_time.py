"""The width of a small dense model that samples as fast as a condensed sparse one.

A condensed network *is* a smaller dense one, so the honest baseline for a fast sparse setting is
a dense model trained the same way at the width that takes the same time. The condensed network's
widths follow from the engine's plan alone (how many channels or units each layer keeps), so
random masks of the setting give its deployed speed before any training. This script condenses
such a network and times it against dense models of the candidate widths on the same inputs
(rotating rounds, medians, 1 thread), then names the width whose time is closest.

    python benchmarks/equal_time.py chirodiff --granularity unit --widths 48 52 56 60 64
    python benchmarks/equal_time.py fmnist-64-128 --granularity channel --tied --widths 40,80 48,96
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsediff.models.chirodiff import BiGRUDenoiser
from sparsediff.models.condense import condense
from sparsediff.models.unet import build_unet, stream_groups
from sparsediff.sparsity import SparseTraining

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ldm_throughput import machine  # noqa: E402
from real_speedup import MODELS, SKETCH_POINTS, build, forward  # noqa: E402


def dense_at(name: str, width: str) -> torch.nn.Module:
    """The model ``name`` at another width: a GRU's hidden size, a UNet's block channels."""
    arch, preset, overrides = MODELS[name]
    if arch == "birnn":
        return BiGRUDenoiser(hidden=int(width), layers=3, time_dim=8, num_timesteps=35)
    channels = tuple(int(c) for c in width.split(","))
    overrides = {k: v for k, v in overrides.items() if k != "block_out_channels"}
    return build_unet(preset, channels, **overrides)  # heads as a config's model.channels has


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--granularity", default="channel")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--distribution", default="erk")
    parser.add_argument("--tied", action="store_true", help="UNet: the residual stream tied")
    parser.add_argument("--widths", nargs="+", required=True, help="candidate widths")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = build(args.model)
    masked = copy.deepcopy(base)
    SparseTraining(
        masked,
        torch.optim.SGD(masked.parameters(), lr=0.1),
        method="static",
        sparsity=args.sparsity,
        granularity=args.granularity,
        distribution=args.distribution,
        total_steps=10,
        tied=stream_groups(masked) if args.tied else (),
    ).remove()
    nets = {"dense": base, "condensed": condense(masked.eval())[0]}
    nets |= {f"dense {w}": dense_at(args.model, w) for w in args.widths}
    if hasattr(base, "config"):
        c, side = base.config.in_channels, base.config.sample_size
        x = torch.randn(args.batch, c, side, side)
    else:
        x = torch.randn(args.batch, SKETCH_POINTS, 3)
    t = torch.full((args.batch,), 10, dtype=torch.long)
    times: dict[str, list[float]] = {name: [] for name in nets}
    with torch.inference_mode():
        for net in nets.values():
            forward(net.eval(), x, t)  # warm-up
        for r in range(args.rounds):
            names = list(nets)[r % len(nets) :] + list(nets)[: r % len(nets)]
            for name in names:
                tick = time.perf_counter()
                for _ in range(5):
                    forward(nets[name], x, t)
                times[name].append(time.perf_counter() - tick)
    med = {name: statistics.median(ts) / 5 for name, ts in times.items()}
    print(f"{machine(torch.device('cpu'))}, 1 thread, batch {args.batch}, {args.rounds} rounds")
    for name, seconds in med.items():
        params = sum(p.numel() for p in nets[name].parameters())
        print(
            f"{name:<16} {seconds * 1e3:8.2f} ms per forward  {med['dense'] / seconds:5.2f}x "
            f"dense  {params:>10,} params"
        )
    best = min(args.widths, key=lambda w: abs(med[f"dense {w}"] - med["condensed"]))
    print(
        f"equal sampling time: dense {best} ({med[f'dense {best}'] * 1e3:.2f} ms vs condensed "
        f"{med['condensed'] * 1e3:.2f} ms)"
    )


if __name__ == "__main__":
    main()
