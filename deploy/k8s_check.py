"""Offline checks of a RayService manifest: what `kubectl apply` and the cluster would reject, found
before anything is applied. Every problem comes back as one readable line that names where it is.

  schema      the RayService CRD's openAPIV3Schema through jsonschema, unknown fields rejected (as
              `kubectl apply --validate=strict` does), list-map keys unique, KubeRay's name and
              ray.io/initializing-timeout rules
  serve       serveConfigV2 through Ray's ServeDeploySchema (unknown keys, which Ray ignores, are
              errors here), the import_path found (without importing it: the app imports torch and
              Ray Serve), the builder's args and the stage graph through our schemas, and deployment
              overrides that agree with the graph
  resources   each worker group as Ray's KubeRay autoscaler reads it; GPUs that Ray counts backed by
              nvidia.com/gpu limits; no GPU on the head; every deployment fits some group, and all
              replicas at their maximum fit the groups at theirs
"""
from __future__ import annotations

import ast
import importlib.util
import json
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Union, get_args

import yaml
from pydantic import BaseModel, ValidationError

from serve_app.app_config import deployment_name, parse_app_args
from serve_app.stage_graph import REPO_ROOT, StageGraphError, load_stage_graph, resolve_stage_graph_path
from serve_app.strict_model import error_lines, suggest

from .k8s_render import (GPU_RESOURCE, IMAGE_APP_ROOT, PLACEMENT_OPTIONS, ReplicaRange, builder_application,
                         pinned_options, ray_version, replica_demand, replica_range, repo_path)

MAX_RAYSERVICE_NAME = 47          # KubeRay: 53-character RayCluster names minus its 6-character suffix
INITIALIZING_TIMEOUT = "ray.io/initializing-timeout"
INT_RANGES = {"int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1)}
OBJECT_META = {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
    "name": {"type": "string"}, "namespace": {"type": "string"}, "generateName": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}


def load_yaml(path: Union[str, Path]):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)   # the CRD is 1 MB of YAML
    return yaml.load(Path(path).read_text(), Loader=loader)


