"""Stage graph: which model, and how the ingress, thinker and DiT deployments are sized and placed.

A graph is a YAML file in configs/stage_graphs/. It is validated in full before anything is
deployed: unknown keys (with the closest valid key suggested), values out of range and resource
combinations that cannot work are errors that name the file and the key. A value the schema accepts
is what runs: nothing later overrides it. Each spec also turns itself into its deployment's Serve
options (`deployment_options`), which the builder binds and the KubeRay renderer sizes pods from.

Pure on purpose (pydantic, PyYAML and the import-light stages.lance.limits): the deploy tooling
imports it without torch or Ray Serve.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import (Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                      ValidationError, model_validator)

from stages.lance.limits import DTYPE_NAMES

from .app_config import stage_key
from .strict_model import StrictModel, error_lines

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_GRAPHS_DIR = REPO_ROOT / "configs" / "stage_graphs"
DEFAULT_MAX_MODEL_LEN = 8192        # the thinker's longest context, and the largest max_tokens
STAGES = ("ingress", "thinker", "dit")
CFG_BRANCHES = 2                    # the CFG-parallel DiT: the cond and uncond branches, one GPU each


class StageGraphError(ValueError):
    """A stage graph file that cannot be used; the message names the file and every bad key."""


def graph_for_gpus(num_gpus: int) -> str:
    """The shipped graph `stage_graph: auto` picks: cpu without GPUs, single_gpu with one, else multi_gpu."""
    return "cpu" if num_gpus == 0 else "single_gpu" if num_gpus == 1 else "multi_gpu"


def resolve_stage_graph_path(name: str, num_gpus: Optional[int] = None, repo_root: Path = REPO_ROOT) -> Path:
    """The file a `stage_graph` value names: `auto` (needs `num_gpus`), a shipped graph's name
    (configs/stage_graphs/<name>.yaml under `repo_root`), or a path; a relative path is taken from
    the working directory (Serve's working_dir), else from `repo_root`."""
    if name == "auto":
        if num_gpus is None:
            raise StageGraphError("stage_graph 'auto' depends on the GPUs present when the app is built; "
                                  "name the graph")
        name = graph_for_gpus(num_gpus)
    if "/" not in name and not name.endswith((".yaml", ".yml")):
        graphs_dir = repo_root / "configs" / "stage_graphs"
        path = graphs_dir / f"{name}.yaml"
        if not path.is_file():
            shipped = sorted(p.stem for p in graphs_dir.glob("*.yaml"))
            raise StageGraphError(f"no shipped stage graph {name!r} (shipped: {', '.join(shipped)})")
        return path
    path = Path(name)
    if not path.is_absolute() and not path.exists() and (repo_root / path).exists():
        return repo_root / path
    return path


class Resources(StrictModel):
    """Per-replica Ray resources (become the deployment's ray_actor_options)."""

    num_cpus: NonNegativeFloat = 1.0
    num_gpus: NonNegativeFloat = 0.0
    memory_gib: Optional[PositiveFloat] = None     # Ray `memory` reservation, in GiB
    accelerator_type: Optional[str] = None         # e.g. "H100"
    custom: dict[str, NonNegativeFloat] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _whole_gpus_above_one(self):
        # Ray schedules a fraction of one GPU or whole GPUs, never 1.5 GPUs.
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError(f"num_gpus {self.num_gpus}: above 1 it must be a whole number "
                             "(Ray gives a replica a share of one GPU or whole GPUs)")
        return self

    def ray_actor_options(self) -> dict:
        opts: dict = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_gib is not None:
            opts["memory"] = int(self.memory_gib * 2**30)
        if self.accelerator_type:
            opts["accelerator_type"] = self.accelerator_type
        if self.custom:
            opts["resources"] = dict(self.custom)
        return opts


class Autoscaling(StrictModel):
    """Ray Serve request-based autoscaling (subset of ray.serve.config.AutoscalingConfig)."""

    min_replicas: NonNegativeInt = 1
    max_replicas: PositiveInt
    initial_replicas: Optional[NonNegativeInt] = None
    target_ongoing_requests: PositiveFloat = 2.0
    upscale_delay_s: NonNegativeFloat = 30.0
    downscale_delay_s: NonNegativeFloat = 600.0

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.initial_replicas is not None and not (
                self.min_replicas <= self.initial_replicas <= self.max_replicas):
            raise ValueError(f"initial_replicas {self.initial_replicas} is outside "
                             f"[{self.min_replicas}, {self.max_replicas}]")
        return self


class DeploymentSpec(StrictModel):
    """Serve options shared by every stage: replicas or autoscaling, resources, concurrency."""

    num_replicas: Optional[PositiveInt] = None     # fixed count; leave out to use `autoscaling`
    autoscaling: Optional[Autoscaling] = None
    max_ongoing_requests: PositiveInt = 8
    max_queued_requests: int = Field(default=-1, ge=-1)   # -1: no limit (Serve's default)
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="after")
    def _one_scaling_mode(self):
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        return self

    def deployment_options(self) -> dict:
        """Keyword arguments for `Deployment.options()`."""
        opts: dict = {"max_ongoing_requests": self.max_ongoing_requests,
                      "max_queued_requests": self.max_queued_requests,
                      "ray_actor_options": self.resources.ray_actor_options()}
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas or 1
        return opts


