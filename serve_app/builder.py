"""Ray Serve application builder: `import_path: serve_app.builder:build_app`.

    args:                       (all optional; unknown keys are errors with a suggested fix;
                                 schema: app_config.AppArgs)
      stage_graph: auto         auto | cpu | single_gpu | multi_gpu | path/to/graph.yaml
                                (auto: cpu.yaml with no GPU, single_gpu.yaml with one, multi_gpu.yaml
                                with more; GPUs of the Ray cluster when the builder runs in it)
      model: null               local dir or hub id (see model_choice.py for the precedence)
      served_model_name: null   the id clients send as `model` (default: the model's own)
      allow_remote_images: false   fetch http(s) image_url parts (off: data URLs only) ...
      remote_image_hosts: []    ... from these hosts only (`host`, `*.suffix`, either with
                                `:port`); empty: nothing is fetched (serve_app/safe_fetch.py)
      remote_image_timeout_s: 10   connect + download of one image, redirects included
      request_timeout_s: 600    a request still running after this gets a 504
      max_image_bytes: 20971520 largest accepted input image
      api_keys: []              keys clients send as `Authorization: Bearer <key>`; the env
                                LANCE_SERVE_API_KEY (comma-separated) adds more; none: no auth
      max_video_bytes: 67108864 largest accepted input video
      video_store_max_jobs: 64  /v1/videos jobs kept at once (a new one past that is a 429)
      video_store_max_bytes: 2147483648  finished videos kept (a new job while full is a 503)
      video_ttl_s: 3600         a video job and its content are deleted this long after creation

The stage graph sets each deployment's Serve options and picks each stage's class (`deployment_class`);
the stage classes get the engine arguments:
    ThinkerStage(model, engine_args, variant)
    DiTStage | CfgParallelDiTStage(model, engine_args, variant, max_batch_size, batch_wait_timeout_s)
    LanceIngress(thinker_handle, dit_handle, settings, other_variants)

A graph serving several checkpoint variants (`variants:`) gets a thinker and a DiT per variant: the
first variant's are ThinkerStage / DiTStage, the others' ThinkerStage_<variant> / DiTStage_<variant>
(app_config.deployment_name). A local model folder serves the graph's variants it holds (a folder with
only Lance_3B_Video serves every task on it); the tiny checkpoint holds both.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.deployment import Application, Deployment

from stages.lance.config import LatentConfig

from .app_config import DEPLOYMENT_NAMES, deployment_name, parse_app_args, stage_key
from .ingress import IngressSettings, LanceIngress
from .model_choice import ServedModel, choose_model, count_gpus
from .knobs import RequestLimits
from .stage_graph import StageGraph, StageGraphError, load_stage_graph, resolve_stage_graph_path

logger = logging.getLogger("ray.serve")
STAGE_HEALTH_CHECK_PERIOD_S = 2.0   # Serve calls each stage replica's check_health this often


@dataclass(frozen=True)
class AppPlan:
    """Everything build_app decides before it imports the stage classes and binds them."""

    graph_path: Path
    graph: StageGraph
    served: ServedModel
    settings: IngressSettings
    thinker_init: dict              # the first variant's
    dit_init: dict
    variants: tuple[str, ...] = ("Lance_3B",)
    stage_inits: dict = None        # variant -> (thinker_init, dit_init), every variant


def served_variants(graph: StageGraph, model_path: str) -> tuple[str, ...]:
    """The graph's variants that the model holds (a local folder is checked; a hub id is trusted)."""
    wanted = graph.served_variants
    root = Path(model_path).expanduser()
    if not root.is_dir() or (root / "llm_config.json").is_file():
        return tuple(wanted)
    present = [v for v in wanted if (root / v).is_dir()]
    if not present:
        raise StageGraphError(f"stage graph {graph.name!r} serves {wanted}, but the model folder "
                              f"holds none of them")
    if present != wanted:
        logger.warning("lance-serve: the model folder holds %s of the graph's variants %s; serving "
                       "those", present, wanted)
    return tuple(present)


