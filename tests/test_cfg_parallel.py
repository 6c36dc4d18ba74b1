"""CFG-parallel denoising (stages/dit/cfg_parallel.py): two ranks, one branch each, equal to one process.

The two ranks are two CPU processes joined with gloo, standing in for the two GPUs of a
`cfg_parallel: 2` DiT replica: same loop, same collectives, only the backend differs (NCCL there).
Judged against the single-process `stages.lance.denoise.denoise` (fp32: 1e-5 relative) and the
upstream goldens (compare.py's rule), on the golden t2i case and on a wider tiny checkpoint with
non-square grids and CFG intervals that put non-CFG steps before, after and around the CFG steps.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from helpers import drive_runner, golden_branch, golden_handoff
from serve_app.stage_graph import cfg_parallel_deployment_options
from stages.dit.cfg_parallel import (COND_RANK, UNCOND_RANK, BranchJob, CfgParallelGroup, branch_state,
                                     cfg_step_indexes, denoise_cfg_parallel, spawn_local_group, split_handoff)
from stages.dit.model import MARKER_IDS, load_dit_model
from stages.lance.checkpoint import resolve_checkpoint
from stages.lance.context import prefill_context
from stages.lance.denoise import denoise
from stages.lance.handoff import BranchKV, ContextHandoff
from stages.lance.requests import DenoiseParams
from stages.lance.scheduler import FlowMatchEulerScheduler
from stages.lance.tiny import TinyCheckpointSpec, make_tiny_checkpoint

pytestmark = pytest.mark.slow   # two torch.distributed processes per test

WIDE = dict(layers=3, hidden=256, heads=4, kv_heads=2, intermediate=320)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def golden_t2i_handoff(g) -> ContextHandoff:
    """The golden t2i request as the thinker would hand it over (caches, positions, upstream's noise)."""
    return golden_handoff(g, "t2i", request_id="golden-t2i", with_noise=True)


def single_process(model, handoff: ContextHandoff, dtype=torch.float32) -> list[torch.Tensor]:
    """x after every step of the reference loop (batched cond/uncond forward in one process)."""
    cond = branch_state(handoff.cond, "cpu", dtype)
    uncond = branch_state(handoff.uncond, "cpu", dtype) if handoff.uncond is not None else None
    steps = []
    denoise(model, FlowMatchEulerScheduler(handoff.params), handoff.initial_noise.to(dtype), handoff.latent_grid,
            MARKER_IDS, cond, uncond, on_step=lambda i, x, vc, vu: steps.append(x.clone()))
    return steps


def run_ranks(rank: int, ckpt_dir: str, handoffs: list[ContextHandoff], dtype: torch.dtype, out_dir: str) -> None:
    """One rank: its own branch of each request, x after every step it takes part in -> out_dir."""
    torch.set_num_threads(1)
    model, _ = load_dit_model(resolve_checkpoint(ckpt_dir, need_vit=False, need_vae=False), "cpu", dtype)
    results = []
    for seq, handoff in enumerate(handoffs):
        jobs = split_handoff(handoff, seq)
        job: BranchJob | None = jobs[rank]
        steps: dict[int, torch.Tensor] = {}
        if job is not None:
            branch = branch_state(job.branch, "cpu", dtype) if job.branch is not None else None
            x = (job.initial_noise.to(dtype) if rank == COND_RANK
                 else torch.empty(handoff.num_target_tokens, 48, dtype=dtype))
            out = denoise_cfg_parallel(model, FlowMatchEulerScheduler(job.params), x, job.latent_grid, MARKER_IDS,
                                       branch, job.with_cfg,
                                       on_step=lambda i, x, vc, vu: steps.__setitem__(i, x.clone()))
            assert (out is None) == (rank == UNCOND_RANK)
        results.append(steps)
    torch.save(results, f"{out_dir}/rank{rank}.pt")


def cfg_parallel(ckpt_dir, handoffs, tmp_path, dtype=torch.float32):
    spawn_local_group(run_ranks, (str(ckpt_dir), handoffs, dtype, str(tmp_path)), backend="gloo")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in (COND_RANK, UNCOND_RANK)]


