"""Every Prometheus metric lance-serve defines, in one table, and the one way to record them.

The stages record what happens inside them (the thinker: prefill, KV export, bytes handed off, the
export registry; the DiT: queue, batch, steps, denoise, VAE decode, encode, KV fetch) and the ingress
(serve_app) what the client sees (requests, end-to-end latency, stage calls, retries, refused media
fetches). vLLM's own engine metrics (`vllm:*`) come from the thinker's AsyncLLM through vLLM's
`RayPrometheusStatLogger` (stages/thinker/thinker.py).

They are Ray metrics (`ray.serve.metrics`: inside a Serve replica they also carry the `deployment`,
`replica` and `application` tags), exported by each node's Ray metrics agent on its metrics export
port (KubeRay: 8080; `serve run`: a free port, listed in the session's
`prom_metrics_service_discovery.json`). Ray prefixes every name with `ray_`; a counter is exported as
`<name>` (names here end in `_total`), a histogram as `<name>_bucket`, `_sum` and `_count`. vLLM's
`vllm:x` is exported as `ray_vllm_x` (counters `ray_vllm_x_total`).

Label sets are bounded: a task is one of TASKS (else "other"), a route is a template of the app's route
table (never a raw path), a status is an HTTP status code, and the other labels take the fixed values
named in their descriptions. Recording is cheap (no device sync) and never raises: a metric that
cannot be recorded must not fail a request. Without Ray (offline tests, benchmarks) recording is a
no-op. Nothing here imports Ray until the first record, so deployment tooling can read the table.
"""
from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Prefix Ray's metrics agent puts in front of every name it exports.
EXPORT_PREFIX = "ray_"

