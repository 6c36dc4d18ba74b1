"""Helpers the tests share (fixtures live in conftest.py): images as the API takes them, hand-offs built
from the golden contexts (recorded K/V and positions), and the loop that drives a DiT runner."""
from __future__ import annotations

import base64
import io

import torch
from PIL import Image

from stages.lance.handoff import BranchKV, ContextHandoff
from stages.lance.requests import DenoiseParams


# vLLM engine arguments of the tests that run a Thinker in-process (tiny checkpoint, fp32 on a CPU)
THINKER_ENGINE_ARGS = {"dtype": "float32", "max_model_len": 1024, "max_num_seqs": 4, "block_size": 32,
                       "enable_prefix_caching": True, "cpu_kv_cache_space_gib": 0.25}


# --- images as clients send them -----------------------------------------------------------------------

def png_bytes(image: Image.Image | None = None, fmt: str = "PNG") -> bytes:
    """`image` encoded as `fmt`; by default a small solid red PNG."""
    image = Image.new("RGB", (40, 30), (200, 30, 30)) if image is None else image
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


# --- hand-offs from the golden contexts ------------------------------------------------------------------

# VAE tokens before the target in the upstream sample (an edit's reference block)
REFERENCE_TOKENS = {"t2i": 0, "image_edit": 266, "t2v": 0, "i2v": 0, "video_edit": 504}


def golden_condition(g: dict, case: str) -> torch.Tensor | None:
    """i2v's frame condition: the first latent frame (h*w rows) of the posterior-sampled condition latent."""
    if case != "i2v":
        return None
    t, h, w, c = g["cond_latent_sampled"].shape
    return g["cond_latent_sampled"][0].reshape(h * w, c)


def golden_branch(g: dict, branch: str, length: int | None = None) -> BranchKV:
    k, v = g[f"ctx_{branch}_K"], g[f"ctx_{branch}_V"]
    if length is not None:
        k, v = k[:, :length], v[:, :length]
    return BranchKV((k, v), k.shape[1], g[f"query_position_ids_{branch}"])


def golden_handoff(g: dict, case: str, params: DenoiseParams = DenoiseParams(), request_id: str | None = None,
                   with_uncond: bool = True, with_noise: bool = False) -> ContextHandoff:
    """The golden request as the thinker hands it over; `with_noise`: with upstream's recorded initial
    noise (`latents=`) instead of the seed's draw."""
    grid = tuple(g["final_latent"].shape[:3])
    return ContextHandoff(request_id or case, case, grid, params, golden_branch(g, "cond"),
                          golden_branch(g, "uncond") if with_uncond else None,
                          num_reference_tokens=REFERENCE_TOKENS[case],
                          initial_noise=g["noise_all_vae_tokens"] if with_noise else None,
                          condition_latents=golden_condition(g, case))


def golden_video_params(g: dict) -> DenoiseParams:
    """The video goldens' knobs: their own step count, otherwise upstream's defaults."""
    return DenoiseParams(num_inference_steps=g["dts"].numel())


def grid_positions(anchor: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Target-block positions [3, n + 2] of a (1, h, w) image block whose <|vision_start|> is at `anchor`."""
    _, h, w = grid
    hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    body = torch.stack([torch.full((h * w,), anchor + 1), anchor + 1 + hh.reshape(-1), anchor + 1 + ww.reshape(-1)])
    end = torch.full((3, 1), anchor + 2 + max(h - 1, w - 1))
    return torch.cat([torch.full((3, 1), anchor), body, end], dim=1)


def synthetic_handoff(g: dict, request_id: str, grid, params: DenoiseParams, cond_len: int,
                      uncond_len: int | None) -> ContextHandoff:
    """A request on a grid of our choosing over a prefix of the golden contexts (any cache is a valid cache)."""
    n = grid[0] * grid[1] * grid[2]

    def branch(name, length):
        k, v = g[f"ctx_{name}_K"][:, :length], g[f"ctx_{name}_V"][:, :length]
        return BranchKV((k, v), length, grid_positions(length, grid))

    assert n > 0
    return ContextHandoff(request_id, "t2i", tuple(grid), params, branch("cond", cond_len),
                          branch("uncond", uncond_len) if uncond_len is not None else None)


# --- driving a DiT runner ----------------------------------------------------------------------------------

def drive_runner(runner, handoffs: list[ContextHandoff], frame_sinks: list | None = None) -> list:
    """Submit every hand-off to a `DiTRunner`, step it until it is idle, and return each request's
    result in order (a request's error is raised). `frame_sinks`: each video's `on_frames` (None: none)."""
    frame_sinks = frame_sinks or [None] * len(handoffs)
    jobs = [runner.prepare(h, h.cond.fetch(), h.uncond.fetch() if h.uncond is not None else None, on_frames=sink)
            for h, sink in zip(handoffs, frame_sinks)]
    for job in jobs:
        runner.submit(job)
    results = {}
    while runner.has_work:
        for job, result in runner.step():
            results[job] = result
    out = [results[job] for job in jobs]
    for result in out:
        if isinstance(result, BaseException):
            raise result
    return out
