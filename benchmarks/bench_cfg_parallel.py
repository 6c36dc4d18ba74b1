"""CFG-parallel and replica scaling of the DiT on two GPUs (issue 7), Lance_3B-shaped random weights in bf16.

    python benchmarks/bench_cfg_parallel.py              # one node with 2 GPUs, NCCL (about 5 minutes on H200s)
    python benchmarks/bench_cfg_parallel.py --smoke      # 2 CPU processes, gloo, tiny shapes: the script works

Everything runs through the DiT stage's own code (stages/dit: `DenoiseEngine`, its forward, the frame
decoder and PNG encoding of `DiTRunner.decode`, and `CfgParallelWorker` of the cfg_parallel: 2 option),
on a model built directly on each GPU (36 layers, hidden 2048, 16/2 heads of 128, FFN 11008; weights
drawn on rank 0 and broadcast) and a random Wan2.2-shaped VAE decoder. Each request has a 256-token
context per CFG branch, handed over on the host as the thinker's would be.

1. equivalence: CFG-parallel vs one device on the same weights - fp32 with TF32 off (must be <= 1e-5
   relative) and bf16, both against the fp32 one-device result;
2. latency of one request (1024^2, 30 steps, CFG on steps 0..25): one GPU (cond and uncond rows in one
   packed forward) vs CFG-parallel (one branch per GPU, velocities all_gathered): per CFG step, per
   non-CFG step, the denoising loop, and end to end (hand-off on the host -> PNG bytes);
3. images/s at 512^2 / 25 steps: one replica (GPU 0) vs two independent replicas (GPU 0 and GPU 1),
   each its own engine batching `--replica-batch` requests, `--replica-images` requests per replica.

Prints a table and writes JSON to $OUT/bench_cfg_parallel.json (or --out DIR).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.dit.cfg_parallel import (COND_RANK, CfgParallelWorker, cfg_parallel_steps,  # noqa: E402
                                     spawn_local_group, split_handoff)
from stages.dit.engine import DenoiseEngine  # noqa: E402
from stages.dit.model import build_dit_model, random_init_  # noqa: E402
from stages.dit.runner import DiTRunner  # noqa: E402
from stages.dit.vae_decode import FrameDecoder  # noqa: E402
from stages.lance.config import LanceConfig, LanceLLMConfig  # noqa: E402
from stages.lance.handoff import BranchKV, ContextHandoff  # noqa: E402
from stages.lance.requests import DenoiseParams  # noqa: E402
from stages.lance.vae import LATENTS_MEAN, LATENTS_STD, LanceVAE  # noqa: E402

LANCE_3B = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, head_dim=128,
                intermediate_size=11008, mrope_section=(16, 24, 24))
TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            intermediate_size=256, mrope_section=(8, 12, 12))
# Wan2.2 VAE (spec §6.1): dim 160, dec_dim 256; the smoke run shrinks only the widths.
WAN22_DECODER = dict(base_dim=160, decoder_base_dim=256)
TINY_DECODER = dict(base_dim=16, decoder_base_dim=16)
TARGETS = {"cfg_step_speedup": 1.7, "end_to_end_speedup": 1.5, "replica_scaling": 0.9}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU + gloo, tiny model and sizes (checks the script)")
    p.add_argument("--size", type=int, default=1024, help="latency: image side in pixels")
    p.add_argument("--steps", type=int, default=30, help="latency: denoising steps")
    p.add_argument("--context", type=int, default=256, help="context tokens of the cond branch")
    p.add_argument("--uncond-context", type=int, default=None, help="of the uncond branch (default: --context)")
    p.add_argument("--repeats", type=int, default=3, help="latency: timed requests per mode (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed requests per mode first")
    p.add_argument("--replica-size", type=int, default=512)
    p.add_argument("--replica-steps", type=int, default=25)
    p.add_argument("--replica-images", type=int, default=32, help="requests per replica")
    p.add_argument("--replica-batch", type=int, default=4, help="the engine's max_batch_size per replica")
    p.add_argument("--check-size", type=int, default=256, help="equivalence check: image side")
    p.add_argument("--check-steps", type=int, default=6, help="equivalence check: steps (CFG and non-CFG ones)")
    p.add_argument("--no-check", action="store_true", help="skip the fp32/bf16 equivalence check")
    p.add_argument("--forward", default="fast", choices=("fast", "reference"))
    p.add_argument("--kernels", default="auto", choices=("auto", "torch", "triton"),
                   help="element-wise ops of the fast forward (auto: triton on GPU when installed)")
    p.add_argument("--cuda-graphs", action="store_true", help="the engine's CUDA graphs option")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="directory for bench_cfg_parallel.json")
    args = p.parse_args(argv)
    if args.smoke:
        args = replace_args(args, size=64, steps=10, context=16, repeats=1, warmup=1, replica_size=32, replica_steps=4,
                            replica_images=4, replica_batch=2, check_size=64, check_steps=4)
    args.uncond_context = args.uncond_context or args.context
    args.backend = "gloo" if args.smoke else "nccl"
    if args.kernels == "auto":
        args.kernels = "triton" if not args.smoke and _has_triton() else "torch"
    return args


def replace_args(args, **values):
    for k, v in values.items():
        setattr(args, k, v)
    return args


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


# --- inputs ------------------------------------------------------------------------------------------

def model_config(smoke: bool) -> LanceConfig:
    shape = TINY if smoke else LANCE_3B
    return LanceConfig(llm=LanceLLMConfig(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1e6,
                                          max_position_embeddings=128000, **shape))


def target_positions(start: int, grid) -> torch.Tensor:
    """mRoPE positions [3, n+2] of a target block whose <|vision_start|> sits at `start` (spec §2.3)."""
    t, h, w = grid
    tt, hh, ww = torch.meshgrid(torch.arange(t) * 2, torch.arange(h), torch.arange(w), indexing="ij")
    body = torch.stack([tt, hh, ww]).reshape(3, -1) + start + 1
    return torch.cat([torch.full((3, 1), start), body, torch.full((3, 1), int(body.max()) + 1)], dim=1)


def make_handoff(cfg: LanceConfig, size: int, steps: int, context: tuple[int, int], seed: int, request_id: str,
                 noise: bool = False) -> ContextHandoff:
    """A t2i hand-off with random bf16 context K/V per branch on the host (as the object store gives it)."""
    llm = cfg.llm
    grid = (1, size // 16, size // 16)
    g = torch.Generator().manual_seed(seed)

    def branch(length):
        shape = (llm.num_hidden_layers, length, llm.num_key_value_heads, llm.head_dim)
        kv = tuple(torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(2))
        return BranchKV(kv, length, target_positions(length, grid))

    initial = torch.randn(grid[1] * grid[2], cfg.latent.channels, generator=g) if noise else None
    return ContextHandoff(request_id, "t2i", grid, DenoiseParams(steps, 3.5, 4.0, (0.4, 1.0), seed=seed),
                          branch(context[0]), branch(context[1]), initial_noise=initial)


def contexts(args) -> tuple[int, int]:
    return args.context, args.uncond_context


def build_model(cfg: LanceConfig, device, dtype) -> torch.nn.Module:
    """Random weights drawn on rank 0 and broadcast, so both GPUs hold the same model."""
    model = build_dit_model(cfg, device, dtype)
    if dist.get_rank() == 0:
        random_init_(model, seed=0)
    for p in model.parameters():
        dist.broadcast(p.data, src=0)
    return model


def build_decode(smoke: bool, device, dtype):
    """The DiT stage's decode to PNG (`DiTRunner.decode`) over a random Wan2.2-shaped frame decoder."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                           out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                           latents_mean=list(LATENTS_MEAN), latents_std=list(LATENTS_STD),
                           **(TINY_DECODER if smoke else WAN22_DECODER))
    vae.encoder, vae.quant_conv = None, None
    lance_vae = LanceVAE(vae.to(device, dtype), dtype).to(device)
    runner_view = SimpleNamespace(decoder=FrameDecoder(lance_vae), dtype=dtype, debug_outputs=False)
    return lambda grid, latents: DiTRunner.decode(runner_view, grid, latents)


