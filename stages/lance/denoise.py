"""The denoising forward and loop of Lance's generation path, shared by the offline pipeline and the DiT.

Each step queries the target block `[<|vision_start|>, latents, <|vision_end|>]` non-causally against a
branch's context cache without updating it (markers through the und expert, latents through gen).
On CFG steps the cond and text-uncond branches run as one batched forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .model import LanceModel
from .scheduler import FlowMatchEulerScheduler
from .transformer import KVCache


@dataclass
class BranchState:
    """A branch's context cache [1, L, Hkv, d] per layer and its target query positions [3, n+2]."""

    cache: KVCache
    query_positions: torch.Tensor


def initial_noise(num_target: int, num_reference: int, seed: int, channels: int, device, dtype) -> torch.Tensor:
    """Upstream's seeded noise: drawn over *all* VAE tokens of the sample, the target takes the last rows."""
    g = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(num_reference + num_target, channels, generator=g, device=device, dtype=dtype)
    return noise[num_reference:]


def batch_caches(caches: list[KVCache]) -> KVCache:
    """Stack single-row caches of different lengths into one padded cache with a validity mask."""
    if len(caches) == 1:
        return caches[0]
    length = max(c.length for c in caches)
    ref = caches[0].keys[0]
    valid = torch.zeros(len(caches), length, dtype=torch.bool, device=ref.device)
    for b, c in enumerate(caches):
        valid[b, :c.length] = True

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, 0, 0, 0, 0, length - t.shape[1]))

    n_layers = len(caches[0].keys)
    keys = [torch.cat([pad(c.keys[i]) for c in caches]) for i in range(n_layers)]
    values = [torch.cat([pad(c.values[i]) for c in caches]) for i in range(n_layers)]
    return KVCache(keys, values, None if bool(valid.all()) else valid)


def target_block_embeds(model: LanceModel, x: torch.Tensor, sigma: torch.Tensor, grid, markers: torch.Tensor,
                        clean_rows: int = 0):
    """[B, n+2, hidden]: embed(<|vision_start|>), latent embeddings at sigma (the first `clean_rows` at 0),
    embed(<|vision_end|>)."""
    batch = x.shape[0]
    lat = model.embed_latents(x, sigma, grid, clean_rows)
    mark = model.embed_tokens(markers).to(lat.dtype)  # [2, hidden]
    return torch.cat([mark[0].expand(batch, 1, -1), lat, mark[1].expand(batch, 1, -1)], dim=1)


def predict_velocity(model: LanceModel, x: torch.Tensor, sigma: torch.Tensor, grid, markers: torch.Tensor,
                     positions: torch.Tensor, cache: KVCache, clean_rows: int = 0) -> torch.Tensor:
    """One forward of B target blocks: x [B, n, 48], sigma [B], positions [B, 3, n+2] -> v [B, n, 48]
    (velocities of every row, the clean conditioning rows included)."""
    embeds = target_block_embeds(model, x, sigma, grid, markers, clean_rows)
    gen_mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=x.device)
    gen_mask[:, 0] = gen_mask[:, -1] = False
    hidden = model.language_model(embeds, positions, gen_mask=gen_mask, cache=cache)
    return model.velocity(hidden[:, 1:-1])


@torch.no_grad()
def denoise(model: LanceModel, scheduler: FlowMatchEulerScheduler, x: torch.Tensor, grid, markers: torch.Tensor,
            cond: BranchState, uncond: BranchState | None,
            on_step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor | None], None] | None = None,
            clean_rows: int = 0) -> torch.Tensor:
    """Euler-integrate x [n, 48] from sigma=1 to 0; `on_step(i, x_next, v_cond, v_uncond)` observes.

    The first `clean_rows` rows are clean conditioning (i2v's first latent frame): embedded at timestep
    0 and never updated, but their velocities are predicted and enter the global CFG renorm, as upstream.
    """
    both = batch_caches([cond.cache, uncond.cache]) if uncond is not None else None
    both_pos = torch.stack([cond.query_positions, uncond.query_positions]) if uncond is not None else None
    for i in range(scheduler.num_steps):
        sigma = scheduler.sigmas[i].to(x.device, x.dtype)
        if uncond is not None and scheduler.uses_cfg(i):
            v = predict_velocity(model, torch.stack([x, x]), sigma.expand(2), grid, markers, both_pos, both, clean_rows)
            v_cond, v_uncond = v[0], v[1]
            v_applied = scheduler.guide(v_cond, v_uncond)
        else:
            v_cond = predict_velocity(model, x[None], sigma[None], grid, markers, cond.query_positions[None],
                                      cond.cache, clean_rows)[0]
            v_uncond, v_applied = None, v_cond
        if clean_rows:
            x = torch.cat([x[:clean_rows], scheduler.step(x[clean_rows:], v_applied[clean_rows:], i)])
        else:
            x = scheduler.step(x, v_applied, i)
        if on_step is not None:
            on_step(i, x, v_cond, v_uncond)
    return x