# ----------------------------------------------------------------------------------------------------
# schema: the CRD's openAPIV3Schema as JSON Schema
# ----------------------------------------------------------------------------------------------------
def openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes structural schema) -> JSON Schema Draft 7.

    Objects with `properties` reject unknown fields unless x-kubernetes-preserve-unknown-fields;
    `nullable` admits null; int32/int64 get their bounds. x-kubernetes-list-map-keys stays, for the
    validator keyword below; x-kubernetes-validations (CEL) are not evaluated.
    """
    if not isinstance(node, dict):
        return node
    out: dict = {}
    for key, value in node.items():
        if key in ("nullable", "x-kubernetes-validations"):
            continue
        if key == "properties":                      # a map of field name -> schema
            out[key] = {name: openapi_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = openapi_to_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [openapi_to_jsonschema(sub) for sub in value]
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("format") in INT_RANGES and node.get("type") == "integer":
        out["minimum"], out["maximum"] = INT_RANGES[node["format"]]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator, keys, instance, schema):
    if not validator.is_type(instance, "array") or schema.get("x-kubernetes-list-type") != "map":
        return
    from jsonschema import ValidationError as SchemaError
    seen = {}
    for i, item in enumerate(instance):
        if isinstance(item, dict):
            key = tuple(json.dumps(item.get(k)) for k in keys)
            if key in seen:
                shown = ", ".join(f"{k}={item.get(k)!r}" for k in keys)
                yield SchemaError(f"items [{seen[key]}] and [{i}] have the same {shown}; "
                                  "Kubernetes keys this list by it")
            seen[key] = i


@lru_cache(maxsize=4)
def crd_validator(crd_path: str, version: str = "v1"):
    from jsonschema import Draft7Validator, validators

    crd = load_yaml(crd_path)
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        raise ValueError(f"{crd_path}: no version {version!r} (has {', '.join(versions)})")
    schema = openapi_to_jsonschema(versions[version]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    kind = crd["spec"]["names"]["kind"]
    schema["properties"]["kind"] = {"const": kind}
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{version}"}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    cls = validators.extend(Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys})
    return cls(schema)


def json_path(parts: Iterable) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<top level>"


def _schema_message(error) -> str:
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        return "; ".join(f"unknown field '{k}'{suggest(k, known)}"
                         for k in sorted(error.instance) if k not in known)
    if error.validator in ("anyOf", "oneOf") and error.context:
        return "; ".join(sorted({e.message for e in error.context}))
    return error.message


def schema_problems(manifest: dict, crd_path: Union[str, Path]) -> list[str]:
    validator = crd_validator(str(crd_path))
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))
    problems = [f"{json_path(e.absolute_path)}: {_schema_message(e)}" for e in errors]
    return problems + metadata_problems(manifest.get("metadata") or {})


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def go_duration_s(text: str) -> Optional[float]:
    """Seconds of a Go duration ("90m", "1h30m") or of a whole number of seconds; None if neither."""
    if text.isdigit():
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _SECONDS[u] for n, u in parts)


def metadata_problems(meta: dict) -> list[str]:
    """The checks KubeRay's ValidateRayServiceMetadata makes."""
    problems = []
    name = str(meta.get("name", ""))
    if len(name) > MAX_RAYSERVICE_NAME:
        problems.append(f"metadata.name: {name!r} is longer than {MAX_RAYSERVICE_NAME} characters")
    if name and not _DNS1035.match(name):
        problems.append(f"metadata.name: {name!r} is not a DNS-1035 label (lowercase letters, digits, "
                        "'-', starting with a letter)")
    timeout = (meta.get("annotations") or {}).get(INITIALIZING_TIMEOUT)
    if timeout is None:
        problems.append(f"metadata.annotations: no {INITIALIZING_TIMEOUT}: the first start downloads "
                        "and loads the weights; say how long KubeRay should wait for it")
    elif not (go_duration_s(str(timeout)) or 0) > 0:
        problems.append(f"metadata.annotations.{INITIALIZING_TIMEOUT}: {timeout!r} is not a positive "
                        "Go duration ('90m', '2h') or number of seconds")
    return problems


