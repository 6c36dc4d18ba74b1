"""Find, open and account for the files of a Lance checkpoint.

A checkpoint is either a local directory laid out like the Hugging Face repo `bytedance-research/Lance`
(lance_spec.md §1.1), a path straight at one of its variant folders (`.../Lance_3B`), or a hub repo id, which is
downloaded with only the files the chosen variant needs. Weights are read lazily: shapes and names
come from the safetensors header alone, tensors are materialised one at a time.

Key accounting is strict: every tensor the model expects must be in the file with the expected shape,
and every tensor in the file must be expected, unless a caller allows a prefix explicitly.
"""
from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import LanceConfig
from .weights import BUNDLED_VIT_PREFIX, checkpoint_tensor_shapes

logger = logging.getLogger(__name__)

HUB_REPO_ID = "bytedance-research/Lance"
VARIANTS = ("Lance_3B", "Lance_3B_Video")
# The video fine-tune stores the 3-D (31-frame) latent position table and its own copy of the ViT.
VIDEO_VARIANTS = frozenset({"Lance_3B_Video"})

LLM_CONFIG_NAME = "llm_config.json"
LLM_WEIGHT_NAMES = ("model.safetensors", "ema.safetensors")  # upstream falls back to ema (lance_spec.md §1.5)
VIT_DIR_NAME = "Qwen2.5-VL-ViT"
VIT_CONFIG_NAME = "config.json"
VIT_WEIGHTS_NAME = "vit.safetensors"
VAE_FILE_NAME = "Wan2.2_VAE.pth"
TOP_CONFIG_NAME = "config.json"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ----------------------------------------------------------------------------------------------------
# Locating the files
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointFiles:
    """Where the parts of one Lance checkpoint variant live on disk."""

    root: Path
    llm_dir: Path
    vit_dir: Path | None
    vae_path: Path | None
    variant: str
    repo_id: str | None = None  # set when the files came from the hub

    @property
    def llm_config_path(self) -> Path:
        return self.llm_dir / LLM_CONFIG_NAME

    @property
    def llm_weights_path(self) -> Path:
        for name in LLM_WEIGHT_NAMES:
            if (self.llm_dir / name).is_file():
                return self.llm_dir / name
        raise FileNotFoundError(f"{self.llm_dir} has none of {', '.join(LLM_WEIGHT_NAMES)}")

    @property
    def vit_config_path(self) -> Path:
        return self._need_vit_dir() / VIT_CONFIG_NAME

    @property
    def vit_weights_path(self) -> Path:
        return self._need_vit_dir() / VIT_WEIGHTS_NAME

    def _need_vit_dir(self) -> Path:
        if self.vit_dir is None:
            raise FileNotFoundError(f"checkpoint {self.root} has no {VIT_DIR_NAME}/ folder")
        return self.vit_dir


