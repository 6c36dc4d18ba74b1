"""Element-wise ops of the DiT forward, in plain torch and fused in Triton (same semantics).

The plain versions are the reference (they follow `stages.lance.transformer` op for op, in the input
dtype with fp32 statistics); the Triton versions do each op in one pass over memory, which is what
matters once the GEMMs and attention run near peak: unfused, these ops move ~250 KB per token and
layer, fused ~100 KB (see benchmarks/dit_notes.md).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # Triton is only needed (and only present) where the fast GPU path runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


# ---------------------------------------------------------------------------------------------
# Plain torch (reference semantics)
# ---------------------------------------------------------------------------------------------

def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2 RMSNorm over the last dim: statistics in fp32, weight applied in the input dtype."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def qk_norm_rope_torch(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                       cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int):
    """qkv [T, (Hq + 2 Hkv) d] -> q [T, Hq, d], k [T, Hkv, d] (per-head RMSNorm, then mRoPE), v [T, Hkv, d].

    cos/sin [T, d] in fp32; RoPE is applied in the input dtype as the model core does.
    """
    d = q_weight.shape[0]
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q = rms_norm_torch(q.unflatten(-1, (num_heads, d)), q_weight, eps)
    k = rms_norm_torch(k.unflatten(-1, (num_kv_heads, d)), k_weight, eps)
    c, s = cos.to(qkv.dtype).unsqueeze(1), sin.to(qkv.dtype).unsqueeze(1)

    def rope(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * c + torch.cat([-x2, x1], dim=-1) * s

    return rope(q), rope(k), v.unflatten(-1, (num_kv_heads, d))


def qk_norm_rope_into_torch(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                            cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                            k_buf: torch.Tensor, v_buf: torch.Tensor, kv_index: torch.Tensor) -> torch.Tensor:
    """`qk_norm_rope`, with token t's K and V written to row kv_index[t] of k_buf / v_buf ([S, Hkv, d]: the
    attention's packed [context; query] key/value rows) instead of returned. -> q [T, Hq, d]."""
    q, k, v = qk_norm_rope_torch(qkv, q_weight, k_weight, eps, cos, sin, num_heads, num_kv_heads)
    k_buf.index_copy_(0, kv_index, k)
    v_buf.index_copy_(0, kv_index, v)
    return q


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"   # Triton's CPU interpreter (the CPU tests)

# FP8 (E4M3) activations, one scale per token (row): q = x / s, s = max|x| / 448, so x ~ q * s.
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_MIN_SCALE = 1e-12 / FP8_MAX   # an all-zero row gets a tiny scale, not a division by zero


def quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (E4M3 [M, K], fp32 scales [M, 1])."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def rms_norm_fp8_torch(x, weight, eps):
    return quantize_rows_torch(rms_norm_torch(x, weight, eps))


