"""Latent-diffusion UNet builders (diffusers ``UNet2DModel``) with named architecture presets."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

from diffusers import UNet2DModel
from torch import nn

# LDM-4 layout: four levels, attention at all but the first.
_LDM = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": 32,
    "norm_num_groups": 32,
}
# Two levels on 8×8×3 latents, attention at the second and in the middle block.
_TWO_LEVELS = {
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}

UNET_PRESETS: dict[str, dict[str, Any]] = {
    # LDM-4 UNet of CompVis configs/latent-diffusion/celebahq-ldm-vq-4.yaml and
    # lsun_bedrooms-ldm-vq-4.yaml: 64×64×3 VQ-f4 latents, model_channels 224, channel_mult
    # (1, 2, 3, 4), 2 res blocks per level, attention at latent resolutions 32/16/8
    # (attention_resolutions 8,4,2) with 32 channels per head → 274.06 M parameters.
    "ldm4": {**_LDM, "block_out_channels": (224, 448, 672, 896)},
    # LDM-4 layout at ~2/7 width (22.4 M params) for quick GPU runs on 64×64×3 latents.
    "small": {**_LDM, "block_out_channels": (64, 128, 192, 256)},
    # CPU-sized latent UNet for the built-in Fashion-MNIST job: 8×8×3 latents of the fmnist-f4
    # autoencoder (0.29 M params). On 2 shared cores it reached the same held-out ε-MSE in a
    # fixed time budget as a (32, 64) variant (0.70 M, ~1.5× slower per step); pass
    # block_out_channels=(32, 64) for longer runs.
    "fmnist": {
        **_TWO_LEVELS,
        "block_out_channels": (32, 32),
        "attention_head_dim": 32,
        "norm_num_groups": 8,
    },
    # Test-sized UNet (~12 k params) with the same block kinds as the presets above.
    "tiny": {
        **_TWO_LEVELS,
        "block_out_channels": (4, 8),
        "attention_head_dim": 4,
        "norm_num_groups": 2,
    },
}


def unet_config(
    preset: str = "ldm4", channels: Sequence[int] = (), **overrides: Any
) -> dict[str, Any]:
    """Return the ``UNet2DModel`` kwargs of ``preset`` updated with ``overrides``.

    ``channels`` replaces the block channels (a narrower or wider model of the same layout, e.g.
    a small-dense baseline); an attention head keeps the preset's width, capped at the narrowest
    block and narrowed to a width every block divides into (40 and 80 channels: heads of 8), and
    every block must divide into norm groups.
    """
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; expected one of {sorted(UNET_PRESETS)}")
    config = copy.deepcopy(UNET_PRESETS[preset])
    if channels:
        if len(channels) != len(config["block_out_channels"]):
            raise ValueError(
                f"UNet preset {preset!r} has {len(config['block_out_channels'])} blocks; "
                f"got channels {list(channels)}"
            )
        head = math.gcd(min(config["attention_head_dim"], *channels), *channels)
        groups = config["norm_num_groups"]
        if any(c % groups for c in channels):
            raise ValueError(
                f"UNet channels {list(channels)} must be multiples of the {groups} norm groups"
            )
        config.update(block_out_channels=tuple(channels), attention_head_dim=head)
    config.update(overrides)
    return config


def build_unet(preset: str = "ldm4", channels: Sequence[int] = (), **overrides: Any) -> UNet2DModel:
    """Build a diffusers ``UNet2DModel`` from a preset of :data:`UNET_PRESETS`.

    ``"ldm4"`` reproduces the LDM-4 UNet of the CompVis CelebA-HQ / LSUN-Bedrooms VQ-f4 configs
    (274.06 M params); ``"small"``, ``"fmnist"`` and ``"tiny"`` are scaled-down variants. Keyword
    ``overrides`` replace preset entries (e.g. ``in_channels=1``, ``sample_size=16``). Build it
    under ``with torch.device("meta"):`` to count parameters without allocating memory.
    """
    return UNet2DModel(**unet_config(preset, channels, **overrides))


# ---------------------------------------------------------------------- the residual stream
# UNet2DModel blocks whose stream this walk knows: resnets, optional attentions, conv resamplers.
_STREAM_BLOCKS = {
    "DownBlock2D",
    "AttnDownBlock2D",
    "UNetMidBlock2D",
    "AttnUpBlock2D",
    "UpBlock2D",
}


def stream_steps(unet: UNet2DModel) -> list[tuple[str, str]]:
    """The residual stream of ``unet`` in forward order, as ``(kind, module name)`` steps.

    Kinds: ``conv_in``; ``resnet``, ``attention`` and ``resample`` (a module that reads the
    stream and writes it); ``skip`` (the stream is saved for an up block); ``concat`` (the
    stream is concatenated with the last saved one, ahead of an up-block resnet); ``head``
    (``conv_norm_out`` → ``conv_act`` → ``conv_out``). Raises ValueError for a layout the walk
    does not know (cross-attention blocks, resnet resamplers, skip blocks, class embeddings).
    """
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    unknown = sorted({type(b).__name__ for b in blocks} - _STREAM_BLOCKS)
    if unknown or unet.class_embedding is not None:
        raise ValueError(f"no residual-stream walk for UNet blocks {unknown or 'with classes'}")
    for block in blocks:
        for resampler in [
            *(getattr(block, "downsamplers", None) or []),
            *(getattr(block, "upsamplers", None) or []),
        ]:
            conv = getattr(resampler, "conv", None)
            if not isinstance(conv, nn.Conv2d) or getattr(resampler, "use_conv_transpose", 0):
                raise ValueError(f"no residual-stream walk for {type(resampler).__name__}")
            if getattr(resampler, "padding", 1) == 0 or getattr(resampler, "norm", None):
                raise ValueError("no residual-stream walk for padded or normed resamplers")
    steps = [("conv_in", "conv_in"), ("skip", "")]

    def layers(prefix: str, block: nn.Module) -> list[list[tuple[str, str]]]:
        """Per layer of a block: its resnet, then its attention if it has one."""
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        return [
            [("resnet", f"{prefix}.resnets.{j}")]
            + ([("attention", f"{prefix}.attentions.{j}")] if attention is not None else [])
            for j, attention in enumerate(attentions)
        ]

    for i, block in enumerate(unet.down_blocks):
        for layer in layers(f"down_blocks.{i}", block):
            steps += [*layer, ("skip", "")]
        if block.downsamplers:
            steps += [("resample", f"down_blocks.{i}.downsamplers.0"), ("skip", "")]
    mid = unet.mid_block
    steps.append(("resnet", "mid_block.resnets.0"))
    for j, attention in enumerate(mid.attentions):
        if attention is not None:
            steps.append(("attention", f"mid_block.attentions.{j}"))
        steps.append(("resnet", f"mid_block.resnets.{j + 1}"))
    for i, block in enumerate(unet.up_blocks):
        for layer in layers(f"up_blocks.{i}", block):
            steps += [("concat", ""), *layer]
        if block.upsamplers:
            steps.append(("resample", f"up_blocks.{i}.upsamplers.0"))
    steps.append(("head", "conv_norm_out"))
    return steps


def stream_groups(unet: UNet2DModel) -> list[list[str]]:
    """Weight names of the layers that write each segment of ``unet``'s residual stream.

    A segment starts at ``conv_in``, at a resnet with a shortcut convolution (its output is
    ``shortcut(x) + conv2(...)``) and at a resampler's convolution; a resnet with an identity
    shortcut (``conv2``) and an attention block (``to_out.0``) add to the current one. Tying
    each group's channels (``SparseTraining(..., tied=stream_groups(unet))``) makes a stream
    channel dead in all its writers at once, which is what lets ``models.condense`` remove it.
    """
    groups: list[list[str]] = []
    for kind, name in stream_steps(unet):
        module = unet.get_submodule(name) if name else None
        if kind == "conv_in":
            groups.append(["conv_in.weight"])
        elif kind == "resnet" and module.conv_shortcut is None:
            groups[-1].append(f"{name}.conv2.weight")
        elif kind == "resnet":
            groups.append([f"{name}.conv_shortcut.weight", f"{name}.conv2.weight"])
        elif kind == "attention":
            groups[-1].append(f"{name}.to_out.0.weight")
        elif kind == "resample":
            groups.append([f"{name}.conv.weight"])
    return groups
