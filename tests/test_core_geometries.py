"""The model core on geometries and knobs the goldens do not cover.

The und expert is checked against an independent implementation (transformers' Qwen3: same qk-norm
decoder; for text, mRoPE equals 1-D RoPE), and the generation path's invariants (cond/uncond batching
with padded caches, seeds, other sizes, steps and CFG settings) are checked on a bigger tiny model.
"""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from stages.lance import LancePipeline
from stages.lance.context import prefill_context
from stages.lance.denoise import batch_caches, predict_velocity
from stages.lance.prompts import default_system_prompt
from stages.lance.sequence import build_understanding_sequence, mrope_positions, BranchPlan
from stages.lance.tiny import TinyCheckpointSpec, make_tiny_checkpoint

pytestmark = pytest.mark.slow   # a wider checkpoint built and run, several seconds

GEOMETRY = dict(layers=3, hidden=256, heads=4, kv_heads=2, intermediate=320)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_wide")
    make_tiny_checkpoint(root, TinyCheckpointSpec(**GEOMETRY, seed=7))
    return LancePipeline.from_pretrained(str(root))


def qwen3_from_und_expert(pipe) -> Qwen3ForCausalLM:
    llm = pipe.config.llm
    cfg = Qwen3Config(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                      num_hidden_layers=llm.num_hidden_layers, num_attention_heads=llm.num_attention_heads,
                      num_key_value_heads=llm.num_key_value_heads, head_dim=llm.head_dim, rms_norm_eps=llm.rms_norm_eps,
                      rope_theta=llm.rope_theta, attention_bias=True, tie_word_embeddings=False)
    ref = Qwen3ForCausalLM(cfg).eval()
    lm = pipe.model.language_model
    q, kv = llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(lm.embed_tokens.weight)
        ref.model.norm.weight.copy_(lm.norm.weight)
        ref.lm_head.weight.copy_(lm.lm_head.weight)
        for ours, theirs in zip(lm.layers, ref.model.layers):
            e, a = ours.und, theirs.self_attn
            for proj, rows in ((a.q_proj, slice(0, q)), (a.k_proj, slice(q, q + kv)), (a.v_proj, slice(q + kv, q + 2 * kv))):
                proj.weight.copy_(e.attn.qkv_proj.weight[rows])
                proj.bias.copy_(e.attn.qkv_proj.bias[rows])
            a.o_proj.weight.copy_(e.attn.o_proj.weight)
            a.o_proj.bias.zero_()  # Lance's o_proj has no bias
            a.q_norm.weight.copy_(e.attn.q_norm.weight)
            a.k_norm.weight.copy_(e.attn.k_norm.weight)
            gate, up = e.mlp.gate_up_proj.weight.chunk(2)
            theirs.mlp.gate_proj.weight.copy_(gate)
            theirs.mlp.up_proj.weight.copy_(up)
            theirs.mlp.down_proj.weight.copy_(e.mlp.down_proj.weight)
            theirs.input_layernorm.weight.copy_(e.input_layernorm.weight)
            theirs.post_attention_layernorm.weight.copy_(e.post_attention_layernorm.weight)
    return ref


def test_und_expert_matches_an_independent_decoder(pipe):
    seq = build_understanding_sequence(pipe.tokenizer, pipe.tokens, default_system_prompt("chat"),
                                       [("user", ["What is on the blue table today?"])])
    positions = mrope_positions(seq)
    cache = prefill_context(pipe.model, BranchPlan(seq, positions, positions[:, :0]))
    with torch.no_grad():
        out = qwen3_from_und_expert(pipe)(seq.input_ids[None], use_cache=True)
    for layer, ref_layer in enumerate(out.past_key_values.layers):  # transformers' cache: [B, Hkv, L, d]
        k_ref, v_ref = ref_layer.keys, ref_layer.values
        k, v = cache.layer(layer)
        torch.testing.assert_close(k[0], k_ref[0].transpose(0, 1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(v[0], v_ref[0].transpose(0, 1), rtol=1e-4, atol=1e-5)


def test_batched_cfg_branches_equal_separate_forwards(pipe):
    ctx = pipe.prepare_generation(default_system_prompt("t2i"), "a small green bird on a wire", [], (1, 3, 5))
    cond, uncond = (prefill_context(pipe.model, p) for p in (ctx.cond, ctx.uncond))
    assert cond.length != uncond.length  # padding mask in play
    x = torch.randn(15, 48, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(0.7)
    markers = torch.tensor([pipe.tokens.vision_start, pipe.tokens.vision_end])
    both = predict_velocity(pipe.model, torch.stack([x, x]), sigma.expand(2), (1, 3, 5), markers,
                            torch.stack([ctx.cond.query_positions, ctx.uncond.query_positions]), batch_caches([cond, uncond]))
    alone = [predict_velocity(pipe.model, x[None], sigma[None], (1, 3, 5), markers, p.query_positions[None], c)[0]
             for p, c in ((ctx.cond, cond), (ctx.uncond, uncond))]
    torch.testing.assert_close(both[0], alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[1], alone[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("height,width,steps,cfg,interval", [(48, 80, 5, 2.5, (0.0, 1.0)), (64, 32, 7, 1.0, (0.4, 1.0))])
def test_text_to_image_on_other_sizes_and_knobs(pipe, height, width, steps, cfg, interval):
    seen = []
    out = pipe.text_to_image("two cats", height=height, width=width, num_inference_steps=steps, cfg_text_scale=cfg,
                             cfg_interval=interval, seed=3, callback=lambda i, x, vc, vu: seen.append(vu is not None))
    assert out.image.size == (width, height)
    assert out.latents.shape == ((height // 16) * (width // 16), 48)
    assert len(seen) == steps and all(seen) == (cfg != 1.0)
    again = pipe.text_to_image("two cats", height=height, width=width, num_inference_steps=steps, cfg_text_scale=cfg,
                               cfg_interval=interval, seed=3)
    assert torch.equal(out.latents, again.latents)
    other_seed = pipe.text_to_image("two cats", height=height, width=width, num_inference_steps=steps,
                                    cfg_text_scale=cfg, cfg_interval=interval, seed=4)
    assert not torch.equal(out.latents, other_seed.latents)


def test_rejects_sizes_that_are_not_multiples_of_16(pipe):
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.text_to_image("x", height=100, width=64)
