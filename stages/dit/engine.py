"""The DiT stepping engine: many requests' denoising loops advanced together, one step at a time.

Plain Python (no Ray, no asyncio): the deployment drives it from a worker thread; tests and the
benchmark call it directly. Each `step()` admits waiting requests, builds one row per CFG branch that
is active at each request's current step (cond always, uncond inside the CFG interval), runs them in
as few forwards as the token budget allows (a request's rows always share a forward), then applies
CFG + renorm and the Euler update per request. Requests join and leave between steps; each keeps
its own schedule, step count and CFG knobs, so batching never changes what a request computes.

The latent state is kept in fp32 whatever the model dtype (upstream keeps it in bf16); the model
sees it in its own dtype, as the model core's loop does.
"""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from stages.lance.denoise import initial_noise as initial_noise_draw
from stages.lance.handoff import BranchKV, ContextHandoff
from stages.lance.limits import LimitError, check_denoise_params
from stages.lance.model import LanceModel
from stages.lance.scheduler import FlowMatchEulerScheduler

from .forward import BranchContext, FastForward, ReferenceForward, Row, VelocityForward

log = logging.getLogger(__name__)


class DiTRequestError(ValueError):
    """A hand-off the DiT cannot run; carries an HTTP status for the ingress (serve_app.errors)."""

    http_status = 400

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_handoff"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass(eq=False)
class DenoiseJob:
    """One request's denoising loop."""

    request_id: str
    grid: tuple[int, int, int]
    scheduler: FlowMatchEulerScheduler
    cond: BranchContext
    uncond: BranchContext | None
    x: torch.Tensor                                  # [n, channels] fp32, the current latents
    on_step: Callable[[int, int], None] | None = None  # (steps done, total) after every step
    on_decode: Callable[[int, int], None] | None = None  # videos: (latent frames decoded, total) in the VAE
    video: bool = False                              # decode to a video (MP4), not an image
    step: int = 0
    cancelled: bool = False
    error: BaseException | None = None
    forward_calls: list[int] = field(default_factory=list)  # rows of each forward it took part in
    sigmas: torch.Tensor | None = None               # the schedule on the model's device (no host syncs)

    def __post_init__(self):
        if self.sigmas is None:
            self.sigmas = self.scheduler.sigmas.to(self.x.device)

    @property
    def total_steps(self) -> int:
        return self.scheduler.num_steps

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps or self.cancelled or self.error is not None

    def rows(self, dtype: torch.dtype) -> list[Row]:
        sigma = self.sigmas[self.step]
        latents = self.x.to(dtype)
        rows = [Row(self.cond, latents, sigma, request=self)]
        if self.uses_cfg_now:
            rows.append(Row(self.uncond, latents, sigma, request=self))
        return rows

    @property
    def uses_cfg_now(self) -> bool:
        return self.uncond is not None and self.scheduler.uses_cfg(self.step)

    @property
    def tokens_now(self) -> int:
        return (self.x.shape[0] + 2) * (2 if self.uses_cfg_now else 1)

    def apply(self, velocities: list[torch.Tensor]) -> None:
        """CFG-combine this step's velocities and take the Euler step."""
        if len(velocities) == 2:
            v = self.scheduler.guide(velocities[0], velocities[1])
        else:
            v = velocities[0]
        clean = self.cond.clean_rows   # i2v's pinned first frame: predicted (it enters the renorm), never moved
        if clean:
            self.x = torch.cat([self.x[:clean], self.scheduler.step(self.x[clean:], v[clean:], self.step)])
        else:
            self.x = self.scheduler.step(self.x, v, self.step)
        self.step += 1


