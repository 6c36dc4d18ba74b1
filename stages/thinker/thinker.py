"""`Thinker`: one vLLM AsyncLLM running Lance, with the two jobs of the thinker stage.

* `prefill_context(ImageRequest | VideoRequest)`: builds the cond and text-uncond contexts (`stages.lance.sequence`),
  prefills them on vLLM with prefix caching (the uncond branch is submitted once the cond branch is done,
  so the prefix they share - system prompt, and for edits the ViT and reference blocks - is computed once
  and read from the cache), and returns a `ContextHandoff`: per branch the exported K/V as a Ray ObjectRef
  and the positions its target block must use, the latent grid, the knobs, the number of reference tokens.
  i2v adds its clean first latent frame (VAE-encoded here); video_edit samples the input video's frames for
  the ViT and the VAE as upstream does.
* `generate_text(TextRequest)`: understanding (image or video -> text) and chat, streamed token by token.

`ThinkerStage` (stage.py) is this class as a Ray Serve deployment.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import torch

from stages import metrics
from stages.lance.checkpoint import load_lance_config, load_tokenizer, read_vit_config, resolve_checkpoint
from stages.lance.config import SpecialTokens
from stages.lance.handoff import BranchKV, ContextHandoff
from stages.lance.limits import DTYPE_NAMES, LimitError, check_image_size, check_target_size
from stages.lance.preprocessing import vae_image_tensor, vae_video_tensor
from stages.lance.prompts import VIDEO_TASKS, Visual, default_system_prompt
from stages.lance.requests import (DEFAULT_T2I_SIZE, I2V_DEFAULT_FRAMES, T2V_DEFAULT_FRAMES, T2V_DEFAULT_SIZE,
                                   ImageRequest, TextRequest, VideoRequest)
from stages.lance.sequence import (BranchPlan, LanceSequence, build_understanding_sequence, mrope_positions,
                                   plan_generation_request)
from stages.lance.vae import first_frame_condition, latent_tokens, posterior_latent, reference_latent
from stages.lance.video_io import sample_video
from stages.lance.vit import image_patches, video_patches

from .engine_config import LanceTokenIds, engine_kwargs, write_vllm_config_dir
from .errors import ContextTooLongError, KVExportError, ThinkerRequestError
from .exports import DEFAULT_TTL_S, EXPORT_PARAM, make_claims
from .inputs import VisualInputs, vllm_prompt

log = logging.getLogger(__name__)



@dataclass
class PreparedGeneration:
    cond: BranchPlan
    uncond: BranchPlan | None
    latent_grid: tuple[int, int, int]
    visuals: VisualInputs
    num_reference_tokens: int
    condition_latents: torch.Tensor | None = None  # i2v: the clean first latent frame [h*w, 48]


class EngineStats:
    """Last scheduler numbers vLLM reported (KV-cache usage, queue sizes): a custom stat logger."""

    def __init__(self):
        self.kv_cache_usage = 0.0
        self.num_running = self.num_waiting = 0
        self.steps = 0

    def factory(self, vllm_config, engine_index: int = 0):
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class _Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index=0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                if scheduler_stats is not None:
                    stats.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
                    stats.num_running = int(scheduler_stats.num_running_reqs)
                    stats.num_waiting = int(scheduler_stats.num_waiting_reqs)
                    stats.steps += 1

            def log_engine_initialized(self):
                pass

        return _Logger(vllm_config, engine_index)


class Thinker:
    def __init__(self, model: str, engine_args: dict | None = None, variant: str | None = None, *,
                 cache_dir=None, export_sink: str = "shm", export_ttl_s: float = DEFAULT_TTL_S,
                 claim_timeout_s: float = 60.0, put_in_object_store: bool = True):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_args = dict(engine_args or {})
        self.files = resolve_checkpoint(model, variant)
        self.config = load_lance_config(self.files)
        self.tokenizer = load_tokenizer(self.files)
        self.tokens = SpecialTokens.from_config_and_tokenizer(self.config.raw_llm_config, self.tokenizer)
        self.ids = LanceTokenIds.from_tokens(self.tokens, self.config.llm.vocab_size)
        self.vit_config = read_vit_config(self.files)
        self.claims = make_claims(export_sink, export_ttl_s)  # "ray" needs a Ray cluster and puts in the worker
        self.claim_timeout_s = claim_timeout_s
        self.put_in_object_store = put_in_object_store
        config_dir = write_vllm_config_dir(self.files, self.tokenizer, cache_dir)
        kwargs = engine_kwargs(self.files, config_dir, engine_args, self.claims.connector_config())
        kwargs["disable_log_stats"] = False
        self.stats = EngineStats()
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs),
                                                stat_loggers=[self.stats.factory, *_ray_stat_loggers()])
        self.max_model_len = self.engine.model_config.max_model_len
        self.dtype = self.engine.model_config.dtype
        cache = self.engine.vllm_config.cache_config
        self._cache_geometry = {"kv_cache_blocks": cache.num_gpu_blocks, "block_size": cache.block_size}
        self._vae = None
        self._vae_lock = threading.Lock()  # the Wan VAE keeps its causal-conv cache in module state
        # (request id, prompt tokens, tokens served from vLLM's prefix cache) of recent prompts
        self.recent_prompts: collections.deque[tuple[str, int, int]] = collections.deque(maxlen=256)
        self.num_aborted = 0  # vLLM requests aborted because their caller went away
        self.submitted: set[str] = set()  # ids of the requests handed to vLLM that a caller still waits on

    # --- image tasks ------------------------------------------------------------------------------

    async def prefill_context(self, req: ImageRequest | VideoRequest, *,
                              reference_eps: torch.Tensor | None = None) -> ContextHandoff:
        """Prefill both CFG branches' contexts and hand them over (see the module docstring).

        `reference_eps` injects the posterior noise of an edit's reference latent or i2v's first-frame
        condition (upstream draws it from its global RNG; by default we draw it from the request seed, as
        the offline pipeline does).
        """
        request_id = req.request_id or uuid.uuid4().hex
        start = time.perf_counter()
        prepare = self._prepare_video if isinstance(req, VideoRequest) else self._prepare_generation
        prep = await asyncio.to_thread(prepare, req, reference_eps)
        tag = uuid.uuid4().hex[:8]
        cond, cond_bytes = await self._prefill_branch(f"{_safe(request_id)}-cond-{tag}", prep.cond, prep.visuals)
        uncond, uncond_bytes = None, 0
        if prep.uncond is not None:
            uncond, uncond_bytes = await self._prefill_branch(f"{_safe(request_id)}-uncond-{tag}", prep.uncond,
                                                              prep.visuals)
        task = metrics.task_label(req.task)
        metrics.observe(metrics.PREFILL_DURATION, time.perf_counter() - start, task=task)
        metrics.inc(metrics.KV_BYTES, cond_bytes + uncond_bytes, task=task)
        return ContextHandoff(request_id=request_id, task=req.task, latent_grid=prep.latent_grid, params=req.params,
                              cond=cond, uncond=uncond, num_reference_tokens=prep.num_reference_tokens,
                              kv_bytes=cond_bytes + uncond_bytes, condition_latents=prep.condition_latents)

    def _prepare_generation(self, req: ImageRequest, reference_eps) -> PreparedGeneration:
        if req.task not in ("t2i", "image_edit"):
            raise ThinkerRequestError(f"unknown image task {req.task!r}", param="task")
        if not req.prompt:
            raise ThinkerRequestError("the prompt is empty", param="prompt")
        visuals, context_visuals, n_ref = VisualInputs(), [], 0
        if req.task == "t2i":
            height, width = req.height or DEFAULT_T2I_SIZE, req.width or DEFAULT_T2I_SIZE
            try:
                check_image_size(height, width, self.config.latent)
            except LimitError as e:
                raise ThinkerRequestError(e.message, param=e.param, code="invalid_size") from None
            grid = self.config.latent.latent_grid(1, height, width)
        else:
            if req.image is None:
                raise ThinkerRequestError("image_edit needs an input image", param="image")
            visuals.vit_patches, visuals.vit_patch_grid, vit_grid = self._vit_inputs(req.image, req.resolution)
            ref = self._reference_latent(req.image, req.resolution, req.params.seed, reference_eps)  # [1, 48, t, h, w]
            grid = tuple(ref.shape[2:])
            visuals.ref_latents = latent_tokens(ref)
            visuals.latent_grid = grid
            context_visuals, n_ref = [("vit", vit_grid), ("vae_ref", grid)], visuals.ref_latents.shape[0]
        system = req.system_prompt if req.system_prompt is not None else default_system_prompt(req.task)
        cond, uncond = plan_generation_request(self.tokenizer, self.tokens, system, req.prompt, context_visuals, grid,
                                               req.negative_prompt, self.config.llm.tokens_per_second)
        for plan in (cond, uncond) if req.params.uses_cfg else (cond,):
            self._check_length(plan.context.input_ids.numel(), "context")
        return PreparedGeneration(cond, uncond if req.params.uses_cfg else None, tuple(grid), visuals, n_ref)

    def _prepare_video(self, req: VideoRequest, reference_eps) -> PreparedGeneration:
        """t2v / i2v / video_edit: the same sequences and positions as the offline pipeline's."""
        if req.task not in VIDEO_TASKS - {"x2t_video"}:
            raise ThinkerRequestError(f"unknown video task {req.task!r}", param="task")
        if not req.prompt:
            raise ThinkerRequestError("the prompt is empty", param="prompt")
        visuals, context_visuals, n_ref, condition = VisualInputs(), [], 0, None
        if req.task == "t2v":
            height, width = req.height or T2V_DEFAULT_SIZE[0], req.width or T2V_DEFAULT_SIZE[1]
            grid = self._target_grid(req.num_frames or T2V_DEFAULT_FRAMES, height, width)
        elif req.task == "i2v":
            if req.image is None:
                raise ThinkerRequestError("i2v needs a first-frame image", param="image")
            pixels = self._preprocess(vae_image_tensor, req.image, req.resolution)
            grid = self._target_grid(req.num_frames or I2V_DEFAULT_FRAMES, *pixels.shape[-2:])
            with self._vae_lock:
                condition = latent_tokens(first_frame_condition(self._reference_encoder(), pixels, grid,
                                                                req.params.seed, reference_eps))
        else:
            if req.video is None:
                raise ThinkerRequestError("video_edit needs an input video", param="video")
            frames, (visuals.vit_patches, visuals.vit_patch_grid, vit_grid) = self._video_vit_inputs(req.video,
                                                                                                   req.resolution)
            pixels = self._preprocess(vae_video_tensor, frames, req.resolution)
            self._target_grid(pixels.shape[1], *pixels.shape[-2:])
            with self._vae_lock:
                ref = posterior_latent(self._reference_encoder(), pixels, req.params.seed, reference_eps)
            grid = tuple(ref.shape[2:])
            visuals.ref_latents, visuals.latent_grid = latent_tokens(ref), grid
            context_visuals, n_ref = [("vit", vit_grid), ("vae_ref", grid)], visuals.ref_latents.shape[0]
        system = req.system_prompt if req.system_prompt is not None else default_system_prompt(req.task)
        cond, uncond = plan_generation_request(self.tokenizer, self.tokens, system, req.prompt, context_visuals, grid,
                                               req.negative_prompt, self.config.llm.tokens_per_second)
        for plan in (cond, uncond) if req.params.uses_cfg else (cond,):
            self._check_length(plan.context.input_ids.numel(), "context")
        return PreparedGeneration(cond, uncond if req.params.uses_cfg else None, tuple(grid), visuals, n_ref, condition)

    def _target_grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        try:
            return check_target_size(num_frames, height, width, self.config.latent)
        except LimitError as e:
            raise ThinkerRequestError(e.message, param=e.param, code="invalid_size") from None

    @staticmethod
    def _preprocess(fn, *args):
        try:
            return fn(*args)
        except ValueError as e:
            raise ThinkerRequestError(str(e), param="resolution") from None

    def _vit_inputs(self, image, resolution: str):
        """Merge-window pixel patches, their patch grid and the block's LLM grid (T/2, H/28, W/28)."""
        cfg = self.vit_config
        try:
            return image_patches(image, resolution, cfg.get("patch_size", 14), cfg.get("temporal_patch_size", 2),
                                 cfg.get("spatial_merge_size", 2))
        except ValueError as e:
            raise ThinkerRequestError(str(e), param="resolution") from None

    def _video_vit_inputs(self, video, resolution: str):
        """The video's sampled frames, and their ViT inputs as `_vit_inputs` gives an image's."""
        try:
            _, frames = sample_video(video)
        except (ValueError, TypeError, IndexError) as e:
            raise ThinkerRequestError(f"cannot read the input video: {e}", param="video") from None
        cfg = self.vit_config
        return frames, self._preprocess(video_patches, frames, resolution, cfg.get("patch_size", 14),
                                        cfg.get("temporal_patch_size", 2), cfg.get("spatial_merge_size", 2))

    def _reference_latent(self, image, resolution: str, seed: int, eps) -> torch.Tensor:
        with self._vae_lock:
            return reference_latent(self._reference_encoder(), image, resolution, seed, eps)

    def _reference_encoder(self):
        if self._vae is None:  # edits only: t2i and text deployments never load the VAE
            from stages.lance.vae import LanceVAE

            dtype = self.dtype if str(self.dtype).removeprefix("torch.") in DTYPE_NAMES else torch.float32
            self._vae = LanceVAE.from_wan22_pth(self.files.vae_path, dtype=dtype, decoder=False)
        return self._vae

    async def _prefill_branch(self, export_id: str, plan: BranchPlan, visuals: VisualInputs) -> tuple[BranchKV, int]:
        """Prefill one branch's context on vLLM, claim its exported K/V and put it in Ray's object store."""
        from vllm import SamplingParams

        prompt = vllm_prompt(plan.context, plan.context_positions, self.ids, visuals)
        params = SamplingParams(max_tokens=1, temperature=0.0,
                                extra_args={"kv_transfer_params": {EXPORT_PARAM: {"export_id": export_id}}})
        finished = None
        self.submitted.add(export_id)
        try:
            async for out in self.engine.generate(prompt, params, request_id=export_id):
                finished = out
            prefilled = time.perf_counter()
            exported = ((finished.kv_transfer_params or {}).get(EXPORT_PARAM) or {}) if finished else {}
            if not exported.get("exported"):
                raise KVExportError(f"vLLM finished {export_id} without exporting its context")
            claimed = await self.claims.claim(export_id, self.claim_timeout_s)
        except BaseException:
            if finished is None or not finished.finished:
                await self._abort(export_id)
            self.claims.drop(export_id)
            raise
        finally:
            self.submitted.discard(export_id)
        n = plan.context.input_ids.numel()
        if claimed.num_tokens != n:
            raise KVExportError(f"export {export_id} holds {claimed.num_tokens} tokens, the context has {n}")
        self.recent_prompts.append((export_id, n, int(finished.num_cached_tokens or 0)))
        kv = claimed.kv
        if isinstance(kv, tuple) and self.put_in_object_store:
            kv = _object_store_put(kv)  # the replica owns it; Ray frees it when the last holder drops it
        metrics.observe(metrics.KV_HANDOFF_DURATION, time.perf_counter() - prefilled, phase="export")
        await self._record_export_registry()
        return BranchKV(kv=kv, context_len=n, query_positions=plan.query_positions.clone()), claimed.nbytes

    # --- text tasks -------------------------------------------------------------------------------

    async def generate_text(self, req: TextRequest) -> AsyncIterator[dict]:
        """Stream {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"} per step."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        request_id = req.request_id or uuid.uuid4().hex
        start, first = time.perf_counter(), True
        seq, visuals = await asyncio.to_thread(self._prepare_text, req)
        n = seq.input_ids.numel()
        self._check_length(n + 1, "prompt plus one generated token")
        prompt = vllm_prompt(seq, mrope_positions(seq, self.config.llm.tokens_per_second), self.ids, visuals)
        params = SamplingParams(max_tokens=min(req.max_tokens, self.max_model_len - n), temperature=req.temperature,
                                top_p=req.top_p, stop=list(req.stop) or None, seed=req.seed,
                                stop_token_ids=[self.tokens.im_end], output_kind=RequestOutputKind.DELTA)
        completion, finished = 0, False
        self.submitted.add(request_id)
        try:
            async for out in self.engine.generate(prompt, params, request_id=request_id):
                if first:
                    metrics.observe(metrics.PREFILL_DURATION, time.perf_counter() - start,
                                    task=metrics.task_label(req.task))
                    first = False
                o = out.outputs[0]
                token_ids = list(o.token_ids)
                if out.finished and o.stop_reason == self.tokens.im_end and token_ids[-1:] == [self.tokens.im_end]:
                    token_ids.pop()  # the end-of-turn token is not part of the answer
                completion += len(token_ids)
                finished = out.finished
                if out.finished:
                    self.recent_prompts.append((request_id, n, int(out.num_cached_tokens or 0)))
                yield {"text": o.text, "token_ids": token_ids,
                       "finish_reason": o.finish_reason if out.finished else None,
                       "prompt_tokens": n, "completion_tokens": completion}
        finally:
            self.submitted.discard(request_id)
            if not finished:  # the caller went away: stop spending compute on it
                await self._abort(request_id)

    def _prepare_text(self, req: TextRequest) -> tuple[LanceSequence, VisualInputs]:
        if req.task not in ("x2t_image", "x2t_video", "chat"):
            raise ThinkerRequestError(f"unknown text task {req.task!r}", param="task")
        if not req.turns or req.turns[-1].role != "user":
            raise ThinkerRequestError("the last message must be the user's", param="messages")
        if req.max_tokens < 1 or req.temperature < 0 or not 0 < req.top_p <= 1:
            raise ThinkerRequestError("need max_tokens >= 1, temperature >= 0 and 0 < top_p <= 1", param="max_tokens")
        visuals, grids = VisualInputs(), []
        turns: list[tuple[str, list]] = []
        image_pending = req.task in ("x2t_image", "x2t_video")
        if req.task == "x2t_image" and req.image is None:
            raise ThinkerRequestError("x2t_image needs an image", param="image")
        if req.task == "x2t_video" and req.video is None:
            raise ThinkerRequestError("x2t_video needs a video", param="video")
        if req.task == "x2t_image":
            visuals.vit_patches, visuals.vit_patch_grid, vit_grid = self._vit_inputs(req.image, req.resolution)
            grids.append(vit_grid)
        elif req.task == "x2t_video":
            _, (visuals.vit_patches, visuals.vit_patch_grid, vit_grid) = self._video_vit_inputs(req.video,
                                                                                              req.resolution)
            grids.append(vit_grid)
        for turn in req.turns:
            if turn.role == "system":
                raise ThinkerRequestError("pass the system prompt as system_prompt, not as a turn", param="messages")
            parts: list = [turn.text] if turn.text else []
            if image_pending and turn.role == "user":
                parts.insert(0, Visual("vit"))
                image_pending = False
            turns.append((turn.role, parts))
        system = req.system_prompt if req.system_prompt is not None else default_system_prompt(req.task)
        seq = build_understanding_sequence(self.tokenizer, self.tokens, system, turns, grids)
        return seq, visuals

    # --- service ----------------------------------------------------------------------------------

    async def _abort(self, request_id: str) -> None:
        self.num_aborted += 1
        await self.engine.abort(request_id)

    def _check_length(self, num_tokens: int, what: str) -> None:
        if num_tokens > self.max_model_len:
            raise ContextTooLongError(num_tokens, self.max_model_len, what)

    async def check_health(self) -> None:
        """Raises when vLLM's engine is dead (its engine core exited or failed: vLLM's own check) or
        was shut down, so that Serve replaces this replica."""
        if self.engine is None:
            raise RuntimeError("the thinker's vLLM engine was shut down")
        await self.engine.check_health()
        await self._record_export_registry()   # Serve calls this periodically: expired exports show

    async def _record_export_registry(self) -> None:
        try:
            metrics.set_gauge(metrics.EXPORT_REGISTRY_SIZE, await self.claims.num_pending())
        except Exception:   # a metric never fails a request
            log.debug("reading the export registry size failed", exc_info=True)

    def model_info(self) -> dict:
        llm = self.config.llm
        return {"model": str(self.files.root), "variant": self.files.variant, "max_model_len": self.max_model_len,
                "dtype": str(self.dtype).removeprefix("torch."), "num_layers": llm.num_hidden_layers,
                "num_kv_heads": llm.num_key_value_heads, "head_dim": llm.head_dim,
                "kv_bytes_per_token_per_branch": llm.num_hidden_layers * 2 * llm.num_key_value_heads * llm.head_dim
                * torch.tensor([], dtype=self.dtype).element_size(),
                **self._cache_geometry,
                "tasks": ["t2i", "image_edit", "x2t_image", "chat", "t2v", "i2v", "video_edit", "x2t_video"]}

    def engine_stats(self) -> dict:
        """vLLM's scheduler numbers as of its last step (KV-cache usage and blocks in use, queues),
        the exports not claimed yet, and the requests this replica has in vLLM."""
        usable_blocks = max((self._cache_geometry["kv_cache_blocks"] or 1) - 1, 0)   # minus vLLM's null block
        return {"kv_cache_usage": self.stats.kv_cache_usage, "num_running": self.stats.num_running,
                "num_waiting": self.stats.num_waiting, "pending_exports": self.claims.pending(),
                "aborted_requests": self.num_aborted, "submitted_requests": sorted(self.submitted),
                "kv_cache_blocks": usable_blocks,
                "kv_blocks_in_use": round(self.stats.kv_cache_usage * usable_blocks),
                "engine_steps": self.stats.steps, "pid": os.getpid()}

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        self.claims.close()


def _ray_stat_loggers() -> list:
    """vLLM's engine metrics as Ray metrics (`vllm:*` -> `ray_vllm_*` on the node's metrics port),
    when the engine runs in a Ray process (a Serve replica); without Ray, vLLM keeps its default
    prometheus_client logger."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return []
    from vllm.v1.metrics.ray_wrappers import RayGaugeWrapper, RayPrometheusStatLogger

    class KeptRayGauge(RayGaugeWrapper):
        """vLLM sets its gauges only while the engine steps: recorded again while idle (stages.metrics
        says why), so that an idle engine shows 0 running requests rather than no series."""

        def set(self, value):
            gauge, tags = self.metric, dict(self._tags)
            metrics.keep_alive((gauge.info["name"], tuple(sorted(tags.items()))),
                               lambda: gauge.set(value, tags=tags))
            return super().set(value)

    class LanceRayStatLogger(RayPrometheusStatLogger):
        _gauge_cls = KeptRayGauge

    return [LanceRayStatLogger]


def _safe(text: str) -> str:
    """A request id reduced to the characters export ids allow."""
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in text)[:120] or "req"


def _object_store_put(value):
    import ray

    return ray.put(value)
