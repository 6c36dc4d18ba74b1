"""Render a KubeRay RayService manifest from a stage graph and the Serve config.

The manifest runs what `serve run configs/lance_2stage.yaml` runs: its serveConfigV2 is that
application config with the stage graph named explicitly, and the Ray worker groups are sized from
the same graph, so the two cannot drift (tests/test_k8s.py re-renders the committed k8s/*.yaml).

Cluster layout
  head    GCS, Serve controller, a proxy, and CPUs for the ingress replicas; never a GPU
          (rayStartParams num-gpus "0", no GPU limit).
  workers one group hosting a thinker and a DiT replica per pod when both fit one GPU
          (single_gpu); otherwise a `thinker` and a `dit` group whose pods hold whole replicas and
          advertise a custom Ray resource (lance_thinker / lance_dit) that the stage's replicas
          request, which pins each stage to its group. A group scales between its stage's min and
          max replicas, through the KubeRay autoscaler.
"""
from __future__ import annotations

import copy
import json
import math
import shlex
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Optional

import yaml

from serve_app.app_config import BUILDER_IMPORT_PATH, deployment_name
from serve_app.stage_graph import REPO_ROOT, StageGraph, load_stage_graph, resolve_stage_graph_path

SERVE_CONFIG = "configs/lance_2stage.yaml"      # relative to the repository root
# The Dockerfile copies the repository's configs/ here; serveConfigV2 names graphs by this path.
IMAGE_APP_ROOT = "/app"
PIN_RESOURCE = {"thinker": "lance_thinker", "dit": "lance_dit"}
COLOCATED_GROUP = "thinker-dit"

HF_CACHE_MOUNT = "/data/hf"
DEFAULT_HF_CACHE_PVC = "lance-hf-cache"
DEFAULT_HF_TOKEN_SECRET = "lance-hf-token"
HF_TOKEN_SECRET_KEY = "token"
# The API key clients must send (env LANCE_SERVE_API_KEY, read by the ingress replica). Not optional:
# the manifests listen beyond loopback, so a pod without the Secret does not start (fail closed).
DEFAULT_API_KEY_SECRET = "lance-api-key"
API_KEY_SECRET_KEY = "key"
API_KEY_ENV = "LANCE_SERVE_API_KEY"   # = serve_app.auth.API_KEY_ENV (no Serve import here)
GPU_RESOURCE = "nvidia.com/gpu"
# CPUs beyond the Ray CPUs of a pod: raylet, dashboard agent, object transfers (and on the head the
# GCS and Serve controller), which Ray does not count but the container has to run.
SYSTEM_CPUS = {"head": 2, "worker": 2}
HEAD_MEMORY_GIB = 16
CPU_POD_MEMORY_GIB_PER_CPU = 4
HEAD_PORTS = (("gcs-server", 6379), ("dashboard", 8265), ("client", 10001), ("serve", 8000),
              ("metrics", 8080))


class RenderError(ValueError):
    """A stage graph or option the renderer cannot turn into a working manifest."""


@dataclass(frozen=True)
class RenderOptions:
    stage_graph: str                              # shipped graph name or path to a graph in configs/
    image: str
    name: Optional[str] = None                    # RayService name; default lance-<graph>
    namespace: Optional[str] = None
    model: Optional[str] = None                   # app arg `model` (else LANCE_MODEL / the graph's)
    serve_config: str = SERVE_CONFIG              # relative to repo_root
    hf_cache_pvc: str = DEFAULT_HF_CACHE_PVC      # "" : an emptyDir per pod (downloads every start)
    hf_token_secret: str = DEFAULT_HF_TOKEN_SECRET
    api_key_secret: str = DEFAULT_API_KEY_SECRET   # "": no API key (anyone reaching the port serves)
    initializing_timeout: str = "2h"              # first start: download (~29 GB) + load + compile
    memory_per_gpu_gib: int = 64
    idle_timeout_s: int = 300                     # an idle autoscaled pod lives this long
    image_pull_policy: str = "IfNotPresent"
    # The tree whose configs/ the image carries (the Dockerfile's COPY configs); not a CLI flag.
    repo_root: Path = REPO_ROOT

    def command(self) -> str:
        """The `lance-serve k8s render` command line that renders these options."""
        args = ["lance-serve", "k8s", "render", "--stage-graph", self.stage_graph, "--image", self.image]
        defaults = RenderOptions(stage_graph=self.stage_graph, image=self.image)
        for flag, attr in CLI_FLAGS:
            value = getattr(self, attr)
            if value != getattr(defaults, attr):
                args += [flag, str(value)]
        return shlex.join(args)


