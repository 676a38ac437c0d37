"""First-stage autoencoders (diffusers ``VQModel`` / ``AutoencoderKL``): presets, losses, I/O.

LDM trains the diffusion model on the *pre-quantisation* latents of a VQ autoencoder and
quantises only when decoding (:func:`encode_latents` / :func:`decode_latents` follow that).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, VQModel
from torch import nn

Autoencoder = VQModel | AutoencoderKL

_ENC3 = ("DownEncoderBlock2D",) * 3
_DEC3 = ("UpDecoderBlock2D",) * 3
# What every preset shares: 3 latent channels, VQ codes of dimension 3, latents not rescaled.
_COMMON = {"latent_channels": 3, "vq_embed_dim": 3, "scaling_factor": 1.0}

AUTOENCODER_KINDS = ("vq", "kl")  # diffusers VQModel | AutoencoderKL
AE_PRESETS: dict[str, dict[str, Any]] = {
    # CompVis models/first_stage_models/vq-f4 (the LDM-4 first stage): ch 128, ch_mult (1, 2, 4),
    # 2 res blocks, no attention at any resolution (only the mid-block attention that every
    # taming/LDM encoder and decoder has), embed_dim 3, n_embed 8192 → 55.32 M params.
    "vq-f4": {
        **_COMMON,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": _ENC3,
        "up_block_types": _DEC3,
        "block_out_channels": (128, 256, 512),
        "layers_per_block": 2,
        "num_vq_embeddings": 8192,
        "norm_num_groups": 32,
        "sample_size": 256,
    },
    # VQ-f4 layout shrunk for 1-channel 32×32 Fashion-MNIST on CPU: 8×8×3 latents, 1024 codes.
    # Narrow full-resolution levels (8, 16 channels): the 32×32 convolutions dominate CPU time.
    # Codebook measured after 3000 steps (reconstructions vs real, 1000 vs 1000 test images):
    # 256 codes FID 49.8 / KID 0.019, 1024 codes 45.4 / 0.016, 8192 codes 46.9 / 0.018 (and
    # 1.7x slower to train): docs/results/evidence/calibration.md.
    "fmnist-f4": {
        **_COMMON,
        "in_channels": 1,
        "out_channels": 1,
        "down_block_types": _ENC3,
        "up_block_types": _DEC3,
        "block_out_channels": (8, 16, 32),
        "layers_per_block": 1,
        "num_vq_embeddings": 1024,
        "norm_num_groups": 8,
        "sample_size": 32,
    },
    # Test-sized f2 autoencoder (~43 k params): 16×16×3 images → 8×8×3 latents, 16 codes.
    "tiny": {
        **_COMMON,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "num_vq_embeddings": 16,
        "norm_num_groups": 4,
        "sample_size": 16,
    },
}

_CLASSES: dict[str, type[Autoencoder]] = {"vq": VQModel, "kl": AutoencoderKL}


def autoencoder_kind(ae: nn.Module) -> str:
    """Return ``"vq"`` or ``"kl"`` for a diffusers autoencoder."""
    if isinstance(ae, VQModel):
        return "vq"
    if isinstance(ae, AutoencoderKL):
        return "kl"
    raise TypeError(f"expected a diffusers VQModel or AutoencoderKL, got {type(ae).__name__}")


def build_autoencoder(kind: str = "vq", preset: str = "vq-f4", **overrides: Any) -> Autoencoder:
    """Build a ``VQModel`` (``kind="vq"``) or ``AutoencoderKL`` (``"kl"``) from :data:`AE_PRESETS`.

    ``"vq-f4"`` reproduces the CompVis VQ-f4 first stage of the LDM-4 CelebA-HQ / LSUN-Bedrooms
    configs (55.32 M params); ``"fmnist-f4"`` and ``"tiny"`` are small variants. With
    ``kind="kl"`` the same encoder/decoder layout gets a Gaussian posterior (KL-f4 style) and the
    VQ-only entries are dropped. ``overrides`` replace preset entries.
    """
    if kind not in _CLASSES:
        raise ValueError(f"unknown autoencoder kind {kind!r}; expected 'vq' or 'kl'")
    if preset not in AE_PRESETS:
        raise ValueError(f"unknown autoencoder preset {preset!r}; expected {sorted(AE_PRESETS)}")
    cls = _CLASSES[kind]
    config = copy.deepcopy(AE_PRESETS[preset])
    config.update(overrides)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in config.items() if k in accepted})


def reconstruct(
    ae: Autoencoder,
    x: torch.Tensor,
    sample_posterior: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Autoencode ``x``; returns ``(reconstruction, regulariser)``.

    The regulariser is the VQ codebook + commitment loss (VQ) or the KL to N(0, I) summed over
    latent entries and averaged over the batch (KL).
    """
    if autoencoder_kind(ae) == "vq":
        out = ae.decode(ae.encode(x).latents)
        return out.sample, out.commit_loss.mean()
    posterior = ae.encode(x).latent_dist
    z = posterior.sample(generator) if sample_posterior else posterior.mode()
    return ae.decode(z).sample, posterior.kl().mean()


