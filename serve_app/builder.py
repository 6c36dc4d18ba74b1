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

The stage graph sets each deployment's Serve options and picks each stage's class (`deployment_class`);
the stage classes get the engine arguments:
    ThinkerStage(model, engine_args, variant)
    DiTStage | CfgParallelDiTStage(model, engine_args, variant, max_batch_size, batch_wait_timeout_s)
    LanceIngress(thinker_handle, dit_handle, settings)
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

from .app_config import DEPLOYMENT_NAMES, parse_app_args
from .ingress import IngressSettings, LanceIngress
from .model_choice import ServedModel, choose_model, count_gpus
from .knobs import RequestLimits
from .stage_graph import StageGraph, StageGraphError, load_stage_graph, resolve_stage_graph_path

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class AppPlan:
    """Everything build_app decides before it imports the stage classes and binds them."""

    graph_path: Path
    graph: StageGraph
    served: ServedModel
    settings: IngressSettings
    thinker_init: dict
    dit_init: dict


def plan_app(args: dict | None, num_gpus: int | None = None) -> AppPlan:
    app_args = parse_app_args(args)
    num_gpus = count_gpus() if num_gpus is None else num_gpus
    graph_path = resolve_stage_graph_path(app_args.stage_graph, num_gpus)
    graph = load_stage_graph(graph_path)
    served = choose_model(app_args.model, graph.model, num_gpus)
    thinker, dit = graph.stages.thinker, graph.stages.dit
    limits = RequestLimits(max_image_side=LatentConfig().max_image_side,
                           max_new_tokens=thinker.engine.max_model_len,
                           max_image_bytes=app_args.max_image_bytes,
                           allow_remote_images=app_args.allow_remote_images,
                           remote_image_hosts=tuple(app_args.remote_image_hosts),
                           remote_image_timeout_s=app_args.remote_image_timeout_s)
    if app_args.allow_remote_images and not app_args.remote_image_hosts:
        logger.warning("lance-serve: allow_remote_images is on but remote_image_hosts is empty: "
                       "no image URL will be fetched")
    settings = IngressSettings(served_model_name=app_args.served_model_name or served.name,
                               model_path=served.path,
                               tiny_random_weights=served.tiny_random_weights,
                               stage_graph=graph.name,
                               request_timeout_s=app_args.request_timeout_s, limits=limits,
                               api_keys=tuple(app_args.api_keys))
    return AppPlan(
        graph_path=graph_path, graph=graph, served=served, settings=settings,
        thinker_init={"model": served.path, "variant": graph.variant,
                      "engine_args": thinker.engine.vllm_engine_args()},
        dit_init={"model": served.path, "variant": graph.variant,
                  "engine_args": dit.engine.model_dump(),
                  "max_batch_size": dit.batching.max_batch_size,
                  "batch_wait_timeout_s": dit.batching.batch_wait_timeout_s})


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
    stages, options = plan.graph.stages, plan.graph.deployment_options()
    logger.info("lance-serve: stage graph %s (%s), model %s (from %s)", plan.graph.name,
                plan.graph_path, plan.served.path, plan.served.source)
    # a replica being replaced (redeploy, downscale) finishes what it runs: the longest request
    drain = {"graceful_shutdown_timeout_s": plan.settings.request_timeout_s + 30}
    thinker = _stage_deployment(stages.thinker.deployment_class, DEPLOYMENT_NAMES["thinker"],
                                options["thinker"] | drain).bind(**plan.thinker_init)
    dit = _stage_deployment(stages.dit.deployment_class, DEPLOYMENT_NAMES["dit"],
                            options["dit"] | drain).bind(**plan.dit_init)
    # a full ingress queue is answered by Serve's proxy: 503 with Retry-After (the stages' 503s,
    # raised in the ingress, carry an OpenAI error body)
    ingress = serve.deployment(LanceIngress).options(
        name=DEPLOYMENT_NAMES["ingress"], backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
        **options["ingress"] | drain)
    return ingress.bind(thinker, dit, plan.settings)
