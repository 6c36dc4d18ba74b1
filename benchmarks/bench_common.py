"""Helpers shared by the benchmark scripts (each runs as `python benchmarks/NAME.py`, so this folder is on
sys.path): the machine's description, a free port, and the kernel probes' timing, CUDA-graph capture and output."""
import json
import platform
import socket
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench(fn, reps=30, warm=5):
    """Mean milliseconds per call of fn(), back to back, timed with CUDA events."""
    import torch

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


def capture_graph(fn, calls: int = 1):
    """A CUDA graph of `calls` calls of fn (run it eagerly first: compiling inside a capture fails),
    warmed on a side stream as capture needs; `graph.replay()` runs it."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def emit(**kw):
    print(json.dumps(kw), flush=True)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
