"""t2v end to end on one GPU: Lance_3B_Video-shaped random weights (bf16), the real Wan2.2 VAE shape.

    PYTHONUNBUFFERED=1 python benchmarks/bench_t2v.py --out $OUT            # 121 and 33 frames at 480x848
    python benchmarks/bench_t2v.py --tiny --out /tmp/t2v                   # CPU smoke run of the script

Per frame count: the DiT stage's work for one request, split into denoise (30 steps through the DiT
engine's fast path: Triton kernels, CUDA graphs, cuDNN attention, as `DiTStage` runs on a GPU), VAE
decode (`LanceVAE.decode_chunks`: one latent frame at a time with the causal feature cache) and H.264
MP4 encode (`video_io.Mp4Writer`, 12 fps), seconds each and end to end; MFU of the denoising forwards
(FLOPs as benchmarks/bench_dit.py counts them, against 989 TFLOP/s dense bf16); peak GPU memory of the
denoise and, separately, of the decode. The context is a t2v prompt's (system prompt + a 40-token caption
+ template: 98 cond / 58 uncond tokens of random K/V). Writes bench_t2v.json and bench_t2v.log under --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dit import LANCE_3B, PEAK_BF16, WAN22_VAE, loop_flops   # noqa: E402
from stages.dit.engine import DenoiseEngine                       # noqa: E402
from stages.dit.model import build_dit_model, random_init_        # noqa: E402
from stages.dit.runner import fast_path_options                   # noqa: E402
from stages.lance.config import LanceConfig, LanceLLMConfig       # noqa: E402
from stages.lance.handoff import BranchKV, ContextHandoff         # noqa: E402
from stages.lance.requests import DenoiseParams                   # noqa: E402
from stages.lance.sequence import LanceSequence, Segment, mrope_positions  # noqa: E402
from stages.lance.vae import LATENTS_MEAN, LATENTS_STD, LanceVAE, decode_to_uint8   # noqa: E402
from stages.lance.video_io import Mp4Writer                       # noqa: E402

COND_CONTEXT, UNCOND_CONTEXT = 98, 58
log = logging.getLogger("bench_t2v")


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def t2v_handoff(cfg: LanceConfig, grid, steps: int, device, dtype, seed: int = 0) -> ContextHandoff:
    """A t2v hand-off: random context K/V, the target block's real 3-D positions after the context."""
    llm = cfg.llm
    g = torch.Generator(device=device).manual_seed(1000 + seed)

    def branch(length):
        seq = LanceSequence(torch.zeros(length + grid[0] * grid[1] * grid[2] + 2, dtype=torch.long),
                            [Segment("text", length), Segment("target", grid[0] * grid[1] * grid[2] + 2, grid)])
        positions = mrope_positions(seq, llm.tokens_per_second)[:, length:]
        shape = (llm.num_hidden_layers, length, llm.num_key_value_heads, llm.head_dim)
        kv = tuple(torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(2))
        return BranchKV(kv, length, positions)

    return ContextHandoff(f"t2v-{seed}", "t2v", tuple(grid), DenoiseParams(num_inference_steps=steps, seed=seed),
                          branch(COND_CONTEXT), branch(UNCOND_CONTEXT))


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


def run_one(cfg, model, vae, engine, frames: int, height: int, width: int, steps: int, device, dtype) -> dict:
    grid = cfg.latent.latent_grid(frames, height, width)
    # warm-up: both forward shapes (CFG and plain), eager then captured
    warm = t2v_handoff(cfg, grid, 4, device, dtype, seed=99)
    warm.params = DenoiseParams(num_inference_steps=4, cfg_interval=(0.8, 1.0))
    engine.run([engine.prepare(warm, warm.cond.kv, warm.uncond.kv)])
    handoff = t2v_handoff(cfg, grid, steps, device, dtype)
    job = engine.prepare(handoff, handoff.cond.kv, handoff.uncond.kv)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    (x,) = engine.run([job])
    sync(device)
    denoise_s = time.perf_counter() - t0
    denoise_peak = peak_gib(device)
    flops = loop_flops(cfg, handoff)

    t, h, w = grid
    z = x.view(t, h, w, -1).permute(3, 0, 1, 2)[None].to(dtype)
    del job, handoff, x
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    chunks = []
    for chunk in vae.decode_chunks(z):
        chunks.append(decode_to_uint8(chunk[0]).cpu())   # what the runner keeps: uint8 frames on the host
    sync(device)
    decode_s = time.perf_counter() - t0
    decode_peak = peak_gib(device)
    pixels = torch.cat(chunks)
    t0 = time.perf_counter()
    writer = Mp4Writer(pixels.shape[2], pixels.shape[1])
    writer.write(pixels.numpy())
    mp4 = writer.close()
    encode_s = time.perf_counter() - t0
    row = {"frames": frames, "height": height, "width": width, "latent_grid": list(grid), "tokens": t * h * w,
           "steps": steps, "denoise_s": denoise_s, "vae_decode_s": decode_s, "mp4_encode_s": encode_s,
           "end_to_end_s": denoise_s + decode_s + encode_s, "denoise_tflops": flops / denoise_s / 1e12,
           "mfu": flops / denoise_s / PEAK_BF16, "denoise_peak_gib": denoise_peak, "decode_peak_gib": decode_peak,
           "mp4_bytes": len(mp4), "decoded_frames": int(pixels.shape[0])}
    log.info("%s", row)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--frames", default="121,33")
    ap.add_argument("--size", default="480x848")
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
    cfg = LanceConfig(llm=LanceLLMConfig(**llm), variant="Lance_3B_Video")
    results = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "runs": []}
    model = random_init_(build_dit_model(cfg, device, dtype), seed=0)
    vae = random_vae(vae_kwargs, device, dtype)
    engine = DenoiseEngine(model, "fast", max_batch_size=1, max_tokens_per_forward=1 << 20,
                           **fast_path_options(not args.tiny, device))
    for frames in (int(f) for f in args.frames.split(",")):
        results["runs"].append(run_one(cfg, model, vae, engine, frames, height, width, args.steps, device, dtype))
        (out / "bench_t2v.json").write_text(json.dumps(results, indent=1))
    print(f"{'frames':>6} {'size':>9} {'denoise s':>9} {'MFU':>6} {'decode s':>8} {'mp4 s':>6} {'total s':>7} "
          f"{'peak denoise GiB':>16} {'peak decode GiB':>15}")
    for r in results["runs"]:
        print(f"{r['frames']:>6} {r['height']}x{r['width']:<4} {r['denoise_s']:>9.2f} {100 * r['mfu']:>5.1f}% "
              f"{r['vae_decode_s']:>8.2f} {r['mp4_encode_s']:>6.2f} {r['end_to_end_s']:>7.2f} "
              f"{r['denoise_peak_gib']:>16.2f} {r['decode_peak_gib']:>15.2f}")


if __name__ == "__main__":
    main()
