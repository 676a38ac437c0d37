import pytest
import torch
import torch.nn.functional as F

from sparsediff.metrics import tf1_bilinear_resize

# float results compared across two computations: CI runs these under other CPU kernels too
pytestmark = pytest.mark.kernels


def test_upsample_2x2_to_4x4_matches_hand_computed_tf1_values():
    # TF1 legacy: src = i * in/out = [0, .5, 1, 1.5]; floor + 1 is clamped to the last pixel,
    # so a row [a, b] becomes [a, (a+b)/2, b, b].
    x = torch.tensor([[0.0, 4.0], [8.0, 12.0]]).view(1, 1, 2, 2)
    expected = torch.tensor(
        [
            [0.0, 2.0, 4.0, 4.0],
            [4.0, 6.0, 8.0, 8.0],
            [8.0, 10.0, 12.0, 12.0],
            [8.0, 10.0, 12.0, 12.0],
        ]
    ).view(1, 1, 4, 4)
    out = tf1_bilinear_resize(x, 4)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # Half-pixel (align_corners=False) sampling gives [a, .75a+.25b, .25a+.75b, b] instead.
    half_pixel = F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False)
    assert not torch.allclose(out, half_pixel)
    assert half_pixel[0, 0, 0, 1].item() == pytest.approx(1.0)


def test_downsample_and_non_square_sizes():
    # 4 -> 3 along W: src = [0, 4/3, 8/3] -> [0, 10 + 10/3, 20 + 20/3] for row [0, 10, 20, 30].
    x = torch.tensor([0.0, 10.0, 20.0, 30.0]).view(1, 1, 1, 4).repeat(2, 3, 2, 1)
    out = tf1_bilinear_resize(x, (5, 3))
    assert out.shape == (2, 3, 5, 3)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 40.0 / 3, 80.0 / 3]))
    torch.testing.assert_close(out, out[:1, :1, :1].expand_as(out))


def test_same_size_is_identity():
    x = torch.rand(2, 3, 7, 7)
    torch.testing.assert_close(tf1_bilinear_resize(x, 7), x, rtol=0, atol=0)


def test_matches_independent_shifted_grid_sample_formulation():
    # The StyleGAN/torch-fidelity formulation: affine_grid + grid_sample with the grid
    # shifted by 1/in - 1/out, i.e. no half-pixel offset.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 32, 20), generator=g).float()
    out_h, out_w = 299, 299
    theta = torch.tensor([[1.0, 0.0, 1 / 20 - 1 / out_w], [0.0, 1.0, 1 / 32 - 1 / out_h]])
    grid = F.affine_grid(theta.expand(2, 2, 3), [2, 3, out_h, out_w], align_corners=False)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = tf1_bilinear_resize(x, 299)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-3)


def test_rejects_integer_input():
    with pytest.raises(ValueError, match="float"):
        tf1_bilinear_resize(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 8)
