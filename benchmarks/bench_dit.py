"""DiT stage benchmark on one GPU: Lance_3B-shaped random weights (bf16), the real Wan2.2 VAE shape.

    PYTHONUNBUFFERED=1 python benchmarks/bench_dit.py --out $OUT [--quick] [--fp32-1024]
    # old vs new on one machine: the same script against the old checkout, then the new one
    python benchmarks/bench_dit.py --out $OUT/old --code-root OLD --label old --skip accuracy,vae,micro,serving
    python benchmarks/bench_dit.py --out $OUT/new --compare $OUT/old/bench_dit.json

Reports, for 512² (25 steps) and 1024² (30 steps): seconds per image (denoise, VAE decode), images/s at
batch 1 and at the best batch, MFU of the denoising forwards, peak memory - for the fast path and the
plain reference path (the model core's forward) in the same run, and the opt-in FP8 path (where the
code under test has it) - plus the error of bf16 and FP8 final latents against fp32 on the same weights
(rel-L2, and PSNR of the decoded images), and the DiT stage's serving loop (`DiTServingLoop`: engine
thread, VAE decode, encoding pool) under 16 concurrent requests. Writes bench_dit.json and bench_dit.log
under --out and prints a short table last.

FLOPs (model FLOPs, executed useful work): one forward of a row = N query tokens (latents + 2 markers)
against L cached context tokens:
    per layer  2*N*(hidden*(q_dim + 2*kv_dim) + q_dim*hidden + 3*hidden*ffn)  +  4*N*(L+N)*q_dim
    x layers, + vae2llm/llm2vae 2*2*n*48*hidden + time embedder 2*(256*hidden + hidden^2) per row.
MFU = FLOPs of every forward of the loop / loop wall time / peak (989 TFLOP/s dense bf16, H100 SXM;
also given against the measured 8192^3 bf16 matmul rate).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

def _code_root() -> str:
    """`--code-root DIR` runs this script against another checkout's stages/ (the old rows of a comparison)."""
    if "--code-root" in sys.argv:
        return str(Path(sys.argv[sys.argv.index("--code-root") + 1]).resolve())
    return str(Path(__file__).resolve().parents[1])


sys.path.insert(0, _code_root())

from bench_common import capture_graph                          # noqa: E402  (benchmarks/: the script's folder)

from stages.dit.engine import DenoiseEngine                      # noqa: E402
from stages.dit.forward import BranchContext, FastForward, ReferenceForward, Row   # noqa: E402
from stages.dit.model import build_dit_model, random_init_       # noqa: E402
from stages.lance.config import LanceConfig, LanceLLMConfig      # noqa: E402
from stages.lance.handoff import BranchKV, ContextHandoff        # noqa: E402
from stages.lance.requests import DenoiseParams                  # noqa: E402
from stages.lance.scheduler import FlowMatchEulerScheduler       # noqa: E402

PEAK_BF16 = 989e12
LANCE_3B = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, head_dim=128,
                intermediate_size=11008, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
                mrope_section=(16, 24, 24), max_position_embeddings=128000)
COND_CONTEXT, UNCOND_CONTEXT = 256, 232     # t2i: system prompt + caption (24 tokens) + template
SIZES = {512: 25, 1024: 30}
log = logging.getLogger("bench_dit")
RESULTS: dict = {}


# --- helpers ---------------------------------------------------------------------------------------

def cuda_time(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn() over reps, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def section(name):
    def wrap(fn):
        def run(*a, **kw):
            log.info("=== %s", name)
            t0 = time.perf_counter()
            try:
                out = fn(*a, **kw)
                log.info("=== %s done in %.1fs", name, time.perf_counter() - t0)
                return out
            except Exception as e:   # one failing section must not lose the others' numbers
                log.error("%s failed: %s\n%s", name, e, traceback.format_exc())
                RESULTS.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
                return None
            finally:
                gc.collect()
                torch.cuda.empty_cache()
                if "out" in RESULTS:   # partial results survive a run cut short
                    Path(RESULTS["out"], "bench_dit.partial.json").write_text(json.dumps(RESULTS, indent=1, default=str))
        return run
    return wrap


def lance_3b() -> LanceConfig:
    return LanceConfig(llm=LanceLLMConfig(**LANCE_3B))


def grid_positions(anchor: int, h: int, w: int) -> torch.Tensor:
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    body = torch.stack([torch.full((h * w,), anchor + 1), anchor + 1 + hh.reshape(-1), anchor + 1 + ww.reshape(-1)])
    return torch.cat([torch.full((3, 1), anchor), body, torch.full((3, 1), anchor + 2 + max(h, w) - 1)], dim=1)


def make_handoff(cfg: LanceConfig, side: int, steps: int, seed: int, dtype, request_id="r") -> ContextHandoff:
    llm = cfg.llm
    h = w = side // 16
    g = torch.Generator(device="cuda").manual_seed(1000 + seed)

    def branch(length):
        shape = (llm.num_hidden_layers, length, llm.num_key_value_heads, llm.head_dim)
        kv = tuple(torch.randn(shape, generator=g, device="cuda").to(dtype) for _ in range(2))
        return BranchKV(kv, length, grid_positions(length, h, w))

    return ContextHandoff(request_id, "t2i", (1, h, w), DenoiseParams(num_inference_steps=steps, seed=seed),
                          branch(COND_CONTEXT), branch(UNCOND_CONTEXT))


def row_flops(cfg: LanceConfig, n: int, context: int) -> float:
    llm = cfg.llm
    hid, q, kv, ffn = llm.hidden_size, llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim, \
        llm.intermediate_size
    tokens = n + 2
    per_layer = 2 * tokens * (hid * (q + 2 * kv) + q * hid + 3 * hid * ffn) + 4 * tokens * (context + tokens) * q
    return llm.num_hidden_layers * per_layer + 2 * 2 * n * 48 * hid + 2 * (256 * hid + hid * hid)


def loop_flops(cfg: LanceConfig, handoff: ContextHandoff) -> float:
    sched = FlowMatchEulerScheduler(handoff.params)
    n = handoff.num_target_tokens
    total = 0.0
    for i in range(sched.num_steps):
        total += row_flops(cfg, n, handoff.cond.context_len)
        if sched.uses_cfg(i):
            total += row_flops(cfg, n, handoff.uncond.context_len)
    return total


def jobs_for(engine, handoffs):
    return [engine.prepare(h, h.cond.kv, h.uncond.kv) for h in handoffs]


def has(module: str) -> bool:
    """Does the code under test have this module (new features are skipped on an old checkout)?"""
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:   # a dotted name whose parent package is absent (flash_attn.cute without flash_attn)
        return False


# the attention kernel the fast path uses: "flash_attn_4" when the attention section finds FlashAttention-4
# installed and faster than SDPA's best at the model's shape, else "sdpa" (with the chosen SDPA backend)
ATTENTION_KERNEL = "sdpa"
# the MLP's gate_up GEMM: with SwiGLU in its epilogue (Triton), as the serving fast path runs it
GATE_UP_KERNEL = "triton_swiglu"


def fast_forward_options(attn, **kw) -> dict:
    """FastForward keyword arguments the code under test accepts."""
    import inspect
    accepted = inspect.signature(FastForward.__init__).parameters
    opts = dict(kernels="triton", attention_backends=attn, attention_kernel=ATTENTION_KERNEL,
                gate_up_kernel=GATE_UP_KERNEL)
    opts.update(kw)
    return {k: v for k, v in opts.items() if k in accepted}


def fp8_model(cfg, m16):
    """A copy of the bf16 model with its layer weights quantized to FP8 (the serving path's quantization)."""
    from stages.dit.quantize import quantize_dit_model
    m8 = build_dit_model(cfg, "cuda", torch.bfloat16)
    copy_weights(m8, m16)
    quantize_dit_model(m8, "fp8")
    return m8


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of two uint8 images."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


# --- sections -------------------------------------------------------------------------------------

@section("device and ceilings")
def ceilings():
    p = torch.cuda.get_device_properties(0)
    info = {"gpu": p.name, "sms": p.multi_processor_count, "memory_gib": p.total_memory / 2**30,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, reps=20, warmup=5)
    info["matmul_8192_bf16_tflops"] = 2 * 8192**3 / t / 1e12
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), reps=10)
    info["copy_tb_per_s"] = 2 * x.numel() / t / 1e12
    RESULTS["device"] = info
    log.info("%s", info)


