"""The video goldens (t2v, i2v, video_edit, x2t_video, vae_video) through the offline `LancePipeline` on the
tiny Lance_3B_Video checkpoint, judged by the goldens' own rule (`assert_golden`, default fp32 tolerance)
on every key we produce. Inputs are upstream's (the clip is decoded with PyAV and sampled by our frame
sampler); the target noise is the seed's own draw; only the posterior noise is injected (upstream draws it
from its global RNG)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stages.lance import LancePipeline
from stages.lance.checkpoint import SafetensorsFile
from stages.lance.context import prefill_context
from stages.lance.denoise import initial_noise, target_block_embeds
from stages.lance.embeddings import latent_pos_embed, latent_pos_embed_table
from stages.lance.preprocessing import CLIP_MEAN, CLIP_STD, vae_image_tensor, vae_video_tensor, vit_video_tensor
from stages.lance.prompts import Visual, default_system_prompt
from stages.lance.scheduler import shifted_sigmas
from stages.lance.sequence import (BranchPlan, build_generation_sequence, build_understanding_sequence,
                                   mrope_positions, shift_generation_positions)
from stages.lance.video_io import VideoClip, sample_video
from stages.lance.vit import patchify_video_with_merge

CAPTION_T2V = "A red ball rolls across a wooden table"
CAPTION_I2V = "The red square slides to the right"
INSTRUCTION = "Make the red square green"
QUESTION = "Which way does the red square move?"


@pytest.fixture(scope="module")
def pipe(tiny_ckpt_dir):
    return LancePipeline.from_pretrained(str(tiny_ckpt_dir), variant="Lance_3B_Video")


@pytest.fixture(scope="module")
def clip_path(golden_dir):
    return golden_dir / "cases" / "inputs" / "video_input.mp4"


@pytest.fixture
def check(assert_golden):
    """check(produced, golden): every produced key against its golden; all failures reported together."""
    def run(produced: dict, g: dict) -> None:
        failures = []
        for key, value in produced.items():
            try:
                assert_golden(value, g[key], key)
            except AssertionError as e:
                failures.append(str(e))
        assert not failures, "\n".join(failures)
        assert produced
    return run


def to_uint8(x: torch.Tensor, mean, std) -> torch.Tensor:
    """A normalized [3, T, H, W] input back to the uint8 THWC frames it was made from."""
    m = torch.tensor(mean).view(3, 1, 1, 1)
    s = torch.tensor(std).view(3, 1, 1, 1)
    return ((x * s + m) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)


def recorder():
    seen = []
    return seen, lambda i, x, vc, vu: seen.append((x, vc, vu))


def full_positions(seq):
    """Upstream's position_ids over a whole generation sequence: get_rope_index + shift_position_ids."""
    return shift_generation_positions(mrope_positions(seq), seq)


def generation_keys(pipe, out, seen, x0, steps, sequence) -> dict:
    """Golden keys every generation case shares, from a VideoOutput and the per-step record."""
    ctx = out.context
    ck, cv = ctx.cond_cache.stacked()
    uk, uv = ctx.uncond_cache.stacked()
    sig = shifted_sigmas(steps, 3.5)
    t, h, w = ctx.latent_grid
    markers = torch.tensor([pipe.tokens.vision_start, pipe.tokens.vision_end])
    v_uncond = torch.stack([s[2] for s in seen if s[2] is not None])
    uncond_seq = sequence.without_caption()
    return {
        "input_ids": sequence.input_ids, "input_ids_uncond": uncond_seq.input_ids,
        "sample_modality": sequence.modality,
        "position_ids_cond": full_positions(sequence), "position_ids_uncond": full_positions(uncond_seq),
        "ctx_cond_K": ck, "ctx_cond_V": cv, "ctx_uncond_K": uk, "ctx_uncond_V": uv,
        "ctx_cond_position_ids": ctx.cond.context_positions, "ctx_uncond_position_ids": ctx.uncond.context_positions,
        "query_position_ids_cond": ctx.cond.query_positions, "query_position_ids_uncond": ctx.uncond.query_positions,
        "sigmas": sig, "dts": sig[:-1] - sig[1:],
        "time_embed_step0_target_row": pipe.model.time_embedder(sig[:1])[0],
        "step0_cond_query_embeds": target_block_embeds(pipe.model, x0[None], sig[:1], ctx.latent_grid, markers,
                                                       ctx.clean_rows)[0],
        "x_steps": torch.stack([x0] + [s[0] for s in seen]), "v_cond": torch.stack([s[1] for s in seen]),
        "v_uncond": v_uncond, "final_latent": out.latents.reshape(t, h, w, -1), "video_uint8": out.frames,
    }