def lance_serve_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where lance-serve keeps what it generates (tiny checkpoint, vLLM config dirs):
    $LANCE_SERVE_CACHE_DIR, else $XDG_CACHE_HOME/lance-serve, else ~/.cache/lance-serve."""
    env = os.environ if env is None else env
    if env.get("LANCE_SERVE_CACHE_DIR"):
        return Path(env["LANCE_SERVE_CACHE_DIR"])
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lance-serve"


def hub_allow_patterns(variant: str = "Lance_3B", need_vit: bool = True, need_vae: bool = True) -> list[str]:
    """The files of the hub repo that one variant needs (the whole repo is ~57 GB)."""
    _check_variant_name(variant)
    patterns = [f"{variant}/*", TOP_CONFIG_NAME]
    if need_vit:
        patterns.append(f"{VIT_DIR_NAME}/*")
    if need_vae:
        patterns.append(VAE_FILE_NAME)
    return patterns


def resolve_checkpoint(path_or_repo_id: str | Path, variant: str | None = None, need_vit: bool = True,
                       need_vae: bool = True, *, revision: str | None = None,
                       cache_dir: str | Path | None = None) -> CheckpointFiles:
    """Locate a checkpoint variant: an existing local path (never touches the network) or a hub repo id.

    A path that does not exist and reads `owner/name` is taken as a repo id. `variant` defaults to
    "Lance_3B", or to the folder's own name when the path points at a variant folder. Raises
    FileNotFoundError naming what is missing.
    """
    path = Path(path_or_repo_id).expanduser()
    if path.exists():
        return _resolve_local(path, variant, need_vit, need_vae)
    text = str(path_or_repo_id)
    if not _REPO_ID.match(text):
        raise FileNotFoundError(f"checkpoint path {text!r} does not exist (and is not a hub repo id)")
    variant = variant or VARIANTS[0]
    from huggingface_hub import snapshot_download

    patterns = hub_allow_patterns(variant, need_vit, need_vae)
    logger.info("downloading %s (%s) from the Hugging Face hub", text, ", ".join(patterns))
    root = Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, allow_patterns=patterns))
    files = _resolve_local(root, variant, need_vit, need_vae)
    return CheckpointFiles(files.root, files.llm_dir, files.vit_dir, files.vae_path, files.variant, repo_id=text)


def _resolve_local(path: Path, variant: str | None, need_vit: bool, need_vae: bool) -> CheckpointFiles:
    path = path.resolve()
    if (path / LLM_CONFIG_NAME).is_file():  # a variant folder itself
        root = path.parent
        if variant is not None and path.name in VARIANTS and path.name != variant:
            raise ValueError(f"{path} is the {path.name} variant, but variant={variant!r} was asked for")
        variant = path.name if path.name in VARIANTS else (variant or VARIANTS[0])
        _check_variant_name(variant)
        llm_dir = path
    elif path.is_dir():
        root = path
        variant = variant or VARIANTS[0]
        _check_variant_name(variant)
        llm_dir = root / variant
        if not (llm_dir / LLM_CONFIG_NAME).is_file():
            present = sorted(p.name for p in root.iterdir() if (p / LLM_CONFIG_NAME).is_file())
            raise FileNotFoundError(f"{root} has no {variant}/{LLM_CONFIG_NAME} "
                                    f"(variant folders found: {present or 'none'})")
    else:
        raise FileNotFoundError(f"{path} is not a Lance checkpoint folder")

    vit_dir = root / VIT_DIR_NAME
    vit_dir = vit_dir if (vit_dir / VIT_CONFIG_NAME).is_file() else None
    vae_path = root / VAE_FILE_NAME
    vae_path = vae_path if vae_path.is_file() else None
    if need_vit and vit_dir is None:
        raise FileNotFoundError(f"{root} has no {VIT_DIR_NAME}/{VIT_CONFIG_NAME} (pass need_vit=False to skip)")
    if need_vae and vae_path is None:
        raise FileNotFoundError(f"{root} has no {VAE_FILE_NAME} (pass need_vae=False to skip)")
    return CheckpointFiles(root=root, llm_dir=llm_dir, vit_dir=vit_dir, vae_path=vae_path, variant=variant)


def _check_variant_name(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown Lance variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def load_lance_config(files: CheckpointFiles) -> LanceConfig:
    return LanceConfig.from_llm_config_file(files.llm_config_path, variant=files.variant)


def load_tokenizer(files: CheckpointFiles):
    """The variant's tokenizer (Qwen2 BPE), read from its folder only (hub files are already local)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(files.llm_dir), local_files_only=True)


def read_vit_config(files: CheckpointFiles) -> dict:
    """`Qwen2.5-VL-ViT/config.json` as a dict (kwargs of `Qwen2_5_VLVisionConfig`, plus private keys)."""
    return json.loads(files.vit_config_path.read_text())


# ----------------------------------------------------------------------------------------------------
# Lazy safetensors access
# ----------------------------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 * 2**20


