"""`lance-serve k8s render` and `lance-serve k8s check`: KubeRay RayService manifests.

    lance-serve k8s render --stage-graph multi_gpu --image REGISTRY/lance-serve:0.1.0 -o k8s/multi_gpu.yaml
    lance-serve k8s check k8s/*.yaml --crd path/to/ray.io_rayservices.yaml
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(title="actions", dest="action", required=True, metavar="ACTION")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    render = actions.add_parser("render", help="write the RayService for a stage graph",
                                description="Render a RayService manifest from a stage graph and the "
                                "Serve config (the same app `serve run` runs).", formatter_class=fmt)
    configure_render(render)
    check = actions.add_parser("check", help="check RayService manifests without a cluster",
                               description="Validate manifests against the RayService CRD, Ray's Serve "
                               "schema, our stage-graph schema and the worker groups' resources.",
                               formatter_class=fmt)
    check.add_argument("manifests", nargs="+", type=Path)
    check.add_argument("--crd", type=Path, required=True,
                       help="the RayService CRD (ray.io_rayservices.yaml of the KubeRay release)")
    check.set_defaults(run=_run_check)


def configure_render(parser: argparse.ArgumentParser) -> None:
    from .k8s_render import RenderOptions  # light: dataclass defaults only

    d = RenderOptions(stage_graph="", image="")
    parser.add_argument("--stage-graph", required=True,
                        help="shipped graph name (single_gpu, multi_gpu, ...) or a graph file under configs/")
    parser.add_argument("--image", required=True, help="container image built from the Dockerfile")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
    parser.add_argument("--name", default=d.name, help="RayService name (default lance-<graph>)")
    parser.add_argument("--namespace", default=d.namespace)
    parser.add_argument("--model", default=d.model,
                        help="app arg `model`: local dir in the pod or hub id (default: the graph's)")
    parser.add_argument("--serve-config", default=d.serve_config,
                        help="Serve config (relative to the repository) whose application the manifest runs")
    parser.add_argument("--hf-cache-pvc", default=d.hf_cache_pvc,
                        help="PVC holding the Hugging Face cache ('' for an emptyDir per pod)")
    parser.add_argument("--hf-token-secret", default=d.hf_token_secret,
                        help="Secret with the hub token under key 'token' (optional at run time)")
    parser.add_argument("--api-key-secret", default=d.api_key_secret,
                        help="Secret with the API key(s) clients must send, under key 'key' "
                             "(comma-separated for several); required at run time. '' : no API key")
    parser.add_argument("--initializing-timeout", default=d.initializing_timeout,
                        help="ray.io/initializing-timeout: how long the first start may take")
    parser.add_argument("--memory-per-gpu-gib", type=int, default=d.memory_per_gpu_gib,
                        help="pod memory per GPU of a worker")
    parser.add_argument("--idle-timeout-s", type=int, default=d.idle_timeout_s,
                        help="autoscaler: seconds an idle worker pod is kept")
    parser.add_argument("--image-pull-policy", default=d.image_pull_policy,
                        choices=("IfNotPresent", "Always", "Never"))
    parser.set_defaults(run=_run_render)


def render_options(args: argparse.Namespace):
    from .k8s_render import CLI_FLAGS, RenderOptions

    extra = {attr: getattr(args, attr) for _, attr in CLI_FLAGS}
    return RenderOptions(stage_graph=args.stage_graph, image=args.image, **extra)


def _run_render(args: argparse.Namespace) -> int:
    from .k8s_render import render_manifest

    text = render_manifest(render_options(args))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(args.output)
    else:
        sys.stdout.write(text)
    return 0


def _run_check(args: argparse.Namespace) -> int:
    from .k8s_check import check_file

    if not args.crd.is_file():
        raise FileNotFoundError(f"no CRD at {args.crd}")
    bad = 0
    for path in args.manifests:
        problems = check_file(path, args.crd)
        bad += bool(problems)
        print(f"{path}: no RayService, skipped" if problems is None else
              "\n".join(problems) if problems else f"{path}: ok")
    return 1 if bad else 0
