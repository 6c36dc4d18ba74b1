"""Lance's latent-token embeddings: timestep embedder and the 3-D sin-cos latent position table.

A latent token enters the LLM as `vae2llm(x) + time_embedder(sigma) + latent_pos_embed[t*S*S + h*S + w]`
(lance_spec.md §3.2, §3.3); ids restart at 0 for every VAE block.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import TIMESTEP_FREQ_DIM


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double().reshape(-1, 1) * omega
    return torch.cat([out.sin(), out.cos()], dim=1)  # sin half first


def _sincos_3d(hidden_size: int, coords: torch.Tensor) -> torch.Tensor:
    """coords [3, M] (t, h, w) -> [M, hidden]; dims t/h = hidden//3 rounded down to even, w the rest."""
    d = hidden_size // 3
    d -= d % 2
    return torch.cat([_sincos_1d(d, coords[0]), _sincos_1d(d, coords[1]),
                      _sincos_1d(hidden_size - 2 * d, coords[2])], 1).float()


def _grid_coords(t: int, h: int, w: int) -> torch.Tensor:
    return torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)


def latent_pos_embed_table(hidden_size: int, frames: int, size: int) -> torch.Tensor:
    """upstream's PositionEmbedding3D table [frames*size*size, hidden], rows ordered (t, h, w)."""
    return _sincos_3d(hidden_size, _grid_coords(frames, size, size))


def latent_pos_embed(hidden_size: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """The table's rows for a (t, h, w) latent block (ids restart at 0 per block), computed directly:
    the same values as indexing the table, without building a 31x64x64 table."""
    return _sincos_3d(hidden_size, _grid_coords(*grid))


def embed_latent_tokens(vae2llm: nn.Module, latents: torch.Tensor, timestep_embedding: torch.Tensor,
                        position_embedding: torch.Tensor) -> torch.Tensor:
    """How a VAE latent token enters the LLM: vae2llm(x) + time_embedder(sigma) + its latent position row.

    The one formula the model core, the thinker (reference latents at sigma 0) and the DiT's packed
    forward all use; each computes the two embeddings its own way (cached, batched, broadcast).
    """
    return vae2llm(latents) + timestep_embedding + position_embedding


def timestep_features(sigma: torch.Tensor, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """DiT sinusoidal features of sigma in [0, 1] (used directly, no x1000): [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = sigma.reshape(-1, 1).float() * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, freq_dim: int = TIMESTEP_FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(sigma, self.freq_dim).to(self.mlp[0].weight.dtype))