# (flag, RenderOptions attribute) of the optional command-line flags, in command-line order.
CLI_FLAGS = (("--name", "name"), ("--namespace", "namespace"), ("--model", "model"),
             ("--serve-config", "serve_config"), ("--hf-cache-pvc", "hf_cache_pvc"),
             ("--hf-token-secret", "hf_token_secret"), ("--api-key-secret", "api_key_secret"),
             ("--initializing-timeout", "initializing_timeout"),
             ("--memory-per-gpu-gib", "memory_per_gpu_gib"), ("--idle-timeout-s", "idle_timeout_s"),
             ("--image-pull-policy", "image_pull_policy"))


# ----------------------------------------------------------------------------------------------------
# Cluster plan: which pods host which stage replicas
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplicaRange:
    min: int
    initial: int
    max: int


def _k8s_suffix(key: str) -> str:
    """A stage key's suffix in Kubernetes names: "" for the first variant, "-lance-3b-video" after."""
    _, _, variant = key.partition("@")
    return "-" + variant.lower().replace("_", "-") if variant else ""


def replica_range(options: dict) -> ReplicaRange:
    auto = options.get("autoscaling_config")
    if not auto:
        n = options.get("num_replicas") or 1
        return ReplicaRange(n, n, n)
    lo, hi = auto.get("min_replicas", 1), auto.get("max_replicas", 1)
    initial = auto.get("initial_replicas")
    return ReplicaRange(lo, lo if initial is None else initial, hi)


def _add(into: dict[str, float], resources: dict[str, float], times: float = 1) -> None:
    for key, value in resources.items():
        into[key] = into.get(key, 0) + value * times


def replica_demand(options: dict) -> dict[str, float]:
    """Ray resources one replica takes on its node: the bundles of its placement group when it has
    one (Serve reserves them with the replica; packed on one node), else its ray_actor_options."""
    if options.get("placement_group_bundles"):
        need: dict[str, float] = {}
        for bundle in options["placement_group_bundles"]:
            _add(need, bundle)
    else:
        actor = options.get("ray_actor_options") or {}
        need = {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0),
                "memory": actor.get("memory", 0), **(actor.get("resources") or {})}
        if actor.get("accelerator_type"):
            # Ray's own resource name. The group advertises it so the autoscaler can scale for it;
            # the pods must then land on such GPUs (add your cloud's GPU nodeSelector).
            need[f"accelerator_type:{actor['accelerator_type']}"] = 0.001
    return {k: v for k, v in need.items() if v}


def pinned_options(options: dict, pin: dict[str, float]) -> dict:
    """Serve options that also request the group's pin (in the first bundle too: Serve wants the
    replica's own resources to be a subset of it)."""
    options = copy.deepcopy(options)
    actor = options.setdefault("ray_actor_options", {})
    actor["resources"] = {**(actor.get("resources") or {}), **pin}
    if options.get("placement_group_bundles"):
        options["placement_group_bundles"][0].update(pin)
    return options


@dataclass
class GroupPlan:
    """One Ray node type: what a pod advertises to Ray and how many pods there may be."""

    name: str
    stages: tuple[str, ...]
    ray_cpus: int
    gpus: int
    custom: dict[str, int] = field(default_factory=dict)
    ray_memory_bytes: Optional[int] = None        # set only when a stage reserves memory
    pods: ReplicaRange = ReplicaRange(1, 1, 1)


@dataclass
class ClusterPlan:
    head: GroupPlan
    workers: list[GroupPlan]
    options: dict[str, dict]                      # stage -> Serve options, pins included
    pinned: tuple[str, ...] = ()                  # stages whose options the manifest overrides


