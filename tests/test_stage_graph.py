"""Stage graphs, the Serve config and the app plan: what ships validates, and every mistake is an
error that names the file, the key and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from serve_app.app_config import BUILDER_IMPORT_PATH, parse_app_args
from serve_app.builder import build_app, plan_app
from serve_app.model_choice import TINY_SERVED_NAME, choose_model, ensure_tiny_checkpoint
from serve_app.stage_graph import (CFG_PARALLEL_DIT_CLASS, REPO_ROOT, SHIPPED_GRAPHS_DIR, DiTSpec, StageGraphError,
                                   load_stage_graph, resolve_stage_graph_path)
from stages.lance.checkpoint import HUB_REPO_ID

SHIPPED = sorted(SHIPPED_GRAPHS_DIR.glob("*.yaml"))


def _write_variant(tmp_path: Path, base: str, edit) -> Path:
    """A copy of a shipped graph with `edit(raw_dict)` applied."""
    raw = yaml.safe_load((SHIPPED_GRAPHS_DIR / f"{base}.yaml").read_text())
    edit(raw)
    path = tmp_path / f"{base}_edited.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_three_graphs_ship():
    assert {p.stem for p in SHIPPED} >= {"cpu", "single_gpu", "multi_gpu"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_graph_validates_and_ray_accepts_its_options(path):
    graph = load_stage_graph(path)
    assert graph.name == path.stem
    for stage in (graph.stages.ingress, graph.stages.thinker, graph.stages.dit):
        # Ray's own option validation (autoscaling schema, actor options) on what we produce.
        serve.deployment(type("Probe", (), {})).options(**stage.deployment_options())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_graphs_bound_every_queue(path):
    """Overload is answered (503 + Retry-After), never queued without end; the ingress holds at least
    what the stages can (ongoing + queued), so the stages' 503s (OpenAI error body) come first."""
    s = load_stage_graph(path).stages
    for stage in (s.ingress, s.thinker, s.dit):
        assert stage.max_queued_requests > 0
    max_dit = s.dit.autoscaling.max_replicas if s.dit.autoscaling else (s.dit.num_replicas or 1)
    max_thinker = s.thinker.autoscaling.max_replicas if s.thinker.autoscaling else (s.thinker.num_replicas or 1)
    held = (max_thinker * s.thinker.max_ongoing_requests + s.thinker.max_queued_requests
            + max_dit * s.dit.max_ongoing_requests + s.dit.max_queued_requests)
    assert s.ingress.max_ongoing_requests >= held


def test_shipped_graphs_place_stages_as_their_names_say():
    cpu, single, multi = (load_stage_graph(SHIPPED_GRAPHS_DIR / f"{n}.yaml")
                          for n in ("cpu", "single_gpu", "multi_gpu"))
    assert not cpu.uses_gpus
    t, d = single.stages.thinker, single.stages.dit
    assert 0 < t.resources.num_gpus < 1 and 0 < d.resources.num_gpus < 1
    assert t.resources.num_gpus + d.resources.num_gpus <= 1
    assert t.engine.gpu_memory_utilization <= t.resources.num_gpus
    assert multi.stages.thinker.resources.num_gpus == 1
    assert multi.stages.dit.autoscaling is not None
    assert "autoscaling_config" in multi.stages.dit.deployment_options()
    assert cpu.stages.thinker.engine.cpu_kv_cache_space_gib and cpu.stages.thinker.engine.enforce_eager


