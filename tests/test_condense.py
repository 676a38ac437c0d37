"""Condensed channel-sparse models compute what the masked models compute, with less."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sparsediff.diffusion.samplers import SamplingSettings, run_sampler
from sparsediff.diffusion.schedules import make_scheduler
from sparsediff.models import condense as cd
from sparsediff.models.chirodiff import build_chirodiff_denoiser
from sparsediff.models.unet import build_unet, stream_groups
from sparsediff.sparsity import SparseTraining

# float results compared across two computations: CI runs these under other CPU kernels too
pytestmark = pytest.mark.kernels


def channel_sparse(model, sparsity=0.5, distribution="uniform", seed=0, tied=()):
    """Random channel masks from the engine (``tied`` groups sharing theirs), applied to
    ``model``'s weights (biases kept)."""
    with torch.no_grad():  # non-trivial biases and norms, so dead channels are not zeros
        gen = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    SparseTraining(
        model,
        opt,
        method="static",
        sparsity=sparsity,
        distribution=distribution,
        granularity="channel",
        total_steps=10,
        seed=seed,
        tied=tied,
    ).remove()
    return model.eval()


def unet_inputs(dtype=torch.float32, batch=3, size=8):
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return x, torch.tensor([0, 421, 999][:batch])


def flops(model, *inputs):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*inputs)
    return counter.get_total_flops()


def params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "preset, overrides, sparsity, distribution",
    [
        ("tiny", {}, 0.5, "uniform"),
        ("tiny", {}, 0.75, "erk"),
        ("fmnist", {}, 0.5, "uniform"),
        ("fmnist", {"block_out_channels": (64, 128)}, 0.5, "erk"),
        ("small", {"sample_size": 8}, 0.5, "uniform"),  # LDM-4 layout, down to 1x1 pixels
    ],
)
def test_condensed_unet_equals_masked_unet(
    single_thread, preset, overrides, sparsity, distribution
):
    torch.manual_seed(0)
    masked = channel_sparse(build_unet(preset, **overrides), sparsity, distribution).double()
    condensed, plan = cd.condense(masked)
    kinds = {entry["kind"] for entry in plan.values()}
    assert "resnet" in kinds
    x, t = unet_inputs(torch.float64)
    with torch.no_grad():
        want, got = masked(x, t).sample, condensed(x, t).sample
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()  # float64: exact but rounding
    assert params(condensed) < params(masked)
    assert flops(condensed, x, t) < 0.8 * flops(masked, x, t)


def test_attention_loses_dead_key_and_value_channels(single_thread):
    torch.manual_seed(0)
    masked = channel_sparse(build_unet("tiny"), 0.75, "uniform").double()
    condensed, plan = cd.condense(masked)
    attention = {name: e for name, e in plan.items() if e["kind"] == "attention"}
    assert attention
    width = masked.mid_block.attentions[0].to_k.out_features
    assert any(len(e["qk"]) < width and len(e["v"]) < width for e in attention.values())
    x, t = unet_inputs(torch.float64)
    with torch.no_grad():
        want, got = masked(x, t).sample, condensed(x, t).sample
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()


def test_dead_channels_are_constants_that_matter(single_thread):
    """The tests above can fail: a dead channel's bias moves the output far beyond 1e-12."""
    torch.manual_seed(0)
    masked = channel_sparse(build_unet("tiny"), 0.5, "uniform").double()
    block = masked.mid_block.resnets[0]
    dead = [i for i in range(block.conv1.out_channels) if i not in cd.live_rows(block.conv1.weight)]
    assert dead
    x, t = unet_inputs(torch.float64)
    changed = copy.deepcopy(masked)
    with torch.no_grad():
        before = masked(x, t).sample
        changed.mid_block.resnets[0].conv1.bias[dead] = 0
        assert (changed(x, t).sample - before).abs().max() > 1e-6 * before.abs().max()