Dtype = Literal[("auto",) + DTYPE_NAMES]


class ThinkerEngineArgs(StrictModel):
    """vLLM engine arguments of the thinker (vLLM's own names, plus cpu_kv_cache_space_gib, which
    the thinker turns into vLLM's kv_cache_memory_bytes)."""

    dtype: Dtype = "auto"
    max_model_len: PositiveInt = DEFAULT_MAX_MODEL_LEN
    gpu_memory_utilization: Optional[float] = Field(default=None, gt=0, le=1)
    enable_prefix_caching: bool = True
    max_num_seqs: PositiveInt = 16
    # KV block size (tokens). Only whole blocks are prefix-cached: vLLM's CPU default (128) is longer
    # than Lance's system prefix, so the cpu graph sets 32 to share it between the CFG branches.
    block_size: Optional[PositiveInt] = None
    max_num_batched_tokens: Optional[PositiveInt] = None   # default: max_model_len
    enforce_eager: bool = True
    cpu_kv_cache_space_gib: Optional[PositiveFloat] = None

    @model_validator(mode="after")
    def _what_the_thinker_needs(self):
        if not self.enforce_eager:
            raise ValueError("enforce_eager must be true: the thinker decides its MoT routing and "
                             "bidirectional visual blocks per step from the token ids (Python that CUDA "
                             "graphs and torch.compile cannot capture); remove the key or set it to true")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens {self.max_num_batched_tokens} is below max_model_len "
                             f"{self.max_model_len}: a visual block is never split across scheduler steps "
                             "and may be as long as the context, so one step must hold a whole prompt; set "
                             "it to at least max_model_len or leave it out (default: max_model_len)")
        return self

    def vllm_engine_args(self) -> dict:
        args = self.model_dump(exclude_none=True)
        args.setdefault("max_num_batched_tokens", self.max_model_len)
        return args


class ThinkerSpec(DeploymentSpec):
    deployment_class: str = "stages.thinker:ThinkerStage"
    engine: ThinkerEngineArgs = Field(default_factory=ThinkerEngineArgs)

    @model_validator(mode="after")
    def _memory_fits_the_gpu_share(self):
        gpus, util = self.resources.num_gpus, self.engine.gpu_memory_utilization
        if gpus == 0 and util is not None:
            raise ValueError("engine.gpu_memory_utilization is set but resources.num_gpus is 0; "
                             "remove it or give the thinker a GPU")
        if gpus > 0 and self.engine.cpu_kv_cache_space_gib is not None:
            raise ValueError("engine.cpu_kv_cache_space_gib only applies to vLLM's CPU backend; "
                             "with num_gpus > 0 size the cache with gpu_memory_utilization")
        if 0 < gpus < 1:
            # vLLM takes `util` of the *whole* device; beyond the thinker's share it eats the
            # memory of whatever shares the GPU (the DiT).
            if util is None:
                raise ValueError(f"the thinker has a {gpus} GPU share: set engine."
                                 f"gpu_memory_utilization to at most {gpus} (vLLM defaults to 0.9)")
            if util > gpus:
                raise ValueError(f"engine.gpu_memory_utilization {util} exceeds the thinker's GPU "
                                 f"share num_gpus {gpus}; set it to at most {gpus} to leave the "
                                 "rest of the GPU to the DiT")
        return self


class DiTEngineArgs(StrictModel):
    dtype: Dtype = "auto"
    compile: bool = True           # GPU only: fused Triton kernels, CUDA graphs, cuDNN attention
    quantization: Optional[Literal["none", "fp8"]] = None   # fp8: layer weights in FP8 E4M3 (GPU, bf16)
    png_compress_level: int = Field(6, ge=0, le=9)          # zlib level of PNG responses (same pixels)