def test_typo_num_gpu_names_file_key_and_fix(tmp_path):
    def typo(raw):
        res = raw["stages"]["thinker"]["resources"]
        res["num_gpu"] = res.pop("num_gpus", 0.5)

    path = _write_variant(tmp_path, "single_gpu", typo)
    with pytest.raises(StageGraphError) as err:
        load_stage_graph(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "stages.thinker.resources.num_gpu" in msg
    assert "did you mean 'num_gpus'?" in msg


@pytest.mark.parametrize("where, key, fix", [
    (lambda r: r, "stage", "stages"),
    (lambda r: r["stages"]["dit"], "deployment_clas", "deployment_class"),
    (lambda r: r["stages"]["dit"]["batching"], "max_batch", "max_batch_size"),
    (lambda r: r["stages"]["thinker"]["engine"], "gpu_mem_utilization", "gpu_memory_utilization"),
])
def test_typos_anywhere_suggest_the_closest_key(tmp_path, where, key, fix):
    path = _write_variant(tmp_path, "cpu", lambda r: where(r).__setitem__(key, 1))
    with pytest.raises(StageGraphError, match=f"{key}.*did you mean '{fix}'"):
        load_stage_graph(path)


def _set(path_keys, value):
    def edit(raw):
        node = raw
        for k in path_keys[:-1]:
            node = node.setdefault(k, {})
        node[path_keys[-1]] = value
    return edit


def _chain(*edits):
    def edit(raw):
        for e in edits:
            e(raw)
    return edit


@pytest.mark.parametrize("base, edit, needle", [
    ("multi_gpu", _set(["stages", "dit", "resources", "num_gpus"], 1.5), "whole number"),
    ("single_gpu", _set(["stages", "thinker", "engine", "gpu_memory_utilization"], 0.9),
     "exceeds the thinker's GPU share"),
    ("single_gpu", _set(["stages", "dit", "resources", "num_gpus"], 0.75), "cannot share one GPU"),
    ("single_gpu", _set(["stages", "dit", "deployment_class"], "stages.dit:CfgParallelDiTStage"),
     "CfgParallelDiTStage needs 2 GPUs"),
    ("multi_gpu", lambda r: (_set(["stages", "dit", "deployment_class"], "stages.dit:CfgParallelDiTStage")(r),
                             _set(["stages", "dit", "resources", "num_gpus"], 2)(r)),
     "batching.max_batch_size must be 1"),
    ("cpu", _set(["stages", "dit", "cfg_parallel"], 2), "deployment_class: stages.dit:CfgParallelDiTStage"),
    ("cpu", _set(["stages", "dit", "batching", "max_batch_size"], 64), "could never fill"),
    ("cpu", _set(["stages", "thinker", "engine", "gpu_memory_utilization"], 0.5),
     "resources.num_gpus is 0"),
    ("single_gpu", _set(["stages", "thinker", "engine", "cpu_kv_cache_space_gib"], 4),
     "only applies to vLLM's CPU backend"),
    ("cpu", _set(["stages", "thinker", "resources", "num_cpus"], -1), "greater than or equal to 0"),
    ("multi_gpu", _set(["stages", "dit", "autoscaling", "min_replicas"], 5), "min_replicas 5 > max_replicas"),
    ("multi_gpu", _set(["stages", "dit", "num_replicas"], 2), "either num_replicas or autoscaling"),
    ("cpu", _set(["stages", "thinker", "engine", "dtype"], "fp8"), "dtype"),
    ("cpu", _set(["stages", "thinker", "engine", "max_model_len"], 0), "max_model_len"),
    ("cpu", _set(["stages", "dit", "engine", "quantization"], "fp8"), "quantization fp8 runs on FP8 tensor cores"),
    ("single_gpu", _set(["stages", "dit", "engine", "quantization"], "int4"), "quantization"),
    ("single_gpu", _chain(_set(["stages", "dit", "engine", "dtype"], "float32"),
                          _set(["stages", "dit", "engine", "quantization"], "fp8")), "set engine.dtype to bfloat16"),
    ("multi_gpu", _set(["stages", "dit", "engine", "png_compress_level"], 10), "png_compress_level"),
    ("multi_gpu", _set(["stages", "dit", "deployment_class"], "stages.dit:CfgParallelDiTStage"),
     "CfgParallelDiTStage needs 2 GPUs"),
    # values the thinker cannot run with are refused here, with the reason, never overridden later
    ("cpu", _set(["stages", "thinker", "engine", "enforce_eager"], False),
     "enforce_eager must be true: the thinker decides its MoT routing"),
    ("cpu", _set(["stages", "thinker", "engine", "max_num_batched_tokens"], 2048),
     "max_num_batched_tokens 2048 is below max_model_len 4096: a visual block is never split"),
])
def test_impossible_resources_and_values_fail_naming_the_file(tmp_path, base, edit, needle):
    path = _write_variant(tmp_path, base, edit)
    with pytest.raises(StageGraphError) as err:
        load_stage_graph(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_single_gpu_thinker_without_memory_cap_is_refused(tmp_path):
    path = _write_variant(tmp_path, "single_gpu",
                          lambda r: r["stages"]["thinker"]["engine"].pop("gpu_memory_utilization"))
    with pytest.raises(StageGraphError, match="vLLM defaults to 0.9"):
        load_stage_graph(path)


def test_unreadable_and_non_yaml_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed\n")
    with pytest.raises(StageGraphError, match="bad.yaml: not valid YAML"):
        load_stage_graph(bad)
    with pytest.raises(StageGraphError, match="missing.yaml: cannot read"):
        load_stage_graph(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(StageGraphError, match="a stage graph is a mapping"):
        load_stage_graph(tmp_path / "list.yaml")


# -- the Serve config and the builder's plan --------------------------------------------------------

def test_serve_config_is_valid_and_points_at_build_app():
    raw = yaml.safe_load((REPO_ROOT / "configs" / "lance_2stage.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    (app,) = config.applications
    assert app.import_path == BUILDER_IMPORT_PATH
    module, _, attr = app.import_path.partition(":")
    assert getattr(__import__(module, fromlist=[attr]), attr) is build_app
    assert parse_app_args(app.args).stage_graph == "auto"


@pytest.mark.parametrize("gpus, graph", [(0, "cpu"), (1, "single_gpu"), (4, "multi_gpu")])
def test_auto_picks_the_graph_by_gpu_count(gpus, graph):
    assert resolve_stage_graph_path("auto", gpus) == SHIPPED_GRAPHS_DIR / f"{graph}.yaml"


def test_stage_graph_arg_takes_names_and_repo_relative_paths():
    assert resolve_stage_graph_path("multi_gpu", 0) == SHIPPED_GRAPHS_DIR / "multi_gpu.yaml"
    rel = resolve_stage_graph_path("configs/stage_graphs/cpu.yaml", 0)
    assert rel.resolve() == (SHIPPED_GRAPHS_DIR / "cpu.yaml").resolve()
    shipped = "cpu, multi_gpu, multi_gpu_video, single_gpu, single_gpu_video"
    with pytest.raises(StageGraphError, match=rf"no shipped stage graph 'two_gpu' \(shipped: {shipped}\)"):
        resolve_stage_graph_path("two_gpu")
    with pytest.raises(StageGraphError, match="name the graph"):
        resolve_stage_graph_path("auto")    # without a GPU count


def test_engine_args_the_thinker_gets_are_the_graphs():
    engine = load_stage_graph(SHIPPED_GRAPHS_DIR / "single_gpu.yaml").stages.thinker.engine
    args = engine.vllm_engine_args()
    assert args["max_num_batched_tokens"] == args["max_model_len"] == engine.max_model_len   # the default
    assert args["enforce_eager"] is True


def test_cfg_parallel_dit_reserves_two_worker_gpus_beside_its_replica():
    dit = DiTSpec.model_validate({"deployment_class": CFG_PARALLEL_DIT_CLASS, "max_ongoing_requests": 8,
                                  "resources": {"num_cpus": 4, "num_gpus": 2, "memory_gib": 1}})
    opts = dit.deployment_options()
    assert opts["placement_group_bundles"] == [{"CPU": 4, "memory": 2**30}, {"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}]
    assert opts["placement_group_strategy"] == "STRICT_PACK" and opts["max_ongoing_requests"] == 8
    assert "num_gpus" not in opts["ray_actor_options"]      # the replica's GPUs are the workers'
    serve.deployment(type("Probe", (), {})).options(**opts)   # Ray's own option validation
    assert "placement_group_bundles" not in DiTSpec.model_validate({"resources": {"num_gpus": 1}}).deployment_options()


def test_app_args_typo_is_an_error_with_the_fix():
    with pytest.raises(ValueError, match=r"args.stage_grph: unknown key 'stage_grph' \(did you mean 'stage_graph'\?\)"):
        parse_app_args({"stage_grph": "cpu"})


def test_model_precedence_args_then_env_then_graph_then_gpu_default():
    env = {"LANCE_MODEL": "/models/env"}
    assert choose_model("/models/args", "hub/graph", 0, env).path == "/models/args"
    assert choose_model(None, "hub/graph", 0, env).path == "/models/env"
    assert choose_model(None, "hub/graph", 0, {}).path == "hub/graph"
    gpu = choose_model(None, None, 2, {})
    assert gpu.path == HUB_REPO_ID and not gpu.tiny_random_weights


def test_cpu_without_model_serves_the_tiny_checkpoint_created_once(tmp_path, caplog):
    env = {"LANCE_SERVE_CACHE_DIR": str(tmp_path)}
    served = choose_model(None, None, 0, env)
    assert served.tiny_random_weights and served.name == TINY_SERVED_NAME
    root = Path(served.path)
    assert root == tmp_path / "tiny" and (root / "Lance_3B" / "model.safetensors").is_file()
    assert "NOISE" in caplog.text
    stamp = (root / "Lance_3B" / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_checkpoint(root) == root
    assert (root / "Lance_3B" / "model.safetensors").stat().st_mtime_ns == stamp   # not rewritten
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-")]      # no leftovers


def test_plan_for_cpu_hands_graph_engine_args_to_the_stages(tmp_path, monkeypatch):
    monkeypatch.setenv("LANCE_SERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LANCE_MODEL", raising=False)
    plan = plan_app({"stage_graph": "auto", "allow_remote_images": True}, num_gpus=0)
    graph = load_stage_graph(SHIPPED_GRAPHS_DIR / "cpu.yaml")
    assert plan.graph == graph
    assert plan.settings.tiny_random_weights and plan.settings.served_model_name == TINY_SERVED_NAME
    assert plan.settings.limits.allow_remote_images
    assert plan.settings.limits.max_new_tokens == graph.stages.thinker.engine.max_model_len
    assert plan.settings.limits.max_image_side == 1024
    assert plan.thinker_init == {"model": plan.served.path, "variant": "Lance_3B",
                                 "engine_args": graph.stages.thinker.engine.vllm_engine_args()}
    assert plan.thinker_init["engine_args"]["cpu_kv_cache_space_gib"] == 2
    assert "cfg_parallel" not in plan.dit_init and plan.dit_init["engine_args"] == graph.stages.dit.engine.model_dump()
    assert plan.dit_init["max_batch_size"] == graph.stages.dit.batching.max_batch_size


def test_the_cpu_graph_serves_both_variants_and_a_folder_serves_those_it_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("LANCE_SERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LANCE_MODEL", raising=False)
    plan = plan_app({"stage_graph": "cpu"}, num_gpus=0)     # the tiny checkpoint holds both
    assert plan.variants == ("Lance_3B", "Lance_3B_Video") == plan.settings.variants
    assert plan.stage_inits["Lance_3B_Video"][0]["variant"] == "Lance_3B_Video"
    assert plan.stage_inits["Lance_3B_Video"][1]["variant"] == "Lance_3B_Video"
    assert all((Path(plan.served.path) / v / "model.safetensors").is_file() for v in plan.variants)
    video_only = tmp_path / "video_only"
    video_only.mkdir()
    (video_only / "Lance_3B_Video").symlink_to(Path(plan.served.path) / "Lance_3B_Video")
    plan = plan_app({"stage_graph": "cpu", "model": str(video_only)}, num_gpus=0)
    assert plan.variants == ("Lance_3B_Video",)             # it serves every task
    assert plan.thinker_init["variant"] == "Lance_3B_Video"


def test_an_image_only_tiny_checkpoint_is_replaced_by_one_with_both_variants(tmp_path):
    from stages.lance.tiny import make_tiny_checkpoint
    old = tmp_path / "tiny"
    make_tiny_checkpoint(old)                                 # Lance_3B only, as before
    assert not (old / "Lance_3B_Video").exists()
    assert ensure_tiny_checkpoint(old) == old
    assert (old / "Lance_3B_Video" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny")]


def test_variants_are_checked():
    base = yaml.safe_load((SHIPPED_GRAPHS_DIR / "cpu.yaml").read_text())
    for edit, message in [({"variants": ["Lance_3B", "Lance_3B"]}, "twice"),
                          ({"variants": ["Lance_3B"], "variant": "Lance_3B_Video"}, "not both"),
                          ({"variants": ["Lance_3B"], "variant_stages": {"Lance_3B_Video": {}}},
                           "variants does not list"),
                          ({"variants": ["Lance_4B"]}, "Lance_3B")]:
        with pytest.raises(Exception, match=message):
            from serve_app.stage_graph import StageGraph
            StageGraph.model_validate({**base, **edit})


def test_plan_for_gpu_graph_uses_the_graphs_model(monkeypatch):
    monkeypatch.delenv("LANCE_MODEL", raising=False)
    plan = plan_app({"stage_graph": "single_gpu", "served_model_name": "lance"}, num_gpus=1)
    assert plan.served.path == HUB_REPO_ID and plan.settings.served_model_name == "lance"
    assert plan.thinker_init["engine_args"]["gpu_memory_utilization"] == 0.45


def test_built_app_drains_requests_and_answers_overload():
    """Every bound deployment waits out the longest request on shutdown (a redeploy loses none) and
    has a bounded queue; the ingress's own overflow carries Retry-After."""
    from ray.serve._private.build_app import build_app as build_serve_app

    built = build_serve_app(build_app({"stage_graph": "single_gpu", "request_timeout_s": 120}),
                            name="lance")
    deployments = {d.name: d for d in built.deployments}
    assert set(deployments) == {"LanceIngress", "ThinkerStage", "DiTStage"}
    for d in deployments.values():
        assert d._deployment_config.graceful_shutdown_timeout_s == 150
        assert d.max_queued_requests > 0
    for name in ("ThinkerStage", "DiTStage"):   # a dead engine is noticed within seconds
        assert deployments[name]._deployment_config.health_check_period_s == 2.0
    bp = deployments["LanceIngress"].backpressure_config
    assert (bp.status_code, bp.retry_after_s) == (503, 1)