def test_condensed_sampling_equals_masked_sampling(single_thread):
    torch.manual_seed(0)
    masked = channel_sparse(build_unet("fmnist"), 0.5, "erk")
    condensed, _ = cd.condense(masked)
    condensed.eval()
    settings = SamplingSettings("ddim", steps=4)

    def sample(model):
        gens = [torch.Generator().manual_seed(s) for s in range(4)]
        return run_sampler(
            lambda x, t: model(x, t).sample,
            (4, 3, 8, 8),
            make_scheduler("ldm", 1000),
            settings,
            gens,
            torch.device("cpu"),
        )

    with torch.no_grad():
        want, got = sample(masked), sample(condensed)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_save_and_load_rebuilds_the_same_network(single_thread, tmp_path):
    torch.manual_seed(0)
    masked = channel_sparse(build_unet("tiny"), 0.5, "uniform")
    condensed, plan = cd.condense(masked)
    cd.save_condensed(condensed, plan, tmp_path, source="somewhere")
    assert cd.read_condensed_info(tmp_path)["source"] == "somewhere"
    torch.manual_seed(123)  # a plain model with other weights: everything comes from the files
    loaded = cd.load_condensed(build_unet("tiny"), tmp_path).eval()
    x, t = unet_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, condensed.eval()(x, t).sample)
    assert cd.read_condensed_info(tmp_path / "missing") is None


def test_resnet_with_dead_output_rows_only(single_thread, tmp_path):
    torch.manual_seed(0)
    model = build_unet("tiny").eval()
    block = model.up_blocks[0].resnets[0]
    with torch.no_grad():  # no dead conv1 channel: norm2 sees no constants, fold is empty
        block.conv2.weight[[0, 5]] = 0
        block.conv_shortcut.weight[[1, 5]] = 0
    condensed, plan = cd.condense(model)
    assert plan == {
        "up_blocks.0.resnets.0": {
            "kind": "resnet",
            "conv1": list(range(8)),
            "conv2": [1, 2, 3, 4, 6, 7],
            "shortcut": [0, 2, 3, 4, 6, 7],
            "inputs": None,  # the stream has no dead channel: whole
            "outputs": None,
        }
    }
    x, t = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(condensed(x, t).sample, model(x, t).sample)
    cd.save_condensed(condensed, plan, tmp_path)
    loaded = cd.load_condensed(build_unet("tiny"), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, condensed(x, t).sample)


def test_dense_model_has_nothing_to_condense():
    model = build_unet("tiny")
    assert cd.plan_condense(model) == {}


def test_a_layer_with_no_live_row_keeps_one_zero_row(single_thread):
    torch.manual_seed(0)
    masked = channel_sparse(build_unet("tiny"), 0.5, "uniform")
    with torch.no_grad():
        masked.time_embedding.linear_2.weight.zero_()
        masked.mid_block.resnets[0].conv1.weight.zero_()
    condensed, plan = cd.condense(masked)
    assert plan["time_embedding.linear_2"] == {"kind": "rows", "rows": [0]}
    assert plan["mid_block.resnets.0"]["conv1"] == [0]
    x, t = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(condensed(x, t).sample, masked(x, t).sample)


def test_unsupported_resnet_falls_back_to_row_sparse_layers(single_thread):
    torch.manual_seed(0)
    masked = channel_sparse(build_unet("tiny", dropout=0.1), 0.5, "uniform")  # eval: no dropout
    condensed, plan = cd.condense(masked)
    assert not any(e["kind"] == "resnet" for e in plan.values())
    assert plan["mid_block.resnets.0.conv1"]["kind"] == "rows"
    x, t = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(condensed(x, t).sample, masked(x, t).sample)


@pytest.mark.parametrize("arch", ["birnn", "transformer"])
def test_chirodiff_linear_layers_are_condensed_and_the_rest_left_alone(single_thread, arch):
    torch.manual_seed(0)
    kwargs = {"hidden": 16, "layers": 2} if arch == "birnn" else {"width": 16, "layers": 1}
    masked = channel_sparse(build_chirodiff_denoiser(arch, num_timesteps=100, **kwargs), 0.5)
    condensed, plan = cd.condense(masked)
    # birnn: proj and out; the transformer's encoder reads its weights directly, so only its
    # input and output projections; the GRU is never rewritten
    assert plan and all(e["kind"] == "rows" for e in plan.values())
    assert set(plan) <= {"proj", "out", "embed"}
    x = torch.randn(3, 7, 3)
    t, lengths = torch.tensor([3, 50, 99]), torch.tensor([7, 4, 1])
    with torch.no_grad():
        torch.testing.assert_close(condensed(x, t, lengths), masked(x, t, lengths))