# --- checkpoint --------------------------------------------------------------------------------

def test_video_checkpoint_uses_its_own_vit_copy(pipe, tiny_ckpt_dir):
    vit = pipe.vit.model.state_dict()
    with SafetensorsFile(tiny_ckpt_dir / "Lance_3B_Video" / "model.safetensors") as f:
        bundled = {n[len("vit_model."):]: f.get(n) for n in f.names() if n.startswith("vit_model.")}
    with SafetensorsFile(tiny_ckpt_dir / "Qwen2.5-VL-ViT" / "vit.safetensors") as f:
        standalone = {n: f.get(n) for n in f.names()}
    assert bundled.keys() == vit.keys() == standalone.keys()
    assert all(torch.equal(vit[k], bundled[k]) for k in vit)
    assert not any(torch.equal(vit[k], standalone[k]) for k in vit if vit[k].numel() > 1)


def test_3d_latent_position_table_at_video_sizes(pipe, tiny_ckpt_dir):
    """31 x 64 x 64 rows recomputed = the table the video checkpoint stores; a block's rows are the table's
    rows t*4096 + h*64 + w (ids restart at 0 per block)."""
    hidden = pipe.config.llm.hidden_size
    table = latent_pos_embed_table(hidden, 31, 64)
    with SafetensorsFile(tiny_ckpt_dir / "Lance_3B_Video" / "model.safetensors") as f:
        assert torch.equal(table, f.get("latent_pos_embed.pos_embed"))
    t, h, w = torch.meshgrid(torch.arange(31), torch.arange(3, 64, 11), torch.arange(0, 64, 9), indexing="ij")
    ids = (t * 4096 + h * 64 + w).reshape(-1)
    block = latent_pos_embed(hidden, (31, 64, 64)).reshape(31, 64, 64, -1)[:, 3::11, ::9].reshape(len(ids), -1)
    assert torch.equal(block, table[ids])


# --- cases -------------------------------------------------------------------------------------

def test_t2v_matches_upstream(pipe, golden, check):
    g = golden("t2v")
    x0 = initial_noise(72, 0, 42, 48, "cpu", torch.float32)
    seen, cb = recorder()
    out = pipe.text_to_video(CAPTION_T2V, num_frames=9, height=64, width=96, num_inference_steps=10, seed=42,
                             callback=cb)
    assert out.frames.shape == (9, 64, 96, 3) and out.frames.dtype == torch.uint8 and out.latents.shape == (72, 48)
    seq = build_generation_sequence(pipe.tokenizer, pipe.tokens, default_system_prompt("t2v"), CAPTION_T2V, [],
                                    (3, 4, 6))
    produced = generation_keys(pipe, out, seen, x0, 10, seq)
    v_cond, v_uncond = produced["v_cond"], produced["v_uncond"]
    produced.update({
        "noise_all_vae_tokens": x0, "initial_noise_target": x0, "x_t_initial_all_vae_tokens": x0,
        "latent_pos_embed_rows": latent_pos_embed(pipe.config.llm.hidden_size, (3, 4, 6)),
        "step0_uncond_query_embeds": produced["step0_cond_query_embeds"],
        "v_cond_step0": v_cond[0], "v_uncond_step0": v_uncond[0],
        "decode_input_latent": produced["final_latent"], "decoded_float": out.decoded,
    })
    check(produced, g)


