"""`LanceModel`: the MoT language model plus Lance's generation connectors, loaded from the real layout.

Submodules mirror upstream's `class Lance` (language_model, time_embedder, vae2llm, llm2vae); the 3-D
latent position table is computed, not loaded (upstream pops the stored one). A stage loads only what
it needs: `load_weights(skip_parts=...)` leaves out checkpoint parts (the DiT has no lm_head).
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from .config import LanceConfig
from .embeddings import TimestepEmbedder, embed_latent_tokens, latent_pos_embed
from .transformer import MoTLanguageModel
from .weights import WeightsLoader, WeightTarget, shard_slice

log = logging.getLogger(__name__)


class LanceModel(nn.Module):
    def __init__(self, config: LanceConfig):
        super().__init__()
        llm, latent = config.llm, config.latent
        self.config = config
        self.language_model = MoTLanguageModel(llm)
        self.time_embedder = TimestepEmbedder(llm.hidden_size)
        self.vae2llm = nn.Linear(latent.channels, llm.hidden_size)
        self.llm2vae = nn.Linear(llm.hidden_size, latent.channels)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self._loader: WeightsLoader | None = None  # the last load_weights, for missing_parameters

    # --- embeddings of the two token kinds -------------------------------------------------------

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(ids)

    def latent_positions(self, grid: tuple[int, int, int]) -> torch.Tensor:
        key = (grid, self.vae2llm.weight.device, self.vae2llm.weight.dtype)
        if key not in self._pos_cache:
            rows = latent_pos_embed(self.config.llm.hidden_size, grid)
            self._pos_cache[key] = rows.to(self.vae2llm.weight.device, self.vae2llm.weight.dtype)
        return self._pos_cache[key]

    def embed_latents(self, latents: torch.Tensor, sigma: torch.Tensor, grid: tuple[int, int, int],
                      clean_rows: int = 0) -> torch.Tensor:
        """latents [..., thw, 48], sigma scalar or [...] -> vae2llm(x) + time_embedder(sigma) + pos.

        The first `clean_rows` latent rows are clean conditioning (i2v's first latent frame): they are
        embedded at timestep 0 whatever sigma is, as upstream does for pinned frames."""
        temb = self.time_embedder(sigma.reshape(-1)).to(latents.dtype)  # [B or 1, hidden]
        temb = temb.view(*sigma.shape, 1, -1) if sigma.dim() else temb
        pos = self.latent_positions(grid)
        if not clean_rows:
            return embed_latent_tokens(self.vae2llm, latents, temb, pos)
        zero = self.time_embedder(sigma.new_zeros(1)).to(latents.dtype)[0]
        clean = embed_latent_tokens(self.vae2llm, latents[..., :clean_rows, :], zero, pos[:clean_rows])
        noisy = embed_latent_tokens(self.vae2llm, latents[..., clean_rows:, :], temb, pos[clean_rows:])
        return torch.cat([clean, noisy], dim=-2)

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm2vae(hidden)

    # --- loading ----------------------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]],
                     skip_parts: Iterable[str] = ("bundled_vit", "vit_file")) -> WeightsLoader:
        """Copy checkpoint tensors into our (fused) parameters; `stages.lance.weights` routes and accounts.

        `skip_parts`: the checkpoint parts this copy of the model leaves out (the ViT is a model of its
        own; the DiT has no lm_head). The stored position table is only checked against ours. Returns
        the loader: `.check(source)` raises unless every parameter was filled and nothing was unexpected.
        """
        params = dict(self.named_parameters())
        llm = self.config.llm
        q, kv = llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim

        def fill(target: WeightTarget, tensor: torch.Tensor) -> None:
            dst = params[target.param].data[shard_slice(target.shard, q, kv, llm.intermediate_size)]
            if dst.shape != tensor.shape:
                raise ValueError(f"{target.param}: checkpoint shape {tuple(tensor.shape)} != expected {tuple(dst.shape)}")
            dst.copy_(tensor)

        self._loader = WeightsLoader(params, fill, skip_parts=skip_parts,
                                     part_loaders={"position_table": lambda _, t: self._check_position_table(t)})
        return self._loader.load(tensors)

    def missing_parameters(self) -> list[str]:
        """Parameters (or fused shards) that `load_weights` has not filled (all of them before a load)."""
        names = [n for n, _ in self.named_parameters()]
        if self._loader is None:
            return WeightsLoader(names, fill=None).missing()
        return self._loader.missing(names)

    def _check_position_table(self, stored: torch.Tensor) -> None:
        # The stored table's t=0 rows must equal ours (the goldens show they are bit-identical).
        if stored.is_meta:
            return
        size = self.config.latent.max_latent_size
        ours = latent_pos_embed(self.config.llm.hidden_size, (1, size, size))
        rows = stored[: size * size].float().cpu()
        diff = (rows - ours).abs().max().item() if rows.shape == ours.shape else float("inf")
        if diff > 1e-4:
            log.warning("stored latent_pos_embed differs from the recomputed sin-cos table (max |diff| %.3g); "
                        "using the recomputed table as upstream does", diff)
