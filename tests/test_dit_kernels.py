"""The fast path's parts on CPU: Triton kernels (through Triton's interpreter) against the plain ops,
the packed forward with them against the model core, the attention-backend fallback, and the
single-frame VAE decode layouts. (On the GPU, benchmarks/bench_dit.py re-checks all of it.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend

from helpers import golden_handoff
from stages.dit.engine import DenoiseEngine
from stages.dit.forward import FastForward, ReferenceForward
from stages.dit.model import load_dit_model
from stages.dit.vae_decode import FrameDecoder
from stages.lance.checkpoint import resolve_checkpoint
from stages.lance.vae import LanceVAE

REPO = Path(__file__).resolve().parents[1]

INTERPRETED = textwrap.dedent("""
    import json, sys, torch
    import torch.nn.functional as F
    from stages.dit import kernels as K
    from stages.dit.engine import DenoiseEngine
    from stages.dit.forward import FastForward, ReferenceForward
    from stages.dit.model import load_dit_model
    from stages.lance.checkpoint import resolve_checkpoint
    sys.path.insert(0, "tests")
    from helpers import golden_handoff
    from safetensors.torch import load_file

    torch.manual_seed(0)
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        name = str(dt).split(".")[1]
        x, w = torch.randn(5, 300, dtype=dt), torch.randn(300, dtype=dt)
        qkv = torch.randn(7, (4 + 2 * 2) * 64, dtype=dt)
        qw, kw, cos, sin = torch.randn(64, dtype=dt), torch.randn(64, dtype=dt), torch.randn(7, 64), torch.randn(7, 64)
        gu = torch.randn(3, 2 * 1500, dtype=dt)
        pairs = [(K.rms_norm_torch(x, w, 1e-6), K.rms_norm_triton(x, w, 1e-6)),
                 *zip(K.qk_norm_rope_torch(qkv, qw, kw, 1e-6, cos, sin, 4, 2),
                      K.qk_norm_rope_triton(qkv, qw, kw, 1e-6, cos, sin, 4, 2)),
                 (K.silu_mul_torch(gu), K.silu_mul_triton(gu))]
        # the gate_up GEMM with SwiGLU in its epilogue: edge tiles in M, F and K (37 x 72 -> 40 of 2 x 40)
        gen = torch.Generator().manual_seed(1)   # its own stream: the draws above stay as they were
        h = torch.randn(37, 72, generator=gen).to(dt)
        w_gu = (torch.randn(80, 72, generator=gen) / 72 ** 0.5).to(dt)
        small = dict(block_m=16, block_n=16, block_k=32, group_m=2)
        swiglu_ref = K.silu_mul_torch(F.linear(h, w_gu))
        out[name + "_gate_up_swiglu"] = max(((swiglu_ref.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                            for b in (K.gate_up_swiglu_triton(h, w_gu, small),
                                                      K.gate_up_swiglu_triton(h, w_gu, dict(small, persistent=False))))
        # the same op writing K/V into rows of packed buffers (rows not named by the index stay untouched)
        kv_index = torch.tensor([11, 0, 5, 3, 9, 7, 1])
        bufs = {impl: (torch.zeros(12, 2, 64, dtype=dt), torch.zeros(12, 2, 64, dtype=dt)) for impl in ("torch", "triton")}
        q_torch = K.qk_norm_rope_into_torch(qkv, qw, kw, 1e-6, cos, sin, 4, 2, *bufs["torch"], kv_index)
        q_triton = K.qk_norm_rope_into_triton(qkv, qw, kw, 1e-6, cos, sin, 4, 2, *bufs["triton"], kv_index)
        pairs += [(q_torch, q_triton), *zip(bufs["torch"], bufs["triton"]), (q_torch, pairs[1][0])]
        out[name + "_kv_rows_untouched"] = all(not b[[2, 4, 6, 8, 10]].any() for b in bufs["triton"])
        out[name] = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in pairs)
        # FP8 outputs: the same E4M3 codes and per-row scales as the torch reference in fp32; in bf16 the
        # inputs to the quantizer already differ by a bf16 rounding (as above), so a code may move one step
        fp8 = [(K.rms_norm_fp8_torch(x, w, 1e-6), K.rms_norm_fp8_triton(x, w, 1e-6)),
               (K.silu_mul_fp8_torch(gu), K.silu_mul_fp8_triton(gu)),
               (K.quantize_rows_torch(gu), K.quantize_rows_triton(gu))]
        codes, scales, steps = 0.0, 0.0, 0.0
        for (qa, sa), (qb, sb) in fp8:
            assert qb.dtype == torch.float8_e4m3fn and sb.shape == sa.shape
            codes = max(codes, ((qa.float() - qb.float()).abs() > 0).float().mean().item())
            scales = max(scales, ((sa - sb).abs() / sa).max().item())
            # largest difference in units of the top binade's code step (32 of 448)
            steps = max(steps, ((qa.float() * sa - qb.float() * sb).abs() / (sa * 32)).max().item())
        out[name + "_fp8_codes_differing"] = codes
        out[name + "_fp8_scale_rel"] = scales
        out[name + "_fp8_max_steps"] = steps
    model, _ = load_dit_model(resolve_checkpoint(sys.argv[1], need_vit=False, need_vae=False))
    g = load_file(sys.argv[2])
    h = golden_handoff(g, "t2i")
    job = DenoiseEngine(model, "reference").prepare(h, h.cond.kv, h.uncond.kv)
    rows = job.rows(torch.float32)
    fast, ref = FastForward(model, kernels="triton")(rows), ReferenceForward(model)(rows)
    out["forward"] = max(((a - b).norm() / b.norm()).item() for a, b in zip(fast, ref))
    fused = FastForward(model, kernels="triton", gate_up_kernel="triton_swiglu")
    assert fused.linears.fused_swiglu
    fused.linears.fused_min_rows = 1   # the tiny image's rows too (a GPU runs it from 8192 rows on)
    out["forward_fused_swiglu"] = max(((a - b).norm() / b.norm()).item() for a, b in zip(fused(rows), ref))
    from stages.dit.quantize import quantize_dit_model
    quantize_dit_model(model, "fp8")
    fp8_triton, fp8_torch = FastForward(model, kernels="triton")(rows), FastForward(model, kernels="torch")(rows)
    out["forward_fp8_triton_vs_torch"] = max(((a - b).norm() / b.norm()).item() for a, b in zip(fp8_triton, fp8_torch))
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_triton_kernels_and_fused_forward_match_plain_ops(tiny_ckpt_dir, golden_dir):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", INTERPRETED, str(tiny_ckpt_dir),
                           str(golden_dir / "cases" / "t2i" / "tensors.safetensors")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert errs["float32"] < 1e-6, errs
    assert errs["bfloat16"] < 2e-2, errs      # one bf16 rounding apart at most
    # the fused GEMM rounds three times (gate_up, silu, product), as the unfused ops do: each rounding
    # of the reference and the kernel may land one bf16 step apart (the interpreter truncates)
    assert errs["float32_gate_up_swiglu"] < 1e-6 and errs["bfloat16_gate_up_swiglu"] < 3e-2, errs
    assert errs["float32_kv_rows_untouched"] and errs["bfloat16_kv_rows_untouched"], errs
    assert errs["forward"] < 1e-5 and errs["forward_fused_swiglu"] < 1e-5, errs
    assert errs["float32_fp8_codes_differing"] == 0 and errs["float32_fp8_scale_rel"] < 1e-6, errs
    assert errs["bfloat16_fp8_codes_differing"] < 0.1 and errs["bfloat16_fp8_scale_rel"] < 2e-2, errs
    assert errs["bfloat16_fp8_max_steps"] <= 1.01, errs
    assert errs["forward_fp8_triton_vs_torch"] < 1e-3, errs


@pytest.fixture(scope="module")
def dit_model(tiny_ckpt_dir):
    return load_dit_model(resolve_checkpoint(tiny_ckpt_dir, need_vit=False, need_vae=False))[0]


def test_unavailable_attention_backend_falls_back_to_sdpa_choice(dit_model, golden):
    h = golden_handoff(golden("t2i"), "t2i")
    rows = DenoiseEngine(dit_model, "reference").prepare(h, h.cond.kv, h.uncond.kv).rows(torch.float32)
    fast = FastForward(dit_model, attention_backends=[SDPBackend.CUDNN_ATTENTION])  # no cuDNN on a CPU
    got, want = fast(rows), ReferenceForward(dit_model)(rows)
    assert fast.attention_backends is None and fast.expand_kv is False
    for a, b in zip(got, want):
        assert ((a - b).norm() / b.norm()) < 1e-5


def test_flash_attention_4_where_it_cannot_run_falls_back_to_sdpa(dit_model, golden):
    h = golden_handoff(golden("t2i"), "t2i")
    rows = DenoiseEngine(dit_model, "reference").prepare(h, h.cond.kv, h.uncond.kv).rows(torch.float32)
    fast = FastForward(dit_model, attention_kernel="flash_attn_4")   # a CPU: no FlashAttention-4
    got, want = fast(rows), ReferenceForward(dit_model)(rows)
    assert fast.attention_kernel == "sdpa"
    for a, b in zip(got, want):
        assert ((a - b).norm() / b.norm()) < 1e-5
    with pytest.raises(ValueError, match="attention kernel"):
        FastForward(dit_model, attention_kernel="flash")


def test_fused_gate_up_kernel_that_fails_to_build_falls_back_to_cublas(dit_model, golden, monkeypatch, caplog):
    """A GPU/Triton that cannot build the fused gate_up + SwiGLU kernel: the first call's error is logged and
    the unfused path serves this and every later forward (here the kernel's failure is injected: a CPU
    without Triton's interpreter never reaches it)."""
    from stages.dit import quantize

    calls = []

    def cannot_build(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(quantize, "gate_up_swiglu_supported", lambda x, w: True)
    monkeypatch.setattr(quantize, "gate_up_swiglu_triton", cannot_build)
    h = golden_handoff(golden("t2i"), "t2i")
    rows = DenoiseEngine(dit_model, "reference").prepare(h, h.cond.kv, h.uncond.kv).rows(torch.float32)
    fast = FastForward(dit_model, gate_up_kernel="triton_swiglu")
    fast.linears.fused_min_rows = 1
    with caplog.at_level("WARNING", logger="stages.dit.quantize"):
        got = fast(rows)
        again = fast(rows)
    want = ReferenceForward(dit_model)(rows)
    assert len(calls) == 1 and not fast.linears.fused_swiglu
    assert "fused gate_up + SwiGLU kernel failed" in caplog.text
    for a, b, c in zip(got, again, want):
        assert ((a - c).norm() / c.norm()) < 1e-5 and torch.equal(a, b)
    with pytest.raises(ValueError, match="gate_up kernel"):
        FastForward(dit_model, gate_up_kernel="cutlass")


def test_frame_decoder_layouts_agree(tiny_ckpt_dir):
    vae = LanceVAE.from_wan22_pth(tiny_ckpt_dir / "Wan2.2_VAE.pth", encoder=False)
    z = torch.randn(2, 48, 1, 4, 6, generator=torch.Generator().manual_seed(3))
    a = FrameDecoder(vae)(z)
    b = FrameDecoder(vae, channels_last=True)(z)
    assert (a - b).abs().max() < 1e-5