def test_row_sparse_layer_outputs_bias_for_dead_rows():
    layer = nn.Conv2d(4, 5, 3, padding=1)
    with torch.no_grad():
        layer.weight[[1, 3]] = 0
    sparse = cd.RowSparse(layer, cd.live_rows(layer.weight))
    assert sparse.layer.out_channels == 3
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), layer(x))


def test_constant_input_through_a_padded_strided_conv_is_exact():
    conv = nn.Conv2d(3, 4, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=False)
    u = torch.randn(2, 3, dtype=torch.float64)
    conv = conv.double()
    x = u[:, :, None, None].expand(2, 3, 7, 9)
    want = conv(x)
    weight = conv.weight.detach().transpose(0, 1).reshape(3, -1)
    got = cd.constant_through_conv(u, weight, conv, x.shape[2:], want.shape[2:])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("tie_stream", [False, True])
def test_trained_channel_sparse_run_condenses_exactly(
    single_thread, tmp_path, fmnist_dir, tie_stream
):
    from sparsediff.cli import main
    from sparsediff.workflows.run import load_run

    run = tmp_path / "run"
    sets = [f"data.path={fmnist_dir}", "train.progress=false", "train.threads=1"]
    sets += ["sparse.granularity=channel", "sparse.sparsity=0.5", "sparse.method=rigl"]
    sets += [f"sparse.tie_stream={str(tie_stream).lower()}"]
    args = ["train", "ldm-tiny", "--run-dir", str(run)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    pipeline, denoiser = load_run(run)
    condensed, plan = cd.condense(denoiser)
    assert any(e["kind"] == "resnet" for e in plan.values())
    first = stream_groups(denoiser)[2]  # the widest segment: shortcut, conv2s, to_out
    alive = [cd.alive(denoiser.get_parameter(name)) for name in first]
    if tie_stream:  # tied through training: the segment's writers share their dead channels
        assert all(torch.equal(a, alive[0]) for a in alive) and not alive[0].all()
        assert plan["down_blocks.1.resnets.0"]["outputs"] == alive[0].nonzero().flatten().tolist()
    settings = SamplingSettings("ddim", steps=3)
    want = pipeline.generate(denoiser, [0, 1], settings)
    got = pipeline.generate(condensed.eval(), [0, 1], settings)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def tied_channel_sparse(model, sparsity=0.5, distribution="erk", seed=0):
    """`channel_sparse` with every residual-stream segment's writers tied."""
    return channel_sparse(model, sparsity, distribution, seed, tied=stream_groups(model))


@pytest.mark.parametrize(
    "preset, overrides",
    [("tiny", {}), ("fmnist", {"block_out_channels": (64, 128)}), ("small", {"sample_size": 8})],
)
def test_tied_stream_channels_leave_the_condensed_network(single_thread, preset, overrides):
    torch.manual_seed(0)
    masked = tied_channel_sparse(build_unet(preset, **overrides)).double()
    condensed, plan = cd.condense(masked)
    kinds = {entry["kind"] for entry in plan.values()}
    assert {"resnet", "attention", "resample"} <= kinds
    x, t = unet_inputs(torch.float64)
    with torch.no_grad():
        want, got = masked(x, t).sample, condensed(x, t).sample
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()  # float64: exact but rounding
    # the stream is narrower: blocks pass on fewer channels than the layers they replace write
    narrowed = 0
    for name, entry in plan.items():
        module = masked.get_submodule(name)
        if entry.get("outputs") is not None:
            width = (module.conv2 if entry["kind"] == "resnet" else module.conv).out_channels
            narrowed += len(entry["outputs"]) < width
    assert narrowed >= 3
    # fewer FLOPs than the same sparsity without ties, where stream channels stay
    untied, _ = cd.condense(channel_sparse(build_unet(preset, **overrides), 0.5, "erk").double())
    assert flops(condensed, x, t) < flops(untied, x, t)


def test_tied_stream_condensed_model_saves_and_loads(single_thread, tmp_path):
    torch.manual_seed(0)
    masked = tied_channel_sparse(build_unet("tiny"), 0.5, "uniform")
    condensed, plan = cd.condense(masked)
    assert plan["conv_in"]["kind"] == "slice"
    assert plan["conv_norm_out"]["kind"] == "head"
    cd.save_condensed(condensed, plan, tmp_path)
    # the dead stream channels' values come back from the file, not from the plain model
    loaded = cd.load_condensed(build_unet("tiny"), tmp_path).eval()
    x, t = unet_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, condensed(x, t).sample)
        torch.testing.assert_close(loaded(x, t).sample, masked(x, t).sample)


