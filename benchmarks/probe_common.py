"""Helpers shared by the one-off kernel probes (probe_fp8_attention.py, probe_cute_kernels.py)."""
import json

import torch


def bench(fn, reps=30, warm=5):
    """Mean milliseconds per call of fn(), back to back, timed with CUDA events."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


def emit(**kw):
    print(json.dumps(kw), flush=True)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