def _group(name: str, hosted: dict[str, tuple[dict, int]], pods: ReplicaRange) -> GroupPlan:
    """A group whose pods each hold `count` replicas of every stage in `hosted` (stage -> (options,
    count))."""
    need: dict[str, float] = {}
    for options, count in hosted.values():
        _add(need, replica_demand(options), count)
    cpus, gpus, memory = need.pop("CPU", 0), need.pop("GPU", 0), need.pop("memory", 0)
    # Ray's autoscaler reads rayStartParams resources as whole numbers; round up.
    custom = {k: max(1, math.ceil(v - 1e-9)) for k, v in need.items()}
    return GroupPlan(name=name, stages=tuple(hosted), ray_cpus=math.ceil(cpus - 1e-9),
                     gpus=math.ceil(gpus - 1e-9), custom=custom,
                     ray_memory_bytes=int(memory) if memory else None, pods=pods)


def plan_cluster(stage_opts: dict[str, dict]) -> ClusterPlan:
    """Worker groups for the stages' Serve options (`StageGraph.deployment_options()`, which the
    builder binds)."""
    options = dict(stage_opts)
    gpus = {stage: replica_demand(o).get("GPU", 0) for stage, o in options.items()}
    ranges = {stage: replica_range(o) for stage, o in options.items()}
    if gpus["ingress"] > 0:
        raise RenderError("the ingress asks for GPUs; the renderer puts the ingress on the head, "
                          "which takes no GPU work: set stages.ingress.resources.num_gpus to 0")
    head = _group("head", {"ingress": (options["ingress"], ranges["ingress"].max)}, ReplicaRange(1, 1, 1))

    # one (thinker, DiT) pair per checkpoint variant; with several, every pair is pinned to its own
    # groups so that two variants' replicas never share a pod (or a GPU) sized for one pair
    pairs = [(k, "dit" + k[len("thinker"):]) for k in options if k.partition("@")[0] == "thinker"]
    several = len(pairs) > 1
    workers, pinned = [], []
    for thinker_key, dit_key in pairs:
        suffix = _k8s_suffix(thinker_key)
        t, d = ranges[thinker_key], ranges[dit_key]
        if gpus[thinker_key] + gpus[dit_key] <= 1:
            # One replica of each shares a pod (and its one GPU, if any), as on a single machine.
            name = COLOCATED_GROUP + suffix
            if several:
                for key in (thinker_key, dit_key):
                    options[key] = pinned_options(options[key], {f"lance_pair{suffix}": 1.0})
                pinned += [thinker_key, dit_key]
            pods = ReplicaRange(max(t.min, d.min), max(t.initial, d.initial), max(t.max, d.max))
            workers.append(_group(name, {s: (options[s], 1) for s in (thinker_key, dit_key)}, pods))
            continue
        for key in (thinker_key, dit_key):
            stage = key.partition("@")[0]
            pin = PIN_RESOURCE[stage] + suffix.replace("-", "_")
            options[key] = pinned_options(options[key], {pin: 1.0})
            share, rng = gpus[key], ranges[key]
            # fractional GPU shares: as many replicas as fit one GPU; whole GPUs: one replica per pod
            per_pod = math.floor(1 / share + 1e-9) if 0 < share < 1 else 1
            pods = ReplicaRange(*(math.ceil(n / per_pod) for n in (rng.min, rng.initial, rng.max)))
            workers.append(_group(stage + suffix, {key: (options[key], per_pod)}, pods))
            pinned.append(key)
    return ClusterPlan(head=head, workers=workers, options=options, pinned=tuple(pinned))


# ----------------------------------------------------------------------------------------------------
# Serve config: configs/lance_2stage.yaml with the graph named, and the stage pins
# ----------------------------------------------------------------------------------------------------
def resolve_graph_file(stage_graph: str, repo_root: Path = REPO_ROOT) -> Path:
    """A shipped graph name or a path (as the builder resolves them); the file must be under the
    repository's configs/, which is what the image carries."""
    path = resolve_stage_graph_path(stage_graph, repo_root=repo_root).resolve()
    configs = (repo_root / "configs").resolve()
    if not path.is_relative_to(configs):
        raise RenderError(f"{stage_graph}: the stage graph must live under {configs} so that the image "
                          "(Dockerfile: COPY configs) carries it; add it there and rebuild the image")
    return path


def image_path(repo_file: Path, repo_root: Path = REPO_ROOT) -> str:
    """Where a repository file lies in the image."""
    return f"{IMAGE_APP_ROOT}/{Path(repo_file).resolve().relative_to(repo_root.resolve()).as_posix()}"


