"""LanceVAE against upstream's Wan2.2 VAE outputs (goldens `vae` and `image_edit`), fp32 CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from stages.lance.checkpoint import CheckpointKeyError
from stages.lance.vae import (
    LanceVAE, VAEKeyError, decode_to_uint8, diffusers_to_wan22_state_dict, uint8_to_pil,
    wan22_to_diffusers_state_dict, wan22_vae_config,
)


def channels_first(latent_thwc: torch.Tensor) -> torch.Tensor:
    """Upstream's [t, h, w, 48] (or [1, t, h, w, 48]) latent -> [1, 48, t, h, w]."""
    return latent_thwc.reshape(-1, *latent_thwc.shape[-3:]).permute(3, 0, 1, 2)[None]


@pytest.fixture(scope="module")
def vae(tiny_ckpt_dir) -> LanceVAE:
    return LanceVAE.from_wan22_pth(tiny_ckpt_dir / "Wan2.2_VAE.pth")


@pytest.fixture(scope="module")
def tiny_wan22_state_dict(tiny_ckpt_dir) -> dict[str, torch.Tensor]:
    return torch.load(tiny_ckpt_dir / "Wan2.2_VAE.pth", weights_only=True)


# --- golden case `vae` -------------------------------------------------------------------------

def test_encode_image_returns_normalized_mean_and_raw_logvar(vae, golden, assert_golden):
    g = golden("vae")
    mean, logvar = vae.encode(g["image_in"][None])
    assert_golden(mean.permute(0, 2, 3, 4, 1), g["image_latent_mean"], "image_latent_mean")
    assert_golden(logvar, g["image_latent_logvar"], "image_latent_logvar")


def test_decode_image_latent_reconstruction(vae, golden, assert_golden):
    g = golden("vae")
    assert_golden(vae.decode(channels_first(g["image_latent_mean"]))[0], g["image_recon"], "image_recon")


def test_decode_random_latent(vae, golden, assert_golden):
    g = golden("vae")
    decoded = vae.decode(channels_first(g["random_latent"]))
    assert decoded.abs().max() <= 1.0
    assert_golden(decoded[0], g["random_latent_decoded"], "random_latent_decoded")


def test_encode_five_frame_video_causally(vae, golden, assert_golden):
    g = golden("vae")
    mean, _ = vae.encode(g["video_in"][None])
    assert mean.shape == (1, 48, 2, 4, 4)  # frame 0 alone, then frames 1-4
    assert_golden(mean.permute(0, 2, 3, 4, 1), g["video_latent_mean"], "video_latent_mean")


def test_decode_two_latent_frames_to_five_frames(vae, golden, assert_golden):
    g = golden("vae")
    decoded = vae.decode(channels_first(g["random_video_latent"]))
    assert decoded.shape == (1, 3, 5, 64, 64)
    assert_golden(decoded[0], g["random_video_latent_decoded"], "random_video_latent_decoded")


# --- golden case `image_edit` ------------------------------------------------------------------

@pytest.mark.slow
def test_reference_latent_posterior_sample_with_injected_eps(vae, golden, assert_golden):
    g = golden("image_edit")
    mean, logvar = vae.encode(g["vae_input_ref"][None])
    assert_golden(mean, g["ref_latent_mean"], "ref_latent_mean")
    assert_golden(logvar, g["ref_latent_logvar"], "ref_latent_logvar")
    sampled = vae.encode_sampled(g["vae_input_ref"][None], eps=g["ref_latent_eps"])
    assert_golden(sampled.permute(0, 2, 3, 4, 1), g["ref_latent_sampled"], "ref_latent_sampled")


def test_final_latent_decodes_to_golden_float_and_uint8_image(vae, golden, assert_golden):
    g = golden("image_edit")
    decoded = vae.decode(channels_first(g["final_latent"]))
    assert_golden(decoded[0], g["decoded_float"], "decoded_float")
    pixels = decode_to_uint8(decoded)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 224, 304, 3)
    assert_golden(pixels[0], g["image_uint8"], "image_uint8")
    (image,) = uint8_to_pil(pixels)
    assert image.size == (304, 224) and image.mode == "RGB"
    assert torch.equal(torch.from_numpy(np.array(image)), pixels[0])


# --- posterior sampling ------------------------------------------------------------------------

def test_sample_posterior_noise_std_is_not_divided_by_channel_std():
    mean, logvar = torch.zeros(1, 48, 1, 2, 2), torch.full((1, 48, 1, 2, 2), 2.0)
    eps = torch.ones_like(mean)
    assert torch.allclose(LanceVAE.sample_posterior(mean, logvar, eps), torch.full_like(mean, torch.e))


