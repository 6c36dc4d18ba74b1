"""Bucket preprocessing and the ViT against upstream's outputs (goldens `image_edit`, `x2t_image`), fp32 CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from stages.lance.checkpoint import CheckpointKeyError
from stages.lance.preprocessing import (
    RESOLUTION_PRESETS, bucket_crop_box, get_preset, vae_image_tensor, vae_video_tensor,
    vit_image_tensor, vit_video_tensor,
)
from stages.lance.video_io import video_frame_indices
from stages.lance.vit import LanceViT, attention_backend, patchify_video_with_merge


@pytest.fixture(scope="module")
def edit_image(golden_dir) -> Image.Image:
    return Image.open(golden_dir / "cases" / "inputs" / "edit_input.png")


@pytest.fixture(scope="module")
def vit(tiny_ckpt_dir) -> LanceViT:
    return LanceViT.from_pretrained(tiny_ckpt_dir / "Qwen2.5-VL-ViT")


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# --- preprocessing vs goldens ------------------------------------------------------------------

def test_vae_reference_input_matches_upstream(edit_image, golden, assert_golden):
    # 96x128 (4:3) into the 224x304 bucket: central-crop fallback keeps rows 1..94, full width.
    assert bucket_crop_box(128, 96, (224, 304)) == (0, 1, 128, 94)
    assert_golden(vae_image_tensor(edit_image, "image_256res"), golden("image_edit")["vae_input_ref"], "vae_input_ref")


@pytest.mark.parametrize("case", ["image_edit", "x2t_image"])
def test_vit_input_matches_upstream(edit_image, golden, assert_golden, case):
    assert_golden(vit_image_tensor(edit_image, "image_256res"), golden(case)["vit_input_video"], "vit_input_video")


@pytest.mark.parametrize("case", ["image_edit", "x2t_image"])
def test_patchify_in_merge_window_order(golden, assert_golden, case):
    g = golden(case)
    patches, grid_thw = patchify_video_with_merge(g["vit_input_video"])
    assert torch.equal(grid_thw, g["vit_grid_thw"])
    assert_golden(patches, g["vit_pixel_patches"], "vit_pixel_patches")


@pytest.mark.parametrize("case", ["image_edit", "x2t_image"])
def test_vit_features_match_upstream(vit, edit_image, golden, assert_golden, case):
    g = golden(case)
    patches, grid_thw = patchify_video_with_merge(vit_image_tensor(edit_image, "image_256res"))
    features = vit(patches, grid_thw)
    assert features.shape == (patches.shape[0] // 4, vit.out_hidden_size)
    assert_golden(features, g["vit_features"], "vit_features")


# --- buckets -----------------------------------------------------------------------------------

# spec §4.2, in aspect order 21:9, 16:9, 4:3, 1:1, 3:4, 9:16: (VAE H, W), (ViT H, W)
IMAGE_768RES = [((496, 1152), (420, 1008)), ((576, 1024), (504, 896)), ((672, 896), (560, 756)),
                ((768, 768), (672, 672)), ((896, 672), (756, 560)), ((1024, 576), (896, 504))]
VIDEO_480P_VAE = [(416, 976), (480, 848), (560, 752), (640, 640), (752, 560), (848, 480)]
VIDEO_480P_VIT = [(392, 924), (448, 812), (504, 700), (588, 588), (700, 504), (812, 448)]


def test_bucket_tables_match_spec():
    image = get_preset("image_768res")
    assert image.vae.output_sizes() == [vae for vae, _ in IMAGE_768RES]
    assert image.vit.output_sizes() == [vit for _, vit in IMAGE_768RES]
    assert image.sizes_by_aspect()["21:9"] == IMAGE_768RES[0] and len(image.sizes_by_aspect()) == 6
    video = get_preset("video_480p")
    assert video.vae.output_sizes() == VIDEO_480P_VAE and video.vit.output_sizes() == VIDEO_480P_VIT
    assert set(RESOLUTION_PRESETS) == {"image_256res", "image_512res", "image_768res",
                                       "video_192p", "video_360p", "video_480p"}
    for preset in RESOLUTION_PRESETS.values():
        assert all(h % 16 == 0 and w % 16 == 0 for h, w in preset.vae.output_sizes())
        assert all(h % 28 == 0 and w % 28 == 0 for h, w in preset.vit.output_sizes())


# Non-square inputs of other sizes, one per aspect bucket (some off the exact ratio).
@pytest.mark.parametrize("size, bucket", [((1400, 600), 0), ((1200, 700), 1), ((1000, 700), 2), ((530, 500), 3),
                                          ((600, 790), 4), ((450, 800), 5)])
def test_image_768res_picks_the_nearest_aspect_bucket(size, bucket):
    image = random_image(*size)
    (vae_hw, vit_hw) = IMAGE_768RES[bucket]
    preset = get_preset("image_768res")
    assert preset.vae.output_size(*size) == vae_hw and preset.vit.output_size(*size) == vit_hw
    vae_in, vit_in = vae_image_tensor(image, preset), vit_image_tensor(image, preset)
    assert vae_in.shape == (3, 1, *vae_hw) and vit_in.shape == (3, 2, *vit_hw)
    assert vae_in.min() >= -1 and vae_in.max() <= 1
    assert torch.equal(vit_in[:, 0], vit_in[:, 1])


def test_crop_box_keeps_the_bucket_ratio_centred():
    assert bucket_crop_box(2000, 500, (496, 1152)) == (419, 0, 1161, 500)  # too wide: full height
    assert bucket_crop_box(500, 2000, (1024, 576)) == (0, 555, 500, 889)   # too tall: full width
    assert bucket_crop_box(1536, 2048, (896, 672)) == (0, 0, 1536, 2048)   # exact 3:4: whole image


def test_alpha_is_composited_on_white_and_unknown_preset_rejected():
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert torch.all(vae_image_tensor(image, "image_256res") == 1.0)
    with pytest.raises(ValueError, match="unknown resolution preset"):
        vae_image_tensor(image, "image_1024res")


def test_video_frames_are_transformed_alike_and_vit_frames_padded_to_even():
    frames = [random_image(320, 180, seed) for seed in range(5)]
    video = vae_video_tensor(frames, "video_192p")
    assert video.shape == (3, 5, 192, 336)
    assert torch.equal(video[:, 3:4], vae_image_tensor(frames[3], "video_192p"))
    vit_in = vit_video_tensor(frames[:3], "video_192p")
    assert vit_in.shape == (3, 4, 140, 280) and torch.equal(vit_in[:, 3], vit_in[:, 2])
    with pytest.raises(ValueError, match="same size"):
        vae_video_tensor([random_image(320, 180), random_image(180, 320)], "video_192p")


def test_video_frame_sampling_at_12fps_capped_at_6s_with_4k_plus_1_frames():
    assert video_frame_indices(240, 24) == np.linspace(0, 239, 69, dtype=int).tolist()  # 10 s -> 6 s: 72 -> 69
    assert len(video_frame_indices(25, 25)) == 9  # 1 s: 12 frames -> 9
    assert len(video_frame_indices(50, 25)) == 21  # 2 s: 24 frames, a multiple of 4 -> 21
    assert video_frame_indices(1, 24) == [0]
    # The frame rate is rounded to an integer first (upstream), and round() is half to even.
    assert len(video_frame_indices(90, 29.5)) == 33  # fps 30: 3 s -> 36 -> 33 (29.5 itself would give 37)
    assert len(video_frame_indices(25, 24)) == 9     # 12.5 rounds to 12 -> 9 (half up would give 13)
    assert len(video_frame_indices(16, 24)) == 5     # the golden clip: [0, 3, 7, 11, 15]


# --- ViT loading -------------------------------------------------------------------------------

def test_vit_loads_from_a_prefix_of_another_safetensors_file(tiny_ckpt_dir, tmp_path, vit, golden, assert_golden):
    # Like Lance_3B_Video/model.safetensors: the ViT under `vit_model.` next to LLM tensors.
    bare = {k: v.contiguous() for k, v in vit.model.state_dict().items()}
    bundled = {f"vit_model.{k}": v for k, v in bare.items()}
    bundled["language_model.model.norm.weight"] = torch.ones(8)
    save_file(bundled, str(tmp_path / "model.safetensors"))
    loaded = LanceViT.from_pretrained(tiny_ckpt_dir / "Qwen2.5-VL-ViT", weights_path=tmp_path / "model.safetensors",
                                      prefix="vit_model.")
    g = golden("image_edit")
    assert_golden(loaded(g["vit_pixel_patches"], g["vit_grid_thw"]), g["vit_features"], "vit_features")
    with pytest.raises(KeyError, match="no tensors under prefix"):
        LanceViT.from_pretrained(tiny_ckpt_dir / "Qwen2.5-VL-ViT", weights_path=tmp_path / "model.safetensors",
                                 prefix="visual.")


def test_vit_state_dict_is_loaded_strictly(tiny_ckpt_dir, vit):
    import json
    config = json.loads((tiny_ckpt_dir / "Qwen2.5-VL-ViT" / "config.json").read_text())
    bare = dict(vit.model.state_dict())
    with pytest.raises(CheckpointKeyError, match="merger.mlp.2.bias"):
        LanceViT.from_state_dict(config, {k: v for k, v in bare.items() if k != "merger.mlp.2.bias"})
    with pytest.raises(CheckpointKeyError, match="visual.extra"):
        LanceViT.from_state_dict(config, {**bare, "visual.extra": torch.zeros(1)})


def test_flash_attention_request_falls_back_to_sdpa_on_cpu(vit):
    assert attention_backend("flash_attention_2", "cpu") == "sdpa"
    assert attention_backend("eager", "cpu") == "eager"
    assert vit.model.config._attn_implementation == "sdpa"


def test_vit_rejects_patches_that_do_not_match_grid(vit, golden):
    g = golden("image_edit")
    with pytest.raises(ValueError, match="does not cover"):
        vit(g["vit_pixel_patches"][:-4], g["vit_grid_thw"])
    with pytest.raises(ValueError, match="multiples of 28"):
        patchify_video_with_merge(torch.zeros(3, 2, 42, 56))