class DiTBatching(StrictModel):
    """Requests denoised together in one forward (same latent grid), and how long to wait for them."""

    max_batch_size: PositiveInt = 1
    batch_wait_timeout_s: NonNegativeFloat = 0.0


DIT_CLASS = "stages.dit:DiTStage"
CFG_PARALLEL_DIT_CLASS = "stages.dit:CfgParallelDiTStage"   # a request's two CFG branches on two GPUs


class DiTSpec(DeploymentSpec):
    deployment_class: str = DIT_CLASS
    engine: DiTEngineArgs = Field(default_factory=DiTEngineArgs)
    batching: DiTBatching = Field(default_factory=DiTBatching)

    @model_validator(mode="before")
    @classmethod
    def _cfg_parallel_is_a_class(cls, data):
        if isinstance(data, dict) and "cfg_parallel" in data:
            raise ValueError(f"cfg_parallel is no longer a key: the CFG-parallel DiT is its own class, set "
                             f"deployment_class: {CFG_PARALLEL_DIT_CLASS} (with resources.num_gpus: 2) "
                             "instead of cfg_parallel: 2, and remove cfg_parallel: 1")
        return data

    @property
    def cfg_parallel(self) -> int:
        """Devices one request's CFG branches are spread over: 2 for the CFG-parallel class, else 1."""
        return CFG_BRANCHES if self.deployment_class == CFG_PARALLEL_DIT_CLASS else 1

    @model_validator(mode="after")
    def _feasible(self):
        if self.batching.max_batch_size > self.max_ongoing_requests:
            raise ValueError(f"batching.max_batch_size {self.batching.max_batch_size} exceeds "
                             f"max_ongoing_requests {self.max_ongoing_requests}: a batch could "
                             "never fill; raise max_ongoing_requests or lower max_batch_size")
        gpus = self.resources.num_gpus
        if self.engine.quantization == "fp8":
            if gpus == 0:
                raise ValueError("engine.quantization fp8 runs on FP8 tensor cores: it needs a GPU "
                                 "(resources.num_gpus > 0); remove it for a CPU graph")
            if self.engine.dtype not in ("auto", "bfloat16"):
                raise ValueError(f"engine.quantization fp8 computes in bfloat16; set engine.dtype to "
                                 f"bfloat16 (or auto), not {self.engine.dtype}")
            if self.cfg_parallel == CFG_BRANCHES:
                raise ValueError(f"engine.quantization fp8 is not supported by {CFG_PARALLEL_DIT_CLASS}; use "
                                 f"deployment_class: {DIT_CLASS} or remove the quantization")
        if self.cfg_parallel == CFG_BRANCHES and gpus not in (0, CFG_BRANCHES):
            raise ValueError(f"{CFG_PARALLEL_DIT_CLASS} needs 2 GPUs per DiT replica (one per CFG branch), "
                             f"resources.num_gpus is {gpus}; set num_gpus: 2 or deployment_class: {DIT_CLASS}")
        if self.cfg_parallel == CFG_BRANCHES and self.batching.max_batch_size != 1:
            raise ValueError(f"{CFG_PARALLEL_DIT_CLASS} denoises one request at a time on both GPUs: "
                             f"batching.max_batch_size must be 1 (got {self.batching.max_batch_size}); "
                             "scale with replicas instead")
        return self

    def deployment_options(self) -> dict:
        options = super().deployment_options()
        return cfg_parallel_deployment_options(options) if self.cfg_parallel == CFG_BRANCHES else options


def cfg_parallel_deployment_options(options: dict, worker_cpus: float = 1) -> dict:
    """Serve options of the CFG-parallel DiT (`CfgParallelDiTStage`): the replica actor keeps its CPUs and
    memory and gives its GPUs to two worker bundles, all in one STRICT_PACK placement group per replica
    (Serve places the replica in bundle 0 and reserves the workers' GPUs with it, atomically). The
    replica's `CfgParallelGroup` (stages/dit/cfg_parallel.py) puts its two workers in the last two bundles."""
    opts = {**options, "ray_actor_options": dict(options.get("ray_actor_options", {}))}
    actor = opts["ray_actor_options"]
    gpus = actor.pop("num_gpus", 0) or 0
    if gpus and gpus != CFG_BRANCHES:
        raise ValueError(f"the CFG-parallel DiT needs num_gpus 2 per replica (one per branch), got {gpus}")
    replica_bundle = {"CPU": actor.get("num_cpus", 1)}
    if actor.get("memory"):
        replica_bundle["memory"] = actor["memory"]
    worker_bundle = {"CPU": worker_cpus, "GPU": 1} if gpus else {"CPU": worker_cpus}
    opts["placement_group_bundles"] = [replica_bundle] + [dict(worker_bundle) for _ in range(CFG_BRANCHES)]
    opts["placement_group_strategy"] = "STRICT_PACK"
    return opts


