"""Step-time overhead of the sparse training engine.

Times training steps (forward, backward, optimizer step, engine hooks) of dense, static,
RigL and MagRan, plus the naive "mask gradients before the step and weights after it"
approach, on a small UNet-like conv net and a small bidirectional GRU. Every method has its
own copy of the model; they are interleaved step by step (rotating the order) so all see
the same machine load. ``--steps`` timed steps per method (default 5 ΔT, so RigL/MagRan run
5 mask updates and their cost is amortised in the mean). Reports the mean step time, its
ratio to dense from the same run (throughput), the ratio of median step times (robust to
load spikes, excludes update steps) and the median wall time of one mask update.

    python benchmarks/engine_overhead.py                 # CPU, or CUDA when present
    python benchmarks/engine_overhead.py --device cuda --dtype bfloat16 --batch 32
"""

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from sparsediff.sparsity import SparseTraining

METHODS = ("dense", "naive", "static", "rigl", "magran")


class TinyUNet(nn.Module):
    """Two-level conv encoder/decoder with skip connections, GroupNorm and SiLU."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.SiLU(),
            )

        self.conv_in = nn.Conv2d(3, width, 3, padding=1)
        self.down1 = block(width, width)
        self.down2 = block(width, 2 * width)
        self.mid = block(2 * width, 2 * width)
        self.up2 = block(4 * width, width)
        self.up1 = block(2 * width, width)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.upsample = nn.Upsample(scale_factor=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = self.down1(self.conv_in(x))
        h1 = self.down2(self.pool(h0))
        h = self.mid(self.pool(h1))
        h = self.up2(torch.cat([self.upsample(h), h1], 1))
        h = self.up1(torch.cat([self.upsample(h), h0], 1))
        return self.conv_out(h)


class TinyGRU(nn.Module):
    """Bidirectional two-layer GRU with input and output projections."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.proj = nn.Linear(8, hidden)
        self.gru = nn.GRU(hidden, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.proj(x))[0])


def make_workload(name: str, args: argparse.Namespace, device: torch.device):
    torch.manual_seed(0)
    if name == "unet":
        size = args.image_size
        return TinyUNet().to(device), torch.randn(args.batch, 3, size, size, device=device)
    return TinyGRU().to(device), torch.randn(args.batch, args.seq_len, 8, device=device)


class Runner:
    """One method's model, optimizer and (for sparse methods) SparseTraining."""

    def __init__(self, method: str, base: nn.Module, args: argparse.Namespace) -> None:
        self.method = method
        self.model = copy.deepcopy(base)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
        self.sparse = None
        self.naive: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.update_times: list[float] = []
        self.last_update = None
        if method != "dense":
            engine_method = "static" if method == "naive" else method
            self.sparse = SparseTraining(
                self.model,
                self.opt,
                method=engine_method,
                sparsity=args.sparsity,
                update_interval=args.update_interval,
                prune_ratio=0.3,
                prune_schedule="constant",
                total_steps=10**9,
                stop_fraction=1.0,
            )
        if method == "naive":  # the comparison: masks applied by hand, tensor by tensor
            params = dict(self.model.named_parameters())
            self.naive = [(params[n], m.to(params[n].dtype)) for n, m in self.sparse.masks.items()]
            self.sparse.remove()
            self.sparse = None

    def step(self, x: torch.Tensor, dtype: torch.dtype) -> float:
        """Run one training step; return its wall time in seconds."""
        sync(x.device)
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = (self.model(x) - x).pow(2).mean()
        loss.backward()
        if self.naive:
            for p, m in self.naive:
                p.grad.mul_(m)
        self.opt.step()
        if self.naive:
            with torch.no_grad():
                for p, m in self.naive:
                    p.mul_(m)
        sync(x.device)
        elapsed = time.perf_counter() - start
        sparse = self.sparse
        if sparse is not None and sparse.step % sparse.config["update_interval"] == 0:
            if sparse.method in ("rigl", "magran"):  # read outside the timed window
                self.update_times.append(sparse.stats()["update_time_s"])
        return elapsed


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    base, x = make_workload(name, args, device)
    runners = {m: Runner(m, base, args) for m in METHODS}
    for _ in range(args.warmup):  # allocator, kernels
        for runner in runners.values():
            runner.step(x, dtype)
    for runner in runners.values():
        runner.update_times.clear()
    # Interleave step by step, rotating the order, so every method sees the same machine load.
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in range(args.steps):
        order = METHODS[i % len(METHODS) :] + METHODS[: i % len(METHODS)]
        for method in order:
            times[method].append(runners[method].step(x, dtype))
    mean = {m: statistics.fmean(t) for m, t in times.items()}
    median = {m: statistics.median(t) for m, t in times.items()}
    n_params = sum(p.numel() for p in base.parameters())
    shape = "x".join(map(str, x.shape))
    print(f"\n{name}: {n_params / 1e6:.2f}M params, input {shape}, {dtype}, {device}")
    print(
        f"{'method':<8} {'mean ms/step':>12} {'throughput vs dense':>20} "
        f"{'median-step ratio':>18} {'updates':>8} {'update ms':>10}"
    )
    for method in METHODS:
        upd = runners[method].update_times
        upd_ms = f"{1e3 * statistics.median(upd):10.2f}" if upd else f"{'-':>10}"
        print(
            f"{method:<8} {1e3 * mean[method]:12.2f} {mean['dense'] / mean[method]:19.3f}x "
            f"{median['dense'] / median[method]:17.3f}x {len(upd):8d} {upd_ms}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--models", nargs="+", default=["unet", "gru"], choices=["unet", "gru"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--update-interval", type=int, default=50)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5 ΔT)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU: stabler)"
    )
    args = parser.parse_args()
    args.steps = args.steps or 5 * args.update_interval
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"sparsity {args.sparsity}, ΔT {args.update_interval}, {args.steps} steps per method"
    )
    for name in args.models:
        bench(name, args, device, dtype)


if __name__ == "__main__":
    main()
