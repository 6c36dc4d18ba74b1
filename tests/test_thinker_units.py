"""Thinker building blocks without an engine: paged-KV layouts, bidirectional blocks, prompts, exports."""
from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from stages.lance.checkpoint import load_tokenizer, resolve_checkpoint
from stages.lance.config import SpecialTokens
from stages.lance.prompts import default_system_prompt
from stages.lance.sequence import build_generation_sequence, plan_generation
from stages.thinker.bidirectional import BidirectionalSpan, find_bidirectional_spans, refine_bidirectional
from stages.thinker.engine_config import LanceTokenIds, engine_kwargs, vllm_hf_config
from stages.thinker.errors import ContextTooLongError, KVExportError
from stages.thinker.exports import ExportClaims, SharedMemorySink
from stages.thinker.inputs import VisualInputs, vllm_prompt
from stages.thinker.kv_layout import CpuAttentionReader, FlashAttentionReader, block_slots
from stages.thinker.multimodal import ANCHOR, LATENT, VIT

VS, VE = 985, 986


# --- paged KV layouts -------------------------------------------------------------------------------


def _random_request(num_tokens, heads, d, num_blocks, block_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_tokens, heads, d, generator=g)
    v = torch.randn(num_tokens, heads, d, generator=g)
    blocks = torch.randperm(num_blocks, generator=g)[: -(-num_tokens // block_size)]
    return k, v, blocks, block_slots(blocks, num_tokens, block_size)


@pytest.mark.parametrize("isa,dtype", [("vec", torch.float32), ("vec", torch.bfloat16), ("vec16", torch.float32)])
def test_cpu_layout_reads_back_what_vllms_kernel_wrote(isa, dtype):
    from vllm import _custom_ops as ops

    nb, heads, bs, d = 9, 2, 32, 64
    cache = torch.zeros(nb, heads, bs, 2 * d, dtype=dtype)  # CPU_ATTN's per-layer tensor
    key_cache, value_cache = cache.view(nb, heads, 2 * bs, d).chunk(2, dim=2)
    k, v, blocks, slots = _random_request(70, heads, d, nb, bs)
    ops.cpu_attn_reshape_and_cache(k.to(dtype), v.to(dtype), key_cache, value_cache, slots, isa)
    got_k, got_v = CpuAttentionReader(isa, bs, d, dtype).gather(cache, blocks, 70)
    assert torch.equal(got_k, k.to(dtype)) and torch.equal(got_v, v.to(dtype))
    # the naive K|V-per-token reading (FlashAttention's) is wrong here: layouts must be told apart
    wrong_k, _ = FlashAttentionReader(d).gather(cache, blocks, 70)
    assert not torch.equal(wrong_k, k.to(dtype))


@pytest.mark.parametrize("physical", ["NHD", "HND"])
def test_flash_attention_layout_reads_back_k_and_v(physical):
    nb, heads, bs, d = 7, 2, 16, 64
    # logical [blocks, heads, block_size, 2d]; FlashAttention may store it block-major in either order
    storage = torch.zeros(nb, bs, heads, 2 * d) if physical == "NHD" else torch.zeros(nb, heads, bs, 2 * d)
    cache = storage.permute(0, 2, 1, 3) if physical == "NHD" else storage
    k, v, blocks, slots = _random_request(40, heads, d, nb, bs, seed=1)
    key_cache, value_cache = cache.transpose(1, 2).split(d, dim=-1)  # flash_attn.py's own view
    key_cache[slots // bs, slots % bs] = k  # what reshape_and_cache_flash does
    value_cache[slots // bs, slots % bs] = v
    got_k, got_v = FlashAttentionReader(d).gather(cache, blocks, 40)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)


# --- bidirectional visual blocks --------------------------------------------------------------------


def test_spans_cover_blocks_and_resume_inside_a_cached_block():
    ids = [1, 2, VS, 5, 5, 5, VE, 3, VS, 6, VE, 4]
    # request 0: the whole prompt in one step; request 1: started at token 4 (prefix cache), inside block 1
    qsl, seq_lens = [0, 12, 20, 21], [12, 12, 40]
    step = torch.tensor(ids + ids[4:] + [VS])  # request 2 decodes one token (a generated marker)
    spans = find_bidirectional_spans(step, qsl, seq_lens, VS, VE)
    assert spans == [BidirectionalSpan(2, 7, 0, 7), BidirectionalSpan(8, 11, 0, 11),
                     BidirectionalSpan(12, 15, 1, 7), BidirectionalSpan(16, 19, 1, 11)]


def test_a_block_split_across_steps_is_refused():
    with pytest.raises(RuntimeError, match="split across scheduler steps"):
        find_bidirectional_spans(torch.tensor([1, VS, 5, 5]), [0, 4], [4], VS, VE)


def test_refined_rows_equal_full_attention_inside_blocks():
    """Causal kernel + refinement == upstream's mask (causal text, bidirectional blocks), exactly in fp32."""
    from vllm import _custom_ops as ops

    heads, kv_heads, d, bs, nb = 4, 2, 64, 32, 6
    ids = torch.tensor([1, 2, 3, VS] + [7] * 30 + [VE, 4, 5, VS, 8, 8, 8, VE, 6])
    n = ids.numel()
    g = torch.Generator().manual_seed(3)
    q = torch.randn(n, heads, d, generator=g)
    k, v, blocks, slots = _random_request(n, kv_heads, d, nb, bs, seed=4)
    cache = torch.zeros(nb, kv_heads, bs, 2 * d)
    key_cache, value_cache = cache.view(nb, kv_heads, 2 * bs, d).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, "vec")

    def attend(mask):
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           attn_mask=mask, scale=d**-0.5, enable_gqa=True)
        return o[0].transpose(0, 1).reshape(n, -1)

    causal = torch.ones(n, n, dtype=torch.bool).tril()
    block = torch.zeros(n, dtype=torch.long)
    block[3:35], block[37:42] = 1, 2
    upstream = causal | ((block[:, None] == block[None, :]) & (block[:, None] > 0))
    spans = find_bidirectional_spans(ids, [0, n], [n], VS, VE)
    refined = refine_bidirectional(attend(causal), q.reshape(n, -1), cache, blocks[None], spans,
                                   CpuAttentionReader("vec", bs, d, torch.float32), heads, d, d**-0.5)
    torch.testing.assert_close(refined, attend(upstream), rtol=0, atol=2e-6)
    assert not torch.allclose(attend(causal), attend(upstream), atol=1e-3)  # the blocks do matter


# --- prompts -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_ckpt_dir):
    files = resolve_checkpoint(tiny_ckpt_dir)
    tok = load_tokenizer(files)
    cfg = vllm_hf_config(files, tok)
    tokens = SpecialTokens.from_config_and_tokenizer(cfg, tok)
    return SimpleNamespace(files=files, tok=tok, tokens=tokens, cfg=cfg, ids=LanceTokenIds(**cfg["lance"]["token_ids"]))


def _expand(prompt: dict, ids: LanceTokenIds):
    """Expand a compact prompt the way the processor does: (token ids, features for get_mrope_input_positions)."""
    items = {m: list(v) for m, v in prompt.get("multi_modal_data", {}).items()}
    out, feats, compact = [], [], prompt["prompt_token_ids"]
    i = 0
    while i < len(compact):
        t = compact[i]
        if t == ids.anchor:
            item = items[ANCHOR].pop(0)
            kind, length, seg = ANCHOR, 1, [int(item["anchor_token_id"][0])]
        elif t == ids.vision_start and compact[i + 1] in (ids.vit_pad, ids.gen_pad):
            kind = VIT if compact[i + 1] == ids.vit_pad else LATENT
            item = items[kind].pop(0)
            length = item[f"{'vit' if kind == VIT else 'latent'}_positions"].shape[1]
            seg = [ids.vision_start] + [compact[i + 1]] * (length - 2) + [ids.vision_end]
            i += 2
        else:
            out.append(t)
            i += 1
            continue
        feats.append(SimpleNamespace(modality=kind, mm_position=SimpleNamespace(offset=len(out), length=length),
                                     data={key: SimpleNamespace(data=val) for key, val in item.items()}))
        out += seg
        i += 1
    return out, feats


def test_prompts_carry_upstream_positions_incl_the_uncond_anchor(tiny, golden):
    from stages.thinker.model import LanceThinkerForConditionalGeneration as Model

    g = golden("t2i")
    seq = build_generation_sequence(tiny.tok, tiny.tokens, default_system_prompt("t2i"),
                                    "A red cube on a blue table", [], (1, 8, 8))
    cond, uncond = plan_generation(seq)
    for plan, key in ((cond, "ctx_cond_position_ids"), (uncond, "ctx_uncond_position_ids")):
        prompt = vllm_prompt(plan.context, plan.context_positions, tiny.ids, VisualInputs())
        tokens, feats = _expand(prompt, tiny.ids)
        assert tokens == plan.context.input_ids.tolist()
        positions, delta = Model.get_mrope_input_positions(None, tokens, feats)
        assert torch.equal(positions, g[key])
    # cond: plain text; uncond: one anchor on the first token after the removed caption, at its cond position
    assert "multi_modal_data" not in vllm_prompt(cond.context, cond.context_positions, tiny.ids, VisualInputs())
    anchors = vllm_prompt(uncond.context, uncond.context_positions, tiny.ids, VisualInputs())["multi_modal_data"][ANCHOR]
    assert [int(a["anchor_positions"][0, 0]) for a in anchors] == [41]


def test_edit_prompts_carry_shifted_vit_and_reference_positions(tiny, golden):
    from stages.thinker.model import LanceThinkerForConditionalGeneration as Model

    g = golden("image_edit")
    vit_grid, grid = (1, 6, 9), (1, 14, 19)
    seq = build_generation_sequence(tiny.tok, tiny.tokens, default_system_prompt("image_edit"), "Make the square green",
                                    [("vit", vit_grid), ("vae_ref", grid)], grid)
    cond, uncond = plan_generation(seq)
    visuals = VisualInputs(torch.zeros(216, 1176), (1, 12, 18), torch.zeros(266, 48), grid)
    for plan, branch in ((cond, "cond"), (uncond, "uncond")):
        tokens, feats = _expand(vllm_prompt(plan.context, plan.context_positions, tiny.ids, visuals), tiny.ids)
        positions, _ = Model.get_mrope_input_positions(None, tokens, feats)
        n = plan.context.input_ids.numel()
        # cache positions: upstream prefills both branches with the cond positions of the kept tokens
        kept = seq.kept_token_index()[:n] if branch == "uncond" else torch.arange(n)
        assert torch.equal(positions, g["position_ids_cond"][:, kept])
        assert sum(t == tiny.ids.gen_pad for t in tokens) == 266  # the gen expert's slots


def test_engine_kwargs_fill_in_what_the_model_needs_and_refuse_other_values(tiny):
    kw = engine_kwargs(tiny.files, tiny.files.llm_dir, {"max_model_len": 4096, "cpu_kv_cache_space_gib": 1})
    assert kw["enforce_eager"] and kw["disable_chunked_mm_input"] and kw["max_num_batched_tokens"] == 4096
    assert kw["kv_cache_memory_bytes"] == 2**30 and "cpu_kv_cache_space_gib" not in kw
    assert kw["model"] == str(tiny.files.llm_dir)  # weights straight from the checkpoint, no converted copy
    assert engine_kwargs(tiny.files, tiny.files.llm_dir, {"max_model_len": 4096,
                                                          "max_num_batched_tokens": 8192})["max_num_batched_tokens"] == 8192
    for given, needle in (({"enforce_eager": False}, "enforce_eager=False"),
                          ({"max_num_batched_tokens": 512}, "max_num_batched_tokens=512 is below max_model_len=4096"),
                          ({"generation_config": "auto"}, "generation_config='auto'")):
        with pytest.raises(ValueError, match=needle):   # never silently replaced
            engine_kwargs(tiny.files, tiny.files.llm_dir, {"max_model_len": 4096, **given})
    with pytest.raises(ValueError, match="need max_model_len"):
        engine_kwargs(tiny.files, tiny.files.llm_dir, {})


def test_config_reserves_token_ids_past_the_tokenizer(tiny):
    ids = tiny.ids
    assert ids.gen_pad == ids.len_tokenizer == len(tiny.tok) and ids.anchor == ids.len_tokenizer + 1
    assert ids.anchor < tiny.cfg["vocab_size"] and tiny.cfg["tie_word_embeddings"] is False


# --- exports -------------------------------------------------------------------------------------------


def test_shm_exports_are_claimed_once_fail_loudly_and_expire(tmp_path):
    claims = ExportClaims(ttl_s=0.5, root=tmp_path)
    sink = SharedMemorySink(claims.directory, ttl_s=0.5)
    k, v = torch.randn(2, 5, 1, 64), torch.randn(2, 5, 1, 64)
    sink.put("a", k, v)
    claimed = asyncio.run(claims.claim("a", timeout_s=1))
    got_k, got_v = claimed.kv
    assert torch.equal(got_k, k) and torch.equal(got_v, v) and claims.pending() == []
    assert (claimed.num_tokens, claimed.nbytes) == (5, 2 * k.numel() * 4)
    sink.fail("b", "boom")
    with pytest.raises(KVExportError, match="boom"):
        asyncio.run(claims.claim("b", timeout_s=1))
    with pytest.raises(KVExportError, match="did not arrive"):
        asyncio.run(claims.claim("never", timeout_s=0.05))
    sink.put("unclaimed", k, v)
    old = time.time() - 10
    os.utime(claims.directory / "unclaimed.kv", (old, old))
    assert sink.expire() == 1 and claims.pending() == []
    sink.put("dropped", k, v)
    claims.drop("dropped")
    assert claims.pending() == []
    claims.drop("in-flight")            # cancelled while the engine step is still writing it
    sink.put("in-flight", k, v)
    assert claims.pending() == []
    claims.close()
    assert not claims.directory.exists()


def test_a_dead_replicas_export_directory_is_removed_by_the_next_one(tmp_path):
    """A killed replica never closes its claims: the next replica on the host removes the
    directory (and the unclaimed exports in it), and only directories whose owner is gone."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = ExportClaims(root=tmp_path)
    live = ExportClaims(root=tmp_path)
    SharedMemorySink(gone.directory).put("parked", torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 1, 64))
    orphan = gone.directory.rename(gone.directory.with_name(
        gone.directory.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")))
    namespace = orphan.name.split("-")[2]
    other_namespace = tmp_path / orphan.name.replace(f"-{namespace}-", "-1-")
    other_namespace.mkdir()          # another pid namespace: its pids mean nothing here
    unrelated = tmp_path / "lance-kv-abc"
    unrelated.mkdir()                # not ours (an older layout, another program)
    newer = ExportClaims(root=tmp_path)
    assert newer.orphans_removed == [orphan.name] and not orphan.exists()
    assert live.directory.is_dir() and other_namespace.is_dir() and unrelated.is_dir()
    for claims in (live, newer):
        claims.close()


def test_errors_survive_pickling():
    import pickle

    e = pickle.loads(pickle.dumps(ContextTooLongError(5000, 4096, "context")))
    assert (e.num_tokens, e.max_model_len, e.http_status) == (5000, 4096, 400) and "4096" in str(e)
