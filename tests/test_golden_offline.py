"""All four golden cases through the offline `LancePipeline` and the core, judged by the goldens' own
`compare.py` (default fp32 tolerance) on every key we produce."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from stages.lance import LancePipeline
from stages.lance.denoise import initial_noise, target_block_embeds
from stages.lance.embeddings import latent_pos_embed
from stages.lance.preprocessing import vae_image_tensor, vit_image_tensor
from stages.lance.scheduler import shifted_sigmas
from stages.lance.sequence import mrope_positions
from stages.lance.vit import patchify_video_with_merge


@pytest.fixture(scope="module")
def pipe(tiny_ckpt_dir):
    return LancePipeline.from_pretrained(str(tiny_ckpt_dir))


@pytest.fixture(scope="module")
def edit_input(golden_dir):
    return Image.open(golden_dir / "cases" / "inputs" / "edit_input.png")


def run_compare(golden_dir, out_dir, case, produced):
    (out_dir / case).mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in produced.items()}, str(out_dir / case / "tensors.safetensors"))
    res = subprocess.run([sys.executable, str(golden_dir / "compare.py"), str(out_dir), "--cases", case],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:]
    assert f"{len(produced)} passed, 0 failed" in res.stdout, res.stdout[-2000:]


def generation_trace(pipe, out, steps_seen):
    """Golden keys shared by t2i and edit, from an ImageOutput and the per-step callback record."""
    ctx = out.context
    ck, cv = ctx.cond_cache.stacked()
    uk, uv = ctx.uncond_cache.stacked()
    x_steps = torch.stack([steps_seen["x0"]] + [s[0] for s in steps_seen["steps"]])
    v_cond = torch.stack([s[1] for s in steps_seen["steps"]])
    v_uncond = torch.stack([s[2] for s in steps_seen["steps"] if s[2] is not None])
    t, h, w = ctx.latent_grid
    sig = shifted_sigmas(30, 3.5)
    markers = torch.tensor([pipe.tokens.vision_start, pipe.tokens.vision_end])
    q_embeds = target_block_embeds(pipe.model, steps_seen["x0"][None], sig[:1], ctx.latent_grid, markers)[0]
    return {
        "ctx_cond_K": ck, "ctx_cond_V": cv, "ctx_uncond_K": uk, "ctx_uncond_V": uv,
        "ctx_cond_position_ids": ctx.cond.context_positions, "ctx_uncond_position_ids": ctx.uncond.context_positions,
        "query_position_ids_cond": ctx.cond.query_positions, "query_position_ids_uncond": ctx.uncond.query_positions,
        "sigmas": sig, "dts": sig[:-1] - sig[1:],
        "latent_pos_embed_rows": latent_pos_embed(pipe.config.llm.hidden_size, ctx.latent_grid),
        "time_embed_step0_target_row": pipe.model.time_embedder(sig[:1])[0],
        "step0_cond_query_embeds": q_embeds, "step0_uncond_query_embeds": q_embeds,
        "initial_noise_target": steps_seen["x0"], "x_steps": x_steps, "v_cond": v_cond, "v_uncond": v_uncond,
        "v_cond_step0": v_cond[0], "v_uncond_step0": v_uncond[0],
        "final_latent": out.latents.reshape(1, t, h, w, -1), "decode_input_latent": out.latents.reshape(1, t, h, w, -1),
        "decoded_float": out.decoded, "image_uint8": torch.from_numpy(np.asarray(out.image).copy()),
    }


def recorder(x0):
    seen = {"x0": x0, "steps": []}
    return seen, lambda i, x, vc, vu: seen["steps"].append((x, vc, vu))


def test_t2i_matches_upstream(pipe, golden, golden_dir, tmp_path):
    g = golden("t2i")
    x0 = initial_noise(64, 0, 42, 48, "cpu", torch.float32)  # the seed's own draw, not the recorded noise
    seen, cb = recorder(x0)
    out = pipe.text_to_image("A red cube on a blue table", height=128, width=128, seed=42, callback=cb)
    produced = generation_trace(pipe, out, seen)
    produced["noise_all_vae_tokens"] = x0
    assert torch.equal(out.context.cond.context.input_ids, g["input_ids"][:46])
    run_compare(golden_dir, tmp_path, "t2i", produced)


@pytest.mark.slow
def test_image_edit_matches_upstream(pipe, golden, golden_dir, tmp_path, edit_input):
    g = golden("image_edit")
    noise_all = initial_noise(266, 266, 42, 48, "cpu", torch.float32)
    seen, cb = recorder(noise_all)
    out = pipe.edit_image(edit_input, "Make the square green", resolution="image_256res", seed=42,
                          reference_eps=g["ref_latent_eps"], callback=cb)
    produced = generation_trace(pipe, out, seen)
    vit_video = vit_image_tensor(edit_input, "image_256res")
    patches, grid_thw = patchify_video_with_merge(vit_video)
    mean, logvar = pipe.vae.encode(vae_image_tensor(edit_input, "image_256res")[None])
    produced.update({
        "noise_all_vae_tokens": initial_noise(266 * 2, 0, 42, 48, "cpu", torch.float32),
        "vae_input_ref": vae_image_tensor(edit_input, "image_256res"), "vit_input_video": vit_video,
        "vit_pixel_patches": patches, "vit_grid_thw": grid_thw, "vit_features": out.context.vit_features,
        "ref_latent_mean": mean, "ref_latent_logvar": logvar,
        "ref_latent_sampled": out.context.reference_latents.reshape(1, 14, 19, 48),
    })
    run_compare(golden_dir, tmp_path, "image_edit", produced)


def test_x2t_image_matches_upstream(pipe, golden, golden_dir, tmp_path, edit_input):
    out = pipe.image_to_text(edit_input, "What color is the square?", resolution="image_256res",
                             max_new_tokens=16, output_logits=True)
    vit_video = vit_image_tensor(edit_input, "image_256res")
    patches, grid_thw = patchify_video_with_merge(vit_video)
    features, _ = pipe.encode_vit(edit_input, "image_256res")
    produced = {
        "generated_ids": torch.tensor(out.token_ids), "logits_all_steps": torch.stack(out.logits),
        "logits_first3": torch.stack(out.logits[:3]), "vit_features": features, "vit_grid_thw": grid_thw,
        "vit_input_video": vit_video, "vit_pixel_patches": patches,
    }
    run_compare(golden_dir, tmp_path, "x2t_image", produced)
    g = golden("x2t_image")
    # The prompt and its positions come from the same sequence builder the thinker uses.
    assert out.token_ids == g["generated_ids"].tolist()


def test_vae_case_matches_upstream(pipe, golden, golden_dir, tmp_path):
    g = golden("vae")
    mean, logvar = pipe.vae.encode(g["image_in"][None])
    video_mean, _ = pipe.vae.encode(g["video_in"][None])
    chw = lambda z: z.permute(3, 0, 1, 2)[None]  # [t, h, w, 48] -> [1, 48, t, h, w]
    produced = {
        "image_latent_mean": mean[0].permute(1, 2, 3, 0), "image_latent_logvar": logvar,
        "image_recon": pipe.vae.decode(mean)[0],
        "random_latent_decoded": pipe.vae.decode(chw(g["random_latent"]))[0],
        "video_latent_mean": video_mean[0].permute(1, 2, 3, 0),
        "random_video_latent_decoded": pipe.vae.decode(chw(g["random_video_latent"]))[0],
    }
    run_compare(golden_dir, tmp_path, "vae", produced)


def test_x2t_positions_match_upstream(pipe, golden, edit_input):
    from stages.lance.prompts import Visual, default_system_prompt
    from stages.lance.sequence import build_understanding_sequence
    g = golden("x2t_image")
    _, grid = pipe.encode_vit(edit_input, "image_256res")
    seq = build_understanding_sequence(pipe.tokenizer, pipe.tokens, default_system_prompt("x2t"),
                                       [("user", [Visual("vit"), "What color is the square?"])], [grid])
    assert torch.equal(seq.input_ids, g["prompt_ids"])
    pos = mrope_positions(seq)
    assert torch.equal(pos, g["position_ids"][..., : pos.shape[-1]].reshape(3, -1))