@section("GPU self-check: fast forward (Triton, attention backends, CUDA graphs) vs the model core")
def self_check():
    from torch.nn.attention import SDPBackend
    cfg = LanceConfig(llm=LanceLLMConfig(**dict(LANCE_3B, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                                 head_dim=64, mrope_section=(8, 12, 12), intermediate_size=512)))
    out = {}
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        model = random_init_(build_dit_model(cfg, "cuda", dtype), seed=1)

        def rows_for(seed):
            g = torch.Generator(device="cuda").manual_seed(seed)
            rows = []
            for length, (h, w) in [(17, (3, 5)), (40, (4, 4)), (17, (3, 5)), (0, (2, 2))]:
                kv = [torch.randn(2, length, 2, 64, generator=g, device="cuda").to(dtype) for _ in range(2)]
                b = BranchContext(kv[0], kv[1], grid_positions(length + 3, h, w).cuda(), (1, h, w))
                rows.append(Row(b, torch.randn(h * w, 48, generator=g, device="cuda").to(dtype),
                                torch.rand((), generator=g, device="cuda"), request=object()))
            return rows
        variants = {"torch": FastForward(model, "torch"), "triton": FastForward(model, "triton"),
                    "triton+flash": FastForward(model, "triton", [SDPBackend.FLASH_ATTENTION]),
                    "triton+cudnn": FastForward(model, "triton", [SDPBackend.CUDNN_ATTENTION]),
                    "triton+graphs": FastForward(model, "triton", cuda_graphs=True)}
        if "overlap_markers" in fast_forward_options(None, overlap_markers=False):
            variants["triton+graphs, markers inline"] = FastForward(model, "triton", cuda_graphs=True,
                                                                    overlap_markers=False)
        fa4 = dtype == torch.bfloat16 and has("flash_attn.cute") and "attention_kernel" in fast_forward_options(None)
        if fa4:
            variants["triton+flash_attn_4+graphs"] = FastForward(model, "triton", cuda_graphs=True,
                                                                 attention_kernel="flash_attn_4")
        if dtype == torch.bfloat16 and "gate_up_kernel" in fast_forward_options(None):
            fused = FastForward(model, "triton", cuda_graphs=True, gate_up_kernel="triton_swiglu")
            fused.linears.fused_min_rows = 1   # these rows are few: run the fused kernel on them anyway
            variants["triton+gate_up swiglu epilogue+graphs"] = fused
        if has("stages.dit.quantize") and dtype == torch.bfloat16:   # FP8 against the bf16 model core
            from stages.dit.quantize import quantize_dit_model
            m8 = build_dit_model(cfg, "cuda", dtype)
            copy_weights(m8, model)
            quantize_dit_model(m8, "fp8")
            emulated = FastForward(m8, "torch")
            emulated.linears.native = False        # fp32 dequantized matmuls, torch quantizers
            variants.update({"fp8 triton+scaled_mm+graphs": FastForward(m8, "triton", cuda_graphs=True),
                             "fp8 emulated (fp32)": emulated})
            if fa4:
                variants["fp8 triton+scaled_mm+flash_attn_4+graphs"] = FastForward(
                    m8, "triton", cuda_graphs=True, attention_kernel="flash_attn_4")
        ref = ReferenceForward(model)
        for name, fwd in variants.items():
            worst = 0.0
            try:
                for seed in range(4):   # new requests of the same shapes: graphs replay with reloaded contexts
                    rows = rows_for(seed)
                    for a, b in zip(fwd(rows), ref(rows)):
                        worst = max(worst, ((a - b).norm() / b.norm()).item())
                out[f"{dtype}/{name}"] = worst
                limit = 0.15 if name.startswith("fp8") else tol   # FP8: quantization error, reported not hidden
                kernel = getattr(fwd, "attention_kernel", "")   # what ran: an optional kernel may have fallen back
                out[f"{dtype}/{name}/attention_kernel"] = kernel
                log.info("self-check %s %-30s max rel err %.2e %s %s", dtype, name, worst, "ok" if worst < limit else "FAIL",
                         kernel)
            except RuntimeError as e:
                if "float32" in str(dtype) and name in ("triton+flash", "triton+cudnn"):
                    continue   # those kernels take 16-bit inputs only
                out[f"{dtype}/{name}"] = f"error: {e}"[:200]
                log.error("self-check %s %s: %s", dtype, name, e)
    RESULTS["self_check"] = out


