"""The video tasks on a second geometry (a Lance_3B_Video checkpoint made by `make-tiny-checkpoint`), on
frame counts, sizes, frame rates and knobs the goldens do not cover.

No golden exists here, so each check is an identity upstream's rules imply: a one-frame video is the image
path, the causal VAE makes i2v's first frame the condition's own decode, ViT temporal groups do not see
each other, positions follow the 3-D rule, seeds are reproducible."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stages.lance import LancePipeline
from stages.lance.checkpoint import SafetensorsFile
from deploy.cli import main as cli_main
from stages.lance.preprocessing import vae_image_tensor
from stages.lance.vae import latent_tokens, posterior_eps
from stages.lance.video_io import VideoClip, sample_video
from stages.lance.vit import video_patches

GEOMETRY = ["--layers", "3", "--hidden", "256", "--heads", "4", "--kv-heads", "2", "--intermediate", "320",
            "--vit-depth", "3", "--seed", "11"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_video")
    assert cli_main(["make-tiny-checkpoint", str(root), "--variant", "Lance_3B_Video", *GEOMETRY]) == 0
    assert cli_main(["check-checkpoint", str(root), "--variant", "Lance_3B_Video"]) == 0
    return root


@pytest.fixture(scope="module")
def pipe(ckpt):
    return LancePipeline.from_pretrained(str(ckpt), variant="Lance_3B_Video")


def random_frames(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth moving pattern (not noise), uint8 [n, H, W, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 2 * np.pi, 3)
    frames = [np.stack([127.5 + 120 * np.sin(x / 9 + y / 13 + base[c] + 0.4 * i) for c in range(3)], -1)
              for i in range(n)]
    return np.stack(frames).round().astype(np.uint8)


def test_loads_strictly_with_its_own_vit(pipe, ckpt):
    assert pipe.config.variant == "Lance_3B_Video" and pipe.config.llm.num_hidden_layers == 3
    with SafetensorsFile(ckpt / "Lance_3B_Video" / "model.safetensors") as f:
        vit = pipe.vit.model.state_dict()
        assert all(torch.equal(vit[k], f.get("vit_model." + k)) for k in vit)


def test_t2v_frames_sizes_positions_and_seeds(pipe):
    kw = dict(num_frames=13, height=48, width=80, num_inference_steps=3, cfg_text_scale=2.5, cfg_interval=(0.0, 1.0))
    seen = []
    out = pipe.text_to_video("a kite over the sea", seed=5, callback=lambda i, x, vc, vu: seen.append(vu is not None),
                             **kw)
    assert out.frames.shape == (13, 48, 80, 3) and out.frames.dtype == torch.uint8
    assert out.latents.shape == (4 * 3 * 5, 48) and out.context.latent_grid == (4, 3, 5)
    assert seen == [True, True, True]
    # 3-D rule: latent (t, h, w) at (P+1+2t, P+1+h, P+1+w), <|vision_end|> at P+2+max(2(t-1), h-1, w-1).
    q = out.context.cond.query_positions
    p = int(q[0, 0])
    t, h, w = torch.meshgrid(torch.arange(4), torch.arange(3), torch.arange(5), indexing="ij")
    body = torch.stack([p + 1 + 2 * t, p + 1 + h, p + 1 + w]).reshape(3, -1)
    assert torch.equal(q[:, 1:-1], body) and torch.equal(q[:, -1], torch.full((3,), p + 2 + 6))
    # Reproducible per seed; other counts round down to 4k+1 as upstream does: 14 frames are 13.
    assert torch.equal(pipe.text_to_video("a kite over the sea", seed=5, **{**kw, "num_frames": 14}).latents,
                       out.latents)


def test_one_frame_video_is_the_image_path(pipe):
    system = "You draw what you are told."
    kw = dict(height=32, width=64, num_inference_steps=3, seed=3, system_prompt=system)
    video = pipe.text_to_video("a red barn", num_frames=1, **kw)
    image = pipe.text_to_image("a red barn", **kw)
    assert torch.equal(video.latents, image.latents)
    assert video.frames.shape == (1, 32, 64, 3)
    assert np.array_equal(video.frames[0].numpy(), np.asarray(image.image))


def test_i2v_first_frame_is_the_clean_condition(pipe):
    image = Image.fromarray(random_frames(1, 90, 160, seed=2)[0])  # 16:9 -> the 192x336 bucket of video_192p
    out = pipe.image_to_video(image, "the waves roll in", num_frames=5, resolution="video_192p",
                              num_inference_steps=2, seed=4)
    t, h, w = out.context.latent_grid
    assert (t, h, w) == (2, 12, 21) and out.frames.shape == (5, 192, 336, 3)
    # The pinned rows: the image's posterior sample with latent frame 0 of the seed's posterior noise.
    eps = posterior_eps((1, 48, t, h, w), 4, "cpu", torch.float32)
    mean, logvar = pipe.vae.encode(vae_image_tensor(image, "video_192p")[None])
    pinned = latent_tokens(mean + torch.exp(0.5 * logvar) * eps[:, :, :1])
    assert torch.equal(out.latents[: h * w], pinned)
    # Causal VAE: the first output frame is the decode of the condition latent alone.
    first = pipe.vae.decode(out.latents[: h * w].reshape(1, h, w, 48).permute(3, 0, 1, 2)[None])
    assert torch.equal(out.decoded[:, :1], first[0])
    # reference_eps given for the whole latent or only its first frame: the same condition.
    pixels = vae_image_tensor(image, "video_192p")
    assert torch.equal(pipe.first_frame_latent(pixels, (t, h, w), 0, eps[:, :, :1]),
                       pipe.first_frame_latent(pixels, (t, h, w), 0, eps))
    with pytest.raises(ValueError, match="reference_eps must be"):
        pipe.first_frame_latent(pixels, (t, h, w), 0, eps[:, :, :, :5])


def test_one_frame_video_edit_is_the_image_edit(pipe):
    frames = random_frames(5, 72, 128, seed=3)
    clip = VideoClip(frames, 24.0)  # 5 frames at 24 fps: round(2.5) = 2 -> one frame, frame 0
    assert sample_video(clip)[0] == [0]
    system = "Edit what you see."
    kw = dict(resolution="video_192p", num_inference_steps=2, seed=9, system_prompt=system)
    video = pipe.edit_video(clip, "make it blue", **kw)
    image = pipe.edit_image(Image.fromarray(frames[0]), "make it blue", **kw)
    assert torch.equal(video.latents, image.latents)
    assert video.frames.shape == (1, 192, 336, 3) and video.context.frame_indices == [0]


def test_video_understanding_at_another_fps(pipe):
    clip = VideoClip(random_frames(40, 72, 128, seed=5), 30.0)  # 30 fps, 1.33 s -> 16 -> 13 frames
    indices, frames = sample_video(clip)
    assert indices == np.linspace(0, 39, 13, dtype=int).tolist()
    features, grid = pipe.encode_vit_video(frames, "video_192p")
    assert grid == (7, 5, 10) and features.shape == (7 * 5 * 10, 256)  # 13 frames -> 14 -> 7 groups of 2
    # Window and full attention stay within a temporal group: group 0 is the ViT of frames 0-1 alone.
    alone, _ = pipe.encode_vit_video(frames[:2], "video_192p")
    torch.testing.assert_close(features[:50], alone, rtol=1e-5, atol=1e-6)
    patches, patch_grid, _ = video_patches(frames, "video_192p")
    assert patch_grid == (7, 10, 20) and patches.shape == (7 * 10 * 20, 3 * 2 * 14 * 14)
    out = pipe.video_to_text(clip, "What moves?", resolution="video_192p", max_new_tokens=4)
    assert out.token_ids == pipe.video_to_text(clip, "What moves?", resolution="video_192p", max_new_tokens=4).token_ids
    assert 0 < len(out.token_ids) <= 4 or out.text == ""


@pytest.mark.parametrize("kw,message", [
    (dict(num_frames=125, height=64, width=64), "more than the 121 frames"),
    (dict(num_frames=9, height=1040, width=64), "1024 px per side"),
    (dict(num_frames=9, height=72, width=64), "multiples of 16"),
    (dict(num_frames=0, height=64, width=64), "at least 1"),
])
def test_limits_are_named(pipe, kw, message):
    with pytest.raises(ValueError, match=message):
        pipe.text_to_video("x", **kw)
