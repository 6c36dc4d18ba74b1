"""t2v end to end on one GPU: Lance_3B_Video-shaped random weights (bf16), the real Wan2.2 VAE shape.

    PYTHONUNBUFFERED=1 python benchmarks/bench_t2v.py --out $OUT            # 33 then 121 frames at 480x848
    python benchmarks/bench_t2v.py --tiny --out /tmp/t2v                   # CPU smoke run of the script

Per frame count: the DiT stage's work for one request (batch 1), split into
  denoise     30 steps through the DiT engine's fast path (Triton element-wise kernels, cuDNN attention,
              CUDA graphs for forwards of <= 40,000 tokens; larger ones, e.g. 121 frames, run eagerly),
              configured as `DiTStage` configures it on a GPU;
  VAE decode  `stages.dit.video.VideoDecode`, the stage's own loop: `LanceVAE.decode_chunks` (one latent
              frame at a time with the causal feature cache), each chunk to uint8 frames on the host;
  MP4 encode  `stages.dit.video.Mp4Encoder` with the default `VideoEncoding` (H.264 yuv420p, crf 18,
              preset fast, 12 fps), the stage's encoder.
The three run one after another here (the stage overlaps encode with decode on an encoder thread), so
end to end = their sum. MFU = model FLOPs of every forward of the loop (benchmarks/bench_dit.py's count)
over the denoise wall time, against 989 TFLOP/s dense bf16 (H100 SXM). Peak GPU memory
(`max_memory_allocated`) of the denoise and, separately, of the decode, both with every resident weight
(DiT + VAE decoder) included; also the decode's own part (peak minus what was allocated before it).

Only the first frame count gets a warm-up (4 steps of it: compiles the Triton kernels, settles the
attention backend, captures its graphs; then 2 latent frames of its decode and their MP4); later counts run cold, so their first step carries any
first-use cost of their shapes (per-step times are recorded with CUDA events to show it). The captured
graphs of one count are dropped before the next, so each count's peak memory is its own.
Each count's result is written to <out>/t2v_<frames>.json as soon as it finishes (and all of them to
bench_t2v.json), so a run cut short keeps the finished counts.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import LANCE_3B, PEAK_BF16, WAN22_VAE, loop_flops   # noqa: E402
from stages.dit.engine import DenoiseEngine                       # noqa: E402
from stages.dit.model import build_dit_model, memory_report, random_init_   # noqa: E402
from stages.dit.runner import fast_path_options                   # noqa: E402
from stages.dit.video import Mp4Encoder, VideoDecode              # noqa: E402
from stages.lance.config import LanceConfig, LanceLLMConfig       # noqa: E402
from stages.lance.handoff import BranchKV, ContextHandoff         # noqa: E402
from stages.lance.requests import DenoiseParams, VideoEncoding    # noqa: E402
from stages.lance.sequence import LanceSequence, Segment, mrope_positions  # noqa: E402
from stages.lance.vae import LATENTS_MEAN, LATENTS_STD, LanceVAE, decode_to_uint8   # noqa: E402

COND_CONTEXT, UNCOND_CONTEXT = 98, 58
GIB = 2**30
log = logging.getLogger("bench_t2v")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def allocated_gib(device) -> float:
    return torch.cuda.memory_allocated() / GIB if device.type == "cuda" else 0.0   # CPU: not measured


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else 0.0


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def t2v_handoff(cfg: LanceConfig, grid, params: DenoiseParams, device, dtype, seed: int = 0) -> ContextHandoff:
    """A t2v hand-off: random context K/V, the target block's real 3-D positions after the context."""
    llm = cfg.llm
    g = torch.Generator(device=device).manual_seed(1000 + seed)
    n = grid[0] * grid[1] * grid[2]

    def branch(length):
        seq = LanceSequence(torch.zeros(length + n + 2, dtype=torch.long),
                            [Segment("text", length), Segment("target", n + 2, grid)])
        positions = mrope_positions(seq, llm.tokens_per_second)[:, length:]
        shape = (llm.num_hidden_layers, length, llm.num_key_value_heads, llm.head_dim)
        kv = tuple(torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(2))
        return BranchKV(kv, length, positions)

    return ContextHandoff(f"t2v-{seed}", "t2v", tuple(grid), params, branch(COND_CONTEXT), branch(UNCOND_CONTEXT))