def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor entries, metadata) of a .safetensors file, reading only its JSON header."""
    path = Path(path)
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_HEADER_BYTES:
            raise ValueError(f"{path} is not a safetensors file (header length {header_len})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} has a corrupt safetensors header: {e}") from None
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata


class SafetensorsFile:
    """One .safetensors file: names, shapes and dtypes from the header; tensors read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._entries, self.metadata = read_safetensors_header(self.path)
        self._handle = None

    def names(self) -> list[str]:
        return list(self._entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(e["shape"]) for name, e in self._entries.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._entry(name)["dtype"]
        if code not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {code}")
        return _SAFETENSORS_DTYPES[code]

    def get(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        self._entry(name)
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        tensor = self._handle.get_tensor(name)
        return tensor.to(device=device, dtype=dtype) if (dtype is not None or device is not None) else tensor

    def close(self) -> None:
        self._handle = None

    def _entry(self, name: str) -> dict:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_vae_tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Wan2.2 VAE .pth state dict, memory-mapped (no weights are read)."""
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    return {name: tuple(t.shape) for name, t in state.items()}


# ----------------------------------------------------------------------------------------------------
# What a checkpoint must contain
# ----------------------------------------------------------------------------------------------------
def stored_latent_pos_embed_frames(cfg: LanceConfig) -> int:
    """Rows of the stored table are frames x max_latent_size^2: 1 frame (image variant) or 31 (video)."""
    return cfg.latent.max_latent_frames if cfg.variant in VIDEO_VARIANTS else 1


def expected_llm_tensor_shapes(cfg: LanceConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the MoT LLM + generation connectors (the 1021 tensors of Lance_3B's file),
    from the one name scheme of `stages.lance.weights`."""
    rows = stored_latent_pos_embed_frames(cfg) * cfg.latent.max_latent_size ** 2
    return checkpoint_tensor_shapes(cfg.llm, cfg.latent.channels, rows)


def expected_vit_tensor_shapes(vit_config: dict) -> dict[str, tuple[int, ...]]:
    """Bare names/shapes of the Qwen2.5-VL vision tower described by `vit_config` (built on the meta device)."""
    from transformers import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    kwargs = {k: v for k, v in vit_config.items() if not k.startswith("_")}  # e.g. _attn_implementation
    with torch.device("meta"):
        model = Qwen2_5_VisionTransformerPretrainedModel._from_config(
            Qwen2_5_VLVisionConfig(**kwargs), attn_implementation="sdpa")
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def expected_model_file_tensor_shapes(cfg: LanceConfig, vit_config: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Everything a variant's model.safetensors may hold: the LLM tensors, plus `vit_model.*` when a
    ViT config is given (required in the video variant's file, see `check_model_file`)."""
    shapes = expected_llm_tensor_shapes(cfg)
    if vit_config is not None:
        shapes.update({BUNDLED_VIT_PREFIX + n: s for n, s in expected_vit_tensor_shapes(vit_config).items()})
    return shapes


# ----------------------------------------------------------------------------------------------------
# Key accounting
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyReport:
    """Result of comparing a checkpoint's tensor names (and shapes) with what the model expects."""

    source: str
    matched: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    wrong_shape: tuple[tuple[str, tuple, tuple], ...] = ()  # (name, found, expected)
    allowed_missing: tuple[str, ...] = ()
    allowed_unexpected: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape)

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.matched} tensors matched, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.wrong_shape)} with a wrong shape"
                 + (f" ({len(self.allowed_missing)} allowed missing)" if self.allowed_missing else "")
                 + (f" ({len(self.allowed_unexpected)} allowed unexpected)" if self.allowed_unexpected else "")]
        lines += _listing("missing", self.missing)
        lines += _listing("unexpected", self.unexpected)
        lines += _listing("wrong shape", [f"{n}: found {list(f)}, expected {list(e)}" for n, f, e in self.wrong_shape])
        return "\n".join(lines)


def _listing(title: str, items, limit: int = 20) -> list[str]:
    items = list(items)
    if not items:
        return []
    out = [f"  {title}:"] + [f"    {i}" for i in items[:limit]]
    if len(items) > limit:
        out.append(f"    ... and {len(items) - limit} more")
    return out


class CheckpointKeyError(ValueError):
    """A checkpoint's tensors do not match what the model expects (`reports`: one per bad file)."""

    def __init__(self, *reports: KeyReport):
        super().__init__("\n".join(str(r) for r in reports))
        self.reports = reports
        self.report = reports[0]