# --- timing ------------------------------------------------------------------------------------------

def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    prepare_s: float
    cfg_steps_s: list
    plain_steps_s: list
    decode_s: float
    end_to_end_s: float

    @property
    def denoise_s(self) -> float:
        return sum(self.cfg_steps_s) + sum(self.plain_steps_s)


def run_one_device(engine: DenoiseEngine, decode, handoff: ContextHandoff, device):
    """One request through the engine alone (cond and uncond rows share each CFG forward)."""
    sync(device)
    t0 = time.perf_counter()
    job = engine.prepare(handoff, handoff.cond.fetch(), handoff.uncond.fetch())
    engine.submit(job)
    sync(device)
    t1 = time.perf_counter()
    cfg, plain = [], []
    while not job.done:
        uses_cfg, s0 = job.uses_cfg_now, time.perf_counter()
        engine.step()
        sync(device)
        (cfg if uses_cfg else plain).append(time.perf_counter() - s0)
    if job.error is not None:
        raise job.error
    t2 = time.perf_counter()
    image = decode(job.grid, [job.x])[0]
    sync(device)
    t3 = time.perf_counter()
    return Timing(t1 - t0, cfg, plain, t3 - t2, t3 - t0), job.x, image


def run_cfg_parallel(worker: CfgParallelWorker, handoff: ContextHandoff, sequence: int, device):
    """One request on both ranks, as the cfg_parallel: 2 replica runs it (rank 0 returns the result)."""
    jobs = split_handoff(handoff, sequence)
    job = jobs[worker.rank]
    sync(device)
    t0 = time.perf_counter()
    velocity, x, scheduler = worker.prepare(job)
    sync(device)
    t1 = time.perf_counter()
    cfg, plain, s0 = [], [], time.perf_counter()
    for _, x, _, v_uncond in cfg_parallel_steps(velocity, scheduler, x, job.with_cfg):
        sync(device)
        (cfg if v_uncond is not None else plain).append(time.perf_counter() - s0)
        s0 = time.perf_counter()
    t2 = time.perf_counter()
    image = worker.decode(job.latent_grid, [x])[0] if worker.rank == COND_RANK else None
    if image is not None:
        image.png   # the PNG encoding (the DiT stage does it on its encoder pool), timed with the decode
    sync(device)
    t3 = time.perf_counter()
    return Timing(t1 - t0, cfg, plain, t3 - t2, t3 - t0), x, image


