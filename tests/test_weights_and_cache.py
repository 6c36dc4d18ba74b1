"""Weight loading as data (stages/lance/weights.py) and the model core's preallocated KV cache."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.dit.model import load_dit_model
from stages.lance.checkpoint import expected_llm_tensor_shapes, load_lance_config, resolve_checkpoint
from stages.lance.pipeline import load_lance_model
from stages.lance.transformer import KVCache
from stages.lance.weights import (CHECKPOINT_PARTS, WeightsLoader, WeightsLoadError, map_checkpoint_name,
                                  part_of)


@pytest.fixture(scope="module")
def files(tiny_ckpt_dir):
    return resolve_checkpoint(tiny_ckpt_dir, need_vit=False, need_vae=False)


def test_every_checkpoint_tensor_belongs_to_one_part_and_every_parameter_name_to_one_tensor(files):
    cfg = load_lance_config(files)
    names = list(expected_llm_tensor_shapes(cfg))
    assert all(part_of(n) is not None for n in names)
    targets = [(t.param, t.shard) for t in map(map_checkpoint_name, names) if t is not None]
    assert len(targets) == len(set(targets)) == len(names) - 1   # the position table is recomputed, no parameter
    assert {part_of(n) for n in names} == {p.name for p in CHECKPOINT_PARTS} - {"bundled_vit", "vit_file"}


def test_a_tensor_outside_every_part_fails_each_loader_naming_it(files, tmp_path):
    tensors = load_file(str(files.llm_weights_path))
    tensors["connector.fc1.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    cfg = load_lance_config(files)
    with pytest.raises(WeightsLoadError, match=r"1 unexpected tensors \['connector.fc1.weight'\]"):
        load_lance_model(tmp_path / "model.safetensors", cfg, torch.float32, "cpu")


def test_skipped_parts_are_never_read_and_missing_shards_are_named(files):
    cfg = load_lance_config(files)
    with torch.device("meta"):
        from stages.lance.model import LanceModel
        model = LanceModel(cfg)
    model = model.to_empty(device="cpu")
    reads: list[str] = []

    def reader(name):
        def read():
            reads.append(name)
            return torch.zeros(expected[name])
        return read

    expected = expected_llm_tensor_shapes(cfg)
    names = [n for n in expected if "layers.0.self_attn.k_proj_moe_gen" not in n]
    loader = model.load_weights(((n, reader(n)) for n in names), skip_parts=("lm_head",))
    assert "language_model.lm_head.weight" in loader.skipped and "language_model.lm_head.weight" not in reads
    missing = model.missing_parameters()
    assert "language_model.layers.0.gen.attn.qkv_proj.weight[k]" in missing
    assert "language_model.layers.0.gen.attn.qkv_proj.bias[k]" in missing
    assert "language_model.lm_head.weight" in missing       # skipped, so not filled: a caller must drop it
    with pytest.raises(ValueError, match="unknown checkpoint part"):
        WeightsLoader([], None, skip_parts=("lm_heads",))


def test_dit_loads_only_its_parts(files):
    model, _ = load_dit_model(files)
    assert model.language_model.lm_head is None and model.language_model.embed_tokens.weight.shape[0] == 2


def test_kv_cache_writes_in_place_and_equals_concatenation():
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(2, n, 2, 8, generator=g) for n in (5, 1, 1, 1, 3)]
    cache = KVCache(capacity=8)
    for b in blocks[:4]:
        keys, values = cache.update(0, b, -b)
    buffer = keys.untyped_storage().data_ptr()
    assert keys.shape[1] == 8 and cache.length == 8
    cache.update(0, blocks[4][:, :0], blocks[4][:, :0])
    assert cache.layer(0)[0].untyped_storage().data_ptr() == buffer     # within capacity: no new buffer
    keys, values = cache.update(0, blocks[4], -blocks[4])                # past capacity: grows, keeps contents
    torch.testing.assert_close(keys, torch.cat(blocks, dim=1), rtol=0, atol=0)
    torch.testing.assert_close(values, -torch.cat(blocks, dim=1), rtol=0, atol=0)
    q = torch.randn(2, 4, 2, 8, generator=g)
    read_k, _ = cache.with_block(0, q, q)
    assert read_k.shape[1] == 15 and cache.length == 11                  # a read-only query is not stored
    k_export = torch.cat(blocks, dim=1)[:1]                              # [layers=1, L, Hkv, d], as exported
    before = k_export.clone()
    exported = KVCache.from_stacked(k_export, k_export.clone())
    exported.update(0, q[:1], q[:1])
    assert exported.length == 15 and torch.equal(k_export, before)        # never writes into the given tensors