def check_keys(present: Mapping[str, tuple] | Iterable[str], expected: Mapping[str, tuple] | Iterable[str],
               allowed_missing: Iterable[str] = (), allowed_unexpected: Iterable[str] = (), *,
               source: str = "checkpoint", raise_on_error: bool = True) -> KeyReport:
    """Strict name accounting (and shape accounting when both sides are name->shape mappings).

    `allowed_missing` / `allowed_unexpected` are name prefixes; anything else missing or unexpected,
    and every shape mismatch, is an error (CheckpointKeyError unless raise_on_error=False).
    """
    allowed_missing, allowed_unexpected = tuple(allowed_missing), tuple(allowed_unexpected)
    present_names = set(present)
    expected_names = set(expected)
    missing = sorted(expected_names - present_names)
    unexpected = sorted(present_names - expected_names)
    wrong_shape = []
    if isinstance(present, Mapping) and isinstance(expected, Mapping):
        wrong_shape = [(n, tuple(present[n]), tuple(expected[n])) for n in sorted(present_names & expected_names)
                       if tuple(present[n]) != tuple(expected[n])]
    report = KeyReport(
        source=source,
        matched=len(present_names & expected_names) - len(wrong_shape),
        missing=tuple(n for n in missing if not n.startswith(allowed_missing)),
        unexpected=tuple(n for n in unexpected if not n.startswith(allowed_unexpected)),
        wrong_shape=tuple(wrong_shape),
        allowed_missing=tuple(n for n in missing if n.startswith(allowed_missing)),
        allowed_unexpected=tuple(n for n in unexpected if n.startswith(allowed_unexpected)),
    )
    if raise_on_error and not report.ok:
        raise CheckpointKeyError(report)
    return report


@dataclass(frozen=True)
class CheckpointReport:
    """Key accounting of every part of a checkpoint (None: that part was not checked)."""

    model: KeyReport
    vit: KeyReport | None = None
    vae: KeyReport | None = None

    @property
    def parts(self) -> list[KeyReport]:
        return [r for r in (self.model, self.vit, self.vae) if r is not None]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.parts)

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self.parts)


def check_model_file(files: CheckpointFiles, cfg: LanceConfig | None = None, **kw) -> KeyReport:
    """The variant's model.safetensors against the LLM tensors (+ `vit_model.*`, required for video)."""
    cfg = cfg or load_lance_config(files)
    vit_config = read_vit_config(files) if files.vit_dir is not None else None
    if cfg.variant in VIDEO_VARIANTS and vit_config is None:
        raise FileNotFoundError(f"{files.root}: checking {cfg.variant} needs {VIT_DIR_NAME}/{VIT_CONFIG_NAME}")
    expected = expected_model_file_tensor_shapes(cfg, vit_config)
    # The image variant has no ViT copy of its own (it uses vit.safetensors); accept one if present.
    allowed_missing = () if cfg.variant in VIDEO_VARIANTS else (BUNDLED_VIT_PREFIX,)
    path = files.llm_weights_path
    return check_keys(SafetensorsFile(path).shapes(), expected, allowed_missing,
                      source=str(path.relative_to(files.root)), **kw)


def check_vit_file(files: CheckpointFiles, **kw) -> KeyReport:
    expected = expected_vit_tensor_shapes(read_vit_config(files))
    path = files.vit_weights_path
    return check_keys(SafetensorsFile(path).shapes(), expected, source=str(path.relative_to(files.root)), **kw)


def expected_vae_tensor_shapes(vae_config: dict) -> dict[str, tuple[int, ...]]:
    """Stock Wan2.2 `WanVAE_` names/shapes of a VAE with these `AutoencoderKLWan` kwargs (meta device)."""
    from diffusers import AutoencoderKLWan

    from .vae import diffusers_to_wan22_state_dict

    with torch.device("meta"):
        model = AutoencoderKLWan(**vae_config)
    return {name: tuple(t.shape) for name, t in diffusers_to_wan22_state_dict(model.state_dict()).items()}


def check_vae_file(files: CheckpointFiles, **kw) -> KeyReport:
    """`Wan2.2_VAE.pth` against the Wan2.2 tree of the geometry its own shapes describe."""
    from .vae import wan22_vae_config

    if files.vae_path is None:
        raise FileNotFoundError(f"checkpoint {files.root} has no {VAE_FILE_NAME}")
    present = read_vae_tensor_shapes(files.vae_path)
    expected = expected_vae_tensor_shapes(wan22_vae_config(present))
    return check_keys(present, expected, source=files.vae_path.name, **kw)


def check_checkpoint(files: CheckpointFiles, cfg: LanceConfig | None = None, raise_on_error: bool = True) -> CheckpointReport:
    """Account for every tensor of the model file, the ViT file and the VAE (those present)."""
    model = check_model_file(files, cfg, raise_on_error=False)
    vit = check_vit_file(files, raise_on_error=False) if files.vit_dir is not None else None
    vae = check_vae_file(files, raise_on_error=False) if files.vae_path is not None else None
    report = CheckpointReport(model, vit, vae)
    if raise_on_error and not report.ok:
        raise CheckpointKeyError(*[r for r in report.parts if not r.ok])
    return report
