"""vLLM general plugin (entry point `vllm.general_plugins: lance`): registers Lance's thinker model.

vLLM calls `register()` in every process it starts (API process, engine core, workers), so this
module stays import-light: the model class is named by path and imported only when vLLM builds it.
"""
from __future__ import annotations

from .engine_config import VLLM_ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry

    if VLLM_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(VLLM_ARCHITECTURE, "stages.thinker.model:LanceThinkerForConditionalGeneration")