def autoencoder_loss(
    ae: Autoencoder,
    x: torch.Tensor,
    *,
    recon: tuple[torch.Tensor, torch.Tensor] | None = None,
    l1_weight: float = 1.0,
    l2_weight: float = 1.0,
    reg_weight: float = 1.0,
    kl_weight: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, float]]:
    """First-stage training loss: L1 + L2 reconstruction + VQ codebook/commitment or KL term.

    KL (weight ``kl_weight`` = 1e-6 as in LDM) is taken per input element, matching LDM's ratio
    of a summed KL to a summed reconstruction loss. Pass ``recon=reconstruct(ae, x)`` to reuse a
    reconstruction. Returns ``(loss, logs)``.
    """
    rec, reg = recon if recon is not None else reconstruct(ae, x)
    l1 = (rec - x).abs().mean()
    l2 = ((rec - x) ** 2).mean()
    loss = l1_weight * l1 + l2_weight * l2
    logs = {"l1": l1.item(), "l2": l2.item()}
    if autoencoder_kind(ae) == "vq":
        loss = loss + reg_weight * reg
        logs["vq"] = reg.item()
    else:
        kl = reg / x[0].numel()
        loss = loss + kl_weight * kl
        logs["kl"] = kl.item()
    logs["loss"] = loss.item()
    return loss, logs


def encode_latents(
    ae: Autoencoder,
    x: torch.Tensor,
    sample_posterior: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Images in [-1, 1] → diffusion latents.

    VQ: pre-quantisation latents ``quant_conv(encoder(x))`` (LDM trains on these). KL: posterior
    mode (or a sample) times ``config.scaling_factor``.
    """
    if autoencoder_kind(ae) == "vq":
        return ae.encode(x).latents
    posterior = ae.encode(x).latent_dist
    z = posterior.sample(generator) if sample_posterior else posterior.mode()
    return z * ae.config.scaling_factor


def decode_latents(ae: Autoencoder, z: torch.Tensor) -> torch.Tensor:
    """Diffusion latents → images (VQ: quantised to the codebook first, as LDM decodes)."""
    if autoencoder_kind(ae) == "vq":
        return ae.decode(z, force_not_quantize=False).sample
    return ae.decode(z / ae.config.scaling_factor).sample


def _config_dir(path: Path) -> Path:
    # Accept a model folder or a diffusers pipeline folder (vqvae/ for LDM, vae/ for SD).
    for candidate in (path, path / "vqvae", path / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no autoencoder config.json in {path} (nor in its vqvae/ or vae/ subfolder); expected a "
        "diffusers save_pretrained folder with config.json + diffusion_pytorch_model.safetensors"
    )


def load_autoencoder(path: str | Path) -> tuple[Autoencoder, str]:
    """Load a local diffusers-format autoencoder; returns ``(ae in eval mode, "vq" | "kl")``.

    The class is chosen from ``_class_name`` in ``config.json``; nothing is fetched online.
    """
    folder = _config_dir(Path(path))
    class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    kinds = {"VQModel": "vq", "AutoencoderKL": "kl"}
    if class_name not in kinds:
        raise ValueError(f"{folder}/config.json: unsupported autoencoder class {class_name!r}")
    kind = kinds[class_name]
    ae = _CLASSES[kind].from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    return ae.eval(), kind


def autoencoder_fingerprint(ae: Autoencoder) -> str:
    """Stable SHA-256 of the autoencoder's class, architecture config and weights.

    Private bookkeeping keys (``_name_or_path``, ``_diffusers_version``, …) are ignored, so a
    ``save_pretrained`` / ``from_pretrained`` round trip keeps the fingerprint.
    """
    h = hashlib.sha256()
    config = {k: v for k, v in dict(ae.config).items() if not k.startswith("_")}
    h.update(type(ae).__name__.encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(ae.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
