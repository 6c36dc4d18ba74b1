"""`DiTRunner`: the DiT stage without Ray - load, denoise hand-offs in shared steps, decode to images.

Synchronous and single-threaded by design (the deployment calls it from one worker thread): `prepare`
validates a hand-off, `submit` queues it, `step` advances every active request by one denoising step
and returns the finished ones decoded (`DecodedImage`: pixels; encoding to PNG/WebP/JPEG is
the caller's, off this thread: encode.py). A finished video is decoded one latent frame per `step`
(video.py), interleaved with the other requests' denoising; its frames go to the request's frame sink
as they are decoded (encoding to MP4 is the caller's too), and `step` returns its `DecodedVideo` after
the last one.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import torch

from stages.lance.checkpoint import resolve_checkpoint
from stages.lance.config import LanceConfig
from stages.lance.handoff import ContextHandoff
from stages.lance.limits import torch_dtype
from stages.lance.model import LanceModel
from stages.lance.requests import ImageEncoding
from stages.lance.vae import LanceVAE, decode_to_uint8

from .encode import encode_pixels
from .engine import DenoiseEngine, DenoiseJob, DiTRequestError
from .model import load_dit_model, memory_report
from .quantize import quantize_dit_model
from .vae_decode import FrameDecoder
from .video import DecodedVideo, FrameSink, VideoDecode

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
    """`compile` on a GPU: fused Triton element-wise kernels, the MLP's gate_up GEMM with SwiGLU in its
    epilogue (Hopper or newer), CUDA graphs per batch shape, and the fastest attention
    benchmarks/bench_dit.py measured on an H100: FlashAttention-4 where the `flash-attn-4` package is
    installed (the `gpu` extra), else cuDNN through SDPA; otherwise plain torch ops."""
    if not (compile and device.type == "cuda"):
        return {"kernels": "torch"}
    from torch.nn.attention import SDPBackend

    return {"kernels": "triton", "cuda_graphs": True, "attention_kernel": "flash_attn_4",
            "attention_backends": [SDPBackend.CUDNN_ATTENTION], "gate_up_kernel": "triton_swiglu"}


def require_image_grid(latent_grid) -> None:
    """Image-only paths (the CFG-parallel DiT) decode one latent frame."""
    grid = tuple(latent_grid)
    if len(grid) == 3 and grid[0] != 1:
        raise DiTRequestError(f"the DiT stage makes images (one latent frame); got latent_grid {grid}",
                              param="latent_grid")


@dataclass(eq=False)
class DecodedImage:
    """A finished image: uint8 pixels on the host, and (only when asked for) the debug tensors.

    On a GPU the pixels' device-to-host copy may still be in flight when the engine hands the image
    over: `wait()` (called by `encode`, on an encoder thread) blocks until `ready` has completed.
    """

    pixels: torch.Tensor                  # [H, W, 3] uint8 on the CPU (pinned on a GPU host)
    width: int
    height: int
    ready: object = None                  # torch.cuda.Event recorded after the copy; None: already there
    latents: torch.Tensor | None = None   # [t, h, w, channels] fp32 on the CPU (debug_outputs only)
    image: torch.Tensor | None = None     # [3, H, W] decoded, in [-1, 1], fp32 on the CPU (debug_outputs only)

    def wait(self) -> torch.Tensor:
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return self.pixels

    def encode(self, encoding: ImageEncoding = ImageEncoding()) -> bytes:
        return encode_pixels(self.wait(), encoding)

    def __getstate__(self):   # crosses processes (CFG-parallel ranks) as plain host tensors
        self.wait()
        return dict(self.__dict__)

    @functools.cached_property
    def png(self) -> bytes:
        """The default encoding (PNG, zlib level 6)."""
        return self.encode()


class DiTRunner:
    def __init__(self, model: str, variant: str | None = None, dtype: str | torch.dtype = "auto",
                 device: str = "auto", max_batch_size: int = 8, compile: bool = True, forward: str = "fast",
                 quantization: str | None = None, debug_outputs: bool = False):
        """`quantization`: None or "fp8" (GPU: DiT linear weights held in FP8 E4M3, see quantize.py).
        `debug_outputs`: also copy each image's final latents and float image to the host (tests)."""
        device_ = resolve_device(device)
        dtype_ = resolve_dtype(dtype, device_)
        t0 = time.perf_counter()
        files = resolve_checkpoint(model, variant, need_vit=False, need_vae=True)
        dit, config = load_dit_model(files, device_, dtype_)
        vae = LanceVAE.from_wan22_pth(files.vae_path, dtype=dtype_, device=device_, encoder=False)
        self._assemble(dit, config, vae, max_batch_size, compile, forward, quantization, debug_outputs)
        log.info("DiT stage ready in %.1fs on %s (%s): %s", time.perf_counter() - t0, self.device, self.dtype,
                 self.memory())

    @classmethod
    def from_loaded(cls, model: LanceModel, config: LanceConfig, vae: LanceVAE, max_batch_size: int = 8,
                    compile: bool = True, forward: str = "fast", quantization: str | None = None,
                    debug_outputs: bool = False) -> "DiTRunner":
        """A runner on an already built DiT model and VAE decoder (benchmarks: random weights of the real shapes)."""
        runner = cls.__new__(cls)
        runner._assemble(model, config, vae, max_batch_size, compile, forward, quantization, debug_outputs)
        return runner

    def _assemble(self, model, config, vae, max_batch_size, compile, forward, quantization, debug_outputs):
        self.model, self.config, self.vae = model, config, vae
        self.device = model.vae2llm.weight.device
        self.dtype = model.vae2llm.weight.dtype
        self.debug_outputs = debug_outputs
        self.quantization = quantize_dit_model(model, quantization)
        self.decoder = FrameDecoder(vae)
        self.engine = DenoiseEngine(model, forward, max_batch_size=max_batch_size,
                                    **fast_path_options(compile, self.device))
        self._frame_sinks: dict[DenoiseJob, FrameSink | None] = {}   # video jobs -> where their frames go
        self.decoding: list[VideoDecode] = []

    def memory(self) -> dict:
        """Bytes held by this stage: DiT weights, VAE decoder weights, and (GPU) allocator figures."""
        dit, vae = memory_report(self.model), memory_report(self.vae)
        out = {"dit_parameters": dit.parameters, "dit_parameter_bytes": dit.parameter_bytes,
               "vae_decoder_parameters": vae.parameters, "vae_decoder_parameter_bytes": vae.parameter_bytes}
        if self.device.type == "cuda":
            out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out

    def prepare(self, handoff: ContextHandoff, cond_kv, uncond_kv=None, on_step=None,
                on_frames: FrameSink | None = None) -> DenoiseJob:
        """A job for the hand-off. Videos (`handoff.is_video`) are decoded chunk by chunk after denoising:
        `on_frames(latent frames done, total, uint8 frames)` gets each chunk (None: the frames are
        collected into the `DecodedVideo`)."""
        job = self.engine.prepare(handoff, cond_kv, uncond_kv, on_step)
        if handoff.is_video:
            self._frame_sinks[job] = on_frames
        return job

    def submit(self, job: DenoiseJob) -> None:
        self.engine.submit(job)

    @property
    def has_work(self) -> bool:
        return self.engine.has_work or bool(self.decoding)

    def step(self) -> list[tuple[DenoiseJob, DecodedImage | DecodedVideo | BaseException]]:
        """One engine step, then one latent frame of each video being decoded; finished jobs come back
        decoded (images of one grid in one VAE call)."""
        finished = self.engine.step()
        results: list[tuple[DenoiseJob, DecodedImage | DecodedVideo | BaseException]] = []
        by_grid: dict[tuple, list[DenoiseJob]] = {}
        for job in finished:
            is_video = job in self._frame_sinks
            sink = self._frame_sinks.pop(job, None)
            if job.error is not None:
                results.append((job, job.error))
            elif job.cancelled:
                results.append((job, RuntimeError(f"request {job.request_id} was cancelled")))
            elif is_video:
                self.decoding.append(VideoDecode.start(self.vae, job, self.dtype, sink))
            else:
                by_grid.setdefault(job.grid, []).append(job)
        for grid, jobs in by_grid.items():
            try:
                results += zip(jobs, self.decode(grid, [j.x for j in jobs]))
            except Exception as e:
                results += [(j, e) for j in jobs]
        results += self._advance_decodes()
        return results

    def _advance_decodes(self) -> list[tuple[DenoiseJob, DecodedVideo | BaseException]]:
        results, still = [], []
        for d in self.decoding:
            if d.job.cancelled:
                d.chunks.close()
                results.append((d.job, RuntimeError(f"request {d.job.request_id} was cancelled")))
                continue
            try:
                video = d.advance()
            except Exception as e:   # a failed decode fails its request, not the engine
                d.chunks.close()
                results.append((d.job, e))
                continue
            if video is None:
                still.append(d)
            else:
                results.append((d.job, video))
        self.decoding = still
        return results

    def decode(self, grid, latents: list[torch.Tensor]) -> list[DecodedImage]:
        """Final latents of one grid -> images, in one VAE call. Only the uint8 pixels go to the host
        (plus latents and float image with `debug_outputs`); on a GPU that copy is asynchronous."""
        t, h, w = grid
        z = torch.stack([x.view(t, h, w, -1) for x in latents])        # [B, t, h, w, C]
        images = self.decoder(z.permute(0, 4, 1, 2, 3).to(self.dtype))  # [B, 3, H, W]
        pixels = decode_to_uint8(images.transpose(0, 1))                # [B, H, W, 3] on the device (B as frames)
        ready = None
        if pixels.device.type == "cuda":
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            pixels = host
        out = []
        for i, x in enumerate(latents):
            debug = {}
            if self.debug_outputs:
                debug = {"latents": x.view(t, h, w, -1).cpu(), "image": images[i].float().cpu()}
            out.append(DecodedImage(pixels[i], pixels.shape[2], pixels.shape[1], ready, **debug))
        return out