def silu_mul_fp8_torch(gate_up):
    return quantize_rows_torch(silu_mul_torch(gate_up))


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _qk_norm_rope_kernel(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, kv_index_ptr,
                             stride_qkv, eps, HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr,
                             BLOCK_H: tl.constexpr, INDEXED: tl.constexpr):
        # One token per program: all q and k heads as rows of a [BLOCK_H, HALF] tile (two halves).
        # INDEXED: K (and V, copied as is) go to row kv_index[tok] of the attention's packed K/V buffers;
        # otherwise K goes to row tok and V stays a view of qkv.
        tok = tl.program_id(0).to(tl.int64)
        if INDEXED:
            kv_row = tl.load(kv_index_ptr + tok).to(tl.int64)
        else:
            kv_row = tok
        heads = tl.arange(0, BLOCK_H)[:, None]
        lanes = tl.arange(0, HALF)[None, :]
        valid = heads < HQ + HKV
        is_q = heads < HQ
        src = qkv_ptr + tok * stride_qkv + heads * (2 * HALF) + lanes
        x1 = tl.load(src, mask=valid, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=valid, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
        dt = q_ptr.dtype.element_ty
        w1 = tl.where(is_q, tl.load(qw_ptr + lanes), tl.load(kw_ptr + lanes)).to(tl.float32)
        w2 = tl.where(is_q, tl.load(qw_ptr + HALF + lanes), tl.load(kw_ptr + HALF + lanes)).to(tl.float32)
        n1 = ((x1 * rstd[:, None]).to(dt).to(tl.float32) * w1).to(dt).to(tl.float32)
        n2 = ((x2 * rstd[:, None]).to(dt).to(tl.float32) * w2).to(dt).to(tl.float32)
        c1 = tl.load(cos_ptr + tok * 2 * HALF + lanes)
        c2 = tl.load(cos_ptr + tok * 2 * HALF + HALF + lanes)
        s1 = tl.load(sin_ptr + tok * 2 * HALF + lanes)
        s2 = tl.load(sin_ptr + tok * 2 * HALF + HALF + lanes)
        o1 = (n1 * c1 - n2 * s1).to(dt)
        o2 = (n2 * c2 + n1 * s2).to(dt)
        q_dst = q_ptr + tok * HQ * 2 * HALF + heads * (2 * HALF) + lanes
        k_dst = k_ptr + kv_row * HKV * 2 * HALF + (heads - HQ) * (2 * HALF) + lanes
        tl.store(q_dst, o1, mask=is_q)
        tl.store(q_dst + HALF, o2, mask=is_q)
        k_mask = valid & (heads >= HQ)
        tl.store(k_dst, o1, mask=k_mask)
        tl.store(k_dst + HALF, o2, mask=k_mask)
        if INDEXED:
            v_heads = tl.arange(0, BLOCK_H)[:, None]
            v_mask = v_heads < HKV
            v_src = qkv_ptr + tok * stride_qkv + (HQ + HKV) * (2 * HALF) + v_heads * (2 * HALF) + lanes
            v_dst = v_ptr + kv_row * HKV * 2 * HALF + v_heads * (2 * HALF) + lanes
            tl.store(v_dst, tl.load(v_src, mask=v_mask), mask=v_mask)
            tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=v_mask), mask=v_mask)

    @triton.jit
    def grouped_tile_origin(tile, tiles_m, tiles_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            GROUP_M: tl.constexpr):
        """(first row, first column) of output tile number `tile`, in grouped order: GROUP_M row tiles
        share each weight tile while it is in L2."""
        group = tile // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        group_rows = min(tiles_m - first_m, GROUP_M)
        return (first_m + tile % group_rows) * BLOCK_M, ((tile % (GROUP_M * tiles_n)) // group_rows) * BLOCK_N

    @triton.jit
    def _gate_up_swiglu_kernel(x_desc, w_desc, out_desc, M, F, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                               WARP_SPECIALIZE: tl.constexpr, FLATTEN: tl.constexpr,
                               DOT_IN_FP32: tl.constexpr):
        # Output tiles of silu(x @ Wg^T) * (x @ Wu^T), [Wg; Wu] being the gate_up weight [2F, K]; the
        # [M, 2F] gate_up activation is never written. w_desc is a 3-d view [F, 2, K] of that weight
        # (strides K, F*K, 1): its [BLOCK_N, 2, BLOCK_K] box holds gate row j and up row j side by side, so
        # one dot of N = 2 * BLOCK_N (wgmma's widest) serves both halves, and each thread's accumulator
        # holds gate j and up j in neighbouring registers (benchmarks/probe_swiglu_gemm.py: two N = BLOCK_N
        # dots were 2-7 % slower). Columns past F are TMA's zero fill; the store clips them.
        dtype: tl.constexpr = out_desc.dtype
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(F, BLOCK_N)
        k_steps = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS, flatten=FLATTEN,
                             warp_specialize=WARP_SPECIALIZE):
            m0, n0 = grouped_tile_origin(tile, tiles_m, tiles_n, BLOCK_M, BLOCK_N, GROUP_M)
            acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
            for step in range(k_steps):
                k0 = step * BLOCK_K
                x = x_desc.load([m0, k0])
                w = tl.reshape(w_desc.load([n0, 0, k0]), (2 * BLOCK_N, BLOCK_K))
                if DOT_IN_FP32:   # the interpreter multiplies bf16 tiles as raw integers
                    x, w = x.to(tl.float32), w.to(tl.float32)
                acc = tl.dot(x, w.T, acc)
            gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
            # the unfused path's roundings: gate and up in the model dtype, silu rounded before the product
            gate = gate.to(dtype).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            out_desc.store([m0, n0], (act * up.to(dtype).to(tl.float32)).to(dtype))

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_out, n_cols, BLOCK: tl.constexpr):
        # int64 rows in every kernel here: a 121-frame 480p CFG forward has 98,584 rows, and row * 22016
        # (the gate_up stride) passes 2^31 from row 97,542 on
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _fp8_round(v):
        """v (fp32, |v| <= 448) rounded to the E4M3 grid in fp32 (half away from zero), so the cast that
        follows is exact. Written out because Triton's interpreter rounds fp32 -> fp8 casts wrongly."""
        a = tl.minimum(tl.abs(v), 448.0)
        step = tl.exp2(tl.floor(tl.log2(tl.maximum(a, 0.015625))) - 3.0)   # 3 mantissa bits; subnormal step 2^-9
        r = tl.floor(a / step + 0.5) * step
        return tl.where(v < 0, -r, r)

    @triton.jit
    def _store_fp8_row(y, mask, q_row_ptr, scale_ptr, row, ROUND_IN_FP32: tl.constexpr):
        """One row of fp32 values (already rounded as the model dtype would) -> E4M3 + its scale."""
        scale = tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0) / 448.0, 1e-12 / 448.0)
        q = y / scale
        if ROUND_IN_FP32:   # the interpreter; a GPU's cast rounds to nearest even and saturates by itself
            q = _fp8_round(q)
        tl.store(q_row_ptr, q.to(tl.float8e4nv), mask=mask)
        tl.store(scale_ptr + row, scale)

    @triton.jit
    def _rms_norm_fp8_kernel(x_ptr, w_ptr, q_ptr, scale_ptr, stride_x, n_cols, eps, BLOCK: tl.constexpr,
                             ROUND_IN_FP32: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        dt = x_ptr.dtype.element_ty
        normed = (x * rstd).to(dt).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (normed * w).to(dt).to(tl.float32)
        _store_fp8_row(y, mask, q_ptr + row * n_cols + cols, scale_ptr, row, ROUND_IN_FP32)

    @triton.jit
    def _silu_mul_fp8_kernel(gu_ptr, q_ptr, scale_ptr, stride_gu, n_cols, BLOCK: tl.constexpr,
                             ROUND_IN_FP32: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        dt = gu_ptr.dtype.element_ty
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        y = (act * u).to(dt).to(tl.float32)
        _store_fp8_row(y, mask, q_ptr + row * n_cols + cols, scale_ptr, row, ROUND_IN_FP32)

    if not _INTERPRETED:   # a whole 11008-wide row per program: let the first call pick the warps
        _silu_mul_fp8_kernel = triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (4, 8, 16, 32)],
                                               key=["n_cols"])(_silu_mul_fp8_kernel)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, stride_x, n_cols, BLOCK: tl.constexpr,
                              ROUND_IN_FP32: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        y = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        _store_fp8_row(y, mask, q_ptr + row * n_cols + cols, scale_ptr, row, ROUND_IN_FP32)