def test_i2v_matches_upstream(pipe, golden, golden_dir, check, assert_golden):
    g = golden("i2v")
    image = Image.open(golden_dir / "cases" / "inputs" / "video_input_frame0.png")
    noise = initial_noise(504, 0, 42, 48, "cpu", torch.float32)
    seen, cb = recorder()
    out = pipe.image_to_video(image, CAPTION_I2V, num_frames=5, resolution="video_192p", num_inference_steps=8,
                              seed=42, reference_eps=g["cond_latent_eps"], callback=cb)
    assert out.frames.shape == (5, 192, 336, 3)
    ctx = out.context
    x0 = torch.cat([ctx.condition_latents, noise[252:]])  # the pinned first latent frame, then the noise
    seq = build_generation_sequence(pipe.tokenizer, pipe.tokens, default_system_prompt("i2v"), CAPTION_I2V, [],
                                    (2, 12, 21))
    produced = generation_keys(pipe, out, seen, x0, 8, seq)
    produced.update({
        "noise_all_vae_tokens": noise, "initial_noise_target": noise, "x_t_initial_all_vae_tokens": x0,
        "time_embed_t0_row": pipe.model.time_embedder(torch.zeros(1))[0],
        "cond_image_uint8": to_uint8(vae_image_tensor(image, "video_192p"), (0.5,) * 3, (0.5,) * 3)[0],
    })
    check(produced, g)
    # Latent frame 0 of upstream's encode (image + noise frames) = the image's own encode; the pinned rows.
    mean, logvar = pipe.vae.encode(vae_image_tensor(image, "video_192p")[None])
    assert_golden(mean, g["cond_latent_mean"][:, :, :1], "cond_latent_mean[frame 0]")
    assert_golden(logvar, g["cond_latent_logvar"][:, :, :1], "cond_latent_logvar[frame 0]")
    assert_golden(ctx.condition_latents, g["cond_latent_sampled"][0].reshape(-1, 48), "cond_latent_sampled[frame 0]")
    assert all(torch.equal(s[0][:252], ctx.condition_latents) for s in seen)  # never integrated


def test_video_edit_matches_upstream(pipe, golden, clip_path, check):
    g = golden("video_edit")
    noise_all = initial_noise(1008, 0, 42, 48, "cpu", torch.float32)
    seen, cb = recorder()
    out = pipe.edit_video(str(clip_path), INSTRUCTION, resolution="video_192p", num_inference_steps=8, seed=42,
                          reference_eps=g["ref_latent_eps"], callback=cb)
    assert out.frames.shape == (5, 192, 336, 3)
    ctx = out.context
    indices, frames = sample_video(clip_path)
    vit_grid = (3, 5, 10)
    seq = build_generation_sequence(pipe.tokenizer, pipe.tokens, default_system_prompt("video_edit"), INSTRUCTION,
                                    [("vit", vit_grid), ("vae_ref", (2, 12, 21))], (2, 12, 21))
    produced = generation_keys(pipe, out, seen, noise_all[504:], 8, seq)
    del produced["step0_cond_query_embeds"]  # not recorded for this case (size)
    ref_pixels = vae_video_tensor(frames, "video_192p")
    mean, logvar = pipe.vae.encode(ref_pixels[None])
    produced.update({
        "noise_all_vae_tokens": noise_all, "time_embed_t0_row": pipe.model.time_embedder(torch.zeros(1))[0],
        "sampled_frame_indices": torch.tensor(ctx.frame_indices),
        "sampled_frames_uint8": torch.from_numpy(np.stack([np.asarray(f) for f in frames])),
        "vae_input_ref_uint8": to_uint8(ref_pixels, (0.5,) * 3, (0.5,) * 3),
        "vit_features": ctx.vit_features, "vit_grid_thw": torch.tensor([[3, 10, 20]]),
        "ref_latent_mean": mean, "ref_latent_logvar": logvar,
        "ref_latent_sampled": ctx.reference_latents.reshape(2, 12, 21, 48),
    })
    assert ctx.frame_indices == indices
    check(produced, g)


