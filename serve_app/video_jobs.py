"""The Videos API's jobs: a store and runner that lives outside the ingress replicas.

`VideoJobStore` is a detached, named Ray actor (one per Serve application): every ingress replica
finds the same one by name, so a job created through one replica is visible from all of them and
survives an ingress restart (the job keeps running in the store, not in the replica that took the
request). It runs each job's stage calls (thinker prefill, then the DiT's video stream) as an asyncio
task, keeps the finished MP4 in its own memory, and counts `progress` (0-100) from the DiT's real
steps: denoise steps, then the decode and encode chunks of each latent frame.

Bounded: at most `max_jobs` stored jobs (any status; a new job past that is a 429) and `max_bytes` of
finished videos (a new job while the store is full is a 503; a video that would overflow it fails its
job with `storage_full`). Every job is deleted at its `expires_at` (created_at + `ttl_s`, default 1 h;
OpenAI's field): a running job is cancelled then, and a finished one's content removed. DELETE
cancels a running job in both stages (the prefill call or the DiT stream is cancelled: the DiT drops
the job before its next step, and the hand-off's KV objects lose their last reference).

The actor answers with plain dicts (never exceptions): a video object, or {"error": {...},
"http_status": int}, which the ingress turns into an OpenAI error.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from stages.lance.requests import VideoRequest

log = logging.getLogger("ray.serve")

SWEEP_INTERVAL_S = 5.0


@dataclass(frozen=True)
class VideoStoreLimits:
    max_jobs: int = 64
    max_bytes: int = 2 * 2**30
    ttl_s: float = 3600.0                  # a job and its content are deleted this long after creation
    job_timeout_s: float = 3600.0          # a job still running after this fails with `timeout`


def store_error(status: int, message: str, code: str, param: Optional[str] = None,
                type: str = "invalid_request_error") -> dict:
    return {"http_status": status, "error": {"message": message, "type": type, "param": param,
                                             "code": code}}


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VideoError(_Out):
    code: str
    message: str


class VideoLance(_Out):
    """The routed task and ignored parameters; once finished, what was made."""

    task: str
    ignored_params: list[str]
    num_frames: Optional[int] = None
    fps: Optional[float] = None
    prompt_tokens: Optional[int] = None
    target_tokens: Optional[int] = None


class Video(_Out):
    """OpenAI's video object (what _Job.video_object returns)."""

    id: str
    object: Literal["video"]
    created_at: int
    completed_at: Optional[int]
    expires_at: int
    error: Optional[VideoError]
    model: str
    progress: int = Field(ge=0, le=100)
    prompt: str
    remixed_from_video_id: Optional[str]
    seconds: str
    size: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    lance: VideoLance


class VideoList(_Out):
    object: Literal["list"]
    data: list[Video]
    first_id: Optional[str]
    last_id: Optional[str]
    has_more: bool


class VideoDeleted(_Out):
    id: str
    object: Literal["video.deleted"]
    deleted: bool


@dataclass(eq=False)
class _Job:
    id: str
    request: VideoRequest
    variant: str
    model: str
    size: str
    seconds: str
    created_at: int
    expires_at: int
    lance: dict
    remixed_from: Optional[str] = None
    status: str = "queued"
    progress: int = 0
    completed_at: Optional[int] = None
    error: Optional[dict] = None
    content: Optional[bytes] = None
    media_type: str = "video/mp4"
    thumbnail: Optional[bytes] = None
    task: Optional[asyncio.Task] = None
    extra: dict = field(default_factory=dict)   # the finished video's notes (VideoLance)
    seq: int = 0                                # creation order, for listing

    def video_object(self) -> dict:
        return {"id": self.id, "object": "video", "created_at": self.created_at,
                "completed_at": self.completed_at, "expires_at": self.expires_at,
                "error": self.error, "model": self.model, "progress": self.progress,
                "prompt": self.request.prompt, "remixed_from_video_id": self.remixed_from,
                "seconds": self.seconds, "size": self.size, "status": self.status,
                "lance": dict(self.lance, **self.extra)}