def test_sample_posterior_draws_eps_from_generator():
    mean, logvar = torch.randn(1, 48, 1, 3, 4), torch.randn(1, 48, 1, 3, 4)
    drawn = LanceVAE.sample_posterior(mean, logvar, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(drawn, mean + torch.exp(0.5 * logvar) * eps)
    with pytest.raises(ValueError, match="eps shape"):
        LanceVAE.sample_posterior(mean, logvar, eps=torch.zeros(1, 48, 1, 3, 3))


# --- loading -----------------------------------------------------------------------------------

def test_key_conversion_round_trips_the_stock_tree(tiny_wan22_state_dict):
    converted = wan22_to_diffusers_state_dict(tiny_wan22_state_dict)
    assert len(converted) == len(tiny_wan22_state_dict) == 196
    with torch.device("meta"):
        reference = AutoencoderKLWan(**wan22_vae_config({k: v.shape for k, v in tiny_wan22_state_dict.items()}))
    assert set(converted) == set(reference.state_dict())
    assert list(diffusers_to_wan22_state_dict(converted)) == list(tiny_wan22_state_dict)


def test_real_wan22_geometry_is_inferred_from_shapes():
    real = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16)
    with torch.device("meta"):
        model = AutoencoderKLWan(**real)
    stock = diffusers_to_wan22_state_dict(model.state_dict())
    assert "decoder.upsamples.0.upsamples.3.time_conv.weight" in stock  # resampler after 3 res blocks
    inferred = wan22_vae_config({k: tuple(v.shape) for k, v in stock.items()})
    assert {k: inferred[k] for k in real} == real


def test_random_checkpoint_of_another_geometry_round_trips_through_pth(tmp_path):
    geometry = dict(base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 2], num_res_blocks=1,
                    temperal_downsample=[False, True], is_residual=True, in_channels=12, out_channels=12,
                    patch_size=2)
    torch.manual_seed(0)
    reference = AutoencoderKLWan(**geometry).eval()
    path = tmp_path / "Wan2.2_VAE.pth"
    torch.save(diffusers_to_wan22_state_dict(reference.state_dict()), path)
    vae = LanceVAE.from_wan22_pth(path)
    assert vae.model.config.scale_factor_spatial == 8 and vae.model.config.scale_factor_temporal == 2
    video = torch.rand(1, 3, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        raw = reference._encode(video)
    mean, logvar = vae.encode(video)
    assert torch.equal(logvar, raw.chunk(2, dim=1)[1])
    assert torch.allclose(vae.decode(mean), reference._decode(raw.chunk(2, dim=1)[0], return_dict=False)[0],
                          atol=1e-6)


@pytest.mark.slow
def test_decoder_only_and_encoder_only_loading(tiny_ckpt_dir, vae, golden, assert_golden):
    path = tiny_ckpt_dir / "Wan2.2_VAE.pth"
    decoder_only = LanceVAE.from_wan22_pth(path, encoder=False)
    encoder_only = LanceVAE.from_wan22_pth(path, decoder=False)
    assert (decoder_only.has_encoder, decoder_only.has_decoder) == (False, True)
    assert (encoder_only.has_encoder, encoder_only.has_decoder) == (True, False)
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_params(decoder_only) + n_params(encoder_only) == n_params(vae)
    g = golden("vae")
    assert_golden(decoder_only.decode(channels_first(g["random_latent"]))[0], g["random_latent_decoded"])
    assert_golden(encoder_only.encode(g["image_in"][None])[1], g["image_latent_logvar"])
    with pytest.raises(RuntimeError, match="without its encoder"):
        decoder_only.encode(g["image_in"][None])
    with pytest.raises(RuntimeError, match="without its decoder"):
        encoder_only.decode(channels_first(g["random_latent"]))
    with pytest.raises(ValueError):
        LanceVAE.from_wan22_pth(path, encoder=False, decoder=False)


def test_unknown_or_missing_keys_are_rejected(tiny_wan22_state_dict):
    with pytest.raises(VAEKeyError, match="encoder.extra.weight"):
        wan22_to_diffusers_state_dict({**tiny_wan22_state_dict, "encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointKeyError, match="encoder.extra.weight"):
        LanceVAE.from_wan22_state_dict({**tiny_wan22_state_dict, "encoder.extra.weight": torch.zeros(1)})
    incomplete = {k: v for k, v in tiny_wan22_state_dict.items() if k != "decoder.middle.1.proj.bias"}
    with pytest.raises(CheckpointKeyError, match="decoder.middle.1.proj.bias"):
        LanceVAE.from_wan22_state_dict(incomplete)
    with pytest.raises(VAEKeyError, match="Wan2.1 tree"):  # flat decoder indices: not this key tree
        wan22_vae_config({"encoder.downsamples.0.residual.0.gamma": (16, 1, 1, 1)})
    reshaped = {**tiny_wan22_state_dict, "conv1.bias": torch.zeros(95)}
    with pytest.raises(CheckpointKeyError, match="conv1.bias"):
        LanceVAE.from_wan22_state_dict(reshaped)


@pytest.mark.slow
def test_bf16_load_keeps_latent_constants_in_model_dtype(tiny_wan22_state_dict, golden):
    vae_bf16 = LanceVAE.from_wan22_state_dict(tiny_wan22_state_dict, dtype=torch.bfloat16)
    assert vae_bf16.latents_inv_std.dtype == torch.bfloat16
    decoded = vae_bf16.decode(channels_first(golden("vae")["random_latent"]))
    assert decoded.dtype == torch.bfloat16 and decoded.shape == (1, 3, 1, 96, 128)
