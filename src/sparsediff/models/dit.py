"""Latent DiT builders (diffusers ``DiTTransformer2DModel``), class-conditional, with presets.

A DiT (Peebles & Xie, ICCV 2023) patchifies the latent into tokens and runs transformer blocks
whose layer norms are modulated by the timestep and the class (adaLN-Zero). Its label table
has one more row than there are classes: the *null* class, whose prediction classifier-free
guidance mixes with the class's (:func:`guided_eps`). Training drops labels to the null class
itself, with its own seeded generator (:func:`drop_labels`), so that the run stays exactly
resumable; the model's own random label dropout is switched off.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

# Per preset: width = heads x head_dim, depth, patch side. Sample size, channels and classes
# come from the data.
DIT_PRESETS: dict[str, dict[str, Any]] = {
    # DiT-S/2 (hidden 384, 12 blocks, 6 heads of 64, patch 2: 33 M parameters at 1000
    # classes), the paper's smallest configuration, for GPU runs on 32x32x4 KL-f8 latents.
    "S/2": {"num_attention_heads": 6, "attention_head_dim": 64, "num_layers": 12, "patch_size": 2},
    # DiT-S/4: the same transformer on 4x4 patches, for 64x64 latents (VQ-f4 at 256 px).
    "S/4": {"num_attention_heads": 6, "attention_head_dim": 64, "num_layers": 12, "patch_size": 4},
    # DiT-B/2 (hidden 768, 12 blocks, 12 heads of 64, patch 2).
    "B/2": {"num_attention_heads": 12, "attention_head_dim": 64, "num_layers": 12, "patch_size": 2},
    # CPU-sized for the built-in Fashion-MNIST job: 8x8x3 latents of the fmnist-f4 autoencoder,
    # patch 2 (16 tokens), hidden 128 (4 heads of 32), 4 blocks.
    "fmnist": {
        "num_attention_heads": 4,
        "attention_head_dim": 32,
        "num_layers": 4,
        "patch_size": 2,
    },
    # Test-sized, the same block kinds.
    "tiny": {"num_attention_heads": 2, "attention_head_dim": 4, "num_layers": 1, "patch_size": 2},
}


def build_dit(
    preset: str, sample_size: int, in_channels: int, num_classes: int, **overrides: Any
) -> DiTTransformer2DModel:
    """A class-conditional ``DiTTransformer2DModel`` of :data:`DIT_PRESETS` for latents of
    ``in_channels x sample_size x sample_size`` and ``num_classes`` labels (0..n-1; n is the
    null class). Its random label dropout is off: training drops labels with
    :func:`drop_labels`."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; expected one of {sorted(DIT_PRESETS)}")
    config = {
        **copy.deepcopy(DIT_PRESETS[preset]),
        "in_channels": in_channels,
        "out_channels": in_channels,  # epsilon only: no learned variance
        "sample_size": sample_size,
        "num_embeds_ada_norm": num_classes,
        **overrides,
    }
    model = DiTTransformer2DModel(**config)
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0  # the table keeps its null row
    return model


def null_class(model: nn.Module) -> int:
    """The null class's label (the last row of the label table)."""
    return int(model.config.num_embeds_ada_norm)


def drop_labels(
    labels: torch.Tensor, probability: float, null: int, generator: torch.Generator
) -> torch.Tensor:
    """``labels`` with each replaced by ``null`` with ``probability``, drawn from
    ``generator`` (classifier-free guidance training)."""
    if probability <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=generator.device)
    return torch.where(drop.to(labels.device) < probability, torch.full_like(labels, null), labels)


def dit_eps(model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> Any:
    """The model's noise prediction for latents ``x`` at timesteps ``t`` and ``labels``."""
    return model(x, timestep=t, class_labels=labels).sample


def guided_eps(
    model: nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, scale: float
) -> torch.Tensor:
    """Classifier-free guidance as diffusers' ``DiTPipeline`` computes it: one batch of the
    class and the null class, then ``uncond + scale * (cond - uncond)``; ``scale <= 1`` is the
    class's prediction alone."""
    if scale <= 1:
        return dit_eps(model, x, t, labels)
    null = torch.full_like(labels, null_class(model))
    both = dit_eps(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
    cond, uncond = torch.split(both, len(x), dim=0)
    return uncond + scale * (cond - uncond)


# What a DiT's channel granularity masks: the attention's query/key/value channels and the MLP's
# hidden neurons, which condense (heads narrower, MLPs narrower); the rest stays dense.
CHANNEL_EXCLUDE = ("*norm1*", "pos_embed*", "proj_out*", "*to_out*", "*ff.net.2*")


def attention_groups(model: nn.Module) -> list[list[str]]:
    """Per block, the query and key weights: their channels meet in one product, so a channel
    condenses only when it is dead in both (``Task.channel_groups``)."""
    return [
        [f"transformer_blocks.{i}.attn1.to_q.weight", f"transformer_blocks.{i}.attn1.to_k.weight"]
        for i in range(len(model.transformer_blocks))
    ]
