"""vLLM multimodal processing for Lance's thinker: three item kinds, each a placeholder run in the prompt.

* `lance_vit`: a ViT block. Data: merge-window pixel patches + grid (the vLLM model runs the Qwen2.5-VL
  tower on them). Placeholder: the whole block `<|vision_start|> <|video_pad|>*n <|vision_end|>`, with
  embeddings only for the body.
* `lance_latent`: a clean reference VAE block of an edit (t = 0). Data: the posterior-sampled latent
  tokens [n, 48] + grid. Placeholder: the whole block with the reserved gen-slot id in the body; those
  slots go through the gen expert.
* `lance_anchor`: one text token placed at an explicit position. The text-uncond CFG branch keeps the
  cond positions of the tokens after the removed caption (upstream's KV-cache path), so its positions
  jump there; the anchor carries that jump.

Every item also carries the positions of its placeholder run and the position of the token after it,
taken verbatim from `stages.lance.sequence`; text tokens between items count up from there. Because the
positions are item data, they are part of each item's hash and therefore of vLLM's prefix-cache keys:
two prompts share cached KV only where tokens, visual content and positions all agree.

Prompts are given compact (one placeholder per item: `[vs, pad, ve]` for blocks, the reserved anchor id
for anchors); the processor expands them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import BatchFeature

from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ModalityDataItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor, BaseProcessingInfo,
                                        PromptReplacement, PromptUpdateDetails)
from vllm.multimodal.processing.inputs import ProcessorInputs

from .engine_config import LanceTokenIds

VIT, LATENT, ANCHOR = "lance_vit", "lance_latent", "lance_anchor"
# One input image per prompt in Lance's public tasks (x2t_image, image_edit); the uncond branch needs
# at most one position jump.
MAX_ITEMS_PER_PROMPT = {VIT: 1, LATENT: 1, ANCHOR: 1}
_FIELD_PREFIX = {VIT: "vit", LATENT: "latent", ANCHOR: "anchor"}


@dataclass(frozen=True)
class ItemFields:
    """Field names of one modality (unique across modalities: vLLM merges them into one batch)."""

    prefix: str

    @property
    def positions(self) -> str:
        return f"{self.prefix}_positions"

    @property
    def next_position(self) -> str:
        return f"{self.prefix}_next_position"


def fields_of(modality: str) -> ItemFields:
    return ItemFields(_FIELD_PREFIX[modality])


def lance_token_ids(hf_config) -> LanceTokenIds:
    lance = getattr(hf_config, "lance", None)
    if not lance:
        raise ValueError("this config has no `lance` section; start the thinker through stages.thinker "
                         "(engine_config.write_vllm_config_dir)")
    return LanceTokenIds(**lance["token_ids"])


# ----------------------------------------------------------------------------------------------------
# Items and parsing


class LanceItems(ModalityDataItems[list, dict]):
    """Items of one Lance modality: a list of per-item dicts of tensors."""

    def __init__(self, data: Sequence[Mapping[str, torch.Tensor]], modality: str):
        super().__init__(list(data), modality)
        f = fields_of(modality)
        for i, item in enumerate(self.data):
            for key in _required_keys(modality):
                if key not in item:
                    raise ValueError(f"{modality} item {i} lacks {key!r} (has {sorted(item)})")
            pos = item[f.positions]
            if pos.dim() != 2 or pos.shape[0] != 3:
                raise ValueError(f"{modality} item {i}: {f.positions} must be [3, n], got {list(pos.shape)}")

    def get_count(self) -> int:
        return len(self.data)

    def get(self, index: int) -> dict:
        return self.data[index]

    def get_processor_data(self) -> Mapping[str, object]:
        return {}

    def get_passthrough_data(self) -> Mapping[str, object]:
        keys = self.data[0].keys() if self.data else ()
        out: dict[str, object] = {}
        for key in keys:
            values = [item[key] for item in self.data]
            out[key] = torch.cat(values) if key == "vit_pixel_values" else values
        return out


def _required_keys(modality: str) -> tuple[str, ...]:
    f = fields_of(modality)
    own = {VIT: ("vit_pixel_values", "vit_grid_thw"), LATENT: ("latent_tokens", "latent_grid"),
           ANCHOR: ("anchor_token_id",)}[modality]
    return own + (f.positions, f.next_position)


class LanceDataParser(MultiModalDataParser):
    def _get_subparsers(self):
        return {m: (lambda data, m=m: LanceItems(data if isinstance(data, (list, tuple)) else [data], m))
                for m in (VIT, LATENT, ANCHOR)}


# ----------------------------------------------------------------------------------------------------
# Processing info, dummy inputs, processor


class LanceProcessingInfo(BaseProcessingInfo):
    def get_data_parser(self) -> MultiModalDataParser:
        return LanceDataParser()

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return dict(MAX_ITEMS_PER_PROMPT)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # Embedding rows per item (vLLM's encoder budget); a block can never exceed the context.
        return {VIT: seq_len, LATENT: seq_len, ANCHOR: 1}

    def token_ids(self) -> LanceTokenIds:
        return lance_token_ids(self.get_hf_config())


class LanceDummyInputsBuilder(BaseDummyInputsBuilder[LanceProcessingInfo]):
    """Small valid items of each kind (profiling is skipped: `skip_mm_profiling`)."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return ""

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options) -> dict:
        vision = self.info.get_hf_config().vision_config
        m, p, tp = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
        n = 4  # 2x2 merged ViT tokens / latent tokens
        pos = torch.arange(n + 2).expand(3, -1).clone()
        data = {
            VIT: {"vit_pixel_values": torch.zeros(n * m * m, 3 * tp * p * p), "vit_grid_thw": torch.tensor([1, 2 * m, 2 * m]),
                  "vit_positions": pos, "vit_next_position": torch.tensor(n + 2)},
            LATENT: {"latent_tokens": torch.zeros(n, 48), "latent_grid": torch.tensor([1, 2, 2]),
                     "latent_positions": pos, "latent_next_position": torch.tensor(n + 2)},
            ANCHOR: {"anchor_token_id": torch.tensor([0]), "anchor_positions": torch.zeros(3, 1, dtype=torch.long),
                     "anchor_next_position": torch.tensor(1)},
        }
        return {k: [v] * mm_counts.get(k, 0) for k, v in data.items() if mm_counts.get(k, 0)}


