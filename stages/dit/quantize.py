"""Opt-in FP8 (E4M3) weights for the DiT's transformer layers (`dit.engine.quantization: fp8`).

At load, every linear layer of the MoT blocks (qkv, o, gate_up, down of both experts: 99.6 % of the
DiT's parameters) is quantized with one scale per output channel, w ~ q_w * s_w, and held in FP8 (half
the bytes of bf16). At run time `FastForward` quantizes activations with one scale per token (fused
into RMSNorm and SwiGLU; kernels.py) and multiplies with `torch._scaled_mm` (FP8 tensor cores, fp32
accumulation, out in the model dtype). The connectors (vae2llm, llm2vae, time embedder), norms and the
marker embeddings stay in the model dtype, and attention runs in it.

Where `torch._scaled_mm` is not available (CPUs), the same function is computed by dequantizing in fp32:
the reference that the fused path is tested against. The model core's reference forward does not run
quantized weights.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import FP8_DTYPE, FP8_MAX, ElementwiseOps, gate_up_swiglu_supported, gate_up_swiglu_triton

log = logging.getLogger(__name__)
QUANTIZATIONS = (None, "fp8")
LINEARS = ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
GATE_UP_KERNELS = ("cublas", "triton_swiglu")
# The fused gate_up GEMM runs from this many rows on; fewer stay on cuBLAS + SwiGLU. On an H100
# (benchmarks/README.md, "third pass") it won from ~8k rows on (a 1024^2 CFG forward, 8196 rows: -3.3 ms;
# the 512^2 loop per image: b4 -1.4 %, b16 -4.2 %) but not below (512^2 b1, 2052 rows: +0.1 ms a forward;
# b2, 4104 rows: +1.1 % a loop): the Triton GEMM runs ~15 % below cuBLAS, which at few rows eats the saved
# SwiGLU pass. The und expert's 2-4 marker rows are a matrix-vector product that cuBLAS's split-K kernels
# do far faster.
FUSED_SWIGLU_MIN_ROWS = 8192


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (E4M3 [N, K], fp32 per-output-channel scales [N])."""
    wf = weight.float()
    scale = (wf.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12 / FP8_MAX)
    return (wf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantized_linears(model) -> list[nn.Linear]:
    out = []
    for layer in model.language_model.layers:
        for expert in (layer.gen, layer.und):
            for path in LINEARS:
                out.append(expert.get_submodule(path))
    return out


def is_quantized(model) -> bool:
    return getattr(model, "quantization", None) is not None


def quantize_dit_model(model, quantization: str | None) -> str | None:
    """Quantize the model's layer weights in place (one linear at a time: peak memory grows by one
    weight, not by the model). Returns the scheme now in force."""
    if quantization in (None, "none", ""):   # nothing asked: the model stays as it is
        return getattr(model, "quantization", None)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r} (none | fp8)")
    if is_quantized(model):
        return model.quantization
    with torch.no_grad():
        for lin in quantized_linears(model):
            q, scale = quantize_weight(lin.weight)
            lin.weight = nn.Parameter(q, requires_grad=False)
            lin.register_buffer("weight_scale", scale)
    model.quantization = quantization
    log.info("DiT layer weights quantized to FP8 E4M3 (per-output-channel scales)")
    return quantization


def scaled_mm_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) >= (8, 9)   # FP8 tensor cores: Ada, Hopper and later


def fp8_matmul(q: torch.Tensor, scale: torch.Tensor, lin: nn.Linear, out_dtype: torch.dtype,
               native: bool, bias_in_epilogue: bool = True) -> torch.Tensor:
    """(q * scale) @ (q_w * s_w)^T (+ bias) in out_dtype: FP8 tensor cores (bias in the GEMM's epilogue
    where the library takes it), or fp32 dequantized."""
    if native:
        fused = lin.bias if bias_in_epilogue else None
        # fast accumulation: measured on an H100 at M=8196, 1.29x the rate (gate_up 1070 -> 1382 TFLOP/s) at the
        # same error against a bf16 product (3.745e-2 vs 3.746e-2, per-token x per-channel E4M3 inputs)
        out = torch._scaled_mm(q, lin.weight.t(), scale_a=scale, scale_b=lin.weight_scale.view(1, -1),
                               bias=fused, out_dtype=out_dtype, use_fast_accum=True)
        if lin.bias is not None and fused is None:
            out += lin.bias
        return out
    out = ((q.float() * scale) @ (lin.weight.float() * lin.weight_scale[:, None]).t()).to(out_dtype)
    if lin.bias is not None:
        out += lin.bias
    return out


