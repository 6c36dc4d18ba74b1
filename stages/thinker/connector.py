"""KV connector that exports a context's per-layer K (after qk-norm and RoPE) and V out of vLLM.

A request asks for an export with `kv_transfer_params={"lance_export": {"export_id": ...}}`. In the step
that completes its prompt, the worker gathers every layer's K and V of all prompt tokens from the paged
cache (layout by backend, `kv_layout.py`) and hands them to an export sink; the copy is synchronous, so
when the request's output reaches the caller the export already exists, and vLLM frees (or caches) the
blocks as usual when the request finishes. The output's `kv_transfer_params["lance_export"]` tells the
caller where to claim it.

Sinks (`kv_connector_extra_config["sink"]`):
* `shm` (default; vLLM's "mp" executor on CPU or GPU, one host): a safetensors file in a per-engine
  directory under /dev/shm, written under a temporary name and renamed when complete (the readiness
  signal). The thinker replica claims it (reads, puts it in Ray's object store, deletes the file).
  Unclaimed files expire after `ttl_s`.
* `ray` (the worker runs inside a Ray cluster: vLLM's Ray executor on GPU, or an "mp" worker that joins
  the cluster): `ray.put` in the worker, the ObjectRef parked in a named registry actor that drops it
  after `ttl_s` unless claimed. See `exports.py`.

Only the scheduler and worker roles of vLLM's connector API are used: nothing is ever loaded into vLLM.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                KVConnectorRole)

from .exports import EXPORT_PARAM, make_sink
from .kv_layout import PagedKVReader, reader_for

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class ExportTask:
    request_id: str
    export_id: str
    block_ids: list[int]
    num_tokens: int


@dataclass
class ExportMetadata(KVConnectorMetadata):
    tasks: list[ExportTask] = field(default_factory=list)


class LanceContextExportConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        # scheduler side: requests that asked for an export, until their prompt is complete
        self._wanted: dict[str, tuple["Request", str]] = {}
        # worker side
        self._kv_caches: list[tuple[str, torch.Tensor]] = []
        self._readers: dict[str, PagedKVReader] = {}
        self._sink = make_sink(self._extra) if role == KVConnectorRole.WORKER else None

    # --- scheduler side -----------------------------------------------------------------------------

    def on_new_request(self, request: "Request") -> None:
        params = (request.kv_transfer_params or {}).get(EXPORT_PARAM)
        if params:
            self._wanted[request.request_id] = (request, str(params["export_id"]))

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        return

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        meta = ExportMetadata()
        for req_id, n_new in scheduler_output.num_scheduled_tokens.items():
            wanted = self._wanted.get(req_id)
            if wanted is None:
                continue
            request, export_id = wanted
            if request.num_computed_tokens + n_new < request.num_prompt_tokens:
                continue  # the prompt completes in a later step (chunked prefill)
            block_ids = list(self._kv_cache_manager.get_block_ids(req_id)[0])
            meta.tasks.append(ExportTask(req_id, export_id, block_ids, request.num_prompt_tokens))
            del self._wanted[req_id]
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        params = (request.kv_transfer_params or {}).get(EXPORT_PARAM)
        exported = request.request_id not in self._wanted
        self._wanted.pop(request.request_id, None)
        if not params:
            return False, None
        # The copy already happened in the step that completed the prompt: nothing holds the blocks.
        return False, {EXPORT_PARAM: {**params, "exported": exported, "num_tokens": request.num_prompt_tokens}}

    # --- worker side --------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        def layer_index(name: str) -> int:
            m = _LAYER_INDEX.search(name)
            if m is None:
                raise ValueError(f"cannot order KV cache layer {name!r}")
            return int(m.group(1))

        self._kv_caches = sorted(kv_caches.items(), key=lambda kv: layer_index(kv[0]))

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs) -> None:
        return

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return  # the whole context is gathered once, after the step's forward (wait_for_save)

    def wait_for_save(self):
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, ExportMetadata) or not meta.tasks:
            return
        for task in meta.tasks:
            try:
                k, v = self.gather(task.block_ids, task.num_tokens)
                self._sink.put(task.export_id, k, v)
            except Exception as e:  # the caller must hear about it, the engine must go on
                log.exception("KV export %s failed", task.export_id)
                self._sink.fail(task.export_id, f"{type(e).__name__}: {e}")
        self._sink.expire()

    @torch.no_grad()
    def gather(self, block_ids: list[int], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [num_layers, num_tokens, num_kv_heads, head_dim] of the first tokens of `block_ids`."""
        ids = torch.tensor(block_ids, dtype=torch.long)
        ks, vs = [], []
        for name, cache in self._kv_caches:
            k, v = self._reader(name, cache).gather(cache, ids.to(cache.device), num_tokens)
            ks.append(k)
            vs.append(v)
        return torch.stack(ks), torch.stack(vs)

    def _reader(self, layer_name: str, cache: torch.Tensor) -> PagedKVReader:
        if layer_name not in self._readers:
            layer = self._vllm_config.compilation_config.static_forward_context[layer_name]
            self._readers[layer_name] = reader_for(layer.attn_backend.get_name(), head_dim=layer.head_size,
                                                   block_size=cache.shape[2], dtype=cache.dtype,
                                                   isa=getattr(layer, "isa", None))
        return self._readers[layer_name]

    def shutdown(self):
        if self._sink is not None:
            self._sink.close()
