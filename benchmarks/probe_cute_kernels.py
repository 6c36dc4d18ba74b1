"""Probe: CuTe-DSL kernels (FlashAttention-4's SM90 forward, quack's GEMM + SwiGLU epilogue) at the DiT's
shapes against what the DiT runs today (torch's cuDNN SDPA per group; cuBLAS GEMM + Triton SwiGLU).
One JSON line per case."""
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from bench_common import bench, capture_graph, emit, rel   # benchmarks/ is the script's folder

sys.path.insert(0, os.getcwd())
dev = torch.device("cuda")
bf = torch.bfloat16


def graph_ok(fn, out_fn):
    """Captures fn in a CUDA graph; replays it; says whether the replay reproduces an eager call's output.
    (The run recorded in results/probe_cute_h100_20261206.log compared against the graph's output buffer
    before any replay, an uninitialised buffer: its graph_replay_same fields mean nothing.)"""
    try:
        expected = fn().clone()
        g = capture_graph(fn)
        g.replay()
        torch.cuda.synchronize()
        return {"graph": True, "graph_replay_same": bool(torch.equal(expected, out_fn())), "graph_ms": round(bench(g.replay), 4)}
    except Exception as exc:  # noqa: BLE001
        return {"graph": False, "graph_error": repr(exc)[:300]}


t0 = time.time()
try:
    import cutlass  # noqa: F401
    emit(case="import_cutlass", ok=True, s=round(time.time() - t0, 1))
except Exception as exc:  # noqa: BLE001
    emit(case="import_cutlass", ok=False, error=repr(exc)[:800], tb=traceback.format_exc()[-1500:])

# ---------------- attention ----------------
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

try:
    from flash_attn.cute.interface import flash_attn_func, flash_attn_varlen_func
    emit(case="import_fa4", ok=True)
except Exception as exc:  # noqa: BLE001
    emit(case="import_fa4", ok=False, error=repr(exc)[:800], tb=traceback.format_exc()[-1500:])
    flash_attn_func = None

for name, (n, Lc, Lu) in {"1024": (4098, 256, 232), "512": (1026, 256, 232)}.items():
    Hq, Hkv, D = 16, 2, 128
    g = torch.Generator(device=dev).manual_seed(0)
    q = (torch.randn(2, n, Hq, D, device=dev, generator=g) * 1.5).to(bf)
    ks = [(torch.randn(1, L + n, Hkv, D, device=dev, generator=g) * 1.5).to(bf) for L in (Lc, Lu)]
    vs = [torch.randn(1, L + n, Hkv, D, device=dev, generator=g).to(bf) for L in (Lc, Lu)]
    ref = torch.cat([F.scaled_dot_product_attention(q[i:i + 1].float().transpose(1, 2), ks[i].float().transpose(1, 2),
                                                    vs[i].float().transpose(1, 2), enable_gqa=True).transpose(1, 2)
                     for i in range(2)])
    fl = sum(4 * Hq * n * (L + n) * D for L in (Lc, Lu))

    def cudnn_two():
        outs = []
        for i in range(2):
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                outs.append(F.scaled_dot_product_attention(q[i:i + 1].transpose(1, 2), ks[i].transpose(1, 2),
                                                           vs[i].transpose(1, 2), enable_gqa=True).transpose(1, 2))
        return torch.cat(outs)
    ms = bench(cudnn_two)
    emit(case="attn_cudnn_two_calls", shape=name, ms=round(ms, 4), tflops=round(fl / ms / 1e9, 1), rel_l2=rel(cudnn_two(), ref))
    if flash_attn_func is None:
        continue
    # one call: K/V padded to the longer context, per-row used length
    Lmax = max(Lc, Lu) + n
    kp = torch.zeros(2, Lmax, Hkv, D, device=dev, dtype=bf)
    vp = torch.zeros(2, Lmax, Hkv, D, device=dev, dtype=bf)
    for i in range(2):
        kp[i, :ks[i].shape[1]] = ks[i][0]
        vp[i, :vs[i].shape[1]] = vs[i][0]
    used = torch.tensor([Lc + n, Lu + n], device=dev, dtype=torch.int32)
    try:
        t1 = time.time()
        out_holder = {}

        def fa4_padded():
            r = flash_attn_varlen_func(q, kp, vp, seqused_k=used, max_seqlen_q=n, max_seqlen_k=Lmax)
            out_holder["o"] = r[0] if isinstance(r, tuple) else r
            return out_holder["o"]
        o = fa4_padded()
        torch.cuda.synchronize()
        first = time.time() - t1
        ms = bench(fa4_padded)
        emit(case="attn_fa4_seqused_k", shape=name, first_call_s=round(first, 1), ms=round(ms, 4),
             tflops=round(fl / ms / 1e9, 1), rel_l2=rel(o, ref), **graph_ok(fa4_padded, lambda: out_holder["o"]))
    except Exception as exc:  # noqa: BLE001
        emit(case="attn_fa4_seqused_k", shape=name, error=repr(exc)[:800], tb=traceback.format_exc()[-1500:])
    try:
        qv = q.reshape(2 * n, Hq, D)
        kv_k = torch.cat([ks[0][0], ks[1][0]])
        kv_v = torch.cat([vs[0][0], vs[1][0]])
        cq = torch.tensor([0, n, 2 * n], device=dev, dtype=torch.int32)
        ck = torch.tensor([0, Lc + n, Lc + Lu + 2 * n], device=dev, dtype=torch.int32)
        holder = {}

        def fa4_varlen():
            r = flash_attn_varlen_func(qv, kv_k, kv_v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=n, max_seqlen_k=Lmax)
            holder["o"] = r[0] if isinstance(r, tuple) else r
            return holder["o"]
        o = fa4_varlen().view(2, n, Hq, D)
        ms = bench(fa4_varlen)
        emit(case="attn_fa4_varlen", shape=name, ms=round(ms, 4), tflops=round(fl / ms / 1e9, 1), rel_l2=rel(o, ref),
             **graph_ok(fa4_varlen, lambda: holder["o"]))
    except Exception as exc:  # noqa: BLE001
        emit(case="attn_fa4_varlen", shape=name, error=repr(exc)[:800], tb=traceback.format_exc()[-1500:])
    try:
        k2 = torch.cat([ks[0], ks[0]])
        v2 = torch.cat([vs[0], vs[0]])
        ms_c = bench(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k2.transpose(1, 2), v2.transpose(1, 2), enable_gqa=True))
        ms_f = bench(lambda: flash_attn_func(q, k2, v2))
        fl2 = 2 * 4 * Hq * n * (Lc + n) * D
        emit(case="attn_equal_len_b2", shape=name, cudnn_ms=round(ms_c, 4), cudnn_tflops=round(fl2 / ms_c / 1e9, 1),
             fa4_ms=round(ms_f, 4), fa4_tflops=round(fl2 / ms_f / 1e9, 1))
    except Exception as exc:  # noqa: BLE001
        emit(case="attn_equal_len_b2", shape=name, error=repr(exc)[:500])