@section("GEMM shapes of one 1024^2 CFG forward (M = 8196)")
def gemms(cfg):
    llm = cfg.llm
    m, hid, ffn = 8196, llm.hidden_size, llm.intermediate_size
    q, kv = llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
    out = {}
    for name, (k, n) in {"qkv": (hid, q + 2 * kv), "o_proj": (q, hid), "gate_up": (hid, 2 * ffn),
                         "down": (ffn, hid)}.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        t = cuda_time(lambda: torch.nn.functional.linear(x, w), reps=20)
        out[name] = 2 * m * k * n / t / 1e12
        if has("stages.dit.quantize"):   # FP8 row-wise scaled, as the FP8 path runs it; fast accumulation too
            from stages.dit.kernels import quantize_rows_torch
            from stages.dit.quantize import quantize_weight
            xq, xs = quantize_rows_torch(x)
            wq, ws = quantize_weight(w)
            ref = torch.nn.functional.linear(x.float(), w.float())
            for fast in (False, True):
                def mm():
                    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16,
                                            use_fast_accum=fast)
                t = cuda_time(mm, reps=20)
                key = f"{name}_fp8" + ("_fast_accum" if fast else "")
                out[key] = 2 * m * k * n / t / 1e12
                out[key + "_rel_err"] = ((mm().float() - ref).norm() / ref.norm()).item()
    RESULTS["gemm_tflops"] = out
    log.info("GEMM TFLOP/s: %s", out)


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of `fn` replayed from a CUDA graph, as the engine runs it (no host overhead: a
    Python-heavy kernel wrapper would otherwise be timed by its launch cost)."""
    fn()
    return cuda_time(capture_graph(fn).replay, reps=reps)


@section("attention backends at the 1024^2 shape (2 rows, 4098 queries, 4354 keys)")
def attention_backends():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(2, 4098, 16, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(2, 4354, 2, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn_like(k)
    flops = 4 * 2 * 4098 * 4354 * 16 * 128
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(8, 1),
                                                           v.float().repeat_interleave(8, 1))
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        for expand in (False, True):
            kk, vv = (k.repeat_interleave(8, 1), v.repeat_interleave(8, 1)) if expand else (k, v)

            def call():
                with sdpa_kernel([backend]):
                    return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, enable_gqa=not expand)
            key = f"{name}{'_expanded_kv' if expand else '_gqa'}"
            try:
                o = call()
                err = ((o.float() - ref).norm() / ref.norm()).item()
                t = cuda_time(call, reps=10)
                out[key] = {"ms": t * 1e3, "tflops": flops / t / 1e12, "rel_err": err}
            except RuntimeError as e:
                out[key] = {"error": str(e).splitlines()[0][:160]}
    ok = {k_: v_["tflops"] for k_, v_ in out.items() if "tflops" in v_ and v_["rel_err"] < 2e-2 and k_.endswith("_gqa")}
    best = max(ok, key=ok.get) if ok else None
    backends = {"flash_gqa": [SDPBackend.FLASH_ATTENTION], "cudnn_gqa": [SDPBackend.CUDNN_ATTENTION],
                "efficient_gqa": [SDPBackend.EFFICIENT_ATTENTION]}.get(best)
    # the model's own case: CFG's cond and uncond rows have contexts of different lengths (256 / 232), so
    # SDPA needs one call per row where a variable-length kernel takes both rows in one call; timed from
    # CUDA graphs, as the engine runs them
    rows_q = torch.randn(2 * 4098, 16, 128, device="cuda", dtype=torch.bfloat16)
    lens = (COND_CONTEXT + 4098, UNCOND_CONTEXT + 4098)
    rows_k = torch.randn(sum(lens), 2, 128, device="cuda", dtype=torch.bfloat16)
    rows_v = torch.randn_like(rows_k)
    flops2 = sum(4 * 4098 * n * 16 * 128 for n in lens)
    bounds = [(0, lens[0]), (lens[0], sum(lens))]

    def per_row_sdpa():
        outs = []
        for r, (a, b) in enumerate(bounds):
            qr = rows_q[r * 4098:(r + 1) * 4098].unsqueeze(0).transpose(1, 2)
            kr, vr = (t[a:b].unsqueeze(0).transpose(1, 2) for t in (rows_k, rows_v))
            with sdpa_kernel(backends or [SDPBackend.MATH]):
                outs.append(torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, enable_gqa=True)
                            .transpose(1, 2)[0])
        return torch.cat(outs)
    ref2 = per_row_sdpa().float()
    t = graph_time(per_row_sdpa)
    out["model_rows_sdpa_per_row"] = {"ms": t * 1e3, "tflops": flops2 / t / 1e12, "backend": best}
    global ATTENTION_KERNEL
    ATTENTION_KERNEL = "sdpa"
    if has("flash_attn.cute"):
        try:
            from flash_attn.cute import flash_attn_varlen_func
            cu_q = torch.tensor([0, 4098, 2 * 4098], dtype=torch.int32, device="cuda")
            cu_k = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32, device="cuda")

            def fa4():
                o = flash_attn_varlen_func(rows_q, rows_k, rows_v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                           max_seqlen_q=4098, max_seqlen_k=max(lens))
                return o[0] if isinstance(o, tuple) else o
            err = ((fa4().float() - ref2).norm() / ref2.norm()).item()
            t4 = graph_time(fa4)
            out["model_rows_flash_attn_4_varlen"] = {"ms": t4 * 1e3, "tflops": flops2 / t4 / 1e12, "rel_diff_vs_sdpa": err}
            if err < 2e-2 and t4 < t:
                ATTENTION_KERNEL = "flash_attn_4"
        except Exception as e:  # noqa: BLE001 - an optional kernel that fails here is a result, not a crash
            out["model_rows_flash_attn_4_varlen"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    RESULTS["attention"] = out
    for k_, v_ in out.items():
        log.info("attention %-32s %s", k_, v_)
    RESULTS["attention_choice"] = best
    RESULTS["attention_kernel"] = ATTENTION_KERNEL
    return backends


def copy_weights(dst, src):
    with torch.no_grad():
        for (name, p), (_, q) in zip(dst.named_parameters(), src.named_parameters()):
            p.copy_(q)


@section("correctness and accuracy (fp32 vs bf16 vs FP8, same weights)")
def accuracy(cfg, m16, vae, steps512: int, with_1024: bool, attn):
    """Returns the FP8 copy of the (re-initialised) bf16 model, where the code under test has FP8."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    m32 = build_dit_model(cfg, "cuda", torch.float32)
    random_init_(m32, seed=0)
    copy_weights(m16, m32)
    m8 = fp8_model(cfg, m16) if has("stages.dit.quantize") else None
    out = {}
    # one mixed batch through both forwards: two requests of different grids and context lengths
    for label, model, kernels in (("fp32", m32, "triton"), ("bf16", m16, "triton")):
        rows = []
        for side in (512, 256):
            h = make_handoff(cfg, side, 25, seed=side, dtype=model.vae2llm.weight.dtype)
            job = DenoiseEngine(model, "reference").prepare(h, h.cond.kv, h.uncond.kv)
            rows += [Row(b, job.x.to(model.vae2llm.weight.dtype), torch.tensor(0.7), request=job)
                     for b in (job.cond, job.uncond)]
        opts = fast_forward_options(attn) if label == "bf16" else {}
        fast = FastForward(model, **dict(opts, kernels=kernels))(rows)
        ref = ReferenceForward(model)(rows)
        errs = [((a - b).norm() / b.norm()).item() for a, b in zip(fast, ref)]
        out[f"forward_fast_vs_reference_{label}_rel"] = max(errs)
        log.info("one forward, fast vs reference (%s): max rel err over rows %.3g", label, max(errs))
    sizes = [(512, steps512)] + ([(1024, SIZES[1024])] if with_1024 else [])
    for side, steps in sizes:
        h32 = make_handoff(cfg, side, steps, seed=1, dtype=torch.float32)
        h16 = make_handoff(cfg, side, steps, seed=1, dtype=torch.bfloat16)
        noise = torch.randn(h32.num_target_tokens, 48, generator=torch.Generator("cuda").manual_seed(7), device="cuda")
        h32.initial_noise = h16.initial_noise = noise
        t0 = time.perf_counter()
        x_ref32 = DenoiseEngine(m32, "reference").run(jobs_for(DenoiseEngine(m32, "reference"), [h32]))[0]
        log.info("fp32 reference %d^2 took %.1fs", side, time.perf_counter() - t0)
        e = DenoiseEngine(m32, "fast", kernels="triton")
        x_fast32 = e.run(jobs_for(e, [h32]))[0]
        e = DenoiseEngine(m16, "fast", **fast_forward_options(attn, cuda_graphs=True))
        x_fast16 = e.run(jobs_for(e, [h16]))[0]
        e = DenoiseEngine(m16, "reference")
        x_ref16 = e.run(jobs_for(e, [h16]))[0]

        def rel(a, ref=x_ref32):
            return ((a - ref).norm() / ref.norm()).item()
        out[f"{side}"] = {"fast_fp32_vs_ref_fp32": rel(x_fast32), "fast_bf16_vs_ref_fp32": rel(x_fast16),
                          "ref_bf16_vs_ref_fp32": rel(x_ref16),
                          "fast_bf16_vs_ref_bf16": rel(x_fast16, x_ref16),
                          "final_latent_rms": x_ref32.pow(2).mean().sqrt().item()}
        if m8 is not None:
            e = DenoiseEngine(m8, "fast", **fast_forward_options(attn, cuda_graphs=True))
            x_fast8 = e.run(jobs_for(e, [h16]))[0]
            out[f"{side}"].update(fast_fp8_vs_ref_fp32=rel(x_fast8), fast_fp8_vs_fast_bf16=rel(x_fast8, x_fast16))
        if vae is not None:   # decoded images (random-weight Wan2.2 decoder, bf16), uint8, PSNR in dB
            from stages.dit.vae_decode import FrameDecoder
            from stages.lance.vae import decode_to_uint8
            dec = FrameDecoder(vae)
            hw = side // 16

            def image(x):
                img = dec(x.view(1, hw, hw, -1).permute(0, 3, 1, 2)[:, :, None].to(torch.bfloat16))
                return decode_to_uint8(img.transpose(0, 1))[0]
            i32, i16 = image(x_ref32), image(x_fast16)
            out[f"{side}"].update(psnr_bf16_vs_fp32_db=psnr(i16, i32))
            if m8 is not None:
                i8 = image(x_fast8)
                out[f"{side}"].update(psnr_fp8_vs_bf16_db=psnr(i8, i16), psnr_fp8_vs_fp32_db=psnr(i8, i32))
        log.info("final latent rel err %d^2: %s", side, out[f"{side}"])
    del m32
    RESULTS["accuracy"] = out
    return m8


