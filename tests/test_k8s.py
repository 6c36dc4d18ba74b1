"""KubeRay manifests (k8s/*.yaml): rendered from the stage graphs, up to date, and valid against the
real RayService CRD, Ray's Serve schema, our stage-graph schema and the worker groups' resources.
Broken manifests fail those checks with a message that says what and where."""
from __future__ import annotations

import copy
import difflib
import importlib
import re
import shlex
import shutil
from fnmatch import fnmatch
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from deploy import k8s_check, k8s_render
from deploy.cli import build_parser, main
from deploy.k8s_check import check_file, check_manifest, node_types, serve_problems
from deploy.k8s_cli import render_options
from deploy.k8s_render import RenderOptions, build_rayservice, plan_cluster, render_manifest
from serve_app.app_config import deployment_name
from serve_app.stage_graph import SHIPPED_GRAPHS_DIR, StageGraph, load_stage_graph

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = REPO_ROOT / "k8s"
SHIPPED_MANIFESTS = ("single_gpu", "multi_gpu", "single_gpu_video", "multi_gpu_video")
IMAGE = "lance-serve:0.1.0"


def committed(name: str) -> tuple[Path, dict]:
    path = K8S_DIR / f"{name}.yaml"
    assert path.is_file(), f"{path} is missing: lance-serve k8s render --stage-graph {name} ..."
    return path, yaml.safe_load(path.read_text())


def serve_config(manifest: dict) -> dict:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def groups(manifest: dict) -> dict[str, dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def hosts(manifest: dict) -> dict[str, list[str]]:
    """deployment -> the groups (by name) whose pods can hold one replica of it."""
    _, demands = serve_problems(manifest["spec"]["serveConfigV2"])
    _, nodes = node_types(manifest["spec"]["rayClusterConfig"])
    return {d.name: [n.label.split("(")[-1].rstrip(")") for n in nodes
                     if not k8s_check.shortfall(d.per_replica, n.resources)]
            for d in demands}


# ----------------------------------------------------------------------------------------------------
# the committed manifests are the renderer's output
# ----------------------------------------------------------------------------------------------------
def test_every_shipped_gpu_graph_has_a_committed_manifest():
    gpu_graphs = sorted(p.stem for p in SHIPPED_GRAPHS_DIR.glob("*.yaml") if load_stage_graph(p).uses_gpus)
    assert set(SHIPPED_MANIFESTS) <= set(gpu_graphs)
    for name in gpu_graphs:
        path, _ = committed(name)
        command = k8s_render.rendered_by(path.read_text())
        assert command and f"--stage-graph {name} " in command, f"{path}: not rendered from {name}"


@pytest.mark.parametrize("name", SHIPPED_MANIFESTS)
def test_committed_manifest_is_up_to_date(name):
    path, _ = committed(name)
    text = path.read_text()
    command = k8s_render.rendered_by(text)
    assert command, f"{path}: first line does not record the render command"
    argv = shlex.split(command)
    assert argv[:3] == ["lance-serve", "k8s", "render"]
    fresh = render_manifest(render_options(build_parser(argv[1:]).parse_args(argv[1:])))
    if fresh != text:
        diff = "".join(list(difflib.unified_diff(text.splitlines(True), fresh.splitlines(True),
                                                 str(path), "rendered now"))[:60])
        pytest.fail(f"{path} is stale; re-render it:\n  .venv/bin/{command} -o k8s/{name}.yaml\n{diff}")


# ----------------------------------------------------------------------------------------------------
# the checks the issue asks for, on every committed manifest
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SHIPPED_MANIFESTS)
def test_manifest_validates_against_the_rayservice_crd(name, crd):
    _, manifest = committed(name)
    assert k8s_check.schema_problems(manifest, crd) == []


