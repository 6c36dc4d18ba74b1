"""Serving benchmark on CPU: end-to-end HTTP latency vs the offline pipeline, and throughput at c=1/4/8.

    .venv/bin/python benchmarks/bench_serve.py [--model DIR] [--stage-graph cpu] [--json OUT.json]

1. Offline: `LancePipeline` in this process with `--offline-threads` torch threads (default 1: each
   stage of the cpu graph is a 1-CPU replica, so both sides compute with one thread at a time).
2. Served: a local Ray cluster (`--num-cpus`), the real application (`build_app` on the stage graph,
   the same one `serve run configs/lance_2stage.yaml` builds) on a free loopback port; requests over HTTP.
3. For each case (t2i at two sizes, an edit, image->text), the median latency of the same request both
   ways at c=1 and the ratio served/offline (the served image is checked to equal the offline one, +-1).
4. Throughput of the t2i throughput case at concurrency 1/4/8: a fixed number of requests per level
   (`--requests`), each with its own seed; requests/s and latency p50/p95.

The model is the tiny random-weights checkpoint (the golden one, else a fresh `make_tiny_checkpoint`),
so the numbers measure the serving path (HTTP, Serve handles, vLLM scheduling, KV hand-off through the
object store, PNG encoding) against the compute, not Lance's real cost. Prints a table at the end.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench_common import cpu_model, free_port   # benchmarks/ is the script's folder

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

GOLDEN_TINY = Path(os.environ.get("LANCE_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden")) / "tiny_ckpt"
PROMPT = "A red cube on a blue table"
QUESTION = "What color is the square?"


# -- requests: one definition, sent to both sides ---------------------------------------------------------

def input_image() -> Image.Image:
    y, x = np.mgrid[0:90, 0:120]
    rgb = np.stack([x * 2, y * 2, (x + y) % 256], -1).astype(np.uint8)
    rgb[20:45, 30:60] = (220, 30, 30)
    return Image.fromarray(rgb, "RGB")


def png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_cases(steps: int, x2t_tokens: int) -> dict:
    """name -> (HTTP body, offline call(pipe) -> PIL image or token ids)."""
    img = input_image()
    url = png_data_url(img)

    def t2i(size: int):
        body = {"messages": [{"role": "user", "content": PROMPT}], "modalities": ["image"],
                "size": f"{size}x{size}", "num_inference_steps": steps, "seed": 42}
        return body, lambda p: p.text_to_image(PROMPT, height=size, width=size,
                                               num_inference_steps=steps, seed=42).image

    edit_body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Make the square green"}, {"type": "image_url", "image_url": {"url": url}}]}],
        "modalities": ["image"], "resolution": "image_256res", "num_inference_steps": steps, "seed": 42}
    x2t_body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}],
        "max_tokens": x2t_tokens, "resolution": "image_256res", "return_token_ids": True}
    return {
        "t2i 64x64": t2i(64),
        "t2i 256x256": t2i(256),
        "edit 256res": (edit_body, lambda p: p.edit_image(img, "Make the square green", resolution="image_256res",
                                                          num_inference_steps=steps, seed=42).image),
        f"x2t {x2t_tokens} tok": (x2t_body, lambda p: p.image_to_text(img, QUESTION, resolution="image_256res",
                                                                      max_new_tokens=x2t_tokens).token_ids),
    }


def served_output(resp_json: dict):
    content = resp_json["choices"][0]["message"]["content"]
    if isinstance(content, str):
        return resp_json["choices"][0]["token_ids"]
    raw = base64.b64decode(content[0]["image_url"]["url"].split(",", 1)[1])
    return Image.open(io.BytesIO(raw)).convert("RGB")


def same_output(a, b) -> bool:
    if isinstance(a, list):
        return a == b
    x, y = np.asarray(a, np.int16), np.asarray(b, np.int16)
    return x.shape == y.shape and int(np.abs(x - y).max()) <= 1


# -- measurement ---------------------------------------------------------------------------------------

def median_time(fn, reps: int, warmup: int = 1):
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def post(client: httpx.Client, body: dict) -> dict:
    resp = client.post("/v1/chat/completions", json=body)
    if resp.status_code != 200:
        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
    return resp.json()


def throughput(base_url: str, body: dict, concurrency: int, n_requests: int) -> dict:
    bodies = [dict(body, seed=1000 + i) for i in range(n_requests)]
    latencies: list[float] = []

    def one(b):
        with httpx.Client(base_url=base_url, timeout=600) as c:
            t0 = time.perf_counter()
            post(c, b)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, bodies))
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"concurrency": concurrency, "requests": n_requests, "wall_s": wall, "req_per_s": n_requests / wall,
            "p50_s": lat[len(lat) // 2], "p95_s": lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]}




def resolve_model(arg: str | None, tmp: Path) -> str:
    if arg:
        return arg
    if (GOLDEN_TINY / "Lance_3B").is_dir():
        return str(GOLDEN_TINY)
    from stages.lance.tiny import make_tiny_checkpoint

    make_tiny_checkpoint(tmp / "tiny")
    return str(tmp / "tiny")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint dir (default: the golden tiny checkpoint, else a fresh tiny one)")
    ap.add_argument("--stage-graph", default="cpu")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--offline-threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--x2t-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per latency case (after 1 warm-up)")
    ap.add_argument("--throughput-case", default="t2i 256x256")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model = resolve_model(args.model, tmp)
    cases = make_cases(args.steps, args.x2t_tokens)
    load1 = os.getloadavg()[0]

    # 1. offline
    from stages.lance import LancePipeline

    torch.set_num_threads(args.offline_threads)
    pipe = LancePipeline.from_pretrained(model)
    offline = {name: median_time(lambda f=fn: f(pipe), args.reps) for name, (_, fn) in cases.items()}
    del pipe

    # 2. served
    import ray
    from ray import serve

    from serve_app.builder import build_app

    port = free_port()
    ray.init(num_cpus=args.num_cpus, object_store_memory=512 * 2**20, include_dashboard=False,
             log_to_driver=False)
    try:
        t0 = time.perf_counter()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"stage_graph": args.stage_graph, "model": model}), name="lance", route_prefix="/")
        startup_s = time.perf_counter() - t0
        base_url = f"http://127.0.0.1:{port}"
        rows = []
        with httpx.Client(base_url=base_url, timeout=600) as client:
            for name, (body, _) in cases.items():
                served_s, resp = median_time(lambda b=body: post(client, b), args.reps)
                off_s, off_out = offline[name]
                rows.append({"case": name, "offline_s": off_s, "served_s": served_s, "ratio": served_s / off_s,
                             "same_output": same_output(served_output(resp), off_out)})
        levels = [throughput(base_url, cases[args.throughput_case][0], c, args.requests)
                  for c in (int(x) for x in args.concurrency.split(","))]
    finally:
        serve.shutdown()
        ray.shutdown()

    info = {"date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"), "machine": cpu_model(), "cpus": os.cpu_count(), "loadavg_1m_at_start": load1,
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "model": model,
            "stage_graph": args.stage_graph, "steps": args.steps, "offline_threads": args.offline_threads,
            "serve_startup_s": startup_s}
    print(f"\n{info}\n")
    print(f"{'case':<16}{'offline s':>11}{'served s':>11}{'ratio':>8}  same output")
    for r in rows:
        print(f"{r['case']:<16}{r['offline_s']:>11.3f}{r['served_s']:>11.3f}{r['ratio']:>8.2f}  {r['same_output']}")
    print(f"\nthroughput, {args.throughput_case}, {args.steps} steps, {args.requests} requests per level")
    print(f"{'concurrency':<13}{'req/s':>8}{'p50 s':>9}{'p95 s':>9}{'wall s':>9}")
    for lv in levels:
        print(f"{lv['concurrency']:<13}{lv['req_per_s']:>8.2f}{lv['p50_s']:>9.3f}{lv['p95_s']:>9.3f}{lv['wall_s']:>9.1f}")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "latency": rows, "throughput": levels}, indent=2))


if __name__ == "__main__":
    main()
