"""Wall-clock speed-ups of sparse denoisers as they would be deployed, against dense.

For dense and each granularity (unstructured and channel at ``--sparsities``, 2:4 fixed at
50 %), one process measures on the same UNet, batch, sampler, steps and seed:

* **sampling**: DDIM with ``--sample-steps`` steps from a fixed batch of latents through
  ``diffusion.samplers.run_sampler``, with the network as it would be deployed: unstructured =
  the masked dense model (its zeros are multiplied), channel = the condensed network
  (``models/condense.py``; its largest difference to the masked model on one forward is
  printed); channel trains with the residual stream's writers tied
  (``models.unet.stream_groups``), so the condensed network loses stream channels too, and
  ``channel 50% untied`` shows the same without the ties; 2:4 = semi-structured sparse
  kernels for the Linear layers on CUDA
  (``sparsity/semistructured.py``; elsewhere the masked dense model, with the reason);
* **training**: AdamW + ``SparseTraining`` (RigL, ΔT = ``--update-interval``, constant p 0.05);
  one update interval is timed (ΔT steps, the last one with a mask update) and reported per
  step; dense runs through the engine's dense mode, unstructured and 2:4 as the masked dense
  model, channel and unit as the trainer does (``train.condensed``): through the condensed
  network, the update step at full width, the rebuild after it timed.

Last, for the first model when it is a UNet, **training as a run trains**: dense and channel
(stream tied) at ``--sparsities``, batch 32, ΔT 25, whole intervals timed over
``--train-rounds`` rounds; the last line is ``training speed-up, channel 50%: X.XX×``.

Masks are random from the engine (``--distribution`` layer densities, ``--seed``); the sampling
network is a copy of the training model right after the engine masked it. Every round measures
every setting once in a rotating order, so machine load hits all of them; the numbers are
medians over rounds and "x dense" is dense's median over the setting's (> 1: faster). FLOPs are
one forward at batch 1 of the network that runs (FlopCounterMode): the condensed network for
channel, the dense count for masked models, whose zeros are computed.

CPU defaults: the Fashion-MNIST latent UNet at block channels (64, 128) (2.8 M params), the
0.29 M ``fmnist`` preset, then the ``fmnist`` DiT (hidden 128, 4 blocks; its channel setting
masks query/key/value channels, queries tied to keys, and MLP neurons: ``models.dit``); batch
64 of 8x8x3 latents, 10 DDIM steps, ΔT 4, 5 rounds, 1 torch thread (a shared 2-core box stalls
at 2 when a neighbour is busy), and ChiroDiff's bi-GRU on 52-point sketches (its ``unit``
setting masks whole hidden units, which a condensed GRU drops), about 4 minutes. CUDA: the
LDM-4 UNet (274 M params) and DiT-S/4, bf16 (sampling weights in bf16, training under bf16
autocast), batch 16 for sampling and 8 for training on 64x64x3 latents, 50 and 75 %, 3 rounds.

    python benchmarks/real_speedup.py                    # CPU
    python benchmarks/real_speedup.py --device cuda      # ldm4, bf16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sparsediff.diffusion.losses import epsilon_mse
from sparsediff.diffusion.samplers import SamplingSettings, run_sampler
from sparsediff.diffusion.schedules import make_scheduler
from sparsediff.models.chirodiff import BiGRUDenoiser
from sparsediff.models.condense import condense
from sparsediff.models.dit import CHANNEL_EXCLUDE, attention_groups, build_dit
from sparsediff.models.unet import build_unet, stream_groups
from sparsediff.sparsity import SparseTraining
from sparsediff.sparsity.semistructured import to_semi_structured
from sparsediff.training.condensed import CondensedTraining

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ldm_throughput import machine, sync  # noqa: E402  (the shared harness, next to this file)

MODELS = {  # name -> (architecture, preset, overrides)
    "fmnist-64-128": ("unet", "fmnist", {"block_out_channels": (64, 128)}),
    "fmnist": ("unet", "fmnist", {}),
    "small": ("unet", "small", {}),
    "ldm4": ("unet", "ldm4", {}),
    # the class-conditional DiTs: channel = query/key/value channels and MLP neurons
    "dit-fmnist": ("dit", "fmnist", {}),
    "dit-S4": ("dit", "S/4", {}),
    # ChiroDiff's bi-GRU (3 x 96, 0.417 M params) on 52-point sketches: unit = hidden units
    "chirodiff": ("birnn", "kanjivg", {}),
}
LATENTS = {"fmnist": (3, 8), "small": (3, 64), "ldm4": (3, 64), "S/4": (3, 64)}  # (C, side)
TARGET = ("fmnist-64-128", "channel 50%", 1.5)  # CPU target: condensed sampling >= 1.5x dense


@dataclass
class Setting:
    """One granularity and sparsity: its training run and its deployed sampling network."""

    label: str
    granularity: str | None  # None: dense
    sparsity: float
    tied: bool = False  # channel: the residual stream's writers share their channels
    model: nn.Module | None = None  # training model (masked)
    optimizer: torch.optim.Optimizer | None = None
    sparse: SparseTraining | None = None
    narrow: CondensedTraining | None = None  # channel/unit: trains through the condensed net
    deployed: nn.Module | None = None
    how: str = ""
    params: int = 0
    flops: int = 0
    step: int = 0
    sample_s: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)


def settings_for(sparsities: list[float], arch: str) -> list[Setting]:
    unet, structured = arch == "unet", "unit" if arch == "birnn" else "channel"
    out = [Setting("dense", None, 0.0)]
    out += [Setting(f"unstructured {s:.0%}", "unstructured", s) for s in sparsities]
    out += [Setting(f"{structured} {s:.0%}", structured, s, tied=unet) for s in sparsities]
    if 0.5 in sparsities and unet:  # each writer of the stream with its own channels
        out.append(Setting("channel 50% untied", "channel", 0.5))
    return out + [Setting("2:4", "2:4", 0.5)]


SKETCH_POINTS = 52  # ChiroDiff: a KanjiVG character's points at the preset's resampling


def build(name: str) -> nn.Module:
    """The dense network of ``MODELS[name]`` (a DiT for Fashion-MNIST's ten labels)."""
    arch, preset, overrides = MODELS[name]
    if arch == "unet":
        return build_unet(preset, **overrides)
    if arch == "birnn":
        return BiGRUDenoiser(hidden=96, layers=3, time_dim=8, num_timesteps=35, **overrides)
    channels, side = LATENTS[preset]
    return build_dit(preset, side, channels, 10, **overrides)


def forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ε of a UNet, of a DiT for class 0 (the class changes no cost), or of a sequence model
    for sketches of full length."""
    if not hasattr(model, "config"):  # ChiroDiff's sequence denoiser
        lengths = torch.full((len(x),), x.shape[1], dtype=torch.long, device=x.device)
        return model(x, t, lengths)
    if hasattr(model.config, "num_embeds_ada_norm"):
        labels = torch.zeros(len(x), dtype=torch.long, device=x.device)
        return model(x, timestep=t, class_labels=labels).sample
    return model(x, t).sample


def count_flops(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward(model, x, t)
    return counter.get_total_flops()


def ties(setting: Setting, model: nn.Module) -> tuple[list[list[str]], tuple[str, ...]]:
    """The tied channel groups and the excluded layers of a setting on ``model``."""
    if not hasattr(model, "config"):  # a GRU: its units are the granularity's own groups
        return [], ()
    if not hasattr(model.config, "num_embeds_ada_norm"):  # a UNet
        return (stream_groups(model) if setting.tied else []), ()
    if setting.granularity == "channel":  # heads and MLP neurons, queries tied to keys
        return attention_groups(model), CHANNEL_EXCLUDE
    return [], ()


def prepare(setting: Setting, base: nn.Module, args, device, x: torch.Tensor) -> None:
    """Training model + engine, then the deployed copy of the masked model."""
    setting.model = copy.deepcopy(base).to(device).train()
    setting.optimizer = torch.optim.AdamW(setting.model.parameters(), lr=1e-4)
    tied, exclude = ties(setting, setting.model)
    with warnings.catch_warnings():  # 2:4: conv_in (27 inputs per row) stays dense
        warnings.simplefilter("ignore")
        setting.sparse = SparseTraining(
            setting.model,
            setting.optimizer,
            method="dense" if setting.granularity is None else "rigl",
            sparsity=setting.sparsity,
            distribution=args.distribution,
            granularity=setting.granularity or "unstructured",
            update_interval=args.update_interval,
            prune_ratio=0.05,
            prune_schedule="constant",
            total_steps=10**9,
            stop_fraction=1.0,
            seed=args.seed,
            exclude=list(exclude),
            tied=tied,
        )
    if setting.granularity in ("channel", "unit"):
        setting.narrow = CondensedTraining(setting.model, setting.sparse)
    masked = copy.deepcopy(setting.model).eval()
    t1 = torch.zeros(1, dtype=torch.long, device=device)
    deployed, setting.how = masked, "dense" if setting.granularity is None else "masked dense"
    if setting.granularity in ("channel", "unit"):
        deployed = condense(masked)[0].eval()
        t4 = torch.tensor([0, 250, 500, 999], device=device)
        with torch.no_grad():
            want, got = forward(masked, x[:4], t4), forward(deployed, x[:4], t4)
        rel = float((got - want).abs().max() / want.abs().max())
        setting.how = f"condensed (max |Δ| {rel:.0e} of max)"
    setting.params = sum(p.numel() for p in deployed.parameters())
    setting.flops = count_flops(deployed, x[:1], t1)
    deployed = deployed.to(args.dtype)
    if setting.granularity == "2:4":
        report = to_semi_structured(deployed, quiet=True)
        setting.how = report.summary() if report.converted else f"masked dense ({report.notice})"
    setting.deployed = deployed


def sample_once(setting: Setting, args, shape, scheduler, device) -> None:
    model, dtype = setting.deployed, args.dtype
    gens = [torch.Generator(device=device).manual_seed(args.seed + i) for i in range(shape[0])]
    settings = SamplingSettings("ddim", steps=args.sample_steps)
    with torch.inference_mode():
        sync(device)
        start = time.perf_counter()
        run_sampler(
            lambda x, t: forward(model, x.to(dtype), t).float(),
            shape,
            scheduler,
            settings,
            gens,
            device,
        )
        sync(device)
    setting.sample_s.append(time.perf_counter() - start)


def train_chunk(setting: Setting, args, z, scheduler, device, timed: bool = True) -> None:
    """``ΔT`` optimizer steps; the engine updates the masks at the last one. Channel and unit
    settings train as the trainer does (``train.condensed``): through the condensed network,
    except the update step, which needs the dense gradient; the rebuild after it is timed."""
    optimizer, sparse = setting.optimizer, setting.sparse
    autocast = args.dtype != torch.float32
    sync(device)
    start = time.perf_counter()
    for _ in range(args.update_interval):
        narrow = setting.narrow is not None and not sparse.dense_gradient_next()
        model = setting.narrow if narrow else setting.model
        setting.step += 1
        gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + setting.step)
        with torch.autocast(device.type, dtype=args.dtype, enabled=autocast):
            loss = epsilon_mse(
                lambda x, t, net=model: forward(net, x, t), z, scheduler, generator=gen
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    if timed:
        setting.train_s.append((time.perf_counter() - start) / args.update_interval)


def bench_model(name: str, args, device) -> dict[str, float]:
    torch.manual_seed(args.seed)
    base = build(name)
    if hasattr(base, "config"):
        size, channels = base.config.sample_size, base.config.in_channels
        shape = (args.batch, channels, size, size)
    else:  # sketches: (batch, points, 3)
        size, channels = SKETCH_POINTS, 3
        shape = (args.batch, size, channels)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(shape, generator=gen).to(device)
    z = torch.randn((args.train_batch, *shape[1:]), generator=gen).to(device)
    scheduler = make_scheduler("ldm", 1000)
    n_params = sum(p.numel() for p in base.parameters())
    dtype_name = str(args.dtype).removeprefix("torch.")
    print(
        f"\n== {name}: {type(base).__name__} {n_params / 1e6:.2f} M params, samples "
        f"{'x'.join(map(str, shape[1:]))}, batch {args.batch} (training {args.train_batch}), DDIM "
        f"{args.sample_steps} steps, {dtype_name}, {device}; masks {args.distribution}, "
        f"seed {args.seed}; ΔT {args.update_interval}; {args.rounds} rounds (medians)",
        flush=True,
    )
    settings = settings_for(args.sparsities, MODELS[name][0])
    for setting in settings:
        prepare(setting, base, args, device, x)
        sample_once(setting, args, shape, scheduler, device)  # warm-up, untimed
        setting.sample_s.clear()
        train_chunk(setting, args, z, scheduler, device, timed=False)
    for r in range(args.rounds):
        for setting in settings[r % len(settings) :] + settings[: r % len(settings)]:
            sample_once(setting, args, shape, scheduler, device)
            train_chunk(setting, args, z, scheduler, device)
    dense = settings[0]
    dense_sample, dense_train = statistics.median(dense.sample_s), statistics.median(dense.train_s)
    print(
        f"{'setting':<18} {'params':>8} {'GFLOP/fwd':>9} {'sampling s':>10} {'x dense':>7} "
        f"{'train step s':>12} {'x dense':>7}  deployed as"
    )
    ratios = {}
    for s in settings:
        sample_s, train_s = statistics.median(s.sample_s), statistics.median(s.train_s)
        ratios[s.label] = dense_sample / sample_s
        print(
            f"{s.label:<18} {s.params / 1e6:7.2f}M {s.flops / 1e9:9.3f} {sample_s:10.3f} "
            f"{dense_sample / sample_s:6.2f}x {train_s:12.4f} {dense_train / train_s:6.2f}x  "
            f"{s.how}",
            flush=True,
        )
        s.model = s.optimizer = s.deployed = s.sparse = s.narrow = None  # free before the next
    return ratios


def bench_training(name: str, args, device) -> dict[str, float]:
    """Training step time over whole update intervals as a run trains (``ΔT`` 25, the
    presets' batch 32, updates and rebuilds included): dense and channel (stream tied) at
    ``--sparsities``, condensed between updates. Returns "x dense" per setting."""
    args = copy.copy(args)
    args.update_interval, args.train_batch = 25, 32
    torch.manual_seed(args.seed)
    base = build(name)
    size, channels = base.config.sample_size, base.config.in_channels
    gen = torch.Generator().manual_seed(args.seed)
    z = torch.randn((args.train_batch, channels, size, size), generator=gen).to(device)
    scheduler = make_scheduler("ldm", 1000)
    settings = [Setting("dense", None, 0.0)]
    settings += [Setting(f"channel {s:.0%}", "channel", s, tied=True) for s in args.sparsities]
    print(
        f"\n== training {name}: batch {args.train_batch}, RigL ΔT {args.update_interval} (the "
        f"update step at full width, the condensed network rebuilt after it), "
        f"{args.train_rounds} rounds of one whole interval each (medians)",
        flush=True,
    )
    for setting in settings:
        prepare(setting, base, args, device, z)
        train_chunk(setting, args, z, scheduler, device, timed=False)
    for r in range(args.train_rounds):
        for setting in settings[r % len(settings) :] + settings[: r % len(settings)]:
            train_chunk(setting, args, z, scheduler, device)
    dense = statistics.median(settings[0].train_s)
    ratios = {}
    print(f"{'setting':<18} {'step s':>8} {'x dense':>7}  trains as")
    for s in settings:
        step = statistics.median(s.train_s)
        ratios[s.label] = dense / step
        how = "dense" if s.narrow is None else f"condensed ({s.narrow.rebuilds} rebuilds)"
        print(f"{s.label:<18} {step:8.4f} {dense / step:6.2f}x  {how}", flush=True)
        s.model = s.optimizer = s.deployed = s.sparse = s.narrow = None
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    parser.add_argument("--sparsities", nargs="+", type=float, default=None)
    parser.add_argument("--distribution", default="erk", choices=["erk", "uniform", "er"])
    parser.add_argument("--batch", type=int, default=None, help="sampling batch")
    parser.add_argument("--train-batch", type=int, default=None)
    parser.add_argument("--sample-steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--update-interval", type=int, default=4, help="ΔT: steps timed")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--train-rounds", type=int, default=3, help="whole update intervals timed (training)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    args.models = args.models or (
        ["ldm4", "dit-S4"] if cuda else ["fmnist-64-128", "fmnist", "dit-fmnist"]
    )
    args.sparsities = args.sparsities or ([0.5, 0.75] if cuda else [0.5, 0.75, 0.9])
    args.batch = args.batch or (16 if cuda else 64)
    args.train_batch = args.train_batch or (8 if cuda else args.batch)
    args.rounds = args.rounds or (3 if cuda else 5)
    args.dtype = torch.bfloat16 if cuda else torch.float32
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    if cuda:  # fp32 only runs the exactness check and FLOP count: keep them exact
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    diffusers_logging.set_verbosity_error()  # not the "cast with to()" advice per model
    print(f"machine: {machine(device)}; torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    results = {name: bench_model(name, args, device) for name in args.models}
    first_name = args.models[0]
    training = None
    if MODELS[first_name][0] == "unet" and 0.5 in args.sparsities:
        training = bench_training(first_name, args, device)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    name, label, target = TARGET
    if name in results and not cuda:
        ratio = results[name][label]
        verdict = "met" if ratio >= target else "NOT met"
        print(f"target (CPU, {name}): condensed {label} sampling >= {target}x dense: {verdict}")
    if "channel 50%" in results[first_name]:
        print(f"sampling speed-up, channel 50%: {results[first_name]['channel 50%']:.2f}×")
    if training is not None:
        print(f"training speed-up, channel 50%: {training['channel 50%']:.2f}×")


if __name__ == "__main__":
    main()