def repo_path(path_in_image: str, repo_root: Path = REPO_ROOT) -> Optional[Path]:
    """The repository file an image path was copied from (None: not under the image's app root)."""
    prefix = IMAGE_APP_ROOT.rstrip("/") + "/"
    return repo_root / path_in_image[len(prefix):] if path_in_image.startswith(prefix) else None


def builder_application(serve_config: dict, where: str) -> dict:
    apps = [a for a in serve_config.get("applications") or []
            if isinstance(a, dict) and a.get("import_path") == BUILDER_IMPORT_PATH]
    if len(apps) != 1:
        raise RenderError(f"{where}: expected one application with import_path {BUILDER_IMPORT_PATH}, "
                          f"found {len(apps)}")
    return apps[0]


# What a rendered override sets: the options that place a replica (Serve replaces each whole).
PLACEMENT_OPTIONS = ("ray_actor_options", "placement_group_bundles", "placement_group_strategy")


def render_serve_config(opts: RenderOptions, graph_file: Path, plan: ClusterPlan) -> dict:
    path = opts.repo_root / opts.serve_config
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RenderError(f"{path}: cannot read the Serve config: {e.strerror}") from e
    app = builder_application(config, str(path))
    args = dict(app.get("args") or {})
    args["stage_graph"] = image_path(graph_file, opts.repo_root)
    if opts.model is not None:
        args["model"] = opts.model
    app["args"] = args
    if plan.pinned:
        # Serve replaces a deployment's ray_actor_options (and bundles) with the config's: repeat
        # the graph's and add the pin, so the stages land on their worker groups.
        app["deployments"] = [{"name": deployment_name(stage),
                               **{k: plan.options[stage][k] for k in PLACEMENT_OPTIONS
                                  if k in plan.options[stage]}}
                              for stage in plan.pinned]
    return config


# ----------------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------------
def ray_version() -> str:
    """The Ray the project installs (pyproject pins ray[serve]==2.60.*); the image installs the same."""
    return metadata.version("ray")


def _quantity_gib(gib: float) -> str:
    return f"{math.ceil(gib)}Gi"


def ray_start_resources(custom: dict[str, int]) -> str:
    """rayStartParams `resources`: KubeRay passes it through a shell, hence the quoted JSON."""
    return '"' + json.dumps(custom, sort_keys=True).replace('"', '\\"') + '"'


def _pod_memory_gib(group: GroupPlan, opts: RenderOptions, is_head: bool) -> int:
    if is_head:
        base = HEAD_MEMORY_GIB
    elif group.gpus:
        base = opts.memory_per_gpu_gib * group.gpus
    else:
        base = max(HEAD_MEMORY_GIB, CPU_POD_MEMORY_GIB_PER_CPU * group.ray_cpus)
    reserved = (group.ray_memory_bytes or 0) / 2**30
    # Ray's object store takes 30% of the pod by default; reservations come out of the rest.
    return max(base, math.ceil(reserved / 0.6))


def _ray_start_params(group: GroupPlan, is_head: bool) -> dict[str, str]:
    params = {"num-cpus": str(group.ray_cpus), "num-gpus": str(group.gpus)}
    if group.ray_memory_bytes:
        params["memory"] = str(group.ray_memory_bytes)
    if group.custom:
        params["resources"] = ray_start_resources(group.custom)
    if is_head:
        params["dashboard-host"] = "0.0.0.0"
    return params


def _env(opts: RenderOptions) -> list[dict]:
    env = [{"name": "HF_HOME", "value": HF_CACHE_MOUNT},
           # optional: Lance is public; a token lifts the hub's rate limits
           {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
               "name": opts.hf_token_secret, "key": HF_TOKEN_SECRET_KEY, "optional": True}}}]
    if opts.api_key_secret:
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {
            "name": opts.api_key_secret, "key": API_KEY_SECRET_KEY, "optional": False}}})
    return env


def _volumes(opts: RenderOptions) -> list[dict]:
    cache = ({"persistentVolumeClaim": {"claimName": opts.hf_cache_pvc}} if opts.hf_cache_pvc
             else {"emptyDir": {}})
    # Ray's object store lives in /dev/shm, which Kubernetes otherwise caps at 64 MiB.
    return [{"name": "hf-cache", **cache}, {"name": "dshm", "emptyDir": {"medium": "Memory"}}]


