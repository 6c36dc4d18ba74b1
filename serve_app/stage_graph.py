"""Stage graph: which model, and how the ingress, thinker and DiT deployments are sized and placed.

A graph is a YAML file in configs/stage_graphs/. It is validated in full before anything is
deployed: unknown keys (with the closest valid key suggested), values out of range and resource
combinations that cannot work are errors that name the file and the key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import (Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                      ValidationError, model_validator)

from stages.lance.limits import DTYPE_NAMES

from .strict_model import StrictModel, error_lines

SHIPPED_GRAPHS_DIR = Path(__file__).resolve().parent.parent / "configs" / "stage_graphs"


class StageGraphError(ValueError):
    """A stage graph file that cannot be used; the message names the file and every bad key."""


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
    max_model_len: PositiveInt = 8192
    gpu_memory_utilization: Optional[float] = Field(default=None, gt=0, le=1)
    enable_prefix_caching: bool = True
    max_num_seqs: PositiveInt = 16
    # KV block size (tokens). Only whole blocks are prefix-cached: vLLM's CPU default (128) is longer
    # than Lance's system prefix, so the cpu graph sets 32 to share it between the CFG branches.
    block_size: Optional[PositiveInt] = None
    max_num_batched_tokens: Optional[PositiveInt] = None
    enforce_eager: bool = True    # the thinker requires it (data-dependent MoT routing)
    cpu_kv_cache_space_gib: Optional[PositiveFloat] = None

    def vllm_engine_args(self) -> dict:
        return self.model_dump(exclude_none=True)


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
        return 2 if self.deployment_class == CFG_PARALLEL_DIT_CLASS else 1

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
            if self.cfg_parallel == 2:
                raise ValueError(f"engine.quantization fp8 is not supported by {CFG_PARALLEL_DIT_CLASS}; use "
                                 f"deployment_class: {DIT_CLASS} or remove the quantization")
        if self.cfg_parallel == 2 and gpus not in (0, 2):
            raise ValueError(f"{CFG_PARALLEL_DIT_CLASS} needs 2 GPUs per DiT replica (one per CFG branch), "
                             f"resources.num_gpus is {gpus}; set num_gpus: 2 or deployment_class: {DIT_CLASS}")
        if self.cfg_parallel == 2 and self.batching.max_batch_size != 1:
            raise ValueError(f"{CFG_PARALLEL_DIT_CLASS} denoises one request at a time on both GPUs: "
                             f"batching.max_batch_size must be 1 (got {self.batching.max_batch_size}); "
                             "scale with replicas instead")
        return self


class IngressSpec(DeploymentSpec):
    max_ongoing_requests: PositiveInt = 64
    resources: Resources = Field(default_factory=lambda: Resources(num_cpus=0.5))


class Stages(StrictModel):
    ingress: IngressSpec = Field(default_factory=IngressSpec)
    thinker: ThinkerSpec
    dit: DiTSpec


class StageGraph(StrictModel):
    name: str
    description: str = ""
    model: Optional[str] = None    # local dir or hub id; None: LANCE_MODEL / app args / default
    variant: str = "Lance_3B"
    stages: Stages

    @model_validator(mode="after")
    def _shared_gpu_fits(self):
        t, d = self.stages.thinker.resources.num_gpus, self.stages.dit.resources.num_gpus
        if 0 < t < 1 and 0 < d < 1 and t + d > 1:
            raise ValueError(f"thinker ({t}) and DiT ({d}) GPU shares add up to {t + d} > 1: "
                             "they cannot share one GPU")
        return self

    @property
    def uses_gpus(self) -> bool:
        s = self.stages
        return any(x.resources.num_gpus > 0 for x in (s.ingress, s.thinker, s.dit))


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