def _unit_sparse_gru(distribution="erk", dtype=torch.float64):
    from sparsediff.models.chirodiff import BiGRUDenoiser

    torch.manual_seed(0)
    model = BiGRUDenoiser(hidden=24, layers=3, time_dim=8, num_timesteps=35).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = SparseTraining(
        model,
        opt,
        method="static",
        sparsity=0.5,
        granularity="unit",
        distribution=distribution,
        total_steps=10,
    )
    sparse.remove()
    with torch.no_grad():  # the layers around the GRU keep biases of every size
        model.proj.bias.add_(torch.randn_like(model.proj.bias))
    return model.eval()


def _sketch_inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 12, 3, generator=gen, dtype=dtype)
    return x, torch.tensor([0, 7, 20, 30, 34]), torch.tensor([12, 9, 5, 3, 1])


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_condensed_gru_equals_the_unit_sparse_one(distribution):
    model = _unit_sparse_gru(distribution)
    condensed, plan = cd.condense(model)
    widths = [len(layer[0]) for layer in plan["gru"]["keep"]]
    assert plan["gru"]["kind"] == "gru" and max(widths) < 24
    x, t, lengths = _sketch_inputs()
    with torch.no_grad():
        want, got = model(x, t, lengths), condensed(x, t, lengths)
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    assert sum(p.numel() for p in condensed.parameters()) < sum(
        p.numel() for p in model.parameters()
    )


def test_a_dead_unit_is_zero_only_with_its_biases():
    # the reason the unit's biases go with it: with a new-gate bias a dead unit's state is
    # c(1 - z^t), a function of time that no fold could carry
    model = _unit_sparse_gru()
    condensed, plan = cd.condense(model)
    dead = sorted(set(range(24)) - set(plan["gru"]["keep"][0][0]))[0]
    with torch.no_grad():
        model.gru.bias_ih_l0[2 * 24 + dead] = 0.5  # the new gate's bias of a dead unit
    x, t, lengths = _sketch_inputs()
    with torch.no_grad():
        gap = (condensed(x, t, lengths) - model(x, t, lengths)).abs().max()
    assert gap > 1e-6


def test_a_wrong_gru_plan_is_caught(tmp_path):
    model = _unit_sparse_gru()
    condensed, plan = cd.condense(model)
    keep = plan["gru"]["keep"]
    keep[1][0] = keep[1][0][:-1] + [next(j for j in range(24) if j not in keep[1][0])]
    wrong = cd.apply_plan(copy.deepcopy(model), plan)  # drops a live unit of layer 1
    x, t, lengths = _sketch_inputs()
    with torch.no_grad():
        assert (wrong(x, t, lengths) - model(x, t, lengths)).abs().max() > 1e-6
    # the right plan saves and loads: the narrow GRUs come back from the file
    condensed, plan = cd.condense(model)
    cd.save_condensed(condensed, plan, tmp_path)
    from sparsediff.models.chirodiff import BiGRUDenoiser

    plain = BiGRUDenoiser(hidden=24, layers=3, time_dim=8, num_timesteps=35).double()
    loaded = cd.load_condensed(plain, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, lengths), condensed(x, t, lengths))
