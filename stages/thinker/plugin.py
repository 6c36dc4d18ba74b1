"""vLLM general plugin (entry point `vllm.general_plugins: lance`): registers Lance's thinker model.

vLLM calls `register()` in every process it starts (API process, engine core, workers), so this
module stays import-light: the model class is named by path and imported only when vLLM builds it.
In the processes vLLM starts itself it also arms `exit_with_parent`.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time

from .engine_config import VLLM_ARCHITECTURE

PARENT_POLL_S = 1.0
_watching = False


def register() -> None:
    from vllm import ModelRegistry

    exit_with_parent()
    if VLLM_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(VLLM_ARCHITECTURE, "stages.thinker.model:LanceThinkerForConditionalGeneration")


def exit_with_parent() -> None:
    """In a process started by multiprocessing (vLLM's engine core and workers): exit once the
    parent is gone. A thinker replica that is killed (Ray's `kill`, a crash, the OOM killer) never
    shuts its engine down, and vLLM's engine core does not watch its parent: it would live on as an
    orphan holding the model and its KV cache. The thinker replica itself (a Ray worker, not a
    multiprocessing child) is left alone."""
    global _watching
    if _watching or multiprocessing.parent_process() is None:
        return
    _watching = True
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)   # re-parented: the parent died without stopping us

    threading.Thread(target=watch, name="lance-exit-with-parent", daemon=True).start()
