"""Probe: what the gen chain's marker rows cost. The fast forward runs the gen expert on every packed token,
the 2 markers of each CFG row included (8196 rows at 1024^2 b1 instead of 8192, 2052 at 512^2 instead of
2048), and its attention call has n + 2 queries a row: a few rows past a multiple of the kernels'
128-row tiles. This times, at the Lance_3B layer's shapes, each GEMM of a layer (bf16 cuBLAS as the fast
path calls it, the fused gate_up + SwiGLU kernel, FP8 `_scaled_mm`) with and without those rows, and
FlashAttention-4's variable-length attention with n + 2 queries a row against n queries a row plus a
second call for the markers alone. CUDA-graph timed (as the engine runs); one JSON line per case.
Run from the repository root: `python3 benchmarks/probe_marker_rows.py [--padding]`.

Answer (H100, results/probe_marker_rows_h100_20261206.log; benchmarks/README.md, fourth pass): without the
markers, bf16 cuBLAS is no faster (2-3 % slower), attention plus a marker call is slower; only FP8 gains,
and only at exactly 2048 rows (see PADDED)."""
import os
import sys

import torch
import torch.nn.functional as F

from bench_common import bench, capture_graph, emit   # benchmarks/ is the script's folder

sys.path.insert(0, os.getcwd())
from stages.dit import kernels as K   # noqa: E402
from stages.dit.quantize import quantize_weight   # noqa: E402

dev, bf = torch.device("cuda"), torch.bfloat16
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM = 2048, 11008, 16, 2, 128
QKV = (HEADS + 2 * KV_HEADS) * HEAD_DIM
CALLS_PER_GRAPH = 20
# (label, image tokens per CFG row, rows): the DiT's 1024^2 and 512^2 CFG forwards at batch 1, 2 and 4
CASES = [("512^2 b1", 1024, 2), ("512^2 b2", 1024, 4), ("512^2 b4", 1024, 8),
         ("1024^2 b1", 4096, 2), ("1024^2 b2", 4096, 4)]
CONTEXTS = (256, 232)   # cond / uncond context lengths of a t2i request


def graph_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return bench(capture_graph(fn, CALLS_PER_GRAPH).replay, reps=10, warm=2) / CALLS_PER_GRAPH


def layer_weights() -> tuple[dict, dict]:
    """One Lance_3B layer's projections (random, bf16) and their FP8 copies (per-output-channel scales)."""
    weights = {"qkv": torch.randn(QKV, HIDDEN, device=dev, dtype=bf) * 0.02,
               "qkv_b": torch.randn(QKV, device=dev, dtype=bf) * 0.02,
               "o": torch.randn(HIDDEN, HEADS * HEAD_DIM, device=dev, dtype=bf) * 0.02,
               "gate_up": torch.randn(2 * FFN, HIDDEN, device=dev, dtype=bf) * 0.02,
               "down": torch.randn(HIDDEN, FFN, device=dev, dtype=bf) * 0.02}
    return weights, {name: quantize_weight(weights[name]) for name in ("qkv", "o", "gate_up", "down")}