def _pod_template(group: GroupPlan, opts: RenderOptions, is_head: bool, app_name: str) -> dict:
    cpus = group.ray_cpus + SYSTEM_CPUS["head" if is_head else "worker"]
    amounts = {"cpu": str(cpus), "memory": _quantity_gib(_pod_memory_gib(group, opts, is_head))}
    if group.gpus:
        amounts[GPU_RESOURCE] = str(group.gpus)
    container = {
        "name": "ray-head" if is_head else "ray-worker",
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "env": _env(opts),
        "volumeMounts": [{"name": "hf-cache", "mountPath": HF_CACHE_MOUNT},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if is_head:
        container["ports"] = [{"name": n, "containerPort": p} for n, p in HEAD_PORTS]
    spec: dict = {"containers": [container], "volumes": _volumes(opts)}
    if group.gpus:
        spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    component = "ray-head" if is_head else f"ray-worker-{group.name}"
    labels = {"app.kubernetes.io/name": "lance-serve", "app.kubernetes.io/instance": app_name,
              "app.kubernetes.io/component": component}
    return {"metadata": {"labels": labels}, "spec": spec}


def _literal_str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


class _ManifestDumper(yaml.SafeDumper):
    pass


_ManifestDumper.add_representer(str, _literal_str)


def dump_yaml(data) -> str:
    return yaml.dump(data, Dumper=_ManifestDumper, sort_keys=False, default_flow_style=False, width=100)


def default_name(graph: StageGraph) -> str:
    return "lance-" + graph.name.replace("_", "-").lower()


def build_rayservice(opts: RenderOptions) -> dict:
    graph_file = resolve_graph_file(opts.stage_graph, opts.repo_root)
    graph = load_stage_graph(graph_file)
    plan = plan_cluster(graph.deployment_options())
    serve_config = render_serve_config(opts, graph_file, plan)
    name = opts.name or default_name(graph)
    autoscaling = any(g.pods.min < g.pods.max for g in plan.workers)

    metadata_: dict = {"name": name}
    if opts.namespace:
        metadata_["namespace"] = opts.namespace
    metadata_["labels"] = {"app.kubernetes.io/name": "lance-serve", "app.kubernetes.io/instance": name}
    # The first start downloads and loads the weights and compiles; KubeRay fails the RayService
    # for good if it is not ready by then, so this is generous.
    metadata_["annotations"] = {"ray.io/initializing-timeout": opts.initializing_timeout}

    cluster: dict = {"rayVersion": ray_version(), "enableInTreeAutoscaling": autoscaling}
    if autoscaling:
        cluster["autoscalerOptions"] = {"upscalingMode": "Default",
                                        "idleTimeoutSeconds": opts.idle_timeout_s}
    cluster["headGroupSpec"] = {"rayStartParams": _ray_start_params(plan.head, is_head=True),
                                "template": _pod_template(plan.head, opts, True, name)}
    cluster["workerGroupSpecs"] = [
        {"groupName": g.name, "replicas": g.pods.initial, "minReplicas": g.pods.min,
         "maxReplicas": g.pods.max, "rayStartParams": _ray_start_params(g, is_head=False),
         "template": _pod_template(g, opts, False, name)}
        for g in plan.workers]
    return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": metadata_,
            "spec": {"upgradeStrategy": {"type": "NewCluster"},
                     "serveConfigV2": dump_yaml(serve_config),
                     "rayClusterConfig": cluster}}


RENDERED_BY = "# Rendered by: "


def render_manifest(opts: RenderOptions) -> str:
    manifest = build_rayservice(opts)
    graph_file = resolve_graph_file(opts.stage_graph, opts.repo_root)
    graph_rel = graph_file.relative_to(opts.repo_root.resolve()).as_posix()
    header = (f"{RENDERED_BY}{opts.command()}\n"
              f"# from {graph_rel} and {opts.serve_config}. Do not edit: change those and re-render\n"
              "# (tests/test_k8s.py fails while a committed manifest is stale).\n")
    return header + dump_yaml(manifest)


def rendered_by(text: str) -> Optional[str]:
    """The render command recorded in a manifest's first line, if any."""
    first = text.split("\n", 1)[0]
    return first[len(RENDERED_BY):] if first.startswith(RENDERED_BY) else None