# ----------------------------------------------------------------------------------------------------
# serve: serveConfigV2
# ----------------------------------------------------------------------------------------------------
def _model_classes(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [c for arg in get_args(annotation) for c in _model_classes(arg)]


def unknown_keys(model: type[BaseModel], data: Any, where: str) -> list[str]:
    """Keys a pydantic model would silently ignore (Ray's Serve schemas accept any key)."""
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    names = {f.alias or n: n for n, f in fields.items()} | {n: n for n in fields}
    problems = []
    for key, value in data.items():
        if key not in names:
            problems.append(f"{where}: unknown key '{key}'{suggest(str(key), fields)}")
            continue
        annotation = fields[names[key]].annotation
        for cls in _model_classes(annotation)[:1]:
            items = enumerate(value) if isinstance(value, list) else [(None, value)]
            for i, item in items:
                problems += unknown_keys(cls, item, f"{where}.{key}" + ("" if i is None else f"[{i}]"))
    return problems


def top_level_names(source: str) -> set[str]:
    """Names a module binds at its top level (functions, classes, assignments, imports)."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def import_problems(import_path: str, where: str) -> list[str]:
    """What Serve does with import_path (import the module, take the attribute), checked without
    running the module: it is found on the path and binds the attribute at its top level."""
    sep = ":" if ":" in import_path else "."
    module_name, _, attr = import_path.rpartition(sep)
    try:
        spec = importlib.util.find_spec(module_name) if module_name else None
    except (ImportError, ValueError) as e:
        return [f"{where}: {import_path!r} does not import: {type(e).__name__}: {e}"]
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return [f"{where}: {import_path!r} does not import: No module named {module_name!r}"]
    try:
        names = top_level_names(Path(spec.origin).read_text())
    except (OSError, SyntaxError) as e:
        return [f"{where}: {import_path!r} does not import: {type(e).__name__}: {e}"]
    if attr not in names:
        return [f"{where}: {import_path!r} does not import: module {module_name!r} has no attribute {attr!r}"]
    return []


@dataclass(frozen=True)
class DeploymentDemand:
    name: str
    options: dict                 # Serve options after the config's overrides
    replicas: ReplicaRange

    @property
    def per_replica(self) -> dict[str, float]:
        return replica_demand(self.options)


def _graph_path(stage_graph: str, repo_root: Path) -> Optional[Path]:
    if stage_graph.startswith("/"):
        return repo_path(stage_graph, repo_root)
    try:
        return resolve_stage_graph_path(stage_graph, repo_root=repo_root)
    except StageGraphError:
        return None


def serve_problems(serve_config_text: str, repo_root: Path = REPO_ROOT
                   ) -> tuple[list[str], list[DeploymentDemand]]:
    """Problems of serveConfigV2, and the deployments it makes (for the resource checks).
    `repo_root`: the tree whose configs/ the image carries."""
    # Ray's own schema, with its validators, is the truth for serveConfigV2: the one Ray Serve module
    # the deploy tooling imports, only here (it loads the ray.serve package; nothing is started).
    from ray.serve.schema import ServeDeploySchema

    where = "spec.serveConfigV2"
    try:
        config = yaml.safe_load(serve_config_text)
    except yaml.YAMLError as e:
        return [f"{where}: not valid YAML: {e}"], []
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        return [f"{where}: Ray ServeDeploySchema: {key}: {msg}" for key, msg in error_lines(e)], []
    problems = unknown_keys(ServeDeploySchema, config, where)
    imports = [p for i, app in enumerate(config["applications"])
               for p in import_problems(app["import_path"], f"{where}.applications[{i}].import_path")]
    if imports:
        return problems + imports, []
    try:
        app = builder_application(config, where)
    except ValueError as e:
        return problems + [str(e)], []

    try:
        args = parse_app_args(app.get("args"))
    except ValueError as e:
        return problems + [f"{where}: {e}"], []
    if args.stage_graph == "auto":
        return problems + [f"{where}: args.stage_graph is 'auto', which counts the GPUs present when "
                           "the app is built (GPU pods may not have joined yet); name the graph"], []
    graph_file = _graph_path(args.stage_graph, repo_root)
    if graph_file is None or not graph_file.is_file():
        return problems + [f"{where}: args.stage_graph {args.stage_graph!r} is not a stage graph the "
                           f"image carries (configs/ is copied to {IMAGE_APP_ROOT}/configs)"], []
    try:
        graph = load_stage_graph(graph_file)
    except StageGraphError as e:
        return problems + [f"{where}: args.stage_graph: {e}"], []

    options = {deployment_name(s): o for s, o in graph.deployment_options().items()}
    for override in app.get("deployments") or []:
        name = override.get("name")
        if name not in options:
            problems.append(f"{where}: deployments: no deployment {name!r} in the app "
                            f"(it has {', '.join(options)})")
            continue
        problems += _override_problems(override, options[name], f"{where}: deployments[{name}]",
                                       graph_file)
        options[name] = {**options[name], **{k: v for k, v in override.items() if k != "name"}}
    demands = [DeploymentDemand(n, o, replica_range(o)) for n, o in options.items()]
    return problems, demands


def _override_problems(override: dict, graph_options: dict, where: str, graph_file: Path) -> list[str]:
    """A rendered override repeats the graph's placement options and only adds custom resources
    (the group pin); anything else in it would make the manifest run another graph."""
    problems = [f"{where}.{key}: set it in the stage graph, not in serveConfigV2"
                for key in override if key != "name" and key not in PLACEMENT_OPTIONS]
    graph_actor = graph_options.get("ray_actor_options") or {}
    override_actor = override.get("ray_actor_options") or {}
    pin = {k: v for k, v in (override_actor.get("resources") or {}).items()
           if k not in (graph_actor.get("resources") or {})}
    expected = pinned_options(graph_options, pin) if pin else graph_options
    for key in PLACEMENT_OPTIONS:
        ours, theirs = expected.get(key), override.get(key, graph_options.get(key))  # Serve's fallback
        if key == "ray_actor_options":
            ours, theirs = ours or {}, theirs or {}
            problems += [f"{where}.ray_actor_options.{k} is {theirs.get(k)!r} but {graph_file.name} "
                         f"gives {ours.get(k)!r}: re-render the manifest"
                         for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        elif ours != theirs:
            problems.append(f"{where}.{key} is {theirs!r} but {graph_file.name} gives {ours!r}: "
                            "re-render the manifest")
    return problems


# ----------------------------------------------------------------------------------------------------
# resources: worker groups against deployments
# ----------------------------------------------------------------------------------------------------
@dataclass
class NodeType:
    label: str                      # e.g. "workerGroupSpecs[1] (dit)"
    resources: dict[str, float]     # what Ray advertises per pod, as the autoscaler reads it
    max_pods: int


def _gpu_limit(group: dict) -> int:
    from ray.autoscaler._private.kuberay.utils import parse_quantity
    container = (group["template"]["spec"].get("containers") or [{}])[0]
    limits = (container.get("resources") or {}).get("limits") or {}
    return math.ceil(parse_quantity(str(limits[GPU_RESOURCE]))) if GPU_RESOURCE in limits else 0


@contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def node_types(cluster: dict) -> tuple[list[str], list[NodeType]]:
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec

    problems, nodes = [], []
    groups = [(cluster["headGroupSpec"], True, "headGroupSpec")] + [
        (g, False, f"workerGroupSpecs[{i}] ({g.get('groupName')})")
        for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
    for group, is_head, label in groups:
        try:
            with _quiet("ray.autoscaler"):   # its own error log would repeat ours
                resources = _get_ray_resources_from_group_spec(group, is_head)
        except Exception as e:   # Ray's own reader: a value the autoscaler cannot parse
            problems.append(f"{label}: Ray's autoscaler cannot read this group's resources "
                            f"(rayStartParams {group.get('rayStartParams')}): {type(e).__name__}: {e}")
            continue
        ray_gpus, limit = resources.get("GPU", 0), _gpu_limit(group)
        params = group.get("rayStartParams") or {}
        if is_head and (ray_gpus or limit):
            problems.append(f"{label}: the head would get {max(ray_gpus, limit)} GPU(s); set "
                            "rayStartParams num-gpus '0' and no GPU limit, so no GPU work lands there")
        elif ray_gpus > limit:
            problems.append(f"{label}: Ray would count {ray_gpus} GPU(s) (rayStartParams num-gpus "
                            f"{params.get('num-gpus')!r}) but the container has "
                            + (f"an {GPU_RESOURCE} limit of {limit}" if limit else
                               f"no {GPU_RESOURCE} limit") + ": Kubernetes would not give the pod "
                            "those GPUs; set resources.limits['nvidia.com/gpu']")
        elif limit and "num-gpus" not in params:
            problems.append(f"{label}: set rayStartParams num-gpus to {limit!r} (the GPU limit) so "
                            "Ray and Kubernetes agree on the GPUs")
        max_pods = 1 if is_head else group.get("maxReplicas", 0) * group.get("numOfHosts", 1)
        nodes.append(NodeType("headGroupSpec (head)" if is_head else label, resources, max_pods))
    return problems, nodes


def _amount(key: str, value: float) -> str:
    return f"{value / 2**30:.3g}Gi" if key == "memory" else f"{value:g}"


def _short(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {_amount(k, v)}" for k, v in sorted(resources.items())) + "}"


def shortfall(need: dict[str, float], have: dict[str, float]) -> list[str]:
    return [f"{k} {_amount(k, have.get(k, 0))} < {_amount(k, v)}" for k, v in sorted(need.items())
            if have.get(k, 0) + 1e-9 < v]


def fit_problems(demands: list[DeploymentDemand], nodes: list[NodeType]) -> list[str]:
    problems = []
    for d in demands:
        need = d.per_replica
        if not any(not shortfall(need, n.resources) for n in nodes):
            why = "; ".join(f"{n.label} {_short(n.resources)} has {', '.join(shortfall(need, n.resources))}"
                            for n in nodes)
            problems.append(f"deployment {d.name} needs {_short(need)} per replica, which no group "
                            f"can host: {why}")
    if problems:
        return problems
    # All replicas at their maximum, first-fit by size into every group at its maxReplicas.
    free = [(n, dict(n.resources)) for n in nodes for _ in range(n.max_pods)]
    replicas = sorted(((d.name, d.per_replica) for d in demands
                       for _ in range(d.replicas.max)),
                      key=lambda r: (-r[1].get("GPU", 0), -r[1].get("CPU", 0)))
    placed: dict[str, int] = {}
    for name, need in replicas:
        for node, left in free:
            if not shortfall(need, left):
                for k, v in need.items():
                    left[k] = left.get(k, 0) - v
                placed[name] = placed.get(name, 0) + 1
                break
        else:
            total = sum(d.replicas.max for d in demands if d.name == name)
            problems.append(f"deployment {name}: only {placed.get(name, 0)} of its {total} max "
                            f"replicas ({_short(need)} each) fit the cluster at its largest (every "
                            "group at maxReplicas); raise the group's maxReplicas")
            break
    return problems


def resource_problems(cluster: dict, demands: list[DeploymentDemand]) -> list[str]:
    problems, nodes = node_types(cluster)
    where = "spec.rayClusterConfig"
    if cluster.get("rayVersion") != ray_version():
        problems.append(f"{where}.rayVersion: {cluster.get('rayVersion')!r}, but the project "
                        f"installs Ray {ray_version()}")
    growing = [g.get("groupName") for g in cluster.get("workerGroupSpecs") or []
               if g.get("minReplicas", 0) < g.get("maxReplicas", 0)]
    if growing and not cluster.get("enableInTreeAutoscaling"):
        problems.append(f"{where}: worker groups {growing} may grow but enableInTreeAutoscaling is "
                        "off: no new pods would appear")
    images = {c.get("image") for g in [cluster["headGroupSpec"], *(cluster.get("workerGroupSpecs") or [])]
              for c in g["template"]["spec"].get("containers", [])[:1]}
    if len(images) > 1:
        problems.append(f"{where}: the Ray containers use different images {sorted(images)}; head and "
                        "workers must run the same Ray and Python")
    return problems + fit_problems(demands, nodes)


# ----------------------------------------------------------------------------------------------------
def check_manifest(manifest: dict, crd_path: Union[str, Path], repo_root: Path = REPO_ROOT) -> list[str]:
    """Every problem of one RayService manifest (empty: good to apply)."""
    problems = schema_problems(manifest, crd_path)
    spec = manifest.get("spec") or {}
    serve_text = spec.get("serveConfigV2")
    if not isinstance(serve_text, str):
        return problems + ["spec.serveConfigV2: missing"]
    serve, demands = serve_problems(serve_text, repo_root)
    problems += serve
    cluster = spec.get("rayClusterConfig")
    if isinstance(cluster, dict) and isinstance(cluster.get("headGroupSpec"), dict) and demands:
        try:
            problems += resource_problems(cluster, demands)
        except (KeyError, TypeError, IndexError) as e:   # shapes the schema check already reported
            problems.append(f"spec.rayClusterConfig: cannot read the groups' resources ({e!r})")
    return problems


def check_file(path: Union[str, Path], crd_path: Union[str, Path],
               repo_root: Path = REPO_ROOT) -> Optional[list[str]]:
    """Problems of every RayService in a YAML file; None when the file has no RayService."""
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    services = [(i, d) for i, d in enumerate(docs) if isinstance(d, dict) and d.get("kind") == "RayService"]
    if not services:
        return None
    problems = []
    for i, doc in services:
        prefix = f"{path}" + (f" (document {i + 1})" if len(docs) > 1 else "")
        problems += [f"{prefix}: {p}" for p in check_manifest(doc, crd_path, repo_root)]
    return problems