def rms_norm_fp8_triton(x: torch.Tensor, weight: torch.Tensor, eps: float):
    assert x.dim() == 2 and x.stride(1) == 1
    rows, n = x.shape
    q = torch.empty(rows, n, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        _rms_norm_fp8_kernel[(rows,)](x, weight, q, scale, x.stride(0), n, eps, BLOCK=triton.next_power_of_2(n),
                                      ROUND_IN_FP32=_INTERPRETED, num_warps=8)
    return q, scale


def silu_mul_fp8_triton(gate_up: torch.Tensor):
    assert gate_up.dim() == 2 and gate_up.stride(1) == 1
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    q = torch.empty(rows, n, dtype=FP8_DTYPE, device=gate_up.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=gate_up.device)
    if rows:
        block = triton.next_power_of_2(n)
        _silu_mul_fp8_kernel[(rows,)](gate_up, q, scale, gate_up.stride(0), n, BLOCK=block,
                                      ROUND_IN_FP32=_INTERPRETED)
    return q, scale


def quantize_rows_triton(x: torch.Tensor):
    assert x.dim() == 2 and x.stride(1) == 1
    rows, n = x.shape
    q = torch.empty(rows, n, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(n)
        _quantize_rows_kernel[(rows,)](x, q, scale, x.stride(0), n, BLOCK=block, ROUND_IN_FP32=_INTERPRETED,
                                       num_warps=max(4, min(16, block // 1024)))
    return q, scale


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    assert x.dim() == 2 and x.stride(1) == 1
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0]:
        _rms_norm_kernel[(x.shape[0],)](x, weight, out, x.stride(0), out.stride(0), x.shape[1], eps,
                                        BLOCK=triton.next_power_of_2(x.shape[1]), num_warps=8)
    return out


def _half_head_is_power_of_two(d: int) -> bool:   # tl.arange needs a power-of-two half head
    return d % 2 == 0 and not (d // 2) & (d // 2 - 1)


def _launch_qk_norm_rope(qkv, q_weight, k_weight, eps, cos, sin, num_heads, num_kv_heads, q, k, v, kv_index):
    assert qkv.dim() == 2 and qkv.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    indexed = kv_index is not None
    if qkv.shape[0]:
        _qk_norm_rope_kernel[(qkv.shape[0],)](qkv, q_weight, k_weight, cos, sin, q, k, v if indexed else k,
                                              kv_index if indexed else qkv, qkv.stride(0), eps,
                                              HQ=num_heads, HKV=num_kv_heads, HALF=q_weight.shape[0] // 2,
                                              BLOCK_H=triton.next_power_of_2(num_heads + num_kv_heads),
                                              INDEXED=indexed, num_warps=4)


def qk_norm_rope_triton(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                        cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int):
    tokens, d = qkv.shape[0], q_weight.shape[0]
    if not _half_head_is_power_of_two(d):
        return qk_norm_rope_torch(qkv, q_weight, k_weight, eps, cos, sin, num_heads, num_kv_heads)
    q = qkv.new_empty(tokens, num_heads, d)
    k = qkv.new_empty(tokens, num_kv_heads, d)
    _launch_qk_norm_rope(qkv, q_weight, k_weight, eps, cos, sin, num_heads, num_kv_heads, q, k, None, None)
    v = qkv[:, (num_heads + num_kv_heads) * d:].unflatten(-1, (num_kv_heads, d))
    return q, k, v


def qk_norm_rope_into_triton(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                             cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                             k_buf: torch.Tensor, v_buf: torch.Tensor, kv_index: torch.Tensor) -> torch.Tensor:
    d = q_weight.shape[0]
    if not _half_head_is_power_of_two(d):
        return qk_norm_rope_into_torch(qkv, q_weight, k_weight, eps, cos, sin, num_heads, num_kv_heads,
                                       k_buf, v_buf, kv_index)
    assert k_buf.is_contiguous() and v_buf.is_contiguous() and kv_index.is_contiguous()
    q = qkv.new_empty(qkv.shape[0], num_heads, d)
    _launch_qk_norm_rope(qkv, q_weight, k_weight, eps, cos, sin, num_heads, num_kv_heads, q, k_buf, v_buf, kv_index)
    return q


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    assert gate_up.dim() == 2 and gate_up.stride(1) == 1
    tokens, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(tokens, n)
    block = 1024
    if tokens:
        _silu_mul_kernel[(tokens, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n,
                                                          BLOCK=block, num_warps=4)
    return out


# The fused gate_up + SwiGLU GEMM's launch: block_n output columns per tile (2 * block_n of gate_up);
# persistent: one program per SM walking the tiles, else one program per tile. The fastest of the configs
# benchmarks/probe_swiglu_gemm.py tried on an H100 (3 runs; flattened loops, 64-wide or 256-row tiles,
# BLOCK_K 32/128 and 4 stages were slower, some by 2x).
GATE_UP_SWIGLU_CONFIG = dict(block_m=128, block_n=128, block_k=64, group_m=8, warps=8, stages=3, persistent=True,
                             warp_specialize=True, flatten=False)


def gate_up_swiglu_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """TMA descriptors: a Hopper-or-newer GPU (or Triton's interpreter) and 16-byte aligned rows; 16-bit
    weights (a GPU's fp32 tl.dot would be tf32; the interpreter's is exact, so it takes fp32 too)."""
    if triton is None or TensorDescriptor is None or weight.dtype != x.dtype:
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) and not (_INTERPRETED and x.dtype == torch.float32):
        return False
    if (x.shape[-1] * x.element_size()) % 16 or (weight.shape[0] // 2 * x.element_size()) % 16:
        return False
    if _INTERPRETED:
        return True
    return x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9


def gate_up_swiglu_triton(x: torch.Tensor, weight: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """silu(x @ Wg^T) * (x @ Wu^T) for the gate_up weight [2F, K] = [Wg; Wu], without writing x @ W^T."""
    assert x.dim() == 2 and x.is_contiguous() and weight.is_contiguous()
    rows, k = x.shape
    f = weight.shape[0] // 2
    out = x.new_empty(rows, f)
    if not rows:
        return out
    c = {**GATE_UP_SWIGLU_CONFIG, **(config or {})}
    bm, bn, bk = c["block_m"], c["block_n"], c["block_k"]
    tiles = triton.cdiv(rows, bm) * triton.cdiv(f, bn)
    if c["persistent"]:
        sms = 4 if _INTERPRETED else torch.cuda.get_device_properties(x.device).multi_processor_count
        programs = min(sms, tiles)
    else:
        programs = tiles
    paired_rows = TensorDescriptor(weight, [f, 2, k], [k, f * k, 1], [bn, 2, bk])   # [j, gate|up, :]
    _gate_up_swiglu_kernel[(programs,)](
        TensorDescriptor.from_tensor(x, [bm, bk]), paired_rows,
        TensorDescriptor.from_tensor(out, [bm, bn]), rows, f, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=c["group_m"], NUM_PROGRAMS=programs, WARP_SPECIALIZE=c["warp_specialize"], FLATTEN=c["flatten"],
        DOT_IN_FP32=_INTERPRETED, num_warps=c["warps"], num_stages=c["stages"])
    return out


class ElementwiseOps:
    """The fused element-wise ops of a layer (and their FP8-output variants), in torch or Triton."""

    def __init__(self, impl: str = "torch"):
        if impl == "triton" and triton is None:
            raise RuntimeError("kernels='triton' needs the triton package")
        if impl not in ("torch", "triton"):
            raise ValueError(f"unknown element-wise implementation {impl!r} (torch | triton)")
        self.impl = impl
        fused = impl == "triton"
        self.rms_norm = rms_norm_triton if fused else rms_norm_torch
        self.qk_norm_rope = qk_norm_rope_triton if fused else qk_norm_rope_torch
        self.qk_norm_rope_into = qk_norm_rope_into_triton if fused else qk_norm_rope_into_torch
        self.silu_mul = silu_mul_triton if fused else silu_mul_torch
        self.rms_norm_fp8 = rms_norm_fp8_triton if fused else rms_norm_fp8_torch
        self.silu_mul_fp8 = silu_mul_fp8_triton if fused else silu_mul_fp8_torch
        self.quantize_rows = quantize_rows_triton if fused else quantize_rows_torch