@section("forward ladders (one CFG forward, batch 1: 2 rows) at 1024^2 and 512^2")
def forward_ladder(cfg, m16, m8, attn):
    out = {}
    for side in (1024, 512):
        n = (side // 16) ** 2
        h = make_handoff(cfg, side, 30, seed=3, dtype=torch.bfloat16)
        job = DenoiseEngine(m16, "reference").prepare(h, h.cond.kv, h.uncond.kv)
        rows = [Row(b, job.x.to(torch.bfloat16), torch.tensor(0.9, device="cuda"), request=job)
                for b in (job.cond, job.uncond)]
        flops = row_flops(cfg, n, COND_CONTEXT) + row_flops(cfg, n, UNCOND_CONTEXT)
        variants = {}
        cublas = dict(gate_up_kernel="cublas")   # the rows before the fused gate_up row
        if side == 1024:
            variants.update({"reference (model core)": ReferenceForward(m16),
                             "fast: packed, torch ops, SDPA default": FastForward(m16, "torch"),
                             "+ triton fused element-wise": FastForward(m16, **fast_forward_options(
                                 None, overlap_markers=False, attention_kernel="sdpa", **cublas)),
                             "+ chosen attention backend": FastForward(m16, **fast_forward_options(
                                 attn, overlap_markers=False, attention_kernel="sdpa", **cublas))})
        sdpa = dict(attention_kernel="sdpa", cuda_graphs=True, **cublas)
        variants["+ CUDA graph"] = FastForward(m16, **fast_forward_options(attn, overlap_markers=False, **sdpa))
        if "overlap_markers" in fast_forward_options(attn, overlap_markers=True):
            variants["+ und markers on a side stream"] = FastForward(
                m16, **fast_forward_options(attn, overlap_markers=True, **sdpa))
        if ATTENTION_KERNEL != "sdpa":   # the code under test takes it (an old checkout does not)
            for where, overlap in (("markers inline", False), ("markers on a side stream", True)):
                variants[f"+ {ATTENTION_KERNEL} (one variable-length call), {where}"] = FastForward(
                    m16, **fast_forward_options(attn, cuda_graphs=True, overlap_markers=overlap, **cublas))
        if "gate_up_kernel" in fast_forward_options(attn):
            variants[f"+ gate_up GEMM with SwiGLU in its epilogue ({GATE_UP_KERNEL})"] = FastForward(
                m16, **fast_forward_options(attn, cuda_graphs=True, overlap_markers=True))
        if m8 is not None:
            variants["FP8 weights + activations (graph, SDPA, side stream)"] = FastForward(
                m8, **fast_forward_options(attn, overlap_markers=True, **sdpa))
            if ATTENTION_KERNEL != "sdpa":
                for where, overlap in (("markers inline", False), ("markers on a side stream", True)):
                    variants[f"FP8 + {ATTENTION_KERNEL}, {where}"] = FastForward(
                        m8, **fast_forward_options(attn, cuda_graphs=True, overlap_markers=overlap))
        res = {}
        for name, fwd in variants.items():
            t = cuda_time(lambda: fwd(rows), reps=7, warmup=3)
            res[name] = {"ms": t * 1e3, "tflops": flops / t / 1e12, "mfu": flops / t / PEAK_BF16}
            log.info("forward %d^2 %-48s %8.2f ms  %6.0f TFLOP/s  MFU %.1f%%", side, name, t * 1e3, flops / t / 1e12,
                     100 * flops / t / PEAK_BF16)
        out[str(side)] = res
        profiles = RESULTS.setdefault("forward_profile_ms", {})
        eager = FastForward(m16, **fast_forward_options(attn))
        for label, fwd in ((f"{side}/bf16", eager),) + (((f"{side}/fp8", FastForward(m8, **fast_forward_options(attn))),)
                                                         if m8 is not None else ()):
            try:
                profiles[label] = profile_forward(fwd, rows, label)
            except Exception as e:  # the profile is a breakdown, not a result
                log.warning("profile %s failed: %s", label, e)
    RESULTS["forward_ladder"] = out


def profile_forward(fwd, rows, label=""):
    """Device time by kind of one eager forward (summed over streams: overlapped work counts in full)."""
    from torch.profiler import ProfilerActivity, profile
    fwd(rows)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd(rows)
        torch.cuda.synchronize()
    cats: dict[str, float] = {}
    for ev in prof.key_averages():
        name = ev.key.lower()
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if any(s in name for s in ("sdpa", "flash", "fmha", "attention")):
            cat = "attention"
        elif any(s in name for s in ("gemm", "xmma", "cutlass", "cublas", "nvjet")):
            cat = "gemm"
        elif name.startswith("_") and "_kernel" in name:
            cat = "triton element-wise"
        elif any(s in name for s in ("memcpy", "cat", "index", "copy")):
            cat = "copies and index ops"
        else:
            cat = "other"
        cats[cat] = cats.get(cat, 0.0) + us / 1e3
    log.info("one forward %s, device time by kind (ms): %s", label, {k: round(v, 2) for k, v in cats.items()})
    top = sorted(prof.key_averages(), key=lambda e: -(getattr(e, "device_time_total", 0) or 0))[:14]
    for ev in top:
        log.info("   %9.2f ms  x%-5d %s", (getattr(ev, "device_time_total", 0) or 0) / 1e3, ev.count, ev.key[:110])
    return cats


def timed_engine_run(engine, handoffs):
    jobs = jobs_for(engine, handoffs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.run(jobs)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, [j.x for j in jobs]


@section("denoising loops")
def loops(cfg, models, attn, batches, ref_batches):
    """models: path -> model ("fast" and "reference" on the bf16 model, "fp8" on its FP8 copy)."""
    out = RESULTS.setdefault("loops", {})
    for side, steps in SIZES.items():
        for path, model in models.items():
            for b in (ref_batches if path == "reference" else batches[path][side]):
                key = f"{side}/{path}/b{b}"
                try:
                    engine = (DenoiseEngine(model, "reference", max_batch_size=b) if path == "reference" else
                              DenoiseEngine(model, "fast", **fast_forward_options(attn, cuda_graphs=True), max_batch_size=b,
                                            max_tokens_per_forward=1 << 20))
                    warm = [make_handoff(cfg, side, 4, seed=90 + i, dtype=torch.bfloat16) for i in range(b)]
                    for h in warm:   # 2 CFG steps + 2 plain steps: both forward shapes, eager then captured
                        h.params = DenoiseParams(num_inference_steps=4, cfg_interval=(0.8, 1.0), seed=h.params.seed)
                    timed_engine_run(engine, warm)
                    handoffs = [make_handoff(cfg, side, steps, seed=i, dtype=torch.bfloat16) for i in range(b)]
                    torch.cuda.synchronize()
                    before = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    secs, _ = timed_engine_run(engine, handoffs)
                    flops = sum(loop_flops(cfg, h) for h in handoffs)
                    weights = sum(p.numel() * p.element_size() for p in model.parameters())
                    # this path's weights + the loop's working memory (other resident models left out)
                    peak = (weights + torch.cuda.max_memory_allocated() - before) / 2**30
                    out[key] = {"batch": b, "steps": steps, "denoise_s": secs, "denoise_s_per_image": secs / b,
                                "tflops": flops / secs / 1e12, "mfu": flops / secs / PEAK_BF16,
                                "peak_mem_gib": peak, "weights_gib": weights / 2**30, "forwards": engine.forwards_run}
                    log.info("%-22s denoise %.3fs (%.3fs/image)  %5.0f TFLOP/s  MFU %.1f%%  peak %.1f GiB", key, secs,
                             secs / b, flops / secs / 1e12, 100 * flops / secs / PEAK_BF16, peak)
                    del engine
                except torch.cuda.OutOfMemoryError as e:
                    out[key] = {"error": f"OOM: {e}"[:200]}
                    log.warning("%s: out of memory", key)
                gc.collect()
                torch.cuda.empty_cache()


WAN22_VAE = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
                 patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16)


def make_vae():
    """The Wan2.2 decoder's shape with random weights, bf16, as a LanceVAE (decoder only)."""
    from diffusers import AutoencoderKLWan

    from stages.lance.vae import LATENTS_MEAN, LATENTS_STD, LanceVAE
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoencoderKLWan(**WAN22_VAE, latents_mean=list(LATENTS_MEAN), latents_std=list(LATENTS_STD))
    model.encoder, model.quant_conv = None, None
    with torch.no_grad():  # the tiny checkpoint's recipe: convs N(0, (0.7/sqrt(fan_in))^2), activations O(1)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5 / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.zero_()
    return LanceVAE(model.to(torch.bfloat16), torch.bfloat16).cuda()


@section("VAE decode (Wan2.2 shape, random weights, decoder only, bf16)")
def vae_decode(vae, batches):
    from stages.dit.vae_decode import FrameDecoder
    params = sum(p.numel() for p in vae.parameters())
    out = {"decoder_parameters": params}
    # NCHW vs NHWC at 1024^2, then the faster for every size and batch
    z = torch.randn(1, 48, 1, 64, 64, device="cuda", dtype=torch.bfloat16)
    layouts = {cl: cuda_time(lambda: FrameDecoder(vae, channels_last=cl)(z), reps=5) for cl in (False, True)}
    out["layout_1024_b1_s"] = {"nchw": layouts[False], "channels_last": layouts[True]}
    channels_last = layouts[True] < layouts[False]
    out["channels_last"] = channels_last
    log.info("VAE layout at 1024^2: %s", out["layout_1024_b1_s"])
    dec = FrameDecoder(vae, channels_last=channels_last)
    for side in SIZES:
        for b in sorted({1, *batches[side]}):
            z = torch.randn(b, 48, 1, side // 16, side // 16, device="cuda", dtype=torch.bfloat16)
            torch.cuda.reset_peak_memory_stats()
            t_fast = cuda_time(lambda: dec(z), reps=5)
            peak = torch.cuda.max_memory_allocated() / 2**30
            row = {"frame_decoder_s": t_fast, "peak_mem_gib": peak}
            if b == 1:
                t_ref = cuda_time(lambda: vae.decode(z), reps=5)
                a, r = dec(z).float(), vae.decode(z)[:, :, 0].float()
                row.update(diffusers_decode_s=t_ref, rel_diff_vs_diffusers=((a - r).norm() / r.norm()).item(),
                           clamped_fraction=(r.abs() >= 1).float().mean().item())
            out[f"{side}/b{b}"] = row
            log.info("VAE %d^2 b%d: %s", side, b, row)
    RESULTS["vae"] = out


@section("the DiT stage's serving loop (DiTServingLoop: engine thread, VAE decode, encoding pool), in-process")
def serving(cfg, model, vae, attn, side: int, steps: int, requests: int, max_batch: int, label: str):
    """`requests` concurrent requests of one size through the code DiTStage runs (no Ray); the GPU's idle
    time between engine steps from CUDA events recorded around every step on the engine thread."""
    import asyncio

    from stages.dit.runner import DiTRunner
    from stages.dit.serving import DiTServingLoop

    runner = DiTRunner.from_loaded(model, cfg, vae, max_batch_size=max_batch, compile=True)
    events: list[tuple] = []
    plain_step = runner.step

    def timed_step():
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        result = plain_step()
        b.record()
        events.append((a, b))
        return result
    runner.step = timed_step

    async def one(loop, h):
        final = None
        async for item in loop.generate_image(h, h.cond.kv, h.uncond.kv):
            final = item
        return final

    async def wave(handoffs):
        loop = DiTServingLoop(runner, batch_wait_timeout_s=0.005)
        t0 = time.perf_counter()
        finals = await asyncio.gather(*(one(loop, h) for h in handoffs))
        return time.perf_counter() - t0, finals

    warm = [make_handoff(cfg, side, 4, seed=500 + i, dtype=torch.bfloat16, request_id=f"w{i}") for i in range(requests)]
    for h in warm:   # both forward shapes of every batch size the wave will see, eager then captured
        h.params = DenoiseParams(num_inference_steps=4, cfg_interval=(0.8, 1.0), seed=h.params.seed)
    asyncio.run(wave(warm))
    asyncio.run(wave(warm[:max_batch]))
    handoffs = [make_handoff(cfg, side, steps, seed=600 + i, dtype=torch.bfloat16, request_id=f"r{i}")
                for i in range(requests)]
    torch.cuda.synchronize()
    events.clear()
    wall, finals = asyncio.run(wave(handoffs))
    torch.cuda.synchronize()
    busy = sum(a.elapsed_time(b) for a, b in events) / 1e3
    gaps = [events[i][1].elapsed_time(events[i + 1][0]) / 1e3 for i in range(len(events) - 1)]
    span = events[0][0].elapsed_time(events[-1][1]) / 1e3
    res = {"requests": requests, "max_batch": max_batch, "wall_s": wall, "images_per_s": requests / wall,
           "engine_steps": len(events), "gpu_span_s": span, "step_time_s": busy,
           "idle_between_steps_s": sum(max(g, 0.0) for g in gaps),
           "idle_between_steps_max_ms": 1e3 * max(gaps, default=0.0),
           "before_first_step_and_after_last_s": wall - span,
           "png_bytes_mean": statistics.mean(len(f["image"]) for f in finals)}
    RESULTS.setdefault("serving", {})[label] = res
    log.info("serving %s: %s", label, res)


@section("encoding one finished image (CPU of the GPU machine; random-weight VAE output, noise-like)")
def encoding_costs(vae):
    from stages.dit.encode import encode_pixels
    from stages.dit.vae_decode import FrameDecoder
    from stages.lance.requests import ImageEncoding
    from stages.lance.vae import decode_to_uint8
    out = {}
    for side in SIZES:
        z = torch.randn(1, 48, 1, side // 16, side // 16, device="cuda", dtype=torch.bfloat16)
        pixels = decode_to_uint8(FrameDecoder(vae)(z).transpose(0, 1))[0].cpu()
        for enc in (ImageEncoding("png"), ImageEncoding("png", png_compress_level=1), ImageEncoding("webp", 90),
                    ImageEncoding("jpeg", 90)):
            times, size = [], 0
            for _ in range(3):
                t0 = time.perf_counter()
                size = len(encode_pixels(pixels, enc))
                times.append(time.perf_counter() - t0)
            key = f"{side}/{enc.format}" + (f"-level{enc.png_compress_level}" if enc.format == "png" else f"-q{enc.quality}")
            out[key] = {"ms": 1e3 * statistics.median(times), "bytes": size}
    RESULTS["encoding"] = out
    log.info("encoding: %s", out)


def summarize(loops_: dict, vae: dict, label: str = "") -> list[dict]:
    """Per size and path: batch-1 seconds (denoise + VAE), images/s at batch 1 and at the best batch, MFU, peak."""
    table = []
    for side in SIZES:
        for path in ("fast", "fp8", "reference"):
            rows = {k: v for k, v in loops_.items() if k.startswith(f"{side}/{path}/") and "denoise_s" in v}
            if not rows:
                continue

            def vae_s(b):
                return vae.get(f"{side}/b{b}", {}).get("frame_decoder_s" if path != "reference" else "diffusers_decode_s",
                                                       vae.get(f"{side}/b{b}", {}).get("frame_decoder_s", 0.0))
            per = {}
            for k, v in rows.items():
                b = v["batch"]
                vs = vae_s(b) if path != "reference" else b * vae_s(1)
                per[b] = dict(v, vae_s=vs, images_per_s=b / (v["denoise_s"] + vs))
            b1 = per.get(1)
            best_b = max(per, key=lambda b: per[b]["images_per_s"])
            table.append({"size": side, "path": label + path, "denoise_s_b1": b1 and b1["denoise_s"],
                          "vae_s_b1": b1 and b1["vae_s"], "s_per_image_b1": b1 and b1["denoise_s"] + b1["vae_s"],
                          "img_s_b1": b1 and b1["images_per_s"], "best_batch": best_b,
                          "img_s_best": per[best_b]["images_per_s"], "mfu_b1": b1 and b1["mfu"],
                          "mfu_best": per[best_b]["mfu"], "peak_gib": max(v["peak_mem_gib"] for v in per.values())})
    return table


def print_table(table, old_table=None):
    acc = RESULTS.get("accuracy", {})
    print("\n== DiT benchmark:", RESULTS.get("device", {}).get("gpu"), "| matmul ceiling",
          f"{RESULTS.get('device', {}).get('matmul_8192_bf16_tflops', 0):.0f} TFLOP/s | attention:",
          RESULTS.get("attention_choice"), "| code:", RESULTS.get("label"))
    hdr = f"{'size':>5} {'path':>13} {'denoise b1':>10} {'vae b1':>7} {'s/img b1':>8} {'img/s b1':>8} " \
          f"{'best b':>6} {'img/s best':>10} {'MFU b1':>7} {'MFU best':>8} {'peak GiB':>8}"
    print(hdr)
    rows = sorted((old_table or []) + table, key=lambda r: (r["size"], r["path"].replace("old ", "")))
    by = {(r["size"], r["path"]): r for r in rows}
    for r in rows:
        f = lambda x, fmt: (fmt % x) if x is not None else "-"   # noqa: E731
        print(f"{r['size']:>5} {r['path']:>13} {f(r['denoise_s_b1'], '%.3f'):>10} {f(r['vae_s_b1'], '%.3f'):>7} "
              f"{f(r['s_per_image_b1'], '%.3f'):>8} {f(r['img_s_b1'], '%.2f'):>8} {r['best_batch']:>6} "
              f"{r['img_s_best']:>10.2f} {f(r['mfu_b1'] and 100 * r['mfu_b1'], '%.1f%%'):>7} "
              f"{100 * r['mfu_best']:>7.1f}% {r['peak_gib']:>8.1f}")
    for side in SIZES:
        fast, ref = by.get((side, "fast")), by.get((side, "reference"))
        if fast and ref and fast["s_per_image_b1"] and ref["s_per_image_b1"]:
            print(f"{side}: fast/reference speed-up  b1 {ref['s_per_image_b1'] / fast['s_per_image_b1']:.2f}x,"
                  f" best batch {fast['img_s_best'] / ref['img_s_best']:.2f}x")
    for side, v in acc.items():
        if isinstance(v, dict):
            line = (f"vs fp32 final latent rel err {side}^2: fast bf16 {v['fast_bf16_vs_ref_fp32']:.2e}, reference bf16 "
                    f"{v['ref_bf16_vs_ref_fp32']:.2e}, fast fp32 {v['fast_fp32_vs_ref_fp32']:.1e}")
            if "fast_fp8_vs_ref_fp32" in v:
                line += f", fast FP8 {v['fast_fp8_vs_ref_fp32']:.2e}"
            if "psnr_bf16_vs_fp32_db" in v:
                line += f" | PSNR bf16 vs fp32 {v['psnr_bf16_vs_fp32_db']:.1f} dB"
            if "psnr_fp8_vs_bf16_db" in v:
                line += f", FP8 vs bf16 {v['psnr_fp8_vs_bf16_db']:.1f} dB, FP8 vs fp32 {v['psnr_fp8_vs_fp32_db']:.1f} dB"
            print(line)
    for label, v in RESULTS.get("serving", {}).items():
        print(f"serving loop {label}: {v['images_per_s']:.2f} img/s ({v['requests']} requests, max batch "
              f"{v['max_batch']}), GPU idle between steps {1e3 * v['idle_between_steps_s']:.1f} ms over "
              f"{v['engine_steps']} steps (max gap {v['idle_between_steps_max_ms']:.2f} ms)")
    print("targets: 1024^2/30 b1 bf16 <= 2.5 s incl. VAE (>= 63% MFU), FP8 <= 1.7 s; 512^2/25 bf16 >= 2.0 img/s b1, "
          ">= 2.4 best batch; serving loop within 5% of the engine's best batch")
    if RESULTS.get("errors"):
        print("errors:", RESULTS["errors"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--quick", action="store_true", help="small batches only")
    ap.add_argument("--fp32-1024", action="store_true", help="also the fp32 accuracy run at 1024^2 (~1 min)")
    ap.add_argument("--skip", default="", help="comma list: accuracy,ladder,loops,vae,micro,attention,serving,"
                                                 "encoding,reference (attention: the kernel choice too; without "
                                                 "it every section runs SDPA's default)")
    ap.add_argument("--code-root", default=None, help="import stages/ from this checkout (old rows)")
    ap.add_argument("--label", default="new", help="names the code under test in the JSON")
    ap.add_argument("--compare", default=None, help="an earlier run's bench_dit.json: print its rows next to these")
    ap.add_argument("--sizes", default=None, help="comma list of image sides to run (default: 512,1024)")
    ap.add_argument("--batches", default=None, help="comma list of batch sizes for the fast and FP8 loops")
    args = ap.parse_args()
    if args.sizes:
        for side in [s for s in SIZES if str(s) not in args.sizes.split(",")]:
            del SIZES[side]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.FileHandler(out / "bench_dit.log"), logging.StreamHandler(sys.stdout)])
    skip = set(filter(None, args.skip.split(",")))
    fast = {512: [1, 2, 4] if args.quick else [1, 2, 4, 8, 16], 1024: [1, 2] if args.quick else [1, 2, 4]}
    batches = {"fast": fast, "fp8": {512: [1, 8, 16] if not args.quick else [1, 4], 1024: [1, 2]}}
    if args.batches:
        chosen = [int(b) for b in args.batches.split(",")]
        batches = {path: {side: chosen for side in SIZES} for path in batches}
    RESULTS.update(command=" ".join(sys.argv), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), label=args.label,
                   code_root=_code_root(), out=str(out))
    cfg = lance_3b()
    ceilings()
    self_check()
    attn = None
    if "micro" not in skip:
        gemms(cfg)
    if "attention" not in skip:   # also picks the attention kernel every later section runs (FA4 or SDPA)
        attn = attention_backends()
    m16 = build_dit_model(cfg, "cuda", torch.bfloat16)
    random_init_(m16, seed=0)
    RESULTS["dit_parameters"] = sum(p.numel() for p in m16.parameters())
    RESULTS["dit_weight_gib"] = sum(p.numel() * p.element_size() for p in m16.parameters()) / 2**30
    log.info("DiT model: %.3f B parameters, %.2f GiB bf16", RESULTS["dit_parameters"] / 1e9, RESULTS["dit_weight_gib"])
    vae = make_vae() if not {"vae", "accuracy", "serving"} <= skip else None
    m8 = None
    if "accuracy" not in skip:
        m8 = accuracy(cfg, m16, vae, SIZES[512], args.fp32_1024, attn)
    elif has("stages.dit.quantize"):
        m8 = fp8_model(cfg, m16)
    if m8 is not None:
        RESULTS["dit_weight_gib_fp8"] = sum(p.numel() * p.element_size() for p in m8.parameters()) / 2**30
    if "ladder" not in skip:
        forward_ladder(cfg, m16, m8, attn)
    if "loops" not in skip:
        models = {"fast": m16, **({"fp8": m8} if m8 is not None else {}),
                  **({} if "reference" in skip else {"reference": m16})}
        loops(cfg, models, attn, batches, ref_batches=[1])
    if "vae" not in skip:
        vae_decode(vae, {side: sorted({b for p in batches.values() for b in p[side]}) for side in SIZES})
    if "serving" not in skip and has("stages.dit.serving"):
        best = {row["path"]: row["best_batch"] for row in summarize(RESULTS.get("loops", {}), RESULTS.get("vae", {}))
                if row["size"] == 512}
        serving(cfg, m16, vae, attn, 512, 25, 16, min(best.get("fast", 8), 16), "512/bf16")
        if m8 is not None:
            serving(cfg, m8, vae, attn, 512, 25, 16, min(best.get("fp8", 8), 16), "512/fp8")
    if "encoding" not in skip and has("stages.dit.encode") and vae is not None:
        encoding_costs(vae)
    table = summarize(RESULTS.get("loops", {}), RESULTS.get("vae", {}))
    RESULTS["table"] = table
    old_table = None
    if args.compare:
        old = json.loads(Path(args.compare).read_text())
        # the old run times the denoising loops; the VAE decode code is the same, so both use this run's VAE times
        old_table = summarize(old.get("loops", {}), RESULTS.get("vae", {}), label="old ")
        RESULTS["old_table"] = old_table
        RESULTS["old_forward_ladder"] = old.get("forward_ladder")
    (out / "bench_dit.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    print_table(table, old_table)


if __name__ == "__main__":
    main()
