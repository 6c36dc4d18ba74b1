"""Benchmark of the thinker -> DiT context hand-off on CPU: bytes per request, export + fetch vs plain prefill.

    python benchmarks/bench_kv_handoff.py [--ckpt DIR] [--dtype bfloat16] [--tokens 256,1024] [--repeats 5]

Without --ckpt it writes a random-weight checkpoint with Lance-3B's KV geometry (36 layers, 2 KV heads,
head_dim 128: 36,864 bytes per context token per branch in bf16) and a tiny everything-else, so the
numbers are those of the real hand-off sizes on a model that runs in seconds on a laptop CPU.

Per context length (t2i contexts, one CFG branch per measurement, prefix caching off so every prefill is
a full one) it reports medians of:
  prefill        vLLM prefill of the context, no export (the baseline)
  prefill+export the same request with the export: gather from the paged cache + /dev/shm write, done
                 inside the engine step (the caller sees the output when it is complete)
  claim          the replica reads the export and deletes it
  put            ray.put of (K, V) by the replica
  fetch          ray.get of that ObjectRef in another process (as the DiT does)
  put(zc), fetch(zc)  the same with RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 in the putting process
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid

import ray
import torch


@ray.remote(num_cpus=0)
class Fetcher:
    """Another process that fetches hand-offs (the DiT's side)."""

    def fetch(self, refs: list) -> float:
        t = time.perf_counter()
        k, v = ray.get(refs[0])
        elapsed = time.perf_counter() - t
        assert k.shape == v.shape
        return elapsed


@ray.remote(num_cpus=0, runtime_env={"env_vars": {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}})
class ZeroCopyPutter:
    """A putting process with Ray's zero-copy torch serialization on (the thinker replica's env option)."""

    def put(self, k: torch.Tensor, v: torch.Tensor) -> tuple[list, float]:
        k, v = k.contiguous(), v.contiguous()
        t = time.perf_counter()
        ref = ray.put((k, v))
        return [ref], time.perf_counter() - t


def make_checkpoint(out_dir: str) -> str:
    from stages.lance.tiny import TinyCheckpointSpec, make_tiny_checkpoint

    make_tiny_checkpoint(out_dir, TinyCheckpointSpec(layers=36, hidden=256, heads=2, kv_heads=2, intermediate=256))
    return out_dir


def caption_for(thinker, tokens: int, salt: str) -> str:
    """A caption whose t2i context is about `tokens` long (a unique word first: no prefix-cache hits)."""
    from stages.lance.prompts import default_system_prompt
    from stages.lance.sequence import build_generation_sequence

    words = ["red", "cube", "on", "a", "blue", "table", "near", "the", "window"]
    base = build_generation_sequence(thinker.tokenizer, thinker.tokens, default_system_prompt("t2i"), salt, [],
                                     (1, 8, 8)).input_ids.numel() - 66 - 1
    n = max(0, tokens - base)
    return " ".join([salt] + [words[i % len(words)] for i in range(n)])


async def one(thinker, caption: str, fetcher, putter) -> dict:
    from vllm import SamplingParams

    from stages.lance.requests import ImageRequest
    from stages.thinker.exports import EXPORT_PARAM
    from stages.thinker.inputs import VisualInputs, vllm_prompt

    prep = thinker._prepare_generation(ImageRequest(task="t2i", prompt=caption, height=128, width=128), None)
    prompt = vllm_prompt(prep.cond.context, prep.cond.context_positions, thinker.ids, VisualInputs())
    # baseline: the same prompt shape, no export (a different first word: nothing cached)
    t = time.perf_counter()
    async for _ in thinker.engine.generate(prompt, SamplingParams(max_tokens=1), request_id=uuid.uuid4().hex):
        pass
    plain = time.perf_counter() - t
    export_id = uuid.uuid4().hex
    params = SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": {EXPORT_PARAM: {"export_id": export_id}}})
    t = time.perf_counter()
    async for _ in thinker.engine.generate(prompt, params, request_id=export_id):
        pass
    exported = time.perf_counter() - t
    t = time.perf_counter()
    claimed = await thinker.claims.claim(export_id)
    claim = time.perf_counter() - t
    t = time.perf_counter()
    ref = claimed.kv if isinstance(claimed.kv, ray.ObjectRef) else ray.put(claimed.kv)  # ray sink: put by the worker
    put = time.perf_counter() - t
    fetch = await fetcher.fetch.remote([ref])
    k, v = claimed.kv if isinstance(claimed.kv, tuple) else ray.get(ref)
    zc_refs, put_zero_copy = await putter.put.remote(k, v)
    fetch_zero_copy = await fetcher.fetch.remote(zc_refs)
    return {"tokens": k.shape[1], "bytes": claimed.nbytes, "prefill_s": plain,
            "prefill_export_s": exported, "claim_s": claim, "put_s": put, "fetch_s": fetch,
            "put_zero_copy_s": put_zero_copy, "fetch_zero_copy_s": fetch_zero_copy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="checkpoint (default: a temporary one with Lance-3B's KV geometry)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", default="256,1024", help="context lengths")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sink", default="shm", choices=["shm", "ray"], help="export sink (see stages/thinker/exports.py)")
    ap.add_argument("--json", help="write the raw rows here")
    args = ap.parse_args()

    from stages.thinker.thinker import Thinker

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ckpt = args.ckpt or make_checkpoint(tempfile.mkdtemp(prefix="lance-bench-"))
    thinker = Thinker(ckpt, {"dtype": args.dtype, "max_model_len": 4096, "max_num_seqs": 1,
                             "enable_prefix_caching": False, "cpu_kv_cache_space_gib": 1}, export_sink=args.sink)
    fetcher, putter = Fetcher.remote(), ZeroCopyPutter.remote()
    loop = asyncio.new_event_loop()
    rows = []
    info = thinker.model_info()
    try:
        for target in (int(x) for x in args.tokens.split(",")):
            loop.run_until_complete(one(thinker, caption_for(thinker, target, "warmup"), fetcher, putter))
            for r in range(args.repeats):
                rows.append(loop.run_until_complete(one(thinker, caption_for(thinker, target, f"run{r}x"), fetcher, putter)))
    finally:
        thinker.shutdown()
    print(f"sink: {args.sink}; model: {info['num_layers']} layers x {info['num_kv_heads']} KV heads x head_dim {info['head_dim']}, "
          f"{args.dtype}: {info['kv_bytes_per_token_per_branch']} bytes per context token per branch")
    header = ("tokens", "MB/branch", "prefill", "+export", "claim", "put", "fetch", "put(zc)", "fetch(zc)")
    print(("{:>8} " * len(header)).format(*header))
    by_len: dict[int, list[dict]] = {}
    for row in rows:
        by_len.setdefault(row["tokens"], []).append(row)
    summary = {}
    for n, rs in sorted(by_len.items()):
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k.endswith("_s")}
        mb = rs[0]["bytes"] / 1e6
        summary[n] = {"bytes": rs[0]["bytes"], **med}
        print(f"{n:>8} {mb:>8.2f} " + " ".join(f"{med[k] * 1e3:>7.1f}ms" for k in
              ("prefill_s", "prefill_export_s", "claim_s", "put_s", "fetch_s", "put_zero_copy_s",
               "fetch_zero_copy_s")))
    largest = summary[max(summary)]
    for key in ("fetch_s", "fetch_zero_copy_s"):
        bandwidth = largest["bytes"] / largest[key]
        print(f"{key[:-2]}: {bandwidth / 1e9:.2f} GB/s -> a 256-token Lance-3B branch (9.4 MB bf16) "
              f"in {9.437e6 / bandwidth * 1e3:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