def relative(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().cpu(), b.double().cpu()
    return {"max_rel": float((a - b).abs().max() / b.abs().max()), "rel_l2": float((a - b).norm() / b.norm()),
            "cos": float((a * b).sum() / (a.norm() * b.norm()))}


# --- phases ------------------------------------------------------------------------------------------

def engine_for(model, args, max_batch_size: int = 1) -> DenoiseEngine:
    extra = {"cuda_graphs": True} if args.cuda_graphs else {}
    return DenoiseEngine(model, args.forward, kernels=args.kernels, max_batch_size=max_batch_size, **extra)


def equivalence(rank, model_bf16, cfg, args, device, decode) -> dict | None:
    """CFG-parallel vs one device on the same weights and inputs, fp32 (TF32 off) and bf16."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model32 = build_dit_model(cfg, device, torch.float32)
    model32.load_state_dict(model_bf16.state_dict())
    handoff = make_handoff(cfg, args.check_size, args.check_steps, contexts(args), seed=7, request_id="check",
                           noise=True)
    finals = {}
    for name, model in (("fp32", model32), ("bf16", model_bf16)):
        engine = engine_for(model, args)
        if rank == COND_RANK:
            finals[f"{name}_one_device"] = run_one_device(engine, decode, handoff, device)[1]
        dist.barrier()
        worker = CfgParallelWorker(rank, device)
        worker.attach(engine, decode)
        finals[f"{name}_cfg_parallel"] = run_cfg_parallel(worker, replace(handoff, request_id=f"check-{name}"),
                                                          1, device)[1]
    del model32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if rank != COND_RANK:
        return None
    ref = finals["fp32_one_device"]
    out = {"size": args.check_size, "steps": args.check_steps,
           "fp32_cfg_parallel_vs_fp32_one_device": relative(finals["fp32_cfg_parallel"], ref),
           "bf16_cfg_parallel_vs_fp32_one_device": relative(finals["bf16_cfg_parallel"], ref),
           "bf16_one_device_vs_fp32_one_device": relative(finals["bf16_one_device"], ref),
           "bf16_cfg_parallel_vs_bf16_one_device": relative(finals["bf16_cfg_parallel"], finals["bf16_one_device"])}
    out["fp32_pass"] = out["fp32_cfg_parallel_vs_fp32_one_device"]["max_rel"] <= 1e-5
    return out


def summarize(timings: list[Timing]) -> dict:
    mean = lambda xs: statistics.fmean(xs) if xs else 0.0
    return {"prepare_s": statistics.median(t.prepare_s for t in timings),
            "cfg_step_ms": 1e3 * statistics.median(mean(t.cfg_steps_s) for t in timings),
            "plain_step_ms": 1e3 * statistics.median(mean(t.plain_steps_s) for t in timings),
            "cfg_steps": len(timings[0].cfg_steps_s), "plain_steps": len(timings[0].plain_steps_s),
            "denoise_s": statistics.median(t.denoise_s for t in timings),
            "decode_s": statistics.median(t.decode_s for t in timings),
            "end_to_end_s": statistics.median(t.end_to_end_s for t in timings),
            "end_to_end_all_s": [t.end_to_end_s for t in timings]}


def latency(rank, model, cfg, args, device, decode) -> dict | None:
    engine = engine_for(model, args)
    handoff = make_handoff(cfg, args.size, args.steps, contexts(args), seed=42, request_id="latency")
    one = []
    if rank == COND_RANK:
        for i in range(args.warmup + args.repeats):
            timing = run_one_device(engine, decode, handoff, device)[0]
            if i >= args.warmup:
                one.append(timing)
    dist.barrier()
    worker = CfgParallelWorker(rank, device)
    worker.attach(engine, decode)
    par = []
    for i in range(args.warmup + args.repeats):
        timing = run_cfg_parallel(worker, replace(handoff, request_id=f"latency-{i}"), i, device)[0]
        if i >= args.warmup:
            par.append(timing)
    dist.barrier()
    if rank != COND_RANK:
        return None
    one, par = summarize(one), summarize(par)
    return {"size": args.size, "steps": args.steps, "context": list(contexts(args)), "one_gpu": one,
            "cfg_parallel": par,
            "cfg_step_speedup": one["cfg_step_ms"] / par["cfg_step_ms"],
            "denoise_speedup": one["denoise_s"] / par["denoise_s"],
            "end_to_end_speedup": one["end_to_end_s"] / par["end_to_end_s"]}


def serve_batch(engine: DenoiseEngine, decode, handoffs) -> int:
    """Denoise and decode all hand-offs on one replica, as DiTRunner.step does; returns images made."""
    jobs = [engine.prepare(h, h.cond.fetch(), h.uncond.fetch()) for h in handoffs]
    for job in jobs:
        engine.submit(job)
    made = 0
    while engine.has_work:
        finished = engine.step()
        for job in finished:
            if job.error is not None:
                raise job.error
        by_grid: dict = {}
        for job in finished:
            by_grid.setdefault(job.grid, []).append(job)
        for grid, done in by_grid.items():
            made += len(decode(grid, [j.x for j in done]))
    return made


def replicas(rank, model, cfg, args, device, decode) -> dict | None:
    """images/s of one replica (rank 0 alone) and of two independent replicas (both ranks at once)."""
    engine = engine_for(model, args, args.replica_batch)
    handoffs = [make_handoff(cfg, args.replica_size, args.replica_steps, contexts(args), seed=100 + i,
                             request_id=f"replica{rank}-{i}") for i in range(args.replica_images)]
    serve_batch(engine, decode, handoffs[:args.replica_batch] * args.warmup)  # warm-up (and graph capture)
    walls = {}
    for replicas_on in (1, 2):
        dist.barrier()
        sync(device)
        wall = None
        if rank < replicas_on:
            t0 = time.perf_counter()
            made = serve_batch(engine, decode, handoffs)
            sync(device)
            wall = time.perf_counter() - t0
            assert made == len(handoffs)
        gathered = [None, None]
        dist.all_gather_object(gathered, wall)
        walls[replicas_on] = [w for w in gathered if w is not None]
    if rank != COND_RANK:
        return None
    one = args.replica_images / walls[1][0]
    two = 2 * args.replica_images / max(walls[2])
    return {"size": args.replica_size, "steps": args.replica_steps, "images_per_replica": args.replica_images,
            "max_batch_size": args.replica_batch, "one_replica_images_per_s": one, "two_replicas_images_per_s": two,
            "per_replica_wall_s": walls[2], "one_replica_wall_s": walls[1][0], "replica_scaling": two / (2 * one)}


# --- main ------------------------------------------------------------------------------------------

def bench_rank(rank: int, args, out_path: str) -> None:
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    cfg = model_config(args.smoke)
    model = build_model(cfg, device, torch.bfloat16)
    decode = build_decode(args.smoke, device, torch.bfloat16)
    results = {"check": None if args.no_check else equivalence(rank, model, cfg, args, device, decode)}
    results["latency"] = latency(rank, model, cfg, args, device, decode)
    results["replicas"] = replicas(rank, model, cfg, args, device, decode)
    if rank == COND_RANK:
        report = {"machine": machine(device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
                  "args": vars(args), "model": {"shape": "tiny" if args.smoke else "Lance_3B", **cfg.llm.__dict__},
                  "targets": TARGETS, **results}
        Path(out_path).write_text(json.dumps(report, indent=2, default=str))
        print(table(report))


def machine(device) -> dict:
    info = {"host": platform.node(), "torch": torch.__version__, "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), gpus=torch.cuda.device_count(),
                    cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())))
    else:
        info["gpu"] = "none (CPU, gloo)"
    return info


def table(r: dict) -> str:
    lat, rep, chk = r["latency"], r["replicas"], r["check"]
    one, par = lat["one_gpu"], lat["cfg_parallel"]
    t = TARGETS
    gpus = f"{r['machine']['gpus']} x {r['machine']['gpu']}" if "gpus" in r["machine"] else r["machine"]["gpu"]
    lines = [f"machine: {gpus} on {r['machine']['host']}, "
             f"{r['date']}, torch {r['machine']['torch']}",
             f"command: {r['command']}", "",
             f"| {lat['size']}^2 / {lat['steps']} steps, context {lat['context'][0]}+{lat['context'][1]} | one GPU "
             "| CFG-parallel | speedup | target |",
             "|---|---|---|---|---|",
             f"| CFG step ({one['cfg_steps']}) | {one['cfg_step_ms']:.1f} ms | {par['cfg_step_ms']:.1f} ms | "
             f"{lat['cfg_step_speedup']:.2f}x | >= {t['cfg_step_speedup']}x |",
             f"| non-CFG step ({one['plain_steps']}) | {one['plain_step_ms']:.1f} ms | {par['plain_step_ms']:.1f} ms | "
             f"{one['plain_step_ms'] / max(par['plain_step_ms'], 1e-9):.2f}x | |",
             f"| denoising loop | {one['denoise_s']:.3f} s | {par['denoise_s']:.3f} s | "
             f"{lat['denoise_speedup']:.2f}x | |",
             f"| end to end (hand-off -> PNG) | {one['end_to_end_s']:.3f} s | {par['end_to_end_s']:.3f} s | "
             f"{lat['end_to_end_speedup']:.2f}x | >= {t['end_to_end_speedup']}x |", "",
             f"| {rep['size']}^2 / {rep['steps']} steps, batch {rep['max_batch_size']}, {rep['images_per_replica']} "
             f"images/replica | 1 replica | 2 replicas | scaling | target |",
             "|---|---|---|---|---|",
             f"| images/s | {rep['one_replica_images_per_s']:.3f} | {rep['two_replicas_images_per_s']:.3f} | "
             f"{100 * rep['replica_scaling']:.1f} % | >= {100 * t['replica_scaling']:.0f} % |"]
    if chk:
        f32, b16 = chk["fp32_cfg_parallel_vs_fp32_one_device"], chk["bf16_cfg_parallel_vs_fp32_one_device"]
        b16_one = chk["bf16_one_device_vs_fp32_one_device"]
        lines += ["", f"equivalence ({chk['size']}^2, {chk['steps']} steps, final latent): fp32 CFG-parallel vs fp32 "
                  f"one GPU max rel {f32['max_rel']:.2e} ({'PASS' if chk['fp32_pass'] else 'FAIL'} <= 1e-5); bf16 vs "
                  f"fp32: CFG-parallel rel_l2 {b16['rel_l2']:.2e}, one GPU rel_l2 {b16_one['rel_l2']:.2e}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.backend == "nccl" and torch.cuda.device_count() < 2:
        sys.exit(f"needs 2 GPUs (found {torch.cuda.device_count()}); use --smoke for the CPU check")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / "bench_cfg_parallel.json"
    spawn_local_group(bench_rank, (args, str(out_path)), backend=args.backend)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