# ---------------- GEMM + SwiGLU ----------------
from stages.dit.kernels import silu_mul_triton  # noqa: E402

try:
    from quack.gemm_interface import gemm_act, gemm_add_inplace
    emit(case="import_quack", ok=True)
except Exception as exc:  # noqa: BLE001
    emit(case="import_quack", ok=False, error=repr(exc)[:800], tb=traceback.format_exc()[-1500:])
    gemm_act = None

K, I = 2048, 11008
g = torch.Generator(device=dev).manual_seed(1)
W = (torch.randn(2 * I, K, device=dev, generator=g) * 0.02).to(bf)          # [gate; up] rows, as the checkpoint
W_inter = W.view(2, I, K).transpose(0, 1).reshape(2 * I, K).contiguous()    # g0, u0, g1, u1, ...
Wd = (torch.randn(K, I, device=dev, generator=g) * 0.02).to(bf)
for M in (8196, 8192, 2052):
    x = torch.randn(M, K, device=dev, generator=g).to(bf)
    ref = (lambda gu: F.silu(gu[:, :I]) * gu[:, I:])((x.float() @ W.float().t()))
    fl = 2 * M * K * 2 * I

    def current():
        return silu_mul_triton(torch.mm(x, W.t()))
    ms = bench(current)
    ms_mm = bench(lambda: torch.mm(x, W.t()))
    emit(case="gemm_swiglu_cublas_triton", M=M, ms=round(ms, 4), mm_only_ms=round(ms_mm, 4), tflops_mm=round(fl / ms_mm / 1e9, 1),
         rel_l2=rel(current(), ref))
    if gemm_act is None:
        continue
    for tuned in ((False, True) if M == 8196 else (False,)):
        if tuned and time.time() - t0 > 330:
            emit(case='gemm_swiglu_quack', M=M, tuned=True, skipped='time'); continue
        try:
            holder = {}
            t1 = time.time()

            def q_act():
                _, post = gemm_act(x, W_inter.t(), activation="swiglu", store_preact=False, tuned=tuned)
                holder["o"] = post
                return post
            o = q_act()
            torch.cuda.synchronize()
            first = time.time() - t1
            ms = bench(q_act)
            emit(case="gemm_swiglu_quack", M=M, tuned=tuned, first_call_s=round(first, 1), ms=round(ms, 4),
                 tflops=round(fl / ms / 1e9, 1), rel_l2=rel(o, ref), **(graph_ok(q_act, lambda: holder["o"]) if not tuned else {}))
        except Exception as exc:  # noqa: BLE001
            emit(case="gemm_swiglu_quack", M=M, tuned=tuned, error=repr(exc)[:800], tb=traceback.format_exc()[-1500:])
    # down projection with the residual add (today: addmm in place)
    try:
        h = torch.randn(M, I, device=dev, generator=g).to(bf)
        r = torch.randn(M, K, device=dev, generator=g).to(bf)
        ms_c = bench(lambda: torch.addmm(r, h, Wd.t(), out=r))
        ms_q = bench(lambda: gemm_add_inplace(h, Wd.t(), r, tuned=False))
        emit(case="gemm_down_add", M=M, cublas_addmm_ms=round(ms_c, 4), quack_ms=round(ms_q, 4))
    except Exception as exc:  # noqa: BLE001
        emit(case="gemm_down_add", M=M, error=repr(exc)[:800], tb=traceback.format_exc()[-1000:])
print("done", round(time.time() - t0, 1), file=sys.stderr)
