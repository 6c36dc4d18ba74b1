"""The part of Lance the DiT stage holds: the MoT layers, the generation connectors, two marker rows.

The denoising query is `[<|vision_start|>, latents, <|vision_end|>]`, so of the token embedding table
only those two rows are used, and nothing reads `lm_head`. `load_dit_model` builds the model core's
`LanceModel` on the meta device, swaps the embedding for a two-row table (row 0 = vision_start,
row 1 = vision_end) and drops `lm_head`, then materialises and fills only what is left, tensor by
tensor, straight onto the target device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from stages.lance.checkpoint import (
    CheckpointFiles, SafetensorsFile, check_keys, expected_llm_tensor_shapes, load_lance_config,
)
from stages.lance.config import LanceConfig
from stages.lance.model import LanceModel
from stages.lance.weights import BUNDLED_VIT_PREFIX, EMBED_TOKENS_NAME, POSITION_TABLE_NAME

log = logging.getLogger(__name__)

# Checkpoint parts the DiT never reads (stages.lance.weights.CHECKPOINT_PARTS).
SKIPPED_PARTS = ("lm_head", "bundled_vit")
# Index of each marker in the two-row table; callers pass these as the "token ids" of the markers.
MARKER_IDS = torch.tensor([0, 1])


@dataclass(frozen=True)
class MemoryReport:
    parameters: int
    parameter_bytes: int
    buffer_bytes: int

    def __str__(self) -> str:
        return (f"{self.parameters / 1e9:.3f} B parameters, {self.parameter_bytes / 2**30:.2f} GiB "
                f"(+{self.buffer_bytes / 2**20:.1f} MiB buffers)")


def memory_report(module: nn.Module) -> MemoryReport:
    params = list(module.parameters())
    return MemoryReport(sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params),
                        sum(b.numel() * b.element_size() for b in module.buffers()))


def marker_token_ids(cfg: LanceConfig, files: CheckpointFiles | None = None) -> tuple[int, int]:
    """Ids of <|vision_start|> and <|vision_end|>: from llm_config.json, else from the tokenizer."""
    raw = cfg.raw_llm_config
    if "vision_start_token_id" in raw and "vision_end_token_id" in raw:
        return int(raw["vision_start_token_id"]), int(raw["vision_end_token_id"])
    if files is None:
        raise ValueError("llm_config.json has no vision_start/end_token_id and no tokenizer was given")
    from stages.lance.checkpoint import load_tokenizer

    tok = load_tokenizer(files)
    return tok.convert_tokens_to_ids("<|vision_start|>"), tok.convert_tokens_to_ids("<|vision_end|>")


def build_dit_model(cfg: LanceConfig, device: torch.device | str, dtype: torch.dtype) -> LanceModel:
    """A `LanceModel` with a two-row marker embedding and no lm_head, uninitialised, on `device`."""
    with torch.device("meta"):
        model = LanceModel(cfg)
    lm = model.language_model
    lm.embed_tokens = nn.Embedding(2, cfg.llm.hidden_size, device="meta")
    lm.lm_head = None
    model = model.to(dtype).to_empty(device=device)  # cast on meta: no full-size fp32 copy anywhere
    model.requires_grad_(False)
    return model.eval()


def random_init_(model: LanceModel, seed: int = 0, std: float = 0.02) -> LanceModel:
    """Random weights of the checkpoint's statistics (matrices/biases N(0, std^2), norms 1 + 0.1 N(0, 1)),
    drawn on the model's device in fp32 (for benchmarks and tests; never a stand-in for real weights)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            is_norm = p.dim() == 1 and ("norm" in name or "layernorm" in name)
            p.copy_(1 + 0.1 * x if is_norm else std * x)
    return model


def load_dit_model(files: CheckpointFiles, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   cfg: LanceConfig | None = None) -> tuple[LanceModel, LanceConfig]:
    """Load what the DiT needs from the variant's model.safetensors (strict accounting, lazy reads)."""
    cfg = cfg or load_lance_config(files)
    path = files.llm_weights_path
    st = SafetensorsFile(path)
    expected = expected_llm_tensor_shapes(cfg)
    check_keys(st.shapes(), expected, allowed_unexpected=(BUNDLED_VIT_PREFIX,), source=str(path))
    model = build_dit_model(cfg, device, dtype)
    markers = list(marker_token_ids(cfg, files))

    def reader(name: str):
        if name == EMBED_TOKENS_NAME:
            return lambda: _read_rows(st, name, markers).to(device=device, dtype=dtype)
        if name == POSITION_TABLE_NAME:  # only checked against the recomputed table, on the CPU
            return lambda: st.get(name, dtype=torch.float32)
        return lambda: st.get(name, dtype=dtype, device=device)

    model.load_weights(((name, reader(name)) for name in st.names()), skip_parts=SKIPPED_PARTS).check(f"{path} (DiT)")
    st.close()
    log.info("DiT model loaded from %s: %s", path, memory_report(model))
    return model, cfg


def _read_rows(st: SafetensorsFile, name: str, rows: list[int]) -> torch.Tensor:
    """Just the given rows of a 2-D tensor (not the 150k-row embedding table)."""
    from safetensors import safe_open

    with safe_open(str(st.path), framework="pt", device="cpu") as f:
        sl = f.get_slice(name)
        return torch.stack([sl[r:r + 1][0] for r in rows])
