"""Reading one request's K and V out of vLLM's paged KV cache, for each attention backend's layout.

vLLM 0.32 gives every attention layer one tensor, logically `[num_blocks, num_kv_heads, block_size,
2 * head_dim]`, but backends fill it differently:

* FLASH_ATTN (GPU): per token, K then V along the last dim (`kv.transpose(1, 2).split(head_dim, -1)`);
  the physical stride order may differ, logical indexing hides it.
* CPU_ATTN: each (block, head) region of `2 * block_size * head_dim` values holds a K part then a V part,
  in an order the C++ kernel picks per ISA (with the `vec` ISA K is stored transposed, `[head_dim,
  block_size]`). Rather than hard-coding each ISA's packing, we probe the kernel once: write known
  values with vLLM's own `cpu_attn_reshape_and_cache` into a one-block scratch cache and read back
  where each (token, dim) landed.

Slot of context token i = block_ids[i // block_size] * block_size + i % block_size.
"""
from __future__ import annotations

import functools
from typing import Protocol

import torch


class PagedKVReader(Protocol):
    def gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [num_tokens, num_kv_heads, head_dim] of the first `num_tokens` slots of `block_ids`."""


class FlashAttentionReader:
    """FLASH_ATTN: K|V packed along the last dim of `[blocks, heads, block_size, 2*d]`."""

    def __init__(self, head_dim: int):
        self.head_dim = head_dim

    def gather(self, kv_cache, block_ids, num_tokens):
        block_ids = block_ids[: -(-num_tokens // kv_cache.shape[2])]
        blocks = kv_cache[block_ids.to(kv_cache.device)]               # [nb, H, bs, 2d]
        tokens = blocks.transpose(1, 2).flatten(0, 1)[:num_tokens]    # [nb*bs, H, 2d] -> [n, H, 2d]
        return tokens[..., : self.head_dim], tokens[..., self.head_dim:]


class CpuAttentionReader:
    """CPU_ATTN: per (block, head) a K region then a V region, element order probed from the kernel."""

    def __init__(self, isa: str, block_size: int, head_dim: int, dtype: torch.dtype):
        self.block_size, self.head_dim = block_size, head_dim
        self.k_index, self.v_index = probe_cpu_layout(isa, block_size, head_dim, dtype)
        self._k_plan, self._v_plan = _strided_plan(self.k_index), _strided_plan(self.v_index)

    def gather(self, kv_cache, block_ids, num_tokens):
        block_ids = block_ids[: -(-num_tokens // self.block_size)]
        nb, heads = len(block_ids), kv_cache.shape[1]
        regions = kv_cache[block_ids].reshape(nb, heads, -1)          # [nb, H, 2*bs*d]
        k = self._read(regions, self.k_index, self._k_plan)           # [nb, H, bs, d]
        v = self._read(regions, self.v_index, self._v_plan)
        k = k.transpose(1, 2).reshape(nb * self.block_size, heads, self.head_dim)[:num_tokens]
        v = v.transpose(1, 2).reshape(nb * self.block_size, heads, self.head_dim)[:num_tokens]
        return k, v

    def _read(self, regions: torch.Tensor, index: torch.Tensor, plan) -> torch.Tensor:
        bs, d = self.block_size, self.head_dim
        if plan is not None:  # a plain or transposed [bs, d] run: a view, no gather
            offset, transposed = plan
            run = regions[:, :, offset: offset + bs * d]
            return run.unflatten(-1, (d, bs)).transpose(-1, -2) if transposed else run.unflatten(-1, (bs, d))
        return regions.index_select(-1, index.flatten().to(regions.device)).unflatten(-1, (bs, d))


def _strided_plan(index: torch.Tensor) -> tuple[int, bool] | None:
    """(offset, transposed) when `index` is a contiguous [bs, d] run stored row- or column-major."""
    bs, d = index.shape
    offset = int(index.min())
    run = torch.arange(bs * d)
    if torch.equal(index - offset, run.view(bs, d)):
        return offset, False
    if torch.equal(index - offset, run.view(d, bs).t()):
        return offset, True
    return None


_DIGIT = 64  # every probe value (digit + 1 <= 64) is exact in fp32, bf16 and fp16


@functools.lru_cache(maxsize=None)
def probe_cpu_layout(isa: str, block_size: int, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Where `cpu_attn_reshape_and_cache` puts K[t, c] and V[t, c] inside one (block, head) region.

    Returns index maps [block_size, head_dim] into the flattened region. Each probe writes one base-64
    digit (+1, so 0 means "not written") of the token or the dim index; four probes recover both.
    """
    from vllm import _custom_ops as ops

    region = torch.zeros(1, 1, 2 * block_size, head_dim, dtype=dtype)
    key_cache, value_cache = region.chunk(2, dim=2)
    slots = torch.arange(block_size, dtype=torch.long)
    t = torch.arange(block_size).view(-1, 1).expand(block_size, head_dim)
    c = torch.arange(head_dim).view(1, -1).expand(block_size, head_dim)

    def write(values: torch.Tensor, v_offset: int) -> torch.Tensor:
        """values [bs, d] -> region contents after writing K=values+1, V=values+1+v_offset."""
        region.zero_()
        k = (values + 1).to(dtype).view(block_size, 1, head_dim)
        v = (values + 1 + v_offset).to(dtype).view(block_size, 1, head_dim)
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
        return region.flatten().float().long()

    # Probe 0 also separates K from V: V values are shifted past K's range.
    tag = write(torch.zeros_like(t), _DIGIT)
    is_k, is_v = (tag >= 1) & (tag <= _DIGIT), tag > _DIGIT
    digits = {}
    for name, idx in (("t0", t % _DIGIT), ("t1", t // _DIGIT), ("c0", c % _DIGIT), ("c1", c // _DIGIT)):
        got = write(idx, _DIGIT)
        digits[name] = torch.where(is_v, got - 1 - _DIGIT, got - 1)
    token = digits["t1"] * _DIGIT + digits["t0"]
    dim = digits["c1"] * _DIGIT + digits["c0"]
    maps = []
    for mask in (is_k, is_v):
        index = torch.full((block_size, head_dim), -1, dtype=torch.long)
        where = mask.nonzero().squeeze(1)
        index[token[where], dim[where]] = where
        if int(mask.sum()) != block_size * head_dim or bool((index < 0).any()):
            raise RuntimeError(f"could not map vLLM's CPU KV layout (isa={isa}, block_size={block_size}, "
                               f"head_dim={head_dim}, dtype={dtype})")
        maps.append(index)
    return maps[0], maps[1]


def reader_for(backend_name: str, *, head_dim: int, block_size: int, dtype: torch.dtype, isa: str | None = None) -> PagedKVReader:
    """The reader of an attention backend's layout (by vLLM's backend name)."""
    if backend_name == "CPU_ATTN":
        if isa is None:
            raise ValueError("the CPU attention backend needs the layer's ISA to read its cache")
        return CpuAttentionReader(isa, block_size, head_dim, dtype)
    if backend_name == "FLASH_ATTN":
        return FlashAttentionReader(head_dim)
    raise NotImplementedError(f"reading vLLM's {backend_name} KV cache layout is not implemented "
                              "(supported: CPU_ATTN, FLASH_ATTN)")


def block_slots(block_ids: list[int] | torch.Tensor, num_tokens: int, block_size: int) -> torch.Tensor:
    """Cache slot of each of the first `num_tokens` tokens."""
    ids = torch.as_tensor(block_ids, dtype=torch.long)
    i = torch.arange(num_tokens)
    return ids[i // block_size] * block_size + i % block_size