TASKS = ("t2i", "image_edit", "x2t_image", "chat", "t2v", "i2v", "video_edit", "x2t_video")
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                     300.0, 600.0, 1800.0)
# Half-integer bounds: Ray's metrics agent rebuilds a histogram's sum from its buckets' midpoints, which
# for these are the whole batch sizes 1, 2, 3 and 4 themselves (so sum/count is the mean batch).
BATCH_BUCKETS = (0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5, 24.5, 32.5, 64.5)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str                       # "counter" | "gauge" | "histogram"
    description: str
    tag_keys: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name Prometheus sees (histograms add _bucket, _sum and _count to it)."""
        return EXPORT_PREFIX + self.name


def _counter(name, description, *tags):
    assert name.endswith("_total"), name
    return MetricSpec(name, "counter", description, tuple(tags))


def _gauge(name, description, *tags):
    return MetricSpec(name, "gauge", description, tuple(tags))


def _histogram(name, description, *tags, buckets=LATENCY_BUCKETS_S):
    return MetricSpec(name, "histogram", description, tuple(tags), tuple(buckets))


# -- ingress (serve_app) ---------------------------------------------------------------------------
REQUESTS = _counter(
    "lance_requests_total",
    "HTTP requests answered, by route template, task (the routed task; 'none' for routes without "
    "one) and status code; a client that left before the answer ended counts as status 499.",
    "route", "task", "status")
REQUEST_DURATION = _histogram(
    "lance_request_duration_seconds",
    "End-to-end time of an HTTP request, from its arrival at the ingress to the last byte of the "
    "answer (streams included), by route template and task.",
    "route", "task")
STAGE_IN_FLIGHT = _gauge(
    "lance_stage_requests_in_flight",
    "Calls an ingress replica has made to a stage (thinker, dit) and not finished yet: the stage's "
    "queue plus what it is running.",
    "stage")
STAGE_CALL_DURATION = _histogram(
    "lance_stage_call_duration_seconds",
    "Time of one stage call seen from the ingress, queueing in the stage included: thinker = prefill "
    "up to the hand-off (images, videos) or the first token (text); dit = hand-off to the encoded "
    "result.",
    "stage", "task")
RETRIES = _counter(
    "lance_retries_total",
    "Stage calls run again because a stage replica died or was unreachable, by stage (thinker, dit).",
    "stage")
FETCHES_REFUSED = _counter(
    "lance_media_fetch_refused_total",
    "Remote media URLs (image_url / video_url over http) that were not used, by reason: disabled, "
    "invalid_url, no_hosts_allowed, host_not_allowed, non_public_address, too_many_redirects, "
    "dns, timeout, connect, http_status, content_type, compressed, too_large, "
    "redirect_without_location.",
    "reason")

# -- thinker (stages/thinker) ----------------------------------------------------------------------
PREFILL_DURATION = _histogram(
    "lance_prefill_duration_seconds",
    "Thinker time of one request's prefill: preprocessing and both CFG branches' contexts up to the "
    "hand-off (image and video tasks), or up to the first token (text tasks).",
    "task")
KV_HANDOFF_DURATION = _histogram(
    "lance_kv_handoff_duration_seconds",
    "KV hand-off time: phase=export is the thinker's, per CFG branch, from vLLM finishing the "
    "prefill to the exported K/V in Ray's object store; phase=fetch is the DiT's, per request, from "
    "the hand-off to both branches' K/V on the DiT replica.",
    "phase")
KV_BYTES = _counter(
    "lance_kv_handoff_bytes_total",
    "Bytes of context K/V the thinker handed to the DiT through Ray's object store, by task.",
    "task")
EXPORT_REGISTRY_SIZE = _gauge(
    "lance_kv_export_registry_size",
    "Exported contexts parked on a thinker replica and not claimed yet (they expire after the "
    "export TTL); 0 when idle.")

# -- DiT (stages/dit) ------------------------------------------------------------------------------
DIT_QUEUE_DEPTH = _gauge(
    "lance_dit_queue_depth",
    "Denoising jobs submitted to a DiT replica's engine and waiting to join its batch.")
DIT_ACTIVE_BATCH = _gauge(
    "lance_dit_active_batch_size",
    "Denoising jobs in a DiT replica's batch after its last engine step (0 when idle).")
DIT_STEP_BATCH = _histogram(
    "lance_dit_step_batch_size",
    "Jobs advanced by one DiT engine step (the batch of that step).", buckets=BATCH_BUCKETS)
DIT_STEPS = _counter(
    "lance_dit_steps_total",
    "DiT engine steps run (each advances every job of the batch by one denoising step, or one "
    "latent frame of a video's decode); its rate is the steps per second.")
DENOISE_DURATION = _histogram(
    "lance_denoise_duration_seconds",
    "DiT time of one request's denoising loop, from the job's submission (queueing for the batch "
    "included) to its last step, by task.",
    "task")
DECODE_DURATION = _histogram(
    "lance_vae_decode_duration_seconds",
    "Wan2.2 VAE decode of one request, from its last denoising step to the decoded pixels (videos: "
    "the last latent frame; on a GPU, kernels still running show in the encode time), by task.",
    "task")
ENCODE_DURATION = _histogram(
    "lance_encode_duration_seconds",
    "Encoding one result on the DiT's encoder threads (PNG, WebP or JPEG for images; H.264 MP4 for "
    "videos: the sum of its chunks), by task.",
    "task")

ALL: tuple[MetricSpec, ...] = tuple(v for v in dict(globals()).values() if isinstance(v, MetricSpec))

# vLLM's engine metrics that the dashboard charts (exported through RayPrometheusStatLogger).
VLLM_EXPORTED = ("ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting", "ray_vllm_kv_cache_usage_perc",
                 "ray_vllm_prompt_tokens_total", "ray_vllm_generation_tokens_total",
                 "ray_vllm_time_to_first_token_seconds", "ray_vllm_e2e_request_latency_seconds")


def task_label(task) -> str:
    return task if task in TASKS else "other"


# -- recording -------------------------------------------------------------------------------------
_made: dict[str, object] = {}
_lock = threading.Lock()


def _metric(spec: MetricSpec):
    metric = _made.get(spec.name)
    if metric is None:
        with _lock:
            metric = _made.get(spec.name)
            if metric is None:
                from ray.serve import metrics   # inside a replica: deployment/replica/application tags

                if spec.kind == "counter":
                    metric = metrics.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)
                elif spec.kind == "gauge":
                    metric = metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)
                else:
                    metric = metrics.Histogram(spec.name, description=spec.description,
                                               boundaries=list(spec.buckets), tag_keys=spec.tag_keys)
                _made[spec.name] = metric
    return metric


def _tags(spec: MetricSpec, tags: dict) -> dict | None:
    if not spec.tag_keys:
        return None
    return {k: str(tags.get(k, "")) for k in spec.tag_keys}


def _ray_running() -> bool:
    ray = sys.modules.get("ray")   # never imported here: without Ray there is nothing to export to
    return ray is not None and ray.is_initialized()


def _record(spec: MetricSpec, method: str, value: float, tags: dict) -> None:
    if not _ray_running():
        return
    try:
        getattr(_metric(spec), method)(value, tags=_tags(spec, tags))
    except Exception:   # a metric never fails a request
        log.debug("recording %s failed", spec.name, exc_info=True)


def declare(spec: MetricSpec, **tags) -> None:
    """Export a counter at 0 for a label set before its first event, so that it exists (a dashboard
    shows 0 retries, not "no data") and `increase()` sees its first event. Ray's `Counter.inc` refuses
    0, so this records through the metric's own `_record` (a private method: if a Ray upgrade drops
    it, the counter just appears at its first event)."""
    if spec.kind != "counter" or not _ray_running():
        return
    try:
        _metric(spec)._record(0, tags=_tags(spec, tags))
    except Exception:
        log.debug("declaring %s failed", spec.name, exc_info=True)


def inc(spec: MetricSpec, value: float = 1, **tags) -> None:
    if value > 0:   # Ray counters refuse 0
        _record(spec, "inc", value, tags)


def observe(spec: MetricSpec, value: float, **tags) -> None:
    _record(spec, "observe", value, tags)


def set_gauge(spec: MetricSpec, value: float, **tags) -> None:
    """Set a gauge; its value is recorded again every GAUGE_REFRESH_S until the next set."""
    _record(spec, "set", value, tags)
    if _ray_running():
        keep_alive((spec.name, tuple(sorted(tags.items()))), lambda: _record(spec, "set", value, tags))


# Ray's metrics agent drops a gauge series that was not recorded in the last two report intervals
# (10 s each by default), so a gauge that is set when something changes (a queue that stays empty)
# would vanish from the endpoint while the process is alive. Each process records its gauges' last
# values again from a daemon thread; a dead process's series still age out.
GAUGE_REFRESH_S = 4.0
_kept: dict[object, object] = {}
_refresher: threading.Thread | None = None


def keep_alive(key, record) -> None:
    """Call `record()` (a gauge's last value, `key` its series) every GAUGE_REFRESH_S from now on."""
    global _refresher
    _kept[key] = record
    if _refresher is None:
        with _lock:
            if _refresher is None:
                _refresher = threading.Thread(target=_refresh_forever, name="lance-metrics-gauges", daemon=True)
                _refresher.start()


def _refresh_forever() -> None:
    import time

    while True:
        time.sleep(GAUGE_REFRESH_S)
        for record in list(_kept.values()):
            try:
                record()
            except Exception:
                log.debug("refreshing a gauge failed", exc_info=True)