def random_vae(vae_kwargs: dict, device, dtype) -> LanceVAE:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoencoderKLWan(**vae_kwargs, latents_mean=list(LATENTS_MEAN), latents_std=list(LATENTS_STD))
    model.encoder, model.quant_conv = None, None
    with torch.no_grad():  # convs N(0, (0.5/sqrt(fan_in))^2): activations stay O(1)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.5 / p[0].numel() ** 0.5)
            elif name.endswith("bias"):
                p.zero_()
    return LanceVAE(model.to(dtype), dtype).to(device)


def warm_up(cfg, vae, engine, frames: int, height: int, width: int, device, dtype) -> float:
    """4 steps at `frames`: 2 with CFG, 2 without (both forward shapes, eager then captured); then the
    first two latent frames of its decode (both chunk kinds' kernels) and an MP4 of their frames."""
    grid = cfg.latent.latent_grid(frames, height, width)
    warm = t2v_handoff(cfg, grid, DenoiseParams(num_inference_steps=4, cfg_interval=(0.8, 1.0)), device, dtype, seed=99)
    t0 = time.perf_counter()
    job = engine.prepare(warm, warm.cond.kv, warm.uncond.kv)
    engine.run([job])
    decode = VideoDecode.start(vae, job, dtype)
    frames_out = [decode_to_uint8(next(decode.chunks)).cpu() for _ in range(min(2, grid[0]))]
    decode.chunks.close()
    encoder = Mp4Encoder(width, height, VideoEncoding())
    encoder.write(torch.cat(frames_out))
    encoder.finish()
    sync(device)
    return time.perf_counter() - t0


