import json

import pytest
import torch
from diffusers import AutoencoderKL, VQModel

from sparsediff.models.autoencoder import (
    AE_PRESETS,
    autoencoder_fingerprint,
    autoencoder_loss,
    build_autoencoder,
    decode_latents,
    encode_latents,
    load_autoencoder,
    reconstruct,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def tiny(kind="vq", seed=0):
    torch.manual_seed(seed)
    return build_autoencoder(kind, "tiny").eval()


def test_vq_f4_preset_matches_compvis_vq_f4():
    with torch.device("meta"):
        ae = build_autoencoder("vq", "vq-f4")
    assert isinstance(ae, VQModel)
    assert round(n_params(ae) / 1e6, 2) == 55.32
    assert ae.config.num_vq_embeddings == 8192 and ae.config.vq_embed_dim == 3
    assert ae.config.latent_channels == 3
    assert tuple(ae.config.block_out_channels) == (128, 256, 512)


def test_fmnist_f4_downsamples_by_four():
    torch.manual_seed(0)
    ae = build_autoencoder("vq", "fmnist-f4").eval()
    assert n_params(ae) < 1_500_000
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        z = encode_latents(ae, x)
        assert z.shape == (2, 3, 8, 8)
        assert decode_latents(ae, z).shape == x.shape


def test_kl_variant_of_a_preset_drops_vq_entries():
    ae = tiny("kl")
    assert isinstance(ae, AutoencoderKL) and ae.config.latent_channels == 3
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = encode_latents(ae, x)
        mode = ae.encode(x).latent_dist.mode()
    torch.testing.assert_close(z, mode * ae.config.scaling_factor)
    assert decode_latents(ae, z).shape == x.shape


def test_vq_latents_are_prequant_and_decode_quantizes():
    ae = tiny("vq")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = encode_latents(ae, x)
        torch.testing.assert_close(z, ae.quant_conv(ae.encoder(x)))
        z_q, _, _ = ae.quantize(z)
        # Decoding snaps to the codebook: z and its quantisation decode identically ...
        torch.testing.assert_close(decode_latents(ae, z), decode_latents(ae, z_q))
        # ... unlike the unquantised decoder path.
        raw = ae.decode(z, force_not_quantize=True).sample
        assert not torch.allclose(decode_latents(ae, z), raw)


def test_autoencoder_loss_vq_terms_and_gradients():
    ae = tiny("vq").train()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    loss, logs = autoencoder_loss(ae, x)
    assert set(logs) == {"l1", "l2", "vq", "loss"}
    assert loss.item() == pytest.approx(logs["l1"] + logs["l2"] + logs["vq"], rel=1e-5)
    loss.backward()
    assert ae.quantize.embedding.weight.grad.abs().sum() > 0  # codebook loss reaches the codes
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0  # commitment + straight-through


def test_autoencoder_loss_kl_weight():
    ae = tiny("kl").train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = reconstruct(ae, x, sample_posterior=False)
    loss, logs = autoencoder_loss(ae, x, recon=recon, kl_weight=1.0)
    expected_kl = recon[1].item() / x[0].numel()
    assert logs["kl"] == pytest.approx(expected_kl, rel=1e-5)
    assert loss.item() == pytest.approx(logs["l1"] + logs["l2"] + expected_kl, rel=1e-5)


def test_short_training_reduces_reconstruction_error():
    ae = tiny("vq").train()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    x = torch.stack([torch.stack([xx * s, yy * s, xx * yy]) for s in torch.linspace(-1, 1, 8)])
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    first = None
    for _ in range(15):
        loss, logs = autoencoder_loss(ae, x)
        first = first if first is not None else logs["l1"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs["l1"] < 0.7 * first


def test_save_load_roundtrip_and_fingerprint(tmp_path):
    for kind in ("vq", "kl"):
        ae = tiny(kind, seed=3)
        ae.save_pretrained(tmp_path / kind)
        loaded, got_kind = load_autoencoder(tmp_path / kind)
        assert got_kind == kind and not loaded.training
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        with torch.no_grad():
            torch.testing.assert_close(encode_latents(loaded, x), encode_latents(ae, x))
            z = encode_latents(ae, x)
            torch.testing.assert_close(decode_latents(loaded, z), decode_latents(ae, z))
        assert autoencoder_fingerprint(loaded) == autoencoder_fingerprint(ae)
    # Pipeline layout (e.g. CompVis/ldm-celebahq-256): the VQ model sits in vqvae/.
    (tmp_path / "pipe").mkdir()
    (tmp_path / "vq").rename(tmp_path / "pipe" / "vqvae")
    assert load_autoencoder(tmp_path / "pipe")[1] == "vq"


def test_fingerprint_tracks_weights_and_config():
    a, b = tiny(seed=0), tiny(seed=0)
    assert autoencoder_fingerprint(a) == autoencoder_fingerprint(b)
    with torch.no_grad():
        b.decoder.conv_out.bias[0] += 1e-3
    assert autoencoder_fingerprint(a) != autoencoder_fingerprint(b)
    assert autoencoder_fingerprint(tiny(seed=0)) != autoencoder_fingerprint(tiny("kl", seed=0))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_autoencoder(tmp_path / "missing")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="UNet2DModel"):
        load_autoencoder(tmp_path / "unet")


def test_unknown_kind_or_preset():
    with pytest.raises(ValueError, match="kind"):
        build_autoencoder("vae", "tiny")
    with pytest.raises(ValueError, match="preset"):
        build_autoencoder("vq", "vq-f8")
    assert "vq-f4" in AE_PRESETS