def assert_ranks_in_lockstep(rank0: dict, rank1: dict, scheduler, with_cfg: bool) -> None:
    """Rank 1 takes every step up to the last CFG step and its x is bit-identical to rank 0's."""
    cfg_steps = cfg_step_indexes(scheduler, with_cfg)
    assert sorted(rank0) == list(range(scheduler.num_steps))
    assert sorted(rank1) == (list(range(max(cfg_steps) + 1)) if cfg_steps else [])
    for i, x in rank1.items():
        assert torch.equal(x, rank0[i]), f"ranks diverged at step {i}"


# --- golden t2i ---------------------------------------------------------------------------------------

def test_golden_t2i_split_over_two_ranks_equals_one_process_and_upstream(tiny_ckpt_dir, golden, assert_golden,
                                                                         tmp_path):
    g = golden("t2i")
    handoff = golden_t2i_handoff(g)
    model, _ = load_dit_model(resolve_checkpoint(tiny_ckpt_dir, need_vit=False, need_vae=False))
    reference = single_process(model, handoff)
    rank0, rank1 = (r[0] for r in cfg_parallel(tiny_ckpt_dir, [handoff], tmp_path))

    scheduler = FlowMatchEulerScheduler(handoff.params)
    assert_ranks_in_lockstep(rank0, rank1, scheduler, True)
    assert max(rank1) == 25  # the default interval: CFG on steps 0..25, rank 0 alone for 26..29
    final = rank0[29]
    assert relative_error(final, reference[-1]) <= 1e-5
    assert_golden(final.reshape(1, 8, 8, 48), g["final_latent"], "final_latent")
    assert_golden(torch.stack([handoff.initial_noise] + [rank0[i] for i in range(30)]), g["x_steps"], "x_steps")


# --- a wider checkpoint, other grids and knobs ---------------------------------------------------------

