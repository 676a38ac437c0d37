"""Training speed of the tiny presets at 1 thread, 2 threads and the default, beside a busy process.

Each setting trains the preset for ``--steps`` optimizer steps in a fresh run directory (data and
first stage prepared once beforehand and not timed); the speed is the steps/s of the last
logged interval, with another process spinning on one core the whole time (``--no-busy`` to
measure an idle machine). Prints one line per (preset, threads) with the ratio to 1 thread.

    python benchmarks/threads.py                      # ldm-tiny and chirodiff-tiny
    python benchmarks/threads.py --presets chirodiff-tiny --steps 60
"""

import argparse
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

from sparsediff.pipelines import load_config
from sparsediff.runtime import default_threads
from sparsediff.workflows import train


def _spin(stop: multiprocessing.Event) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def steps_per_second(preset: str, threads: int, steps: int, root: Path, extra: list[str]) -> float:
    overrides = [
        f"train.threads={threads}",
        f"train.steps={steps}",
        f"train.log_every={steps // 2}",
    ]
    overrides += ["train.progress=false", "train.device=cpu", "train.checkpoint_every=0"]
    cfg = load_config(preset, overrides + extra)
    run = root / f"{preset}-{threads}-{time.monotonic_ns()}"
    train(cfg, run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["steps_per_s"]  # the second half: warm-up excluded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["ldm-tiny", "chirodiff-tiny"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--no-busy", action="store_true", help="no competing process")
    args = parser.parse_args()
    stop = multiprocessing.Event()
    busy = None if args.no_busy else multiprocessing.Process(target=_spin, args=(stop,))
    if busy:
        busy.start()
    counts = sorted({1, 2, default_threads()})
    print(f"default threads here: {default_threads()}; busy neighbour: {busy is not None}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for preset in args.presets:
                # prepare shared data once (LDM: the first stage and latents), untimed
                shared = [f"autoencoder.dir={root / 'ae'}", f"data.cache_dir={root / 'lat'}"]
                extra = shared if preset.startswith("ldm") else []
                steps_per_second(preset, 1, 2, root, extra)
                base = None
                for n in counts:
                    rate = steps_per_second(preset, n, args.steps, root, extra)
                    base = base or rate
                    label = f"{n} (default)" if n == default_threads() else str(n)
                    ratio = rate / base
                    print(
                        f"{preset:16s} threads {label:12s} {rate:7.2f} steps/s  {ratio:5.2f}x vs 1"
                    )
    finally:
        stop.set()
        if busy:
            busy.join()


if __name__ == "__main__":
    main()
