"""How the thinker starts vLLM on a Lance checkpoint: the generated HF config and the engine arguments.

The checkpoint keeps upstream's layout (`Lance_3B/llm_config.json`, no `config.json`), and it may be
read-only, so vLLM gets a config directory we write into a cache: the checkpoint's own
`llm_config.json` with our architecture name, the ViT's `config.json` as `vision_config`, a `lance`
section with the token ids the model needs, and a copy of the (small) tokenizer files. vLLM's `model`
stays the variant folder, so the weights are read from the checkpoint itself (no converted copy).

Engine arguments come from the stage graph (vLLM's own names, as data) and pass through as given.
A few must have one value for the model to be exact (`REQUIRED_ENGINE_ARGS`): they are filled in
when absent, and any other value is an error, never silently replaced (the stage graph's schema
rejects such values first, with the same reasons).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stages.lance.checkpoint import CheckpointFiles, lance_serve_cache_dir, load_tokenizer, read_vit_config
from stages.lance.config import SpecialTokens

VLLM_ARCHITECTURE = "LanceThinkerForConditionalGeneration"
CONNECTOR_MODULE = "stages.thinker.connector"
CONNECTOR_NAME = "LanceContextExportConnector"
# Copied beside the generated config so vLLM's tokenizer loader finds a config.json next to them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja")

# Engine arguments Lance's thinker cannot do without:
# - eager mode: bidirectional blocks and MoT routing are decided per step from the token ids (data-dependent
#   Python, not capturable by torch.compile / CUDA graphs);
# - a visual block is never split across two scheduler steps (its tokens attend to the whole block);
# - vLLM's own generation_config.json defaults stay out of the way (upstream decodes greedily by hand).
REQUIRED_ENGINE_ARGS = {"enforce_eager": True, "disable_chunked_mm_input": True, "generation_config": "vllm"}
# Stage-graph keys that are ours, not vLLM's.
_OWN_KEYS = ("cpu_kv_cache_space_gib",)


@dataclass(frozen=True)
class LanceTokenIds:
    """Ids the vLLM model and its processor use, fixed when the config is generated."""

    vision_start: int
    vision_end: int
    vit_pad: int          # ViT slots (upstream's <|video_pad|>)
    gen_pad: int          # reference-latent slots: reserved id past the tokenizer, routed to the gen expert
    anchor: int           # compact-prompt marker of an anchor item (reserved id, never in the final prompt)
    im_end: int
    len_tokenizer: int    # logits >= this are masked, as upstream does

    @classmethod
    def from_tokens(cls, tokens: SpecialTokens, vocab_size: int) -> "LanceTokenIds":
        # Two embedding rows past the tokenizer that Lance never uses and never samples (upstream masks logits
        # >= len(tokenizer)): the gen expert's slots can be told apart from any token the model may generate.
        if tokens.len_tokenizer + 2 > vocab_size:
            raise ValueError(f"the checkpoint's vocab_size {vocab_size} leaves no reserved rows past the tokenizer's "
                             f"{tokens.len_tokenizer} tokens (need 2)")
        return cls(vision_start=tokens.vision_start, vision_end=tokens.vision_end, vit_pad=tokens.visual_pad,
                   gen_pad=tokens.len_tokenizer, anchor=tokens.len_tokenizer + 1, im_end=tokens.im_end,
                   len_tokenizer=tokens.len_tokenizer)


def default_cache_dir() -> Path:
    return lance_serve_cache_dir()


def vllm_hf_config(files: CheckpointFiles, tokenizer) -> dict:
    """The HF config vLLM loads for a Lance checkpoint (see the module docstring)."""
    raw = json.loads(files.llm_config_path.read_text())
    tokens = SpecialTokens.from_config_and_tokenizer(raw, tokenizer)
    ids = LanceTokenIds.from_tokens(tokens, raw["vocab_size"])
    cfg = dict(raw)
    cfg["architectures"] = [VLLM_ARCHITECTURE]
    cfg["tie_word_embeddings"] = False  # upstream unties; lm_head is its own tensor
    if files.vit_dir is not None:  # upstream builds the ViT from this file, not from llm_config's copy
        vit = read_vit_config(files)
        cfg["vision_config"] = {k: v for k, v in vit.items() if k not in ("model_type",) and not k.startswith("_")}
    cfg["lance"] = {"variant": files.variant, "vit_dir": str(files.vit_dir) if files.vit_dir else None,
                    "token_ids": ids.__dict__}
    return cfg


def write_vllm_config_dir(files: CheckpointFiles, tokenizer=None, cache_dir: Path | None = None) -> Path:
    """Write (once per content) the generated config into the cache; returns its directory."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(files)
    cfg = vllm_hf_config(files, tokenizer)
    text = json.dumps(cfg, indent=2, sort_keys=True)
    out = (cache_dir or default_cache_dir()) / "vllm-config" / hashlib.sha256(text.encode()).hexdigest()[:16]
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (files.llm_dir / name).is_file():
                _atomic_write(out / name, (files.llm_dir / name).read_bytes())
        _atomic_write(out / "config.json", text.encode())  # last: its presence marks a complete directory
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(data)
    os.replace(f.name, path)  # replicas may race on a shared cache


def engine_kwargs(files: CheckpointFiles, config_dir: Path, stage_engine_args: dict,
                  connector_extra: dict | None = None, export_kv: bool = True) -> dict:
    """AsyncEngineArgs keyword arguments: the stage graph's (vLLM names) + what the model needs."""
    args = {k: v for k, v in stage_engine_args.items() if k not in _OWN_KEYS and v is not None}
    gib = stage_engine_args.get("cpu_kv_cache_space_gib")
    if gib is not None:
        args["kv_cache_memory_bytes"] = int(float(gib) * 2**30)
    for key, value in REQUIRED_ENGINE_ARGS.items():
        if args.setdefault(key, value) != value:
            raise ValueError(f"thinker engine arg {key}={args[key]!r}: the Lance thinker needs {value!r}")
    if "max_model_len" not in args:
        raise ValueError("thinker engine args need max_model_len (the stage graph's thinker.engine.max_model_len)")
    # A visual block must fit one step (it may be as long as the context): budget a whole prompt per step.
    max_len = args["max_model_len"]
    if args.setdefault("max_num_batched_tokens", max_len) < max_len:
        raise ValueError(f"thinker engine arg max_num_batched_tokens={args['max_num_batched_tokens']} is below "
                         f"max_model_len={max_len}: a visual block is never split across scheduler steps")
    args.update(
        model=str(files.llm_dir),
        tokenizer=str(config_dir),
        hf_config_path=str(config_dir),
        skip_mm_profiling=True,
    )
    if export_kv:
        args["kv_transfer_config"] = {
            "kv_connector": CONNECTOR_NAME,
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_producer",
            "kv_connector_extra_config": dict(connector_extra or {}),
        }
    return args