def plan_app(args: dict | None, num_gpus: int | None = None) -> AppPlan:
    app_args = parse_app_args(args)
    num_gpus = count_gpus() if num_gpus is None else num_gpus
    graph_path = resolve_stage_graph_path(app_args.stage_graph, num_gpus)
    graph = load_stage_graph(graph_path)
    served = choose_model(app_args.model, graph.model, num_gpus)
    variants = served_variants(graph, served.path)
    limits = RequestLimits(max_image_side=LatentConfig().max_image_side,
                           max_new_tokens=min(graph.thinker_spec(v).engine.max_model_len
                                              for v in variants),
                           max_image_bytes=app_args.max_image_bytes,
                           max_video_bytes=app_args.max_video_bytes,
                           max_num_frames=LatentConfig().max_num_frames,
                           allow_remote_images=app_args.allow_remote_images,
                           remote_image_hosts=tuple(app_args.remote_image_hosts),
                           remote_image_timeout_s=app_args.remote_image_timeout_s)
    if app_args.allow_remote_images and not app_args.remote_image_hosts:
        logger.warning("lance-serve: allow_remote_images is on but remote_image_hosts is empty: "
                       "no image URL will be fetched")
    from .video_jobs import VideoStoreLimits
    store = VideoStoreLimits(max_jobs=app_args.video_store_max_jobs,
                             max_bytes=app_args.video_store_max_bytes, ttl_s=app_args.video_ttl_s,
                             job_timeout_s=max(app_args.request_timeout_s, app_args.video_ttl_s))
    settings = IngressSettings(served_model_name=app_args.served_model_name or served.name,
                               model_path=served.path,
                               tiny_random_weights=served.tiny_random_weights,
                               stage_graph=graph.name,
                               request_timeout_s=app_args.request_timeout_s, limits=limits,
                               variants=variants, video_store=store,
                               api_keys=tuple(app_args.api_keys))
    inits = {}
    for variant in variants:
        thinker, dit = graph.thinker_spec(variant), graph.dit_spec(variant)
        inits[variant] = (
            {"model": served.path, "variant": variant,
             "engine_args": thinker.engine.vllm_engine_args()},
            {"model": served.path, "variant": variant, "engine_args": dit.engine.model_dump(),
             "max_batch_size": dit.batching.max_batch_size,
             "batch_wait_timeout_s": dit.batching.batch_wait_timeout_s})
    return AppPlan(graph_path=graph_path, graph=graph, served=served, settings=settings,
                   thinker_init=inits[variants[0]][0], dit_init=inits[variants[0]][1],
                   variants=variants, stage_inits=inits)


def _stage_deployment(import_path: str, name: str, options: dict) -> Deployment:
    module_name, _, attr = import_path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise StageGraphError(f"cannot import the {name} class {import_path!r}: {e}") from e
    deployment = cls if isinstance(cls, Deployment) else serve.deployment(cls)
    return deployment.options(name=name, **options)


def build_app(args: dict) -> Application:
    plan = plan_app(args)
    graph = plan.graph
    logger.info("lance-serve: stage graph %s (%s), model %s (from %s), variants %s", graph.name,
                plan.graph_path, plan.served.path, plan.served.source, ", ".join(plan.variants))
    options = graph.deployment_options()
    # a replica being replaced (redeploy, downscale) finishes what it runs: the longest request
    drain = {"graceful_shutdown_timeout_s": plan.settings.request_timeout_s + 30}
    # a stage whose engine died is replaced after 3 failed checks: seconds, not Serve's 30 (the
    # requests it failed are waiting to be retried); check_health only reads a flag
    health = {"health_check_period_s": STAGE_HEALTH_CHECK_PERIOD_S}
    bound = {}
    for i, variant in enumerate(plan.variants):
        thinker_key, dit_key = stage_key("thinker", i, variant), stage_key("dit", i, variant)
        thinker_init, dit_init = plan.stage_inits[variant]
        thinker = _stage_deployment(graph.thinker_spec(variant).deployment_class, deployment_name(thinker_key),
                                    options[thinker_key] | drain | health).bind(**thinker_init)
        dit = _stage_deployment(graph.dit_spec(variant).deployment_class, deployment_name(dit_key),
                                options[dit_key] | drain | health).bind(**dit_init)
        bound[variant] = (thinker, dit)
    first, *others = plan.variants
    # a full ingress queue is answered by Serve's proxy: 503 with Retry-After (the stages' 503s,
    # raised in the ingress, carry an OpenAI error body)
    ingress = serve.deployment(LanceIngress).options(
        name=DEPLOYMENT_NAMES["ingress"], backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
        **options["ingress"] | drain)
    return ingress.bind(*bound[first], plan.settings, {v: bound[v] for v in others} or None)
