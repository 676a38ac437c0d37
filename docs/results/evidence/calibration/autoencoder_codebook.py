"""Calibration of the Fashion-MNIST first stage: the noise floor of its reconstructions for a
codebook size, after a number of steps (docs/results/evidence/calibration.md).

    python docs/results/evidence/calibration/autoencoder_codebook.py 1024 3000 OUT_DIR
"""

import json
import sys
import time

import torch

from sparsediff.config import load_config
from sparsediff.models import autoencoder
from sparsediff.pipelines import noise_floors, train

torch.set_num_threads(1)
codes, steps, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
name = f"fmnist-f4-{codes}"
autoencoder.AE_PRESETS[name] = {**autoencoder.AE_PRESETS["fmnist-f4"], "num_vq_embeddings": codes}
cfg = load_config(
    "ldm-fashion-mnist",
    {
        "autoencoder.preset": name,
        "autoencoder.steps": steps,
        "train.steps": 10,  # the UNet does not matter here
        "train.progress": False,
        "eval.num_samples": 2,
    },
)
start = time.time()
train(cfg, out)
seconds = time.time() - start
floors = noise_floors(out, progress=False)["floors"]
print(json.dumps({"codes": codes, "steps": steps, "train_seconds": seconds, "floors": floors}))