class LanceMultiModalProcessor(BaseMultiModalProcessor[LanceProcessingInfo]):
    def get_dummy_inputs(self, seq_len, mm_counts, mm_options) -> ProcessorInputs:
        ids = self.info.token_ids()
        prompt: list[int] = []
        for modality, count in mm_counts.items():
            prompt += compact_placeholder(modality, ids) * count
        data = self.dummy_inputs.get_dummy_mm_data(seq_len, mm_counts, mm_options)
        return ProcessorInputs(prompt=prompt, mm_data_items=self.info.parse_mm_data(data, validate=False))

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        config: dict[str, MultiModalFieldConfig] = {}
        for modality in (VIT, LATENT, ANCHOR):
            f = fields_of(modality)
            if f.positions not in hf_inputs:
                continue
            for key in _required_keys(modality):
                config[key] = MultiModalFieldConfig.batched(modality, keep_on_cpu=key.endswith("position")
                                                            or key.endswith("positions"))
        if "vit_pixel_values" in config:
            sizes = torch.stack([torch.as_tensor(g).reshape(3) for g in hf_inputs["vit_grid_thw"]]).prod(-1)
            config["vit_pixel_values"] = MultiModalFieldConfig.flat_from_sizes(VIT, sizes)
        return config

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs,
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptReplacement]:
        ids = self.info.token_ids()
        merge = self.info.get_hf_config().vision_config.spatial_merge_size ** 2

        def block(modality: str, pad: int):
            def replacement(i: int) -> PromptUpdateDetails:
                item = mm_items[modality].get(i)
                body = item[fields_of(modality).positions].shape[1] - 2
                _check_body_size(modality, item, body, merge)
                full = [ids.vision_start] + [pad] * body + [ids.vision_end]
                return PromptUpdateDetails(full=full, is_embed=_body_mask)
            return PromptReplacement(modality=modality, target=compact_placeholder(modality, ids), replacement=replacement)

        def anchor(i: int) -> list[int]:
            return [int(mm_items[ANCHOR].get(i)["anchor_token_id"].reshape(-1)[0])]

        updates = []
        if VIT in mm_items:
            updates.append(block(VIT, ids.vit_pad))
        if LATENT in mm_items:
            updates.append(block(LATENT, ids.gen_pad))
        if ANCHOR in mm_items:
            updates.append(PromptReplacement(modality=ANCHOR, target=[ids.anchor], replacement=anchor))
        return updates


def _body_mask(full: list[int]) -> torch.Tensor:
    mask = torch.ones(len(full), dtype=torch.bool)
    mask[0] = mask[-1] = False
    return mask


def _check_body_size(modality: str, item: dict, body: int, merge: int) -> None:
    if modality == VIT:
        thw = torch.as_tensor(item["vit_grid_thw"]).reshape(-1)
        tokens = int(thw.prod()) // merge
        if tokens != body or item["vit_pixel_values"].shape[0] != int(thw.prod()):
            raise ValueError(f"ViT item: grid {thw.tolist()} gives {tokens} tokens, positions cover {body}, "
                             f"pixel patches {item['vit_pixel_values'].shape[0]}")
    elif modality == LATENT:
        n = int(torch.as_tensor(item["latent_grid"]).prod())
        if n != body or item["latent_tokens"].shape[0] != n:
            raise ValueError(f"latent item: grid gives {n} tokens, positions cover {body}, "
                             f"latent tokens {item['latent_tokens'].shape[0]}")


def compact_placeholder(modality: str, ids: LanceTokenIds) -> list[int]:
    """The compact-prompt stand-in of one item (expanded by the processor)."""
    return {VIT: [ids.vision_start, ids.vit_pad, ids.vision_end],
            LATENT: [ids.vision_start, ids.gen_pad, ids.vision_end],
            ANCHOR: [ids.anchor]}[modality]