class StepTimes:
    """A CUDA event after every step (the engine never syncs with the host, so events mark GPU time)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self, *_):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def run_one(cfg, vae, engine, frames: int, height: int, width: int, steps: int, device, dtype) -> dict:
    grid = cfg.latent.latent_grid(frames, height, width)
    t, h, w = grid
    handoff = t2v_handoff(cfg, grid, DenoiseParams(num_inference_steps=steps), device, dtype)
    flops = loop_flops(cfg, handoff)
    cfg_steps = sum(engine_uses_cfg(handoff, i) for i in range(steps))
    steps_timer = StepTimes(device)
    job = engine.prepare(handoff, handoff.cond.kv, handoff.uncond.kv, on_step=steps_timer.mark)
    free_memory(device)
    resident = allocated_gib(device)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    steps_timer.mark()
    engine.run([job])
    sync(device)
    denoise_s = time.perf_counter() - t0
    denoise_peak = peak_gib(device)
    per_step = steps_timer.seconds()
    cfg_times = [s for i, s in enumerate(per_step) if engine_uses_cfg(handoff, i)]
    plain_times = [s for i, s in enumerate(per_step) if not engine_uses_cfg(handoff, i)]
    del handoff
    job.cond = job.uncond = None      # the context K/V is not needed for the decode
    free_memory(device)

    before_decode = allocated_gib(device)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    decode = VideoDecode.start(vae, job, dtype)
    video = None
    while video is None:
        video = decode.advance()          # one latent frame -> uint8 frames on the host (a blocking copy)
    sync(device)
    decode_s = time.perf_counter() - t0
    decode_peak = peak_gib(device)

    t0 = time.perf_counter()
    encoder = Mp4Encoder(video.width, video.height, VideoEncoding())
    encoder.write(video.frames)
    mp4 = encoder.finish()
    encode_s = time.perf_counter() - t0
    row = {"frames": frames, "height": height, "width": width, "latent_grid": list(grid), "tokens": t * h * w,
           "steps": steps, "cfg_steps": cfg_steps, "denoise_s": denoise_s, "vae_decode_s": decode_s,
           "mp4_encode_s": encode_s, "end_to_end_s": denoise_s + decode_s + encode_s,
           "denoise_pflop": flops / 1e15, "denoise_tflops": flops / denoise_s / 1e12,
           "mfu": flops / denoise_s / PEAK_BF16,
           "step_s_first": per_step[0] if per_step else None,
           "step_s_cfg_median": statistics.median(cfg_times) if cfg_times else None,
           "step_s_plain_median": statistics.median(plain_times) if plain_times else None,
           "step_s_all": per_step,
           "resident_gib_before_denoise": resident, "denoise_peak_gib": denoise_peak,
           "allocated_gib_before_decode": before_decode, "decode_peak_gib": decode_peak,
           "decode_own_peak_gib": decode_peak - before_decode,
           "peak_gib": max(denoise_peak, decode_peak),
           "mp4_bytes": len(mp4), "decoded_frames": int(video.num_frames)}
    if steady := row["step_s_cfg_median"]:
        # MFU of the steady state: every step at its kind's median (first-use costs left out)
        steady_s = cfg_steps * steady + (steps - cfg_steps) * (row["step_s_plain_median"] or 0.0)
        row["mfu_steady"] = flops / steady_s / PEAK_BF16 if steady_s > 0 else None
    log.info("RESULT %s", json.dumps({k: v for k, v in row.items() if k != "step_s_all"}))
    return row


def engine_uses_cfg(handoff: ContextHandoff, step: int) -> bool:
    from stages.lance.scheduler import FlowMatchEulerScheduler

    return FlowMatchEulerScheduler(handoff.params).uses_cfg(step)


def versions(device) -> dict:
    out = {"torch": torch.__version__}
    for name in ("triton", "diffusers", "av"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - a version is informational
            out[name] = f"unavailable ({type(e).__name__})"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, sms=p.multi_processor_count, gpu_memory_gib=p.total_memory / GIB,
                   cudnn=torch.backends.cudnn.version())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--frames", default="33,121", help="frame counts (4k+1), run in this order")
    ap.add_argument("--size", default="480x848", help="HEIGHTxWIDTH")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--tiny", action="store_true", help="tiny model and VAE on the CPU (checks the script runs)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.FileHandler(out / "bench_t2v.log"), logging.StreamHandler(sys.stdout)])
    height, width = (int(v) for v in args.size.split("x"))
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        llm = dict(LANCE_3B, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, head_dim=64,
                   num_key_value_heads=1, intermediate_size=256, mrope_section=(8, 12, 12))
        vae_kwargs = dict(WAN22_VAE, base_dim=16, decoder_base_dim=16)
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        llm, vae_kwargs = LANCE_3B, WAN22_VAE
    t_start = time.perf_counter()
    cfg = LanceConfig(llm=LanceLLMConfig(**llm), variant="Lance_3B_Video")
    results = {"command": " ".join(sys.argv), "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
               "device": str(device), "dtype": str(dtype), "versions": versions(device), "batch": 1,
               "context_tokens": {"cond": COND_CONTEXT, "uncond": UNCOND_CONTEXT}, "runs": [], "errors": {}}
    model = random_init_(build_dit_model(cfg, device, dtype), seed=0)
    vae = random_vae(vae_kwargs, device, dtype)
    results["weights_gib"] = {"dit": memory_report(model).parameter_bytes / GIB,
                              "vae_decoder": memory_report(vae).parameter_bytes / GIB}
    engine = DenoiseEngine(model, "fast", max_batch_size=1, max_tokens_per_forward=1 << 20,
                           **fast_path_options(not args.tiny, device))
    log.info("setup %.1fs: %s %s", time.perf_counter() - t_start, results["versions"], results["weights_gib"])
    frame_counts = [int(f) for f in args.frames.split(",")]
    for i, frames in enumerate(frame_counts):
        try:
            if i == 0:
                results["warmup_s"] = warm_up(cfg, vae, engine, frames, height, width, device, dtype)
                log.info("warm-up (4 steps + 2 latent frames decoded at %d frames) %.1fs", frames, results["warmup_s"])
            else:   # each count's own graphs and peak memory
                getattr(engine.forward, "_graphs", {}).clear()
                free_memory(device)
            row = run_one(cfg, vae, engine, frames, height, width, args.steps, device, dtype)
            results["runs"].append(row)
            (out / f"t2v_{frames}.json").write_text(json.dumps(dict(results, runs=[row]), indent=1))
            print(f"SUMMARY frames={frames} {height}x{width} steps={args.steps}: end_to_end {row['end_to_end_s']:.2f} s "
                  f"= denoise {row['denoise_s']:.2f} + VAE decode {row['vae_decode_s']:.2f} + MP4 {row['mp4_encode_s']:.2f}; "
                  f"MFU {100 * row['mfu']:.1f}% ; peak {row['peak_gib']:.2f} GiB (denoise {row['denoise_peak_gib']:.2f}, "
                  f"decode {row['decode_peak_gib']:.2f}, decode own {row['decode_own_peak_gib']:.2f})", flush=True)
        except Exception as e:   # one failing count must not lose the others' numbers
            log.error("frames=%d failed: %s\n%s", frames, e, traceback.format_exc())
            results["errors"][str(frames)] = f"{type(e).__name__}: {e}"
            free_memory(device)
        (out / "bench_t2v.json").write_text(json.dumps(results, indent=1))
    log.info("total %.1fs", time.perf_counter() - t_start)
    if results["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
