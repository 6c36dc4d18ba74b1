"""CFG-parallel denoising: the cond and text-uncond branches of one request on two devices.

Rank 0 holds the cond branch's context cache, rank 1 the uncond one's; a KV cache never leaves the
device that uses it. Both ranks start from the same x (broadcast from rank 0) and step it identically:

* CFG step: each rank computes its own branch's velocity (the model core's `predict_velocity`, or in
  the serving form the DiT engine's forward), the two velocities are exchanged
  with `all_gather` (NCCL on GPU, gloo on CPU) and both ranks apply `scheduler.guide` + `step` to the
  same numbers, so x stays bit-identical on both ranks.
* Non-CFG step: only the cond velocity is needed and only rank 0 has the cond cache, so rank 0
  computes it; while a CFG step still lies ahead, it broadcasts v_cond (n x 48 values, 0.8 MB at
  1024^2 in fp32) so rank 1's x stays in step. Rank 1 leaves after the last CFG step (with the
  default interval (0.4, 1] that is step 25 of 30) and rank 0 finishes alone. Letting rank 1 also
  compute cond would need a second copy of the cond cache and buys nothing: the step's time is one
  forward either way.

The serving form is `CfgParallelGroup`: two Ray actors (`CfgParallelWorker`), one per GPU bundle of
a STRICT_PACK placement group, joined in a torch.distributed group (rendezvous at rank 0's address).
`spawn_local_group` runs the same loop in plain processes (tests on CPU, the benchmark).
"""
from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
import zlib
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from stages.lance.denoise import BranchState, predict_velocity
from stages.lance.handoff import BranchKV, ContextHandoff
from stages.lance.model import LanceModel
from stages.lance.requests import DenoiseParams
from stages.lance.scheduler import FlowMatchEulerScheduler
from stages.lance.transformer import KVCache

COND_RANK, UNCOND_RANK = 0, 1
WORLD_SIZE = 2
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


# --- the loop ---------------------------------------------------------------------------------------

def cfg_step_indexes(scheduler: FlowMatchEulerScheduler, with_cfg: bool) -> list[int]:
    """Steps that run both branches (empty when the request has no uncond branch)."""
    return [i for i in range(scheduler.num_steps) if with_cfg and scheduler.uses_cfg(i)]