@pytest.mark.parametrize("name", SHIPPED_MANIFESTS)
def test_serve_config_passes_ray_serve_schema_and_our_stage_graph_schema(name):
    from ray.serve.schema import ServeDeploySchema

    _, manifest = committed(name)
    config = serve_config(manifest)
    ServeDeploySchema.model_validate(config)                       # Ray's own schema
    graph_arg = config["applications"][0]["args"]["stage_graph"]
    assert graph_arg == f"{k8s_render.IMAGE_APP_ROOT}/configs/stage_graphs/{name}.yaml"
    assert load_stage_graph(k8s_render.repo_path(graph_arg)).name == name   # our schema
    problems, demands = serve_problems(manifest["spec"]["serveConfigV2"])
    assert problems == []
    graph = load_stage_graph(k8s_render.repo_path(graph_arg))
    assert sorted(d.name for d in demands) == sorted(deployment_name(k) for k in graph.deployment_options())


@pytest.mark.parametrize("name", SHIPPED_MANIFESTS)
def test_import_path_imports_and_takes_the_args(name):
    from serve_app.builder import plan_app

    _, manifest = committed(name)
    app = serve_config(manifest)["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    # the builder's own arg schema, with the graph where the image's /app/configs comes from
    args = {**app["args"], "stage_graph": str(k8s_render.repo_path(app["args"]["stage_graph"]))}
    assert plan_app(args, num_gpus=1).graph.name == name


@pytest.mark.parametrize("name", SHIPPED_MANIFESTS)
def test_checker_sees_the_deployments_build_app_binds(name):
    """The renderer and checker take each deployment's name and ray_actor_options from the stage
    graph; the real builder must bind the same (the manifest adds only the group pins)."""
    from ray.serve._private.build_app import build_app as build_serve_app
    from serve_app.builder import build_app

    _, manifest = committed(name)
    app = serve_config(manifest)["applications"][0]
    graph_file = k8s_render.repo_path(app["args"]["stage_graph"])
    built = build_serve_app(build_app({**app["args"], "stage_graph": str(graph_file)}), name=app["name"])
    bound = {d.name: d.ray_actor_options for d in built.deployments}
    derived = {deployment_name(stage): options["ray_actor_options"]
               for stage, options in load_stage_graph(graph_file).deployment_options().items()}
    assert bound == derived


@pytest.mark.parametrize("name", SHIPPED_MANIFESTS)
def test_every_deployment_fits_a_worker_group(name):
    _, manifest = committed(name)
    _, demands = serve_problems(manifest["spec"]["serveConfigV2"])
    assert k8s_check.resource_problems(manifest["spec"]["rayClusterConfig"], demands) == []
    assert all(hosts(manifest).values())


@pytest.mark.parametrize("name", SHIPPED_MANIFESTS)
def test_committed_manifest_passes_every_check(name, crd):
    path, _ = committed(name)
    assert check_file(path, crd) == []


@pytest.mark.parametrize("name", SHIPPED_MANIFESTS)
def test_serve_config_is_lance_2stage_with_the_graph_named(name):
    _, manifest = committed(name)
    ours = serve_config(manifest)
    source = yaml.safe_load((REPO_ROOT / "configs" / "lance_2stage.yaml").read_text())
    app, source_app = ours["applications"][0], source["applications"][0]
    assert {k: v for k, v in ours.items() if k != "applications"} == \
        {k: v for k, v in source.items() if k != "applications"}
    assert {k: v for k, v in app.items() if k not in ("args", "deployments")} == \
        {k: v for k, v in source_app.items() if k != "args"}
    assert {**app["args"], "stage_graph": None} == {**source_app["args"], "stage_graph": None}


# ----------------------------------------------------------------------------------------------------
# what each layout promises
# ----------------------------------------------------------------------------------------------------
def test_multi_gpu_pins_thinker_and_dit_to_their_own_gpu_groups():
    _, manifest = committed("multi_gpu")
    graph = load_stage_graph(SHIPPED_GRAPHS_DIR / "multi_gpu.yaml")
    where = hosts(manifest)
    assert (where["ThinkerStage"], where["DiTStage"]) == (["thinker"], ["dit"])
    assert "head" in where["LanceIngress"]
    g = groups(manifest)
    for stage in ("thinker", "dit"):
        limits = g[stage]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == str(int(getattr(graph.stages, stage).resources.num_gpus))
    dit_scaling = graph.stages.dit.autoscaling
    assert (g["dit"]["minReplicas"], g["dit"]["maxReplicas"]) == \
        (dit_scaling.min_replicas, dit_scaling.max_replicas)
    assert manifest["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_single_gpu_hosts_both_stages_on_one_gpu_worker():
    _, manifest = committed("single_gpu")
    g = groups(manifest)
    assert list(g) == ["head", k8s_render.COLOCATED_GROUP]
    worker = g[k8s_render.COLOCATED_GROUP]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert (worker["minReplicas"], worker["maxReplicas"]) == (1, 1)
    where = hosts(manifest)
    assert where["ThinkerStage"] == where["DiTStage"] == [k8s_render.COLOCATED_GROUP]
    assert "head" in where["LanceIngress"]


@pytest.mark.parametrize("name", SHIPPED_MANIFESTS)
def test_head_takes_no_gpu_work(name):
    _, manifest = committed(name)
    head = groups(manifest)["head"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert not any(k.endswith("gpu") for k in head["template"]["spec"]["containers"][0]["resources"]["limits"])
    gpu_deployments = [d.name for d in serve_problems(manifest["spec"]["serveConfigV2"])[1]
                       if d.per_replica.get("GPU")]
    assert gpu_deployments and all("head" not in hosts(manifest)[d] for d in gpu_deployments)


@pytest.mark.parametrize("name", SHIPPED_MANIFESTS)
def test_every_pod_takes_the_api_key_from_a_secret_that_must_exist(name):
    _, manifest = committed(name)
    for group in groups(manifest).values():
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        # no pod serves without the Secret: an absent key would leave the API open
        assert env[k8s_render.API_KEY_ENV]["valueFrom"]["secretKeyRef"] == {
            "name": k8s_render.DEFAULT_API_KEY_SECRET, "key": k8s_render.API_KEY_SECRET_KEY,
            "optional": False}


@pytest.mark.parametrize("name", SHIPPED_MANIFESTS)
def test_ray_autoscaler_reads_the_groups_as_rendered(name):
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    _, manifest = committed(name)
    cluster = manifest["spec"]["rayClusterConfig"]
    ray_cr = {"metadata": {"name": manifest["metadata"]["name"], "namespace": "default"}, "spec": cluster}
    config = _derive_autoscaling_config_from_ray_cr(ray_cr)       # runs Ray's validate_config too
    plan = plan_cluster(load_stage_graph(SHIPPED_GRAPHS_DIR / f"{name}.yaml").deployment_options())
    for group in plan.workers:
        node = config["available_node_types"][group.name]
        assert (node["min_workers"], node["max_workers"]) == (group.pods.min, group.pods.max)
        assert node["resources"]["GPU"] == group.gpus
        assert {k: node["resources"][k] for k in group.custom} == group.custom


# ----------------------------------------------------------------------------------------------------
# broken manifests fail with a readable message
# ----------------------------------------------------------------------------------------------------
def _worker(m, name):
    return next(g for g in m["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == name)


def _container(m, name):
    return _worker(m, name)["template"]["spec"]["containers"][0]


def _drop_gpu_limit(m):
    for kind in ("limits", "requests"):
        _container(m, "dit")["resources"][kind].pop("nvidia.com/gpu")


def _serve_edit(old, new):
    def edit(m):
        assert old in m["spec"]["serveConfigV2"]
        m["spec"]["serveConfigV2"] = m["spec"]["serveConfigV2"].replace(old, new)
    return edit


def _rename(mapping, old, new):
    mapping[new] = mapping.pop(old)


BROKEN = {
    "typo in a group field": (lambda m: _rename(_worker(m, "dit"), "minReplicas", "minReplica"),
                              ["workerGroupSpecs[1]: unknown field 'minReplica' (did you mean 'minReplicas'?)"]),
    "typo in the pod spec": (lambda m: _rename(_container(m, "dit"), "resources", "resource"),
                             ["containers[0]: unknown field 'resource' (did you mean 'resources'?)"]),
    "missing GPU limit": (_drop_gpu_limit,
                          ["workerGroupSpecs[1] (dit): Ray would count 1 GPU(s)", "no nvidia.com/gpu limit"]),
    "missing GPU limit and num-gpus": (
        lambda m: (_drop_gpu_limit(m), _worker(m, "dit")["rayStartParams"].pop("num-gpus")),
        ["deployment DiTStage needs {CPU: 4, GPU: 1, lance_dit: 1} per replica, which no group can host",
         "workerGroupSpecs[1] (dit) {CPU: 4, lance_dit: 1, memory: 64Gi} has GPU 0 < 1"]),
    "no group advertises the DiT pin": (
        lambda m: _worker(m, "dit")["rayStartParams"].pop("resources"),
        ["deployment DiTStage needs", "which no group can host", "(dit) {CPU: 4, GPU: 1, memory: 64Gi} has lance_dit 0 < 1"]),
    "a deployment bigger than every group": (
        _serve_edit("num_gpus: 1.0\n      resources:\n        lance_dit", "num_gpus: 2.0\n      resources:\n        lance_dit"),
        ["deployments[DiTStage].ray_actor_options.num_gpus is 2.0 but multi_gpu.yaml gives 1.0",
         "deployment DiTStage needs {CPU: 4, GPU: 2, lance_dit: 1} per replica, which no group can host"]),
    "group cannot reach the max replicas": (lambda m: _worker(m, "dit").update(maxReplicas=2),
                                            ["DiTStage: only 2 of its 3 max replicas"]),
    "GPU on the head": (lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": "1"}),
                        ["headGroupSpec: the head would get 1 GPU(s)"]),
    "autoscaler off": (lambda m: m["spec"]["rayClusterConfig"].update(enableInTreeAutoscaling=False),
                       ["worker groups ['dit'] may grow but enableInTreeAutoscaling is off"]),
    "bad initializing timeout": (lambda m: m["metadata"]["annotations"].update({"ray.io/initializing-timeout": "2 hours"}),
                                 ["ray.io/initializing-timeout: '2 hours' is not a positive Go duration"]),
    "zero initializing timeout": (lambda m: m["metadata"]["annotations"].update({"ray.io/initializing-timeout": "0s"}),
                                  ["ray.io/initializing-timeout: '0s' is not a positive Go duration"]),
    "no initializing timeout": (lambda m: m["metadata"].pop("annotations"),
                                ["metadata.annotations: no ray.io/initializing-timeout"]),
    "name too long": (lambda m: m["metadata"].update(name="lance-" + "x" * 50),
                      ["metadata.name: 'lance-xxxx", "longer than 47 characters"]),
    "rayStartParams not a string": (lambda m: _worker(m, "dit")["rayStartParams"].update({"num-cpus": 4}),
                                    ["rayStartParams.num-cpus: 4 is not of type 'string'"]),
    "custom resources in a format Ray cannot read": (
        lambda m: _worker(m, "dit")["rayStartParams"].update(resources='{"lance_dit": 1}'),
        ["workerGroupSpecs[1] (dit): Ray's autoscaler cannot read this group's resources"]),
    "duplicate env var": (lambda m: _container(m, "dit")["env"].append({"name": "HF_HOME", "value": "/tmp"}),
                          ["env: items [0] and [3] have the same name='HF_HOME'"]),
    "different images": (lambda m: _container(m, "dit").update(image="other:1"),
                         ["the Ray containers use different images"]),
    "wrong kind": (lambda m: m.update(kind="RayCluster"), ["kind: 'RayService' was expected"]),
    "serve config typo": (_serve_edit("route_prefix", "route_prefx"),
                          ["spec.serveConfigV2.applications[0]: unknown key 'route_prefx' (did you mean 'route_prefix'?)"]),
    "serve config Ray rejects": (_serve_edit("port: 8000", "port: eighty"),
                                 ["spec.serveConfigV2: Ray ServeDeploySchema: http_options.port"]),
    "import_path that does not import": (_serve_edit("serve_app.builder:build_app", "serve_app.bulder:build_app"),
                                         ["import_path: 'serve_app.bulder:build_app' does not import",
                                          "No module named 'serve_app.bulder'"]),
    "app args typo": (_serve_edit("allow_remote_images", "allow_remote_image"),
                      ["args.allow_remote_image: unknown key 'allow_remote_image' (did you mean 'allow_remote_images'?)"]),
    "stage graph the image lacks": (_serve_edit("stage_graphs/multi_gpu.yaml", "stage_graphs/multi-gpu.yaml"),
                                    ["args.stage_graph '/app/configs/stage_graphs/multi-gpu.yaml' is not a stage graph the image carries"]),
    "override of a deployment the app lacks": (_serve_edit("name: DiTStage", "name: DitStage"),
                                               ["deployments: no deployment 'DitStage' in the app"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_manifest_fails_with_a_readable_message(case, crd):
    _, good = committed("multi_gpu")
    assert check_manifest(good, crd) == []
    broken = copy.deepcopy(good)
    edit, expected = BROKEN[case]
    edit(broken)
    problems = "\n".join(check_manifest(broken, crd))
    assert problems, f"{case}: no problem found"
    for fragment in expected:
        assert fragment in problems, f"{case}: {fragment!r} not in:\n{problems}"


def test_openapi_schema_conversion_keeps_kubernetes_semantics():
    schema = k8s_check.openapi_to_jsonschema({
        "type": "object", "properties": {
            "properties": {"type": "string"},                       # a field named like a keyword
            "when": {"type": "string", "nullable": True},
            "count": {"type": "integer", "format": "int32"},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "properties": {"a": {"type": "string"}}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}}}})
    from jsonschema import Draft7Validator

    def errors(instance):
        return sorted(e.message for e in Draft7Validator(schema).iter_errors(instance))
    assert errors({"properties": "x", "when": None, "count": 3, "free": {"b": 1}, "labels": {"k": "v"}}) == []
    assert errors({"extra": 1}) == ["Additional properties are not allowed ('extra' was unexpected)"]
    assert errors({"count": 2**31}) == [f"{2**31} is greater than the maximum of {2**31 - 1}"]
    assert errors({"labels": {"k": 1}}) == ["1 is not of type 'string'"]


@pytest.mark.parametrize("value, seconds", [("2h", 7200), ("1h30m", 5400), ("7200", 7200), ("0s", 0),
                                            ("2 hours", None), ("", None)])
def test_initializing_timeout_reads_like_kuberay(value, seconds):
    assert k8s_check.go_duration_s(value) == seconds


def test_a_stage_graph_our_schema_rejects_fails_the_manifest(tmp_path, crd):
    repo = _scratch_repo(tmp_path)
    _, manifest = committed("multi_gpu")
    graph_file = repo / "configs" / "stage_graphs" / "multi_gpu.yaml"
    graph_file.write_text(graph_file.read_text().replace("max_ongoing_requests: 8", "max_ongoing_request: 8"))
    problems = "\n".join(check_manifest(manifest, crd, repo_root=repo))
    assert "args.stage_graph: invalid stage graph" in problems
    assert "stages.dit.max_ongoing_request: unknown key 'max_ongoing_request' (did you mean " \
           "'max_ongoing_requests'?)" in problems


# ----------------------------------------------------------------------------------------------------
# the renderer on other graphs
# ----------------------------------------------------------------------------------------------------
def _scratch_repo(tmp_path: Path) -> Path:
    """A copy of the tree the image carries (configs/), to render and check graphs we do not ship."""
    shutil.copytree(REPO_ROOT / "configs", tmp_path / "configs")
    return tmp_path


def _graph(base: str, **stages) -> dict:
    raw = yaml.safe_load((SHIPPED_GRAPHS_DIR / f"{base}.yaml").read_text())
    for stage, fields in stages.items():
        raw["stages"][stage].update(fields)
    return raw


OTHER_GRAPHS = {
    # cond/uncond on two GPUs per DiT replica: 2-GPU DiT pods
    "dit_cfg_parallel": (_graph("multi_gpu", dit={"deployment_class": "stages.dit:CfgParallelDiTStage",
                                                  "batching": {"max_batch_size": 1},
                                                  "resources": {"num_cpus": 8, "num_gpus": 2}}),
                         {"thinker": 1, "dit": 2}),
    # a half-GPU thinker beside whole-GPU DiTs: two thinker replicas share a thinker pod's GPU
    "half_gpu_thinkers": (_graph("multi_gpu", thinker={"num_replicas": 4, "resources": {"num_cpus": 2, "num_gpus": 0.5},
                                                       "engine": {"gpu_memory_utilization": 0.45}}),
                          {"thinker": 1, "dit": 1}),
    # the CPU graph: a CPU worker group per checkpoint variant, no GPU anywhere
    "cpu": (_graph("cpu"), {"thinker-dit": 0, "thinker-dit-lance-3b-video": 0}),
    # memory reservations and a named accelerator reach the group's resources
    "reserved_memory_h100": (_graph("multi_gpu", dit={"resources": {"num_cpus": 4, "num_gpus": 1, "memory_gib": 100,
                                                                    "accelerator_type": "H100"}}),
                             {"thinker": 1, "dit": 1}),
}


@pytest.mark.parametrize("case", list(OTHER_GRAPHS))
def test_renders_and_checks_other_stage_graphs(case, tmp_path, crd):
    raw, expected_gpus = OTHER_GRAPHS[case]
    raw["name"] = case
    repo = _scratch_repo(tmp_path)
    (repo / "configs" / "stage_graphs" / f"{case}.yaml").write_text(yaml.safe_dump(raw))
    opts = RenderOptions(stage_graph=case, image=IMAGE, repo_root=repo)
    manifest = yaml.safe_load(render_manifest(opts))
    assert check_manifest(manifest, crd, repo_root=repo) == []
    workers = {n: g for n, g in groups(manifest).items() if n != "head"}
    gpus = {n: int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            for n, g in workers.items()}
    assert gpus == expected_gpus


def test_half_gpu_thinkers_pack_two_to_a_pod():
    graph = StageGraph.model_validate({**OTHER_GRAPHS["half_gpu_thinkers"][0], "name": "x"})
    thinker = next(g for g in plan_cluster(graph.deployment_options()).workers if g.name == "thinker")
    assert (thinker.pods.max, thinker.ray_cpus, thinker.custom) == (2, 4, {"lance_thinker": 2})


def test_reserved_memory_and_accelerator_type_are_advertised_by_the_group():
    graph = StageGraph.model_validate({**OTHER_GRAPHS["reserved_memory_h100"][0], "name": "x"})
    dit = next(g for g in plan_cluster(graph.deployment_options()).workers if g.name == "dit")
    assert dit.ray_memory_bytes == 100 * 2**30
    assert dit.custom == {"lance_dit": 1, "accelerator_type:H100": 1}


def test_placement_group_replicas_size_their_group_and_carry_the_pin_in_bundle_zero():
    graph = StageGraph.model_validate({**OTHER_GRAPHS["dit_cfg_parallel"][0], "name": "x"})
    options = graph.deployment_options()   # build_app's options: two GPU workers per replica
    assert options["dit"]["placement_group_bundles"]
    plan = plan_cluster(options)
    dit = next(g for g in plan.workers if g.name == "dit")
    bundles = plan.options["dit"]["placement_group_bundles"]
    assert (dit.gpus, dit.ray_cpus) == (2, sum(b["CPU"] for b in bundles))
    assert bundles[0]["lance_dit"] == plan.options["dit"]["ray_actor_options"]["resources"]["lance_dit"] == 1
    node = k8s_check.NodeType("dit", {"CPU": dit.ray_cpus, "GPU": dit.gpus, **dit.custom}, 1)
    demand = k8s_check.DeploymentDemand("DiTStage", plan.options["dit"], k8s_render.ReplicaRange(1, 1, 1))
    assert k8s_check.fit_problems([demand], [node]) == []
    node.resources["CPU"] -= 1
    assert "which no group can host" in k8s_check.fit_problems([demand], [node])[0]


def test_graph_outside_configs_is_refused_with_the_reason(tmp_path):
    outside = tmp_path / "mine.yaml"
    outside.write_text((SHIPPED_GRAPHS_DIR / "multi_gpu.yaml").read_text())
    with pytest.raises(k8s_render.RenderError, match="must live under .*configs.* so that the image"):
        build_rayservice(RenderOptions(stage_graph=str(outside), image=IMAGE))


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------
def test_cli_render_writes_the_manifest_and_records_its_command(tmp_path, capsys):
    out = tmp_path / "m.yaml"
    assert main(["k8s", "render", "--stage-graph", "multi_gpu", "--image", "r.example/lance:1",
                 "--namespace", "serving", "-o", str(out)]) == 0
    text = out.read_text()
    assert k8s_render.rendered_by(text) == ("lance-serve k8s render --stage-graph multi_gpu "
                                            "--image r.example/lance:1 --namespace serving")
    manifest = yaml.safe_load(text)
    assert manifest["metadata"]["namespace"] == "serving"
    assert {c["image"] for g in groups(manifest).values() for c in g["template"]["spec"]["containers"]} == \
        {"r.example/lance:1"}


def test_cli_render_unknown_graph_is_an_error_not_a_traceback(capsys):
    assert main(["k8s", "render", "--stage-graph", "two_gpu", "--image", IMAGE]) == 2
    assert "no shipped stage graph 'two_gpu' (shipped: cpu, multi_gpu, multi_gpu_video, single_gpu, single_gpu_video)" in capsys.readouterr().err


def test_cli_check_passes_good_and_fails_broken_manifests(tmp_path, capsys, crd):
    broken = yaml.safe_load((K8S_DIR / "multi_gpu.yaml").read_text())
    _drop_gpu_limit(broken)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(broken))
    assert main(["k8s", "check", str(K8S_DIR / "multi_gpu.yaml"), str(K8S_DIR / "hf-cache.yaml"),
                 "--crd", str(crd)]) == 0
    assert main(["k8s", "check", str(bad), "--crd", str(crd)]) == 1
    out = capsys.readouterr().out
    assert "hf-cache.yaml: no RayService, skipped" in out
    assert f"{bad}: workerGroupSpecs[1] (dit): Ray would count 1 GPU(s)" in out


# ----------------------------------------------------------------------------------------------------
# the image and the model cache agree with the manifests
# ----------------------------------------------------------------------------------------------------
def test_dockerfile_builds_what_the_manifests_run():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"(torch==[^"]+)"', pyproject).group(1)
    assert f'"{torch_pin}"' in dockerfile, f"Dockerfile does not install {torch_pin}"
    assert "[gpu]" in dockerfile
    assert re.search(r"^ARG BASE_IMAGE=rayproject/ray:" + re.escape(metadata.version("ray")) + r"-py311-",
                     dockerfile, re.M), "the base image's Ray must be the project's"
    assert f"COPY --chown=ray:users configs {k8s_render.IMAGE_APP_ROOT}/configs" in dockerfile
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M)
    sources = [s for line in copied for s in line.split()]
    assert {"pyproject.toml", "README.md", "stages", "serve_app", "deploy", "configs"} <= set(sources)
    ignored = [line.strip().rstrip("/") for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for source in sources:
        assert not any(fnmatch(source, pattern) for pattern in ignored), f".dockerignore drops {source}"


def _cache_view(pod: dict) -> tuple:
    """(PVC, HF_HOME, where the PVC is mounted, hub-token Secret) of a pod spec."""
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    volume = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume["name"])
    secret = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    return (volume["persistentVolumeClaim"]["claimName"], env["HF_HOME"]["value"], mount,
            (secret["name"], secret["key"]))


def test_model_cache_job_fills_the_cache_the_manifests_read():
    """k8s/hf-cache.yaml is written by hand: its Job must fill the volume, at the HF_HOME, with the
    token, that every pod of the rendered manifests reads, and download the graphs' model."""
    docs = list(yaml.safe_load_all((K8S_DIR / "hf-cache.yaml").read_text()))
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim")
    job = next(d for d in docs if d["kind"] == "Job")
    job_pod = job["spec"]["template"]["spec"]
    job_view = _cache_view(job_pod)
    assert job_view[0] == pvc["metadata"]["name"] and job_view[1] == job_view[2]
    command = job_pod["containers"][0]["command"][-1]
    for name in SHIPPED_MANIFESTS:
        graph = load_stage_graph(SHIPPED_GRAPHS_DIR / f"{name}.yaml")
        assert f'resolve_checkpoint("{graph.model}", "{graph.variant}")' in command
        _, manifest = committed(name)
        for group in groups(manifest).values():
            assert _cache_view(group["template"]["spec"]) == job_view
            assert group["template"]["spec"]["containers"][0]["image"] == job_pod["containers"][0]["image"]
