import pytest
import torch
from torch import nn

from sparsediff.imaging import to_uint8
from sparsediff.metrics import as_uint8_images, extract_features, fid_from_features


class TinyFeatures(nn.Module):
    """Fixed-seed conv + 2x2 average pool: 4 channels x 4 cells = 16 features."""

    num_features = 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        x = x.float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.pool(torch.tanh(self.conv(x))).flatten(1)


def _images(n, size=8, seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def test_features_shape_dtype_and_batching_invariance():
    net, images = TinyFeatures(), _images(10)
    whole = extract_features(images, net, batch_size=64)
    assert whole.shape == (10, 16) and whole.dtype == torch.float64
    torch.testing.assert_close(extract_features(images, net, batch_size=3), whole)
    batches = [images[:4], images[4:9], images[9]]  # last one is a single (C, H, W) image
    torch.testing.assert_close(extract_features(batches, net, batch_size=2), whole)
    loader_like = [(images[:5], torch.zeros(5)), (images[5:], torch.zeros(5))]
    torch.testing.assert_close(extract_features(loader_like, net), whole)


def test_fid_of_set_with_itself_is_zero_and_differs_from_other_set():
    net = TinyFeatures()
    real = extract_features(_images(40, seed=1), net)
    fake = extract_features(_images(40, seed=2) // 2, net)  # darker images
    assert abs(fid_from_features(real, real)) < 1e-6
    assert fid_from_features(real, fake) > 1e-3


def test_float_images_on_uint8_scale_are_rounded_like_png():
    images = _images(4)
    jitter = torch.rand(images.shape, generator=torch.Generator().manual_seed(1)) * 0.8 - 0.4
    as_float = (images.float() + jitter).clamp(0, 255)  # rounds back to the same integers
    torch.testing.assert_close(as_uint8_images(as_float), images)
    net = TinyFeatures()
    torch.testing.assert_close(extract_features(as_float, net), extract_features(images, net))


def test_model_outputs_need_to_uint8_first_and_the_error_says_so():
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0, 1.5]).view(1, 1, 1, 5)
    with pytest.raises(ValueError, match=r"must lie in \[0, 255\].*sparsediff\.imaging\.to_uint8"):
        as_uint8_images(x)
    assert as_uint8_images(to_uint8(x)).flatten().tolist() == [0, 0, 128, 255, 255]


def test_grayscale_images_are_accepted():
    gray = _images(3, channels=1)
    feats = extract_features(gray, TinyFeatures())
    rgb = extract_features(gray.expand(-1, 3, -1, -1), TinyFeatures())
    torch.testing.assert_close(feats, rgb)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.full((2, 3, 4, 4), float("nan")), "NaN"),
        (torch.full((2, 3, 4, 4), 1e9), "must lie in"),
        (torch.full((2, 3, 4, 4), -1.0), "must lie in"),
        (torch.full((2, 3, 4, 4), 256, dtype=torch.int64), "must lie in"),
        (torch.zeros(2, 4, 4, 4, dtype=torch.uint8), r"\(N, 1\|3, H, W\)"),
        (torch.zeros(3, 4, 4, dtype=torch.uint8).unsqueeze(0)[:0], "empty"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.bool), "unsupported dtype"),
    ],
)
def test_bad_images_raise_value_error(images, match):
    with pytest.raises(ValueError, match=match):
        extract_features(images, TinyFeatures())


def test_mismatched_image_sizes_within_a_set_raise():
    batches = [_images(2, size=8), _images(2, size=16)]
    with pytest.raises(ValueError, match="size mismatch within one set"):
        extract_features(batches, TinyFeatures(), name="fake")
    # Two different sets may have different sizes (the feature network resizes).
    net = TinyFeatures()
    a, b = extract_features(_images(3, size=8), net), extract_features(_images(3, size=16), net)
    assert a.shape == b.shape


def test_empty_iterable_raises():
    with pytest.raises(ValueError, match="no images"):
        extract_features([], TinyFeatures())