class DenoiseEngine:
    """Runs `DenoiseJob`s to completion in shared forwards (see the module docstring)."""

    def __init__(self, model: LanceModel, forward: str | VelocityForward = "fast", *, kernels: str = "torch",
                 attention_backends=None, attention_kernel: str = "sdpa", cuda_graphs: bool = False,
                 gate_up_kernel: str = "cublas", max_batch_size: int = 8,
                 max_tokens_per_forward: int = 65536):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.model = model
        self.cfg = model.config
        self.device = model.vae2llm.weight.device
        self.dtype = model.vae2llm.weight.dtype
        if forward == "fast":
            forward = FastForward(model, kernels=kernels, attention_backends=attention_backends,
                                  attention_kernel=attention_kernel, gate_up_kernel=gate_up_kernel,
                                  cuda_graphs=cuda_graphs)
        elif forward == "reference":
            forward = ReferenceForward(model)
        elif isinstance(forward, str):
            raise ValueError(f"unknown forward {forward!r} (fast | reference)")
        self.forward: VelocityForward = forward
        self.max_batch_size = max_batch_size
        self.max_tokens_per_forward = max_tokens_per_forward
        self.active: list[DenoiseJob] = []
        self._pending: collections.deque[DenoiseJob] = collections.deque()
        self._lock = threading.Lock()
        self.forwards_run = 0
        self.last_batch_size = 0   # jobs the last step advanced (metrics)

    # --- building jobs -----------------------------------------------------------------------------

    def prepare(self, handoff: ContextHandoff, cond_kv: tuple[torch.Tensor, torch.Tensor],
                uncond_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                on_step: Callable[[int, int], None] | None = None) -> DenoiseJob:
        """Validate a hand-off (with its fetched K/V) and turn it into a job on this engine's device."""
        p = handoff.params
        grid = self.check_request(handoff.latent_grid, p, has_uncond=handoff.uncond is not None)
        clean = handoff.clean_rows
        cond = self.prepare_branch(handoff.cond, cond_kv, grid, "cond", clean)
        uncond = None
        if handoff.uncond is not None and p.uses_cfg:
            if uncond_kv is None:
                raise DiTRequestError("the hand-off has an uncond branch but no K/V was given for it", param="uncond")
            uncond = self.prepare_branch(handoff.uncond, uncond_kv, grid, "uncond", clean)
        x = self.initial_latents(grid, p.seed, handoff.initial_noise, handoff.num_reference_tokens)
        if handoff.condition_latents is not None:  # i2v: the clean first latent frame pins the first rows
            x = self.pin_condition(x, grid, handoff.condition_latents)
        return DenoiseJob(handoff.request_id, grid, FlowMatchEulerScheduler(p), cond, uncond, x, on_step)

    # The three steps of `prepare`, public for callers that hold only some branches of a request
    # (the CFG-parallel ranks, stages/dit/cfg_parallel.py).

    def check_request(self, latent_grid, params, has_uncond: bool) -> tuple[int, int, int]:
        """What every request must satisfy, whichever branches a caller runs: the latent grid (returned as
        ints), the knobs, and an uncond branch when CFG is on."""
        grid = self._check_grid(latent_grid)
        try:
            check_denoise_params(params)
        except LimitError as e:
            raise DiTRequestError(e.message, param=e.param, code="invalid_value") from None
        if params.uses_cfg and not has_uncond:
            raise DiTRequestError(f"cfg_text_scale={params.cfg_text_scale} needs the text-uncond branch, but the "
                                  "hand-off has none", param="uncond")
        return grid

    def prepare_branch(self, branch: BranchKV, kv: tuple[torch.Tensor, torch.Tensor], grid: tuple[int, int, int],
                       name: str, clean_rows: int = 0) -> BranchContext:
        """One CFG branch's context on this engine's device; its K/V and query positions must fit the grid.
        `clean_rows`: i2v's leading latent rows of clean conditioning (embedded at timestep 0)."""
        llm = self.cfg.llm
        k, v = kv
        want = (llm.num_hidden_layers, branch.context_len, llm.num_key_value_heads, llm.head_dim)
        for label, t in (("K", k), ("V", v)):
            if tuple(t.shape) != want:
                raise DiTRequestError(f"{name} {label} has shape {list(t.shape)}, expected {list(want)} "
                                      "([layers, context_len, kv_heads, head_dim])", param=f"{name}.kv")
        n = grid[0] * grid[1] * grid[2]
        pos = branch.query_positions
        if tuple(pos.shape) != (3, n + 2):
            raise DiTRequestError(f"{name} query_positions has shape {list(pos.shape)}, expected [3, {n + 2}]",
                                  param=f"{name}.query_positions")
        return BranchContext(k.to(self.device, self.dtype), v.to(self.device, self.dtype),
                             pos.to(self.device, torch.long), grid, clean_rows=clean_rows)

    def initial_latents(self, grid: tuple[int, int, int], seed: int, initial_noise: torch.Tensor | None = None,
                        num_reference_tokens: int = 0) -> torch.Tensor:
        """The latents at sigma 1, [n, channels] fp32 on this device: the given noise, or upstream's draw
        (on the model's device, in its dtype, over all VAE tokens of the sample)."""
        n, channels = grid[0] * grid[1] * grid[2], self.cfg.latent.channels
        if initial_noise is not None:
            if tuple(initial_noise.shape) != (n, channels):
                raise DiTRequestError(f"initial_noise has shape {list(initial_noise.shape)}, expected [{n}, {channels}]",
                                      param="initial_noise")
            return initial_noise.to(self.device, torch.float32)
        if num_reference_tokens < 0:
            raise DiTRequestError("num_reference_tokens must be >= 0", param="num_reference_tokens")
        return initial_noise_draw(n, num_reference_tokens, seed, channels, self.device, self.dtype).float()

    def pin_condition(self, x: torch.Tensor, grid: tuple[int, int, int], condition: torch.Tensor) -> torch.Tensor:
        """i2v: the first latent frame's rows of x replaced by the clean condition [h*w, channels]."""
        channels = self.cfg.latent.channels
        if tuple(condition.shape) != (grid[1] * grid[2], channels) or grid[0] < 2:
            raise DiTRequestError(f"condition_latents has shape {list(condition.shape)}; it is one latent frame "
                                  f"[{grid[1] * grid[2]}, {channels}] of a video of >= 2 latent frames",
                                  param="condition_latents")
        return torch.cat([condition.to(x), x[condition.shape[0]:]])

    def _check_grid(self, grid) -> tuple[int, int, int]:
        try:
            t, h, w = (int(g) for g in grid)
        except (TypeError, ValueError):
            raise DiTRequestError(f"latent_grid must be (t, h, w), got {grid!r}", param="latent_grid") from None
        lat = self.cfg.latent
        if min(t, h, w) < 1 or max(h, w) > lat.max_latent_size or t > lat.max_latent_frames:
            raise DiTRequestError(f"latent_grid {(t, h, w)} out of range: 1 <= h, w <= {lat.max_latent_size}, "
                                  f"1 <= t <= {lat.max_latent_frames}", param="latent_grid")
        return t, h, w

    # --- running -----------------------------------------------------------------------------------

    def submit(self, job: DenoiseJob) -> None:
        """Queue a job; it joins at the next step (thread-safe)."""
        with self._lock:
            self._pending.append(job)

    @property
    def has_work(self) -> bool:
        return bool(self.active or self._pending)

    @property
    def num_pending(self) -> int:
        """Jobs submitted and not yet in the batch."""
        return len(self._pending)

    @property
    def jobs(self) -> list[DenoiseJob]:
        """The active and queued jobs (a snapshot; safe to read from another thread)."""
        with self._lock:
            return [*self.active, *self._pending]

    def step(self) -> list[DenoiseJob]:
        """Advance every active job by one step; returns the jobs that finished (or were cancelled)."""
        with self._lock:
            while self._pending and len(self.active) < self.max_batch_size:
                self.active.append(self._pending.popleft())
        finished = [j for j in self.active if j.done]
        running = [j for j in self.active if not j.done]
        self.last_batch_size = len(running)
        for chunk in self._chunks(running):
            rows = [r for job in chunk for r in job.rows(self.dtype)]
            try:
                velocities = self.forward(rows)
            except Exception as e:  # a failed forward fails its jobs, not the engine
                for job in chunk:
                    job.error = e
                continue
            self.forwards_run += 1
            at = 0
            for job in chunk:
                k = 2 if job.uses_cfg_now else 1
                job.forward_calls.append(len(rows))
                job.apply(velocities[at:at + k])
                at += k
                if job.on_step is not None:
                    try:
                        job.on_step(job.step, job.total_steps)
                    except Exception:  # a broken progress listener must not stop the denoising
                        log.exception("progress callback of %s failed", job.request_id)
        finished += [j for j in running if j.done]
        self.active = [j for j in self.active if not j.done]
        return finished

    def _chunks(self, jobs: list[DenoiseJob]):
        chunk, tokens = [], 0
        for job in jobs:
            t = job.tokens_now
            if chunk and tokens + t > self.max_tokens_per_forward:
                yield chunk
                chunk, tokens = [], 0
            chunk.append(job)
            tokens += t
        if chunk:
            yield chunk

    def run(self, jobs: list[DenoiseJob]) -> list[torch.Tensor]:
        """Submit jobs and step until all are done; their final latents [n, channels] (fp32)."""
        for job in jobs:
            self.submit(job)
        while any(not j.done for j in jobs):
            self.step()
        for job in jobs:
            if job.error is not None:
                raise job.error
        return [j.x for j in jobs]