def test_x2t_video_matches_upstream(pipe, golden, clip_path, check):
    g = golden("x2t_video")
    out = pipe.video_to_text(str(clip_path), QUESTION, resolution="video_192p", max_new_tokens=12, output_logits=True)
    indices, frames = sample_video(clip_path)
    vit_in = vit_video_tensor(frames, "video_192p")
    patches, grid_thw = patchify_video_with_merge(vit_in)
    features, llm_grid = pipe.encode_vit_video(frames, "video_192p")
    seq = build_understanding_sequence(pipe.tokenizer, pipe.tokens, default_system_prompt("x2t_video"),
                                       [("user", [Visual("vit"), QUESTION])], [llm_grid])
    positions = mrope_positions(seq)
    n = len(seq.input_ids) - 1
    cache = prefill_context(pipe.model, BranchPlan(seq.head(n), positions[:, :n], positions[:, :0]), features)
    k, v = cache.stacked()
    produced = {
        "sampled_frame_indices": torch.tensor(indices),
        "sampled_frames_uint8": torch.from_numpy(np.stack([np.asarray(f) for f in frames])),
        "vit_input_uint8": to_uint8(vit_in, CLIP_MEAN, CLIP_STD), "vit_pixel_patches": patches,
        "vit_grid_thw": grid_thw, "vit_features": features,
        "prompt_ids": seq.input_ids, "position_ids": positions, "ctx_K": k, "ctx_V": v,
        "generated_ids": torch.tensor(out.token_ids), "logits_all_steps": torch.stack(out.logits),
    }
    # position_ids covers the prompt and the decode steps (text positions continue by one per token)
    produced["position_ids"] = torch.cat([positions, positions[:, -1:] + torch.arange(1, 13)], dim=1)
    check(produced, g)
    assert out.text == pipe.tokenizer.decode(g["generated_ids"].tolist())


def test_vae_video_matches_upstream(pipe, golden, check):
    g = golden("vae_video")
    video_in = (g["video_in_uint8"].permute(3, 0, 1, 2).float() / 255 - 0.5) / 0.5
    mean, logvar = pipe.vae.encode(video_in[None])
    # Decoded chunk by chunk (causal: 1 frame, then 4 per latent frame), with the feature cache carried over.
    chunks = list(pipe.vae.decode_chunks(mean))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    chw = lambda z: z.permute(3, 0, 1, 2)[None]  # [t, h, w, 48] -> [1, 48, t, h, w]
    produced = {
        "video_in": video_in, "video_latent_mean": mean[0].permute(1, 2, 3, 0), "video_latent_logvar": logvar,
        "video_recon": torch.cat(chunks, dim=2)[0],
        "random_video_latent_decoded": pipe.vae.decode(chw(g["random_video_latent"]))[0],
    }
    check(produced, g)


# --- inputs ------------------------------------------------------------------------------------

def test_pyav_decodes_upstreams_frames(golden, clip_path, golden_dir):
    g = golden("video_edit")
    indices, frames = sample_video(clip_path)
    assert indices == g["sampled_frame_indices"].tolist() == [0, 3, 7, 11, 15]
    assert np.array_equal(np.stack([np.asarray(f) for f in frames]), g["sampled_frames_uint8"].numpy())
    # The same clip given as frames + fps samples the same frames; other frame rates sample other ones.
    everything = np.load(golden_dir / "cases" / "inputs" / "video_input_uint8_thwc.npy")
    assert sample_video(VideoClip(everything, 24.0))[0] == indices
    assert sample_video({"frames": torch.from_numpy(everything), "fps": 23.98})[0] == indices  # fps rounds to 24
    assert sample_video(VideoClip(everything, 12.0))[0] == np.linspace(0, 15, 13, dtype=int).tolist()
    assert len(sample_video(VideoClip(everything[:1], 24.0))[1]) == 1
    with pytest.raises(TypeError, match="path to a video file or an object with .frames and .fps"):
        sample_video(everything)


def test_image_tasks_run_on_the_video_checkpoint(pipe, golden_dir):
    out = pipe.text_to_image("A red cube on a blue table", height=64, width=48, num_inference_steps=3, seed=1)
    assert out.image.size == (48, 64) and out.latents.shape == (12, 48)
    image = Image.open(golden_dir / "cases" / "inputs" / "edit_input.png")
    text = pipe.image_to_text(image, "What color is the square?", resolution="image_256res", max_new_tokens=3)
    assert len(text.token_ids) <= 3
