"""`DiTRunner`: the DiT stage without Ray - load, denoise hand-offs in shared steps, decode to PNG.

Synchronous and single-threaded by design (the deployment calls it from one worker thread): `prepare`
validates a hand-off, `submit` queues it, `step` advances every active request by one denoising step
and returns the finished ones decoded.
"""
from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass

import torch
from PIL import Image

from stages.lance.checkpoint import resolve_checkpoint
from stages.lance.handoff import ContextHandoff
from stages.lance.limits import torch_dtype
from stages.lance.vae import LanceVAE, decode_to_uint8

from .engine import DenoiseEngine, DenoiseJob, DiTRequestError
from .model import load_dit_model, memory_report
from .vae_decode import FrameDecoder

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(dtype)


def fast_path_options(compile: bool, device: torch.device) -> dict:
    """`compile` on a GPU: fused Triton element-wise kernels, CUDA graphs per batch shape, cuDNN attention
    (what benchmarks/bench_dit.py measured fastest on an H100); otherwise plain torch ops."""
    if not (compile and device.type == "cuda"):
        return {"kernels": "torch"}
    from torch.nn.attention import SDPBackend

    return {"kernels": "triton", "cuda_graphs": True, "attention_backends": [SDPBackend.CUDNN_ATTENTION]}


def require_image_grid(latent_grid) -> None:
    """The DiT stage decodes images: one latent frame."""
    grid = tuple(latent_grid)
    if len(grid) == 3 and grid[0] != 1:
        raise DiTRequestError(f"the DiT stage makes images (one latent frame); got latent_grid {grid}",
                              param="latent_grid")


@dataclass
class DecodedImage:
    png: bytes
    width: int
    height: int
    latents: torch.Tensor    # [t, h, w, channels] fp32 on the CPU (tests, offline use)
    image: torch.Tensor      # [3, H, W] decoded, in [-1, 1], fp32 on the CPU
    pixels: torch.Tensor     # [H, W, 3] uint8


class DiTRunner:
    def __init__(self, model: str, variant: str | None = None, dtype: str | torch.dtype = "auto",
                 device: str = "auto", max_batch_size: int = 8, compile: bool = True, forward: str = "fast"):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        t0 = time.perf_counter()
        files = resolve_checkpoint(model, variant, need_vit=False, need_vae=True)
        self.model, self.config = load_dit_model(files, self.device, self.dtype)
        self.vae = LanceVAE.from_wan22_pth(files.vae_path, dtype=self.dtype, device=self.device, encoder=False)
        self.decoder = FrameDecoder(self.vae)
        self.engine = DenoiseEngine(self.model, forward, max_batch_size=max_batch_size,
                                    **fast_path_options(compile, self.device))
        log.info("DiT stage ready in %.1fs on %s (%s): %s", time.perf_counter() - t0, self.device, self.dtype,
                 self.memory())

    def memory(self) -> dict:
        """Bytes held by this stage: DiT weights, VAE decoder weights, and (GPU) allocator figures."""
        dit, vae = memory_report(self.model), memory_report(self.vae)
        out = {"dit_parameters": dit.parameters, "dit_parameter_bytes": dit.parameter_bytes,
               "vae_decoder_parameters": vae.parameters, "vae_decoder_parameter_bytes": vae.parameter_bytes}
        if self.device.type == "cuda":
            out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out

    def prepare(self, handoff: ContextHandoff, cond_kv, uncond_kv=None, on_step=None) -> DenoiseJob:
        require_image_grid(handoff.latent_grid)
        return self.engine.prepare(handoff, cond_kv, uncond_kv, on_step)

    def submit(self, job: DenoiseJob) -> None:
        self.engine.submit(job)

    @property
    def has_work(self) -> bool:
        return self.engine.has_work

    def step(self) -> list[tuple[DenoiseJob, DecodedImage | BaseException]]:
        """One engine step; finished jobs come back decoded (jobs of one grid in one VAE call)."""
        finished = self.engine.step()
        results: list[tuple[DenoiseJob, DecodedImage | BaseException]] = []
        by_grid: dict[tuple, list[DenoiseJob]] = {}
        for job in finished:
            if job.error is not None:
                results.append((job, job.error))
            elif job.cancelled:
                results.append((job, RuntimeError(f"request {job.request_id} was cancelled")))
            else:
                by_grid.setdefault(job.grid, []).append(job)
        for grid, jobs in by_grid.items():
            try:
                results += zip(jobs, self.decode(grid, [j.x for j in jobs]))
            except Exception as e:
                results += [(j, e) for j in jobs]
        return results

    def decode(self, grid, latents: list[torch.Tensor]) -> list[DecodedImage]:
        t, h, w = grid
        z = torch.stack([x.view(t, h, w, -1) for x in latents])        # [B, t, h, w, C]
        images = self.decoder(z.permute(0, 4, 1, 2, 3).to(self.dtype))  # [B, 3, H, W]
        out = []
        for x, img in zip(latents, images):
            pixels = decode_to_uint8(img[:, None]).squeeze(0).cpu()      # [H, W, 3]
            buf = io.BytesIO()
            Image.fromarray(pixels.numpy()).save(buf, format="PNG")
            out.append(DecodedImage(buf.getvalue(), pixels.shape[1], pixels.shape[0],
                                    x.view(t, h, w, -1).cpu(), img.float().cpu(), pixels))
        return out