def gemm_cases(m: int, weights: dict, fp8: dict) -> dict:
    x = torch.randn(m, HIDDEN, device=dev, dtype=bf)
    act = torch.randn(m, FFN, device=dev, dtype=bf)
    res = torch.randn(m, HIDDEN, device=dev, dtype=bf)
    o_in = torch.randn(m, HEADS * HEAD_DIM, device=dev, dtype=bf)
    q8, s8 = x.to(K.FP8_DTYPE), torch.rand(m, 1, device=dev) + 0.5
    a8 = act.to(K.FP8_DTYPE)
    out = {
        "qkv": graph_ms(lambda: F.linear(x, weights["qkv"], weights["qkv_b"])),
        "o_addmm": graph_ms(lambda: res.addmm_(o_in, weights["o"].t())),
        "gate_up": graph_ms(lambda: F.linear(x, weights["gate_up"])),
        "down_addmm": graph_ms(lambda: res.addmm_(act, weights["down"].t())),
    }
    if K.gate_up_swiglu_supported(x, weights["gate_up"]):
        out["gate_up_swiglu_fused"] = graph_ms(lambda: K.gate_up_swiglu_triton(x, weights["gate_up"]))

    def mm8(a, name):
        w, ws = fp8[name]
        return torch._scaled_mm(a, w.t(), scale_a=s8, scale_b=ws.view(1, -1), out_dtype=bf, use_fast_accum=True)

    out["fp8_qkv"] = graph_ms(lambda: mm8(q8, "qkv"))
    out["fp8_o"] = graph_ms(lambda: mm8(q8, "o"))
    out["fp8_gate_up"] = graph_ms(lambda: mm8(q8, "gate_up"))
    out["fp8_down"] = graph_ms(lambda: mm8(a8, "down"))
    return out


def attention_cases(n: int, rows: int) -> dict | None:
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except ImportError:
        return None
    ctx = [CONTEXTS[r % 2] for r in range(rows)]
    kv_lens = [c + n + 2 for c in ctx]
    cu_k = torch.tensor([0, *torch.tensor(kv_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    k = torch.randn(int(cu_k[-1]), KV_HEADS, HEAD_DIM, device=dev, dtype=bf)
    v = torch.randn_like(k)

    def call(q_per_row):
        cu_q = torch.arange(0, (rows + 1) * q_per_row, q_per_row, dtype=torch.int32, device=dev)
        q = torch.randn(rows * q_per_row, HEADS, HEAD_DIM, device=dev, dtype=bf)
        return lambda: flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=q_per_row,
                                              max_seqlen_k=max(kv_lens))

    with_markers, latents_only, markers_only = call(n + 2), call(n), call(2)
    out = {"attn_queries_n_plus_2": graph_ms(with_markers), "attn_queries_n": graph_ms(latents_only),
           "attn_markers_only": graph_ms(markers_only)}

    def both():
        latents_only()
        markers_only()

    out["attn_n_then_markers"] = graph_ms(both)
    return out


# Second question (`--padding`): is it the marker rows, or the row count's alignment? cuBLAS's FP8 kernels
# ran 23 % slower a layer at 2052 rows than at 2048 (run 1); time the packed counts rounded up to multiples
# of 16 / 128. Answer (H100, results/probe_marker_rows_h100_20261206_padding.log): no faster at 2064 or 2176
# than at 2052, nor at 8208 / 8320 than at 8196 - only 2048 itself is, so zero-row padding was dropped.
PADDED = [(2052, (2064, 2176)), (4104, (4112, 4224)), (8196, (8208, 8320)), (16392, (16400, 16512))]


def main():
    if "--padding" in sys.argv:
        return padding_main()
    torch.manual_seed(0)
    weights, fp8 = layer_weights()
    emit(device=torch.cuda.get_device_name(), torch=torch.__version__)
    for label, n, rows in CASES:
        for with_markers in (True, False):
            m = rows * (n + 2) if with_markers else rows * n
            times = gemm_cases(m, weights, fp8)
            emit(case=label, rows=m, markers_in_gen_chain=with_markers, per_layer_ms=times)
        attn = attention_cases(n, rows)
        if attn is not None:
            emit(case=label, attention_ms=attn)


def padding_main():
    torch.manual_seed(0)
    weights, fp8 = layer_weights()
    emit(device=torch.cuda.get_device_name(), torch=torch.__version__, question="padding")
    for rows, padded in PADDED:
        for m in (rows, *padded):
            times = gemm_cases(m, weights, fp8)
            emit(rows=m, packed_rows=rows, per_layer_ms=times,
                 fp8_layer_ms=sum(v for k, v in times.items() if k.startswith("fp8_")),
                 bf16_layer_ms=times["qkv"] + times["o_addmm"] + times["down_addmm"] + times["gate_up"])


if __name__ == "__main__":
    main()