class DenseLinears:
    """The layer's projections on weights in the model dtype (residual adds in the GEMM epilogue).

    `gate_up_kernel`: "cublas" (the gate_up GEMM, then SwiGLU as its own pass) or "triton_swiglu" (one
    Triton GEMM with SwiGLU in its epilogue: the [tokens, 2F] gate_up activation is never written; Hopper
    or newer, else the cuBLAS path runs)."""

    def __init__(self, ops: ElementwiseOps, gate_up_kernel: str = "cublas"):
        if gate_up_kernel not in GATE_UP_KERNELS:
            raise ValueError(f"unknown gate_up kernel {gate_up_kernel!r} ({' | '.join(GATE_UP_KERNELS)})")
        self.ops = ops
        self.fused_swiglu = gate_up_kernel == "triton_swiglu"
        self.fused_min_rows = FUSED_SWIGLU_MIN_ROWS

    def norm_linear(self, x, norm, lin):
        return F.linear(self.ops.rms_norm(x, norm.weight, norm.eps), lin.weight, lin.bias)

    def linear_add_(self, residual, x, lin):
        """residual += x @ W^T, in place (cuBLAS reads the residual as C: no copy)."""
        return residual.addmm_(x, lin.weight.t())

    def mlp_add_(self, x, norm, gate_up, down):
        """x += down(silu(gate) * up) of gate_up(norm(x)), in place."""
        h = self.ops.rms_norm(x, norm.weight, norm.eps)
        act = None
        if (self.fused_swiglu and h.shape[0] >= self.fused_min_rows and gate_up.bias is None
                and gate_up_swiglu_supported(h, gate_up.weight)):
            try:   # its first call compiles it, eagerly (a CUDA graph is captured on a later call)
                act = gate_up_swiglu_triton(h, gate_up.weight)
            except Exception as e:   # a Triton or GPU that cannot build it: the unfused path, from now on
                log.warning("the fused gate_up + SwiGLU kernel failed (%s: %s); the DiT uses cuBLAS + SwiGLU",
                            type(e).__name__, str(e)[:200])
                self.fused_swiglu = False
        if act is None:
            act = self.ops.silu_mul(F.linear(h, gate_up.weight, gate_up.bias))
        return x.addmm_(act, down.weight.t())


class Fp8Linears:
    """The same projections on FP8 weights: activations quantized per token on the way in."""

    def __init__(self, ops: ElementwiseOps, device: torch.device, dtype: torch.dtype):
        self.ops, self.dtype = ops, dtype
        self.native = scaled_mm_available(device) and dtype == torch.bfloat16   # row-wise scales: bf16 out
        self.bias_in_epilogue: bool | None = None

    def _mm(self, q, scale, lin):
        if self.bias_in_epilogue is None and lin.bias is not None and self.native:
            try:   # decided on the first (eager) call: does this torch/cuBLAS take a bias with row-wise scales?
                out = fp8_matmul(q, scale, lin, self.dtype, True, True)
                self.bias_in_epilogue = True
                return out
            except RuntimeError:
                self.bias_in_epilogue = False
        return fp8_matmul(q, scale, lin, self.dtype, self.native, bool(self.bias_in_epilogue))

    def norm_linear(self, x, norm, lin):
        return self._mm(*self.ops.rms_norm_fp8(x, norm.weight, norm.eps), lin)

    def linear_add_(self, residual, x, lin):
        return residual.add_(self._mm(*self.ops.quantize_rows(x), lin))

    def mlp_add_(self, x, norm, gate_up, down):
        return x.add_(self._mm(*self.ops.silu_mul_fp8(self.norm_linear(x, norm, gate_up)), down))