@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A 3-layer, hidden-256, 4/2-head checkpoint and real prefilled cond/uncond caches of a prompt."""
    from stages.lance import LancePipeline
    from stages.lance.prompts import default_system_prompt

    root = tmp_path_factory.mktemp("tiny_wide_cfgp")
    make_tiny_checkpoint(root, TinyCheckpointSpec(**WIDE, seed=11))
    pipe = LancePipeline.from_pretrained(str(root))

    def handoff(name, grid, params, negative=None):
        ctx = pipe.prepare_generation(default_system_prompt("t2i"), "a yellow kite over green hills", [], grid,
                                      negative_prompt=negative)
        branch = lambda plan: BranchKV(prefill_context(pipe.model, plan).stacked(), plan.context.input_ids.numel(),
                                       plan.query_positions)
        noise = torch.randn(grid[0] * grid[1] * grid[2], 48, generator=torch.Generator().manual_seed(params.seed))
        return ContextHandoff(name, "t2i", grid, params, branch(ctx.cond), branch(ctx.uncond), initial_noise=noise)

    cases = [
        # every step CFG
        handoff("all-cfg", (1, 3, 5), DenoiseParams(6, 3.0, 2.0, (0.0, 1.0), seed=1)),
        # non-CFG steps first: rank 0 broadcasts v_cond until the CFG block starts
        handoff("cfg-late", (1, 4, 2), DenoiseParams(7, 3.5, 3.0, (0.0, 0.6), "channel", seed=2)),
        # CFG first, then rank 1 leaves; a negative prompt's branch (own positions, other length)
        handoff("cfg-early", (1, 2, 6), DenoiseParams(6, 1.0, 4.0, (0.4, 1.0), seed=3), negative="blurry"),
        # CFG only in the middle of the schedule
        handoff("cfg-middle", (1, 5, 3), DenoiseParams(8, 2.0, 2.5, (0.3, 0.8), seed=4)),
        # no CFG at all: rank 1 is never involved
        handoff("no-cfg", (1, 3, 3), DenoiseParams(5, 3.5, 1.0, seed=5)),
    ]
    return root, cases


def test_wider_checkpoint_grids_and_intervals_equal_one_process(wide, tmp_path):
    root, cases = wide
    model, _ = load_dit_model(resolve_checkpoint(root, need_vit=False, need_vae=False))
    rank0, rank1 = cfg_parallel(root, cases, tmp_path)
    for handoff, steps0, steps1 in zip(cases, rank0, rank1):
        scheduler = FlowMatchEulerScheduler(handoff.params)
        with_cfg = handoff.params.uses_cfg
        assert_ranks_in_lockstep(steps0, steps1, scheduler, with_cfg)
        reference = single_process(model, handoff)
        for i, x in steps0.items():
            assert relative_error(x, reference[i]) <= 1e-5, f"{handoff.request_id}: step {i}"
    cfg_steps = {h.request_id: cfg_step_indexes(FlowMatchEulerScheduler(h.params), h.params.uses_cfg) for h in cases}
    assert cfg_steps["all-cfg"] == list(range(6))                    # the cases are what they claim to be
    assert cfg_steps["cfg-late"][0] > 0 and cfg_steps["cfg-late"][-1] == 6
    assert cfg_steps["cfg-early"][0] == 0 and cfg_steps["cfg-early"][-1] == 3
    assert cfg_steps["cfg-middle"][0] > 0 and cfg_steps["cfg-middle"][-1] < 7
    assert cfg_steps["no-cfg"] == []


def test_bf16_split_stays_within_bf16_error_of_fp32(wide, tmp_path):
    root, cases = wide
    model, _ = load_dit_model(resolve_checkpoint(root, need_vit=False, need_vae=False))
    handoff = cases[0]
    fp32 = single_process(model, handoff)[-1]
    bf16_model, _ = load_dit_model(resolve_checkpoint(root, need_vit=False, need_vae=False), dtype=torch.bfloat16)
    bf16_single = single_process(bf16_model, handoff, torch.bfloat16)[-1].float()
    rank0, rank1 = cfg_parallel(root, [handoff], tmp_path, torch.bfloat16)
    assert_ranks_in_lockstep(rank0[0], rank1[0], FlowMatchEulerScheduler(handoff.params), True)
    split = rank0[0][handoff.params.num_inference_steps - 1].float()
    assert split.dtype == torch.float32 and rank0[0][0].dtype == torch.bfloat16
    err_split, err_single = (float((x - fp32).norm() / fp32.norm()) for x in (split, bf16_single))
    # bf16 carries ~3 significant digits: the split run is as far from fp32 as the one-process bf16 run
    assert err_split < 2e-2
    assert err_split < 2 * err_single + 1e-3


# --- the serving form: two Ray actors in one placement group ---------------------------------------------

def single_gpu_runner_result(runner, handoff: ContextHandoff):
    """The DiT stage's own single-device path (DiTRunner: both branches in one packed forward)."""
    (image,) = drive_runner(runner, [handoff])
    return image