class IngressSpec(DeploymentSpec):
    max_ongoing_requests: PositiveInt = 64
    resources: Resources = Field(default_factory=lambda: Resources(num_cpus=0.5))


class Stages(StrictModel):
    ingress: IngressSpec = Field(default_factory=IngressSpec)
    thinker: ThinkerSpec
    dit: DiTSpec


class VariantStages(StrictModel):
    """A variant's own thinker and DiT (when they differ from `stages.thinker` / `stages.dit`)."""

    thinker: Optional[ThinkerSpec] = None
    dit: Optional[DiTSpec] = None


Variant = Literal["Lance_3B", "Lance_3B_Video"]


class StageGraph(StrictModel):
    name: str
    description: str = ""
    model: Optional[str] = None    # local dir or hub id; None: LANCE_MODEL / app args / default
    variant: Variant = "Lance_3B"
    # several checkpoint variants behind one endpoint, each with its own thinker and DiT deployments
    # (image tasks go to Lance_3B, video tasks to Lance_3B_Video; serve_app/variants.py); the first
    # one's deployments keep the plain names ThinkerStage / DiTStage. Leave out: [variant].
    variants: Optional[list[Variant]] = Field(None, min_length=1)
    # per-variant thinker / DiT specs; a variant not listed uses stages.thinker and stages.dit
    variant_stages: dict[Variant, VariantStages] = Field(default_factory=dict)
    stages: Stages

    @model_validator(mode="after")
    def _variants(self):
        if self.variants is not None:
            if len(set(self.variants)) != len(self.variants):
                raise ValueError(f"variants {self.variants} lists a variant twice")
            if "variant" in self.model_fields_set and self.variant != self.variants[0]:
                raise ValueError("set either variant or variants, not both")
        extra = sorted(set(self.variant_stages) - set(self.served_variants))
        if extra:
            raise ValueError(f"variant_stages names {extra}, which variants does not list "
                             f"({self.served_variants})")
        return self

    @property
    def served_variants(self) -> list[str]:
        return list(self.variants) if self.variants is not None else [self.variant]

    def thinker_spec(self, variant: str) -> "ThinkerSpec":
        own = self.variant_stages.get(variant)
        return own.thinker if own is not None and own.thinker is not None else self.stages.thinker

    def dit_spec(self, variant: str) -> "DiTSpec":
        own = self.variant_stages.get(variant)
        return own.dit if own is not None and own.dit is not None else self.stages.dit

    @model_validator(mode="after")
    def _shared_gpu_fits(self):
        t, d = self.stages.thinker.resources.num_gpus, self.stages.dit.resources.num_gpus
        if 0 < t < 1 and 0 < d < 1 and t + d > 1:
            raise ValueError(f"thinker ({t}) and DiT ({d}) GPU shares add up to {t + d} > 1: "
                             "they cannot share one GPU")
        return self

    @property
    def uses_gpus(self) -> bool:
        specs = [self.stages.ingress] + [x for v in self.served_variants
                                         for x in (self.thinker_spec(v), self.dit_spec(v))]
        return any(x.resources.num_gpus > 0 for x in specs)

    def deployment_options(self) -> dict[str, dict]:
        """Each stage's Serve options (`Deployment.options()` keyword arguments), by stage key: "ingress",
        then a thinker and a DiT per served variant (`app_config.stage_key`: "thinker" / "dit" for the
        first variant, "thinker@<variant>" / "dit@<variant>" for the others)."""
        options = {"ingress": self.stages.ingress.deployment_options()}
        for i, variant in enumerate(self.served_variants):
            options[stage_key("thinker", i, variant)] = self.thinker_spec(variant).deployment_options()
            options[stage_key("dit", i, variant)] = self.dit_spec(variant).deployment_options()
        return options


def load_stage_graph(path: str | Path) -> StageGraph:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise StageGraphError(f"{path}: cannot read stage graph: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise StageGraphError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise StageGraphError(f"{path}: a stage graph is a mapping, got {type(raw).__name__}")
    try:
        return StageGraph.model_validate(raw)
    except ValidationError as e:
        lines = [f"{path}: {key}: {msg}" for key, msg in error_lines(e)]
        raise StageGraphError("invalid stage graph:\n  " + "\n  ".join(lines)) from None
