import pytest
import torch
from diffusers import UNet2DModel

from sparsediff.models.unet import UNET_PRESETS, build_unet, unet_config

# float results compared across two computations: CI runs these under other CPU kernels too
pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.kernels]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_ldm4_preset_is_the_274m_ldm4_unet():
    with torch.device("meta"):
        unet = build_unet("ldm4")
    assert isinstance(unet, UNet2DModel)
    assert round(n_params(unet) / 1e6, 2) == 274.06
    cfg = unet.config
    assert cfg.sample_size == 64 and cfg.in_channels == 3 and cfg.out_channels == 3
    assert tuple(cfg.block_out_channels) == (224, 448, 672, 896)
    assert cfg.layers_per_block == 2 and cfg.attention_head_dim == 32
    # Attention at latent resolutions 32, 16, 8 (levels 1-3), none at 64.
    assert tuple(cfg.down_block_types) == (
        "DownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
    )
    assert tuple(cfg.up_block_types) == (
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "UpBlock2D",
    )


def test_small_preset_on_meta():
    with torch.device("meta"):
        unet = build_unet("small")
    assert round(n_params(unet) / 1e6, 2) == 22.41


@pytest.mark.parametrize(("preset", "max_params"), [("fmnist", 1_000_000), ("tiny", 20_000)])
def test_cpu_presets_are_small_and_run(preset, max_params):
    torch.manual_seed(0)
    unet = build_unet(preset)
    assert n_params(unet) < max_params
    x = torch.randn(2, 3, 8, 8)
    out = unet(x, torch.tensor([0, 999])).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def test_overrides_and_preset_isolation():
    unet = build_unet("tiny", in_channels=1, out_channels=1, sample_size=16)
    assert unet.config.in_channels == 1 and unet.config.sample_size == 16
    assert unet(torch.randn(1, 1, 16, 16), torch.tensor([5])).sample.shape == (1, 1, 16, 16)
    assert UNET_PRESETS["tiny"]["in_channels"] == 3  # overrides must not leak into presets


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown UNet preset"):
        build_unet("ldm8")


def test_narrower_unet_of_the_same_layout():
    wide = unet_config("fmnist")
    narrow = unet_config("fmnist", (24, 24))
    assert narrow["block_out_channels"] == (24, 24)
    assert narrow["attention_head_dim"] == 24  # one head per block, as the preset has
    assert {
        k: v for k, v in narrow.items() if k not in ("block_out_channels", "attention_head_dim")
    } == {k: v for k, v in wide.items() if k not in ("block_out_channels", "attention_head_dim")}
    ldm = unet_config("ldm4", (160, 320, 480, 640))
    assert ldm["attention_head_dim"] == 32  # LDM-4 keeps its 32-wide heads
    # blocks that are not multiples of the preset's head: heads of a width both divide into
    assert unet_config("fmnist", (40, 80))["attention_head_dim"] == 8
    odd = build_unet("fmnist", (40, 80), in_channels=1, out_channels=1, sample_size=8)
    assert odd.down_blocks[1].attentions[0].heads == 10
    assert odd(torch.randn(1, 1, 8, 8), torch.tensor([3])).sample.shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="norm groups"):
        unet_config("fmnist", (20, 20))
    with pytest.raises(ValueError, match="has 2 blocks"):
        unet_config("fmnist", (24, 24, 24))


def test_stream_groups_follow_the_residual_stream():
    from sparsediff.models.unet import stream_groups, stream_steps

    model = build_unet("tiny")
    groups = stream_groups(model)
    assert groups[0] == ["conv_in.weight", "down_blocks.0.resnets.0.conv2.weight"]
    assert groups[1] == ["down_blocks.0.downsamplers.0.conv.weight"]
    # a shortcut conv starts a segment; attention and identity resnets (mid block) add to it
    assert groups[2] == [
        "down_blocks.1.resnets.0.conv_shortcut.weight",
        "down_blocks.1.resnets.0.conv2.weight",
        "down_blocks.1.attentions.0.to_out.0.weight",
        "mid_block.resnets.0.conv2.weight",
        "mid_block.attentions.0.to_out.0.weight",
        "mid_block.resnets.1.conv2.weight",
    ]
    assert len(groups) == 8 and groups[5] == ["up_blocks.0.upsamplers.0.conv.weight"]
    params = dict(model.named_parameters())
    for group in groups:  # a group's writers all write the same channels
        assert len({params[name].shape[0] for name in group}) == 1
    kinds = [kind for kind, _ in stream_steps(model)]
    assert kinds.count("skip") == kinds.count("concat") == 4  # every saved stream is read once
    assert kinds[0] == "conv_in" and kinds[-1] == "head"
    # the LDM-4 layout too; a layout the walk does not know is an error
    assert len(stream_groups(build_unet("small"))) == 22
    cross = build_unet("tiny", down_block_types=("DownBlock2D", "SkipDownBlock2D"))
    with pytest.raises(ValueError, match="no residual-stream walk"):
        stream_groups(cross)
