"""2:4 Linear layers through semi-structured kernels on GPU; dense with a notice elsewhere."""

import pytest
import torch
from torch import nn

from sparsediff.models.chirodiff import build_chirodiff_denoiser
from sparsediff.models.unet import build_unet
from sparsediff.sparsity import SparseTraining
from sparsediff.sparsity import semistructured as ss


def two_four(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="kept dense"):  # conv_in: 27 inputs per row
        SparseTraining(
            model, opt, method="static", sparsity=0.5, granularity="2:4", total_steps=10
        ).remove()
    return model.eval()


def pattern_weight(rows, cols, dtype=torch.bfloat16):
    """A 2:4 weight: the first two of every four columns non-zero."""
    keep = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(cols // 4)
    return (torch.randn(rows, cols) * keep).to(dtype)


def test_on_cpu_the_model_runs_dense_with_a_one_line_notice():
    model = two_four(build_unet("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="not used.*needs CUDA") as caught:
        report = ss.to_semi_structured(model)
    assert len(caught) == 1 and "\n" not in report.notice
    assert report.converted == [] and report.backend is None
    assert report.skipped["mid_block.attentions.0.to_q"] == "needs CUDA, the model is on cpu"
    assert report.skipped["conv_in"].startswith("convolution")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert "0 Linear layers converted" in report.summary()


def test_quiet_keeps_the_notice_in_the_report_only(recwarn):
    report = ss.to_semi_structured(nn.Sequential(nn.Linear(64, 32)), quiet=True)
    assert report.notice and not recwarn.list


def test_eligibility_of_a_linear_weight():
    assert ss.linear_issue(pattern_weight(32, 64), (32, 64)) is None
    assert ss.linear_issue(pattern_weight(32, 64, torch.float16), (32, 64)) is None
    assert "dtype float32" in ss.linear_issue(pattern_weight(32, 64, torch.float32), (32, 64))
    assert "shape" in ss.linear_issue(pattern_weight(48, 64), (32, 64))
    assert "shape" in ss.linear_issue(pattern_weight(32, 96), (32, 64))
    assert ss.linear_issue(torch.randn(32, 64).bfloat16(), (32, 64)) == "not 2:4 sparse"
    w = pattern_weight(32, 64)
    w[5, 2] = 1.0  # three non-zeros in one group
    assert ss.linear_issue(w, (32, 64)) == "not 2:4 sparse"


def test_engine_two_four_masks_are_eligible_patterns():
    model = two_four(build_chirodiff_denoiser("birnn", hidden=32, layers=1))
    assert ss.is_two_four(model.proj.weight)
    assert not ss.is_two_four(torch.ones(4, 8))
    assert not ss.is_two_four(torch.zeros(4, 6))  # rows not made of whole groups


def test_min_shape_comes_from_the_backend_table():
    rows, cols = ss.min_shape(torch.bfloat16)
    assert rows >= 16 and cols >= 16
    assert ss.min_shape(torch.float64) == (32, 64)


def test_linear_layers_inside_fused_modules_are_left_alone():
    model = build_chirodiff_denoiser("transformer", width=64, layers=1, heads=2)
    report = ss.to_semi_structured(model, quiet=True)
    skipped = report.skipped
    assert skipped["encoder.layers.0.self_attn.out_proj"].startswith("inside a module")
    assert skipped["encoder.layers.0.linear1"].startswith("inside a module")


def test_conversion_path_with_a_stand_in_backend(monkeypatch):
    """The conversion loop on CPU: a stand-in for the kernel class keeps the dense weight."""

    class StandIn:
        BACKEND = "stand-in"
        _DTYPE_SHAPE_CONSTRAINTS = {}

        @staticmethod
        def from_dense(weight):
            return weight.clone()

    monkeypatch.setattr(ss, "_backend", lambda: StandIn)
    monkeypatch.setattr(ss, "kernel_issue", lambda device: None)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 3)).bfloat16()
    with torch.no_grad():
        model[0].weight.copy_(pattern_weight(32, 64))
    report = ss.to_semi_structured(model)
    assert report.converted == ["0"] and report.backend == "stand-in" and report.notice is None
    assert report.skipped["1"].startswith("shape")
    assert not model[0].weight.requires_grad
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    model[0](torch.randn(2, 64, 5).bfloat16().transpose(1, 2))  # as after diffusers' GroupNorm
    assert seen == [True]


needs_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="needs CUDA with compute capability >= 8.0",
)


@needs_kernels
def test_cuda_linear_layers_run_semi_structured_with_dense_results():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.SiLU(), nn.Linear(256, 3)).cuda().bfloat16()
    with torch.no_grad():
        model[0].weight.copy_(pattern_weight(256, 128))
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        want = model(x)
        report = ss.to_semi_structured(model)
        got = model(x)
    assert report.converted == ["0"]
    assert report.skipped["2"].startswith("shape")
    assert isinstance(model[0].weight.data, torch.sparse.SparseSemiStructuredTensor)
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()  # bf16 rounding of the output


@needs_kernels
def test_cuda_two_four_unet_attention_runs_semi_structured():
    torch.manual_seed(0)
    model = two_four(build_unet("small")).cuda().bfloat16()
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([10, 500], device="cuda")
    with torch.inference_mode():
        want = model(x, t).sample
        report = ss.to_semi_structured(model)
        got = model(x, t).sample
    assert any(name.endswith("to_q") for name in report.converted)
    assert (got - want).abs().max() <= 5e-2 * want.abs().max()