class VideoJobStore:
    """The actor class (wrapped by `ray.remote` in `get_video_store`)."""

    def __init__(self, limits: VideoStoreLimits = VideoStoreLimits()):
        self.limits = limits
        self.jobs: dict[str, _Job] = {}
        self.stages: dict[str, tuple[Any, Any]] = {}   # variant -> (thinker handle, DiT handle)
        self._sweeper: Optional[asyncio.Task] = None
        self._seq = 0

    # -- set-up -------------------------------------------------------------------------------------
    async def attach(self, stages: dict[str, tuple[Any, Any]]) -> None:
        """The stage handles jobs run on (each ingress replica attaches the ones it was built with)."""
        self.stages.update(stages)
        self._ensure_sweeper()

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            self.sweep()
            await asyncio.sleep(SWEEP_INTERVAL_S)

    def sweep(self, now: Optional[float] = None) -> list[str]:
        """Delete every job past its expires_at (cancelling it if it still runs)."""
        now = time.time() if now is None else now
        gone = [j.id for j in self.jobs.values() if j.expires_at <= now]
        for job_id in gone:
            self._remove(job_id)
        return gone

    def _remove(self, job_id: str) -> Optional[_Job]:
        job = self.jobs.pop(job_id, None)
        if job is not None and job.task is not None and not job.task.done():
            job.task.cancel()
        return job

    @property
    def used_bytes(self) -> int:
        return sum(len(j.content or b"") + len(j.thumbnail or b"") for j in self.jobs.values())

    # -- the API ------------------------------------------------------------------------------------
    async def create(self, request: VideoRequest, variant: str, model: str, size: str, seconds: str,
                     lance: dict, remix_of: Optional[str] = None) -> dict:
        self._ensure_sweeper()
        self.sweep()
        if len(self.jobs) >= self.limits.max_jobs:
            return store_error(429, f"the video store holds {len(self.jobs)} jobs, its limit: delete "
                               "videos you have downloaded (DELETE /v1/videos/{id}) or wait until "
                               "they expire", "too_many_videos", type="rate_limit_exceeded")
        if self.used_bytes >= self.limits.max_bytes:
            return store_error(503, f"the video store is full ({self.limits.max_bytes} bytes of "
                               "finished videos): delete downloaded videos or retry later",
                               "storage_full", type="service_unavailable")
        if variant not in self.stages:
            return store_error(503, f"the {variant} stages are not connected to the video store",
                               "stage_unavailable", type="service_unavailable")
        now = int(time.time())
        self._seq += 1
        job = _Job(id=f"video_{uuid.uuid4().hex}", request=request, variant=variant, model=model,
                   size=size, seconds=seconds, created_at=now,
                   expires_at=now + int(self.limits.ttl_s), lance=lance, remixed_from=remix_of)
        job.seq = self._seq
        self.jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job))
        return job.video_object()

    async def remix_source(self, job_id: str) -> dict:
        """The stored MP4 of a finished job (what a remix edits), or an error."""
        job = self.jobs.get(job_id)
        if job is None:
            return _not_found(job_id)
        if job.status != "completed" or job.content is None:
            return store_error(400, f"video {job_id} is {job.status}: only a completed video can be "
                               "remixed", "video_not_ready", param="video_id")
        return {"content": job.content, "size": job.size, "variant": job.variant}

    async def get(self, job_id: str) -> dict:
        self.sweep()
        job = self.jobs.get(job_id)
        return _not_found(job_id) if job is None else job.video_object()

    async def list(self, after: Optional[str], limit: int, order: str) -> dict:
        self.sweep()
        jobs = sorted(self.jobs.values(), key=lambda j: (j.created_at, j.seq),
                      reverse=order == "desc")
        if after is not None:
            ids = [j.id for j in jobs]
            if after not in ids:
                return store_error(400, f"after: no video {after!r} (it may have expired)",
                                   "invalid_value", param="after")
            jobs = jobs[ids.index(after) + 1:]
        page = jobs[:limit]
        return {"object": "list", "data": [j.video_object() for j in page],
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                "has_more": len(jobs) > len(page)}

    async def content(self, job_id: str, variant: str) -> dict:
        self.sweep()
        job = self.jobs.get(job_id)
        if job is None:
            return _not_found(job_id)
        if job.status != "completed" or job.content is None:
            return store_error(404 if job.status == "failed" else 409,
                               f"video {job_id} is {job.status}: its content is available once it "
                               "is completed", "video_not_ready", param="video_id")
        if variant == "thumbnail":
            if job.thumbnail is None:
                from .media import first_frame_image
                job.thumbnail = await asyncio.to_thread(first_frame_image, job.content)
            return {"content": job.thumbnail, "media_type": "image/webp"}
        return {"content": job.content, "media_type": job.media_type}

    async def delete(self, job_id: str) -> dict:
        job = self._remove(job_id)
        if job is None:
            return _not_found(job_id)
        return {"id": job_id, "object": "video.deleted", "deleted": True}

    async def stats(self) -> dict:
        return {"jobs": len(self.jobs), "bytes": self.used_bytes,
                "running": sum(1 for j in self.jobs.values() if j.status in ("queued", "in_progress")),
                "limits": self.limits.__dict__}

    async def expire_now(self, job_id: str) -> bool:
        """Move a job's expires_at to now and sweep (operators; the expiry test)."""
        job = self.jobs.get(job_id)
        if job is None:
            return False
        job.expires_at = int(time.time())
        self.sweep()
        return True

    # -- running a job ------------------------------------------------------------------------------
    async def _run(self, job: _Job) -> None:
        from .errors import OpenAIError, stage_error
        from .metrics import StageMetrics
        from .pipeline import StagePipeline

        thinker, dit = self.stages[job.variant]
        pipeline = StagePipeline(thinker, dit, _metrics(StageMetrics))
        total_steps = job.request.params.num_inference_steps

        def on_progress(stage: str, step, total) -> None:
            # work units: the denoise steps, then one decode and one encode chunk per latent frame
            # (a video_edit's frame count is known once its decode starts; progress never goes back)
            job.status = "in_progress"
            if not total or step is None:
                return
            if stage == "denoise":
                done, whole = step, total + 2 * _latent_frames(job.request)
            else:
                done = total_steps + step + (total if stage == "encode" else 0)
                whole = total_steps + 2 * total
            job.progress = max(job.progress, min(99, 100 * done // max(whole, 1)))

        try:
            async with asyncio.timeout(self.limits.job_timeout_s):
                item, handoff = await pipeline.generate_video(job.request, on_progress)
        except asyncio.CancelledError:
            raise   # deleted or expired: the job is already gone from the store
        except TimeoutError:
            job.status, job.error = "failed", {"code": "timeout", "message": "the video did not "
                                               f"finish within {self.limits.job_timeout_s:.0f}s"}
            return
        except OpenAIError as e:
            job.status, job.error = "failed", {"code": e.code or "error", "message": e.message}
            return
        except Exception as e:   # noqa: BLE001 - a job fails, the store keeps serving
            err = stage_error(e, "video")
            job.status, job.error = "failed", {"code": err.code or "error", "message": err.message}
            return
        data = item["video"]
        if self.used_bytes + len(data) > self.limits.max_bytes:
            job.status, job.error = "failed", {"code": "storage_full", "message": "the video store "
                                               "is full; delete downloaded videos and retry"}
            return
        job.content, job.media_type = data, item.get("media_type", "video/mp4")
        job.size = f"{item['width']}x{item['height']}"
        if item.get("num_frames"):   # a video edit's length is known now (12 frames a second + 1)
            job.seconds = f"{(item['num_frames'] - 1) / 12:g}"
        job.extra.update(num_frames=item.get("num_frames"), fps=item.get("fps"),
                         prompt_tokens=handoff.cond.context_len,
                         target_tokens=handoff.num_target_tokens)
        job.status, job.progress, job.completed_at = "completed", 100, int(time.time())


def _latent_frames(req: VideoRequest) -> int:
    return (req.num_frames - 1) // 4 + 1 if req.num_frames and req.task != "video_edit" else 1


_METRICS = None


def _metrics(cls):
    global _METRICS
    if _METRICS is None:
        _METRICS = cls()
    return _METRICS


def _not_found(job_id: str) -> dict:
    return store_error(404, f"no video {job_id!r} (it may have been deleted or expired)",
                       "video_not_found", param="video_id", type="not_found_error")


def store_actor_name(app_name: str) -> str:
    return f"lance-video-jobs-{app_name}"


def get_video_store(app_name: str, limits: VideoStoreLimits):
    """The application's store actor: created detached on first use, found by name afterwards."""
    import ray

    actor_cls = ray.remote(VideoJobStore)
    return actor_cls.options(name=store_actor_name(app_name), namespace="lance-serve",
                             lifetime="detached", get_if_exists=True, num_cpus=0,
                             max_concurrency=1000).remote(limits)
