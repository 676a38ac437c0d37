"""Images/s of the FID Inception features, optimised path vs reference path, and their difference.

For each image size (default 32x32x1 and 64x64x1, the sizes of the built-in datasets), batch
size and thread count, times ``extract_features`` over ``--n`` random uint8 images with
``InceptionFeatures()`` (the optimised path: eager copy of the network with folded batch norms,
channels_last, matmul resize) and with ``InceptionFeatures(reference=True)`` (the published
TorchScript graph and index-based resize: the code before the optimisation), one line per
setting (median of ``--repeats`` timed passes, after one untimed warm-up batch). Then, on the
same images, the max abs and relative differences of the two paths' features and the FID
between the two image sets under each path.

    python benchmarks/inception_throughput.py                   # 200 images, 1 and 2 threads
    python benchmarks/inception_throughput.py --threads 1 --n 100 --repeats 3
"""

import argparse
import statistics
import time

import torch

from sparsediff.metrics import InceptionFeatures, extract_features, fid_from_features


def images_per_second(images: torch.Tensor, net: InceptionFeatures, batch: int, repeats: int):
    """Median images/s over ``repeats`` passes, and the features of the last pass."""
    extract_features(images[:batch], net, batch_size=batch)  # warm-up: oneDNN picks kernels
    speeds = []
    for _ in range(repeats):
        start = time.perf_counter()
        feats = extract_features(images, net, batch_size=batch)
        speeds.append(len(images) / (time.perf_counter() - start))
    return statistics.median(speeds), feats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="images per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="HxW, 1 channel")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[25, 100])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per setting")
    args = parser.parse_args()

    nets = {"reference": InceptionFeatures(reference=True), "optimised": InceptionFeatures()}
    g = torch.Generator().manual_seed(0)
    sets = {
        s: torch.randint(0, 256, (args.n, 1, s, s), generator=g, dtype=torch.uint8)
        for s in args.sizes
    }
    feats: dict[tuple[str, int], torch.Tensor] = {}
    print(f"torch {torch.__version__}, {args.n} images per size, {args.repeats} timed pass(es)")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for size, images in sets.items():
            for batch in args.batch_sizes:
                speed = {}
                for name, net in nets.items():
                    speed[name], feats[name, size] = images_per_second(
                        images, net, batch, args.repeats
                    )
                print(
                    f"{size}x{size}x1 batch {batch:3d} threads {threads}: reference "
                    f"{speed['reference']:5.2f} img/s, optimised {speed['optimised']:5.2f} img/s "
                    f"({speed['optimised'] / speed['reference']:.2f}x)",
                    flush=True,
                )

    for size in args.sizes:
        ref, opt = feats["reference", size], feats["optimised", size]
        diff = (opt - ref).abs()
        print(
            f"{size}x{size}x1 features: max |opt - ref| {diff.max():.2e}, / max |ref| "
            f"{diff.max() / ref.abs().max():.2e}, Frobenius relative "
            f"{diff.norm() / ref.norm():.2e}"
        )
    if len(args.sizes) >= 2:
        a, b = args.sizes[:2]
        fid = {name: fid_from_features(feats[name, a], feats[name, b]) for name in nets}
        rel = abs(fid["optimised"] - fid["reference"]) / fid["reference"]
        print(
            f"FID({a}x{a} set, {b}x{b} set): reference {fid['reference']:.6f}, optimised "
            f"{fid['optimised']:.6f}, relative difference {rel:.2e}"
        )


if __name__ == "__main__":
    main()