def exchange_velocities(v_mine: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """all_gather of each rank's branch velocity -> (v_cond, v_uncond), identical on both ranks."""
    v_mine = v_mine.contiguous()
    both = [torch.empty_like(v_mine) for _ in range(WORLD_SIZE)]
    dist.all_gather(both, v_mine, group=group)
    return both[COND_RANK], both[UNCOND_RANK]


BranchVelocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


StepOutput = tuple[int, torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def cfg_parallel_steps(velocity: BranchVelocity | None, scheduler: FlowMatchEulerScheduler, x: torch.Tensor,
                       with_cfg: bool, group=None) -> Iterator[StepOutput]:
    """Yields (i, x_next, v_cond, v_uncond) for every step this rank takes part in.

    velocity(x, sigma) -> v: this rank's branch (rank 0 cond, rank 1 uncond; None on rank 1 when
    `with_cfg` is False). x [n, 48]: rank 0's initial latent; on rank 1 a buffer of the same shape and
    dtype, overwritten. The state stays in x's dtype; `velocity` casts for the model as it needs.
    """
    rank = dist.get_rank(group)
    if dist.get_world_size(group) != WORLD_SIZE:
        raise ValueError(f"CFG-parallel runs on {WORLD_SIZE} ranks, the group has {dist.get_world_size(group)}")
    if velocity is None and (rank == COND_RANK or with_cfg):
        raise ValueError(f"rank {rank} has no branch to compute")
    cfg_steps = set(cfg_step_indexes(scheduler, with_cfg))
    last_cfg = max(cfg_steps, default=-1)
    if rank == UNCOND_RANK and last_cfg < 0:
        return
    if last_cfg >= 0:
        dist.broadcast(x, group=group, group_src=COND_RANK)
    for i in range(scheduler.num_steps):
        if rank == UNCOND_RANK and i > last_cfg:
            return
        sigma = scheduler.sigmas[i].to(x.device, x.dtype)
        if i in cfg_steps:
            v_cond, v_uncond = exchange_velocities(velocity(x, sigma).to(x.dtype), group)
            v_applied = scheduler.guide(v_cond, v_uncond)
        else:
            v_cond = velocity(x, sigma).to(x.dtype) if rank == COND_RANK else torch.empty_like(x)
            if i < last_cfg:
                dist.broadcast(v_cond, group=group, group_src=COND_RANK)
            v_uncond, v_applied = None, v_cond
        x = scheduler.step(x, v_applied, i)
        yield i, x, v_cond, v_uncond


def model_core_velocity(model: LanceModel, grid, markers: torch.Tensor, branch: BranchState) -> BranchVelocity:
    """One branch's velocity through the model core (`predict_velocity`), as `denoise` computes it."""
    return lambda x, sigma: predict_velocity(model, x[None], sigma[None], grid, markers,
                                             branch.query_positions[None], branch.cache)[0]


@torch.no_grad()
def denoise_cfg_parallel(model: LanceModel, scheduler: FlowMatchEulerScheduler, x: torch.Tensor, grid,
                         markers: torch.Tensor, branch: BranchState | None, with_cfg: bool, group=None,
                         on_step: StepCallback | None = None) -> torch.Tensor | None:
    """The CFG-parallel counterpart of `stages.lance.denoise.denoise`: final x on rank 0, None on rank 1."""
    velocity = model_core_velocity(model, grid, markers, branch) if branch is not None else None
    for i, x, v_cond, v_uncond in cfg_parallel_steps(velocity, scheduler, x, with_cfg, group):
        if on_step is not None:
            on_step(i, x, v_cond, v_uncond)
    return x if dist.get_rank(group) == COND_RANK else None


# --- one request, split by rank ---------------------------------------------------------------------

@dataclass
class BranchJob:
    """What one rank gets of a request: its own branch only, plus what both ranks must agree on."""

    request_id: str
    sequence: int                              # the group's job counter: both ranks must see the same
    latent_grid: tuple[int, int, int]
    params: DenoiseParams
    with_cfg: bool                             # the request has an uncond branch and CFG is on
    with_peer: bool                            # both ranks get this job (it has a CFG step)
    branch: BranchKV | None                    # rank 0: cond, rank 1: uncond
    num_reference_tokens: int = 0
    initial_noise: torch.Tensor | None = None  # rank 0 only (rank 1 receives x by broadcast)


def split_handoff(handoff: ContextHandoff, sequence: int) -> tuple[BranchJob, BranchJob | None]:
    """(rank 0 job, rank 1 job); rank 1 gets none when the request has no CFG step."""
    with_cfg = handoff.uncond is not None and handoff.params.uses_cfg
    try:
        with_peer = bool(cfg_step_indexes(FlowMatchEulerScheduler(handoff.params), with_cfg))
    except Exception:  # unusable knobs: rank 0 alone rejects them with the DiT's own error
        with_peer = False
    cond = BranchJob(handoff.request_id, sequence, tuple(handoff.latent_grid), handoff.params, with_cfg,
                     with_peer, handoff.cond, handoff.num_reference_tokens, handoff.initial_noise)
    if not with_peer:
        return cond, None
    return cond, replace(cond, branch=handoff.uncond, num_reference_tokens=0, initial_noise=None)


def branch_state(branch: BranchKV, device, dtype) -> BranchState:
    """Fetch one branch's K/V (ObjectRef or tensors) onto a device, as the model core's cache."""
    k, v = branch.fetch()
    if k.shape[1] != branch.context_len:
        raise ValueError(f"branch KV has {k.shape[1]} context tokens, the handoff says {branch.context_len}")
    cache = KVCache.from_stacked(k.to(device, dtype), v.to(device, dtype))
    return BranchState(cache, branch.query_positions.to(device))


class PeerRejectedRequest(RuntimeError):
    """The other rank refused the request (its error went to the caller from that rank)."""


def agree_on_job(job: BranchJob, error: BaseException | None, device, group=None) -> None:
    """Before any step: both ranks must hold the same request (or their collectives would mix two),
    and both must have accepted it (a rank that raised alone would leave the other blocked)."""
    mine = torch.tensor([job.sequence, zlib.crc32(job.request_id.encode()), job.params.num_inference_steps,
                         *job.latent_grid, int(error is not None)], dtype=torch.int64, device=device)
    both = [torch.empty_like(mine) for _ in range(WORLD_SIZE)]
    dist.all_gather(both, mine, group=group)
    if not torch.equal(both[0][:-1], both[1][:-1]):
        raise RuntimeError(f"CFG-parallel ranks disagree on the request: rank 0 {both[0][:-1].tolist()}, "
                           f"rank 1 {both[1][:-1].tolist()} (sequence, crc32(request_id), steps, grid)")
    if error is not None:
        raise error
    if int(both[0][-1]) or int(both[1][-1]):
        raise PeerRejectedRequest(f"request {job.request_id}: rejected by the other CFG-parallel rank")


# --- plain processes (CPU tests, benchmark) ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _local_rank_main(rank: int, fn, init_method: str, backend: str, args: tuple) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(minutes=10))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn_local_group(fn, args: tuple = (), backend: str = "gloo") -> None:
    """Run `fn(rank, *args)` in two fresh processes joined in the default process group
    (`backend` "gloo" on CPU, "nccl" with one GPU per rank). `fn` must be importable (module level).
    The ranks meet through a file, not a TCP port: a port found free here can be taken by another
    process (a Ray cluster starting beside the tests) before rank 0 binds it."""
    with tempfile.TemporaryDirectory(prefix="lance-cfg-parallel-") as tmp:
        torch.multiprocessing.spawn(_local_rank_main, args=(fn, f"file://{tmp}/rendezvous", backend, args),
                                    nprocs=WORLD_SIZE, join=True)


# --- Ray: two actors in one placement group ----------------------------------------------------------

def worker_bundles(num_cpus: float = 1, num_gpus: float = 1) -> list[dict]:
    return [{"CPU": num_cpus, "GPU": num_gpus} if num_gpus else {"CPU": num_cpus}] * WORLD_SIZE


class CfgParallelWorker:
    """One rank of a CFG-parallel DiT replica (a Ray actor on one GPU): the DiT engine's own checks
    and forward (`DenoiseEngine`), run on one branch per request. Rank 0 also draws the noise and
    decodes the image (`DiTRunner`); rank 1 holds only the model and its forward."""

    def __init__(self, rank: int, device: str | torch.device | None = None):
        self.rank = rank
        # In a Ray actor CUDA_VISIBLE_DEVICES holds the bundle's one GPU, hence cuda:0.
        default = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.device = torch.device(device) if device is not None else default
        self.engine = self.decode = None

    def rendezvous_address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def init_distributed(self, address: str, port: int, timeout_s: float = 600.0) -> str:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=self.rank,
                                world_size=WORLD_SIZE, timeout=timedelta(seconds=timeout_s))
        return backend

    def load(self, model: str, variant: str | None = None, dtype: str = "auto", forward: str = "fast",
             compile: bool = False, debug_outputs: bool = False) -> dict:
        """`debug_outputs`: rank 0's images also carry their final latents and float image (tests)."""
        from .engine import DenoiseEngine
        from .model import load_dit_model
        from .runner import DiTRunner, resolve_dtype

        if self.rank == COND_RANK:
            runner = DiTRunner(model, variant, dtype, str(self.device), max_batch_size=1, compile=compile,
                               forward=forward, debug_outputs=debug_outputs)
            self.attach(runner.engine, runner.decode)
        else:
            from stages.lance.checkpoint import resolve_checkpoint

            files = resolve_checkpoint(model, variant, need_vit=False, need_vae=False)
            dit, _ = load_dit_model(files, self.device, resolve_dtype(dtype, self.device))
            fused = compile and self.device.type == "cuda"
            self.attach(DenoiseEngine(dit, forward, kernels="triton" if fused else "torch", max_batch_size=1))
        return {"rank": self.rank, "device": str(self.device), "dtype": str(self.engine.dtype)}

    def attach(self, engine, decode=None) -> None:
        """Use a built `DenoiseEngine` (its model, forward and checks) and, on rank 0, a decode
        function `(grid, [x]) -> [DecodedImage]` (`DiTRunner.decode`): `load` does this from a checkpoint,
        the benchmark with random weights."""
        self.engine, self.decode = engine, decode

    def prepare(self, job: BranchJob):
        """(velocity of this rank's branch, initial x in fp32, scheduler), checked as the DiT engine
        checks a hand-off; when both ranks take the job, they agree on it before any step."""
        from .forward import Row
        from .runner import require_image_grid

        engine, velocity, x, error = self.engine, None, None, None
        try:
            require_image_grid(job.latent_grid)
            # rank 1 only gets a job that has the uncond branch; rank 0 sees whether the request has one
            grid = engine.check_request(job.latent_grid, job.params,
                                        has_uncond=job.with_cfg or self.rank == UNCOND_RANK)
            if job.branch is not None:
                name = "cond" if self.rank == COND_RANK else "uncond"
                context = engine.prepare_branch(job.branch, job.branch.fetch(), grid, name)
                velocity = lambda x, sigma: engine.forward([Row(context, x.to(engine.dtype), sigma)])[0]
            if self.rank == COND_RANK:
                x = engine.initial_latents(grid, job.params.seed, job.initial_noise, job.num_reference_tokens)
            else:  # overwritten by rank 0's broadcast
                x = torch.empty(grid[0] * grid[1] * grid[2], engine.cfg.latent.channels, device=self.device,
                                dtype=torch.float32)
        except Exception as e:
            error = e
        if job.with_peer:
            agree_on_job(job, error, self.device)
        elif error is not None:
            raise error
        return velocity, x, FlowMatchEulerScheduler(job.params)

    def steps(self, job: BranchJob):
        """(i, x, v_cond, v_uncond) after every step this rank takes part in."""
        velocity, x, scheduler = self.prepare(job)
        yield from cfg_parallel_steps(velocity, scheduler, x, job.with_cfg)

    @torch.no_grad()
    def denoise(self, job: BranchJob):
        """Rank 0: the request's `DecodedImage` (pixels; latents with debug_outputs); rank 1: None."""
        x = None
        for _, x, _, _ in self.steps(job):
            pass
        return self.decode(job.latent_grid, [x])[0] if self.rank == COND_RANK else None

    @torch.no_grad()
    def denoise_stream(self, job: BranchJob) -> Iterator[dict]:
        """Ray streaming generator (rank 0): {"step", "total"} after each step, then {"image": DecodedImage}."""
        x = None
        for i, x, _, _ in self.steps(job):
            yield {"step": i + 1, "total": job.params.num_inference_steps}
        yield {"image": self.decode(job.latent_grid, [x])[0]}

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class CfgParallelGroup:
    """Two `CfgParallelWorker` actors, one per bundle of a STRICT_PACK placement group, joined in one
    torch.distributed group. Inside a Serve replica (whose placement group the stage graph's
    cfg_parallel settings reserve) it uses the replica's own placement group (its last two bundles);
    elsewhere it creates one.

    Requests run one at a time, each on both GPUs (latency mode); for throughput, run more replicas."""

    def __init__(self, model: str, variant: str | None = None, dtype: str = "auto", forward: str = "fast",
                 compile: bool = False, *, debug_outputs: bool = False, num_gpus_per_worker: float | None = None,
                 num_cpus_per_worker: float | None = None, placement_group=None,
                 bundle_indexes: tuple[int, int] | None = None, timeout_s: float = 600.0):
        """Resources per worker default to its bundle's (inside a placement group), else to one CPU
        and, when the cluster has two GPUs, one GPU."""
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group as make_pg
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._owned_pg, self.workers, self.failed = None, [], None
        pg = placement_group or get_current_placement_group()
        if pg is None:
            if num_gpus_per_worker is None:
                num_gpus_per_worker = 1 if ray.cluster_resources().get("GPU", 0) >= WORLD_SIZE else 0
            num_cpus_per_worker = 1 if num_cpus_per_worker is None else num_cpus_per_worker
            bundles = worker_bundles(num_cpus_per_worker, num_gpus_per_worker)
            pg = self._owned_pg = make_pg(bundles, strategy="STRICT_PACK")
            ray.get(pg.ready(), timeout=timeout_s)
            bundle_indexes = (0, 1)
        else:
            n = len(pg.bundle_specs)
            bundle_indexes = bundle_indexes or (n - 2, n - 1)
            spec = pg.bundle_specs[bundle_indexes[0]]
            num_gpus_per_worker = spec.get("GPU", 0) if num_gpus_per_worker is None else num_gpus_per_worker
            num_cpus_per_worker = spec.get("CPU", 0) if num_cpus_per_worker is None else num_cpus_per_worker
        actor = ray.remote(CfgParallelWorker)
        self.workers = [
            actor.options(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker,
                          scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=b))
            .remote(rank)
            for rank, b in enumerate(bundle_indexes)]
        address, port = ray.get(self.workers[COND_RANK].rendezvous_address.remote(), timeout=timeout_s)
        self.backend = ray.get([w.init_distributed.remote(address, port, timeout_s) for w in self.workers])[0]
        self.ranks = ray.get([w.load.remote(model, variant, dtype, forward, compile, debug_outputs)
                              for w in self.workers])
        self._submit_lock = threading.Lock()
        self._sequence = 0

    def _submit(self, handoff: ContextHandoff, method: str):
        self.check_health()
        with self._submit_lock:  # both actors must receive jobs in the same order
            self._sequence += 1
            cond_job, uncond_job = split_handoff(handoff, self._sequence)
            lead = getattr(self.workers[COND_RANK], method).remote(cond_job)
            helper = self.workers[UNCOND_RANK].denoise.remote(uncond_job) if uncond_job is not None else None
        return lead, helper

    @staticmethod
    def _agreed(error: BaseException) -> bool:
        """A request both ranks rejected before their first step: the group is still in step."""
        from .engine import DiTRequestError

        return isinstance(error, (DiTRequestError, PeerRejectedRequest))

    def _on_error(self, error: BaseException) -> None:
        # Anything but an agreed rejection may have left a rank blocked in a collective: the group is
        # shut down and must be recreated (check_health tells Serve to replace the replica).
        if not self._agreed(error):
            self.failed = error
            self.shutdown()

    def denoise(self, handoff: ContextHandoff):
        """The request's `DecodedImage` (blocking)."""
        import ray

        lead, helper = self._submit(handoff, "denoise")
        pending, result, rejected = [lead] + ([helper] if helper is not None else []), None, []
        try:
            while pending:  # in completion order: a failed rank may leave the other one waiting
                (done,), pending = ray.wait(pending, num_returns=1)
                try:
                    value = ray.get(done)
                except Exception as e:
                    if not self._agreed(e):
                        raise
                    rejected.append(e)
                    continue
                result = value if done == lead else result
        except Exception as e:
            self._on_error(e)
            raise
        if rejected:  # the rank that found the problem explains it; the other only says "rejected"
            raise sorted(rejected, key=lambda e: isinstance(e, PeerRejectedRequest))[0]
        return result

    async def denoise_stream(self, handoff: ContextHandoff):
        """Async iterator: {"step", "total"} after each step, then {"image": DecodedImage}."""
        lead, helper = self._submit(handoff, "denoise_stream")
        helper_done = asyncio.ensure_future(_await(helper)) if helper is not None else None
        try:
            while True:
                next_item = asyncio.ensure_future(_next(lead))
                waiting = {next_item} | ({helper_done} if helper_done is not None and not helper_done.done() else set())
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if helper_done is not None and helper_done.done() and helper_done.exception() is not None:
                    next_item.cancel()
                    raise helper_done.exception()  # rank 1 failed: rank 0 may be blocked waiting for it
                try:
                    ref = await next_item
                    item = None if ref is None else await ref
                except PeerRejectedRequest:
                    await helper_done  # raises rank 1's reason
                    raise
                if item is None:
                    break
                if "image" in item and helper_done is not None:
                    await helper_done
                yield item
        except Exception as e:
            self._on_error(e)
            raise
        finally:
            if helper_done is not None and not helper_done.done():
                helper_done.cancel()

    def check_health(self) -> None:
        if self.failed is not None:
            raise RuntimeError(f"the CFG-parallel group failed and must be recreated: {self.failed!r}")

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            ray.kill(w)
        self.workers = []
        if self._owned_pg is not None:
            remove_placement_group(self._owned_pg)
            self._owned_pg = None


async def _await(ref):
    return await ref


async def _next(generator):
    """The next ObjectRef of a Ray streaming generator, None at its end."""
    try:
        return await generator.__anext__()
    except StopAsyncIteration:
        return None