@pytest.mark.heavy
def test_ray_group_serves_requests_like_the_single_device_dit(tiny_ckpt_dir, golden, assert_golden):
    import ray

    from stages.dit.engine import DiTRequestError
    from stages.dit.runner import DiTRunner

    g = golden("t2i")
    runner = DiTRunner(str(tiny_ckpt_dir), dtype="float32", device="cpu", debug_outputs=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        group = CfgParallelGroup(str(tiny_ckpt_dir), dtype="float32", debug_outputs=True, num_gpus_per_worker=0)
        assert group.backend == "gloo" and [r["rank"] for r in group.ranks] == [0, 1]
        handoff = golden_t2i_handoff(g)
        expected = single_gpu_runner_result(runner, handoff)
        for b in (handoff.cond, handoff.uncond):   # as the thinker hands it over: through the object store
            b.kv = ray.put(b.kv)
        image = group.denoise(handoff)
        assert_golden(image.latents[None], g["final_latent"], "final_latent")
        assert_golden(image.pixels, g["image_uint8"], "image_uint8")
        assert relative_error(image.latents, expected.latents) <= 1e-5
        assert image.png.startswith(b"\x89PNG") and (image.width, image.height) == (128, 128)

        async def stream(h):
            return [item async for item in group.denoise_stream(h)]

        # streamed, and a mix of requests: CFG only late (rank 0 alone first), then no CFG at all
        late = ContextHandoff("late", "t2i", (1, 8, 8), DenoiseParams(5, 3.5, 3.0, (0.0, 0.5)), handoff.cond,
                              handoff.uncond, initial_noise=g["noise_all_vae_tokens"])
        no_cfg = ContextHandoff("no-cfg", "t2i", (1, 8, 8), DenoiseParams(4, cfg_text_scale=1.0), handoff.cond,
                                None, initial_noise=g["noise_all_vae_tokens"])
        for h in (late, no_cfg):
            items = asyncio.run(stream(h))
            total = h.params.num_inference_steps
            assert [it.get("step") for it in items[:-1]] == list(range(1, total + 1))
            assert all(it["total"] == total for it in items[:-1])
            local = ContextHandoff(h.request_id, "t2i", h.latent_grid, h.params, golden_branch(g, "cond"),
                                   golden_branch(g, "uncond") if h.uncond is not None else None,
                                   initial_noise=h.initial_noise)
            expected = single_gpu_runner_result(runner, local)
            assert relative_error(items[-1]["image"].latents, expected.latents) <= 1e-5

        # bad hand-offs are rejected with the DiT's own errors, and the group stays usable
        bad_grid = ContextHandoff("bad-grid", "t2i", (1, 8, 80), DenoiseParams(), handoff.cond, handoff.uncond)
        with pytest.raises(DiTRequestError, match="latent_grid"):
            group.denoise(bad_grid)
        missing_uncond = ContextHandoff("no-uncond", "t2i", (1, 8, 8), DenoiseParams(), handoff.cond, None)
        with pytest.raises(DiTRequestError, match="text-uncond"):
            group.denoise(missing_uncond)
        short_uncond = ContextHandoff("short-uncond", "t2i", (1, 8, 8), DenoiseParams(), handoff.cond,
                                      BranchKV((g["ctx_uncond_K"][:, :30], g["ctx_uncond_V"][:, :30]), 39,
                                               g["query_position_ids_uncond"]))
        with pytest.raises(DiTRequestError, match="uncond"):   # only rank 1 sees it; rank 0 is released
            group.denoise(short_uncond)
        with pytest.raises(DiTRequestError, match="uncond"):
            asyncio.run(stream(short_uncond))
        group.check_health()
        assert torch.equal(group.denoise(handoff).latents, image.latents)
        group.shutdown()
        assert_serve_replica_places_its_workers_in_its_own_bundles(ray, tiny_ckpt_dir, handoff, image.latents)
    finally:
        ray.shutdown()


def assert_serve_replica_places_its_workers_in_its_own_bundles(ray, ckpt_dir, handoff, expected):
    """As Serve runs a replica deployed with cfg_parallel_deployment_options: the replica actor in bundle 0
    of its placement group creates the group, whose workers take bundles 1 and 2 with their resources."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    opts = cfg_parallel_deployment_options({"ray_actor_options": {"num_cpus": 0.2}}, worker_cpus=0.5)
    pg = placement_group(opts["placement_group_bundles"], strategy=opts["placement_group_strategy"])
    ray.get(pg.ready(), timeout=60)

    class Replica:
        def __init__(self, ckpt):
            self.group = CfgParallelGroup(ckpt, dtype="float32", debug_outputs=True)

        def denoise(self, h):
            return self.group.denoise(h).latents

        def placement_groups(self):
            """Of this replica and of its two workers."""
            pg_of = lambda _: ray.get_runtime_context().get_placement_group_id()
            return [pg_of(None)] + ray.get([w.__ray_call__.remote(pg_of) for w in self.group.workers])

    replica = ray.remote(Replica).options(num_cpus=0.2, scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote(str(ckpt_dir))
    assert ray.get(replica.placement_groups.remote()) == [pg.id.hex()] * 3
    table = ray.util.placement_group_table(pg)
    assert table["strategy"] == "STRICT_PACK" and len(table["bundles"]) == 3
    assert torch.equal(ray.get(replica.denoise.remote(handoff)), expected)
    ray.kill(replica)
    remove_placement_group(pg)
