"""Which checkpoint the app serves.

First match wins: app args `model` > env LANCE_MODEL > the stage graph's `model` > the default,
which is the hub id `bytedance-research/Lance` (`HUB_REPO_ID`) when the machine (or Ray cluster) has GPUs, and otherwise the
tiny random-weights checkpoint, created once under ~/.cache/lance-serve/tiny (override the cache
root with LANCE_SERVE_CACHE_DIR). The tiny checkpoint exercises every code path but its images are
noise; the app says so loudly and /v1/models reports `tiny_random_weights: true`.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from stages.lance.checkpoint import HUB_REPO_ID, lance_serve_cache_dir

logger = logging.getLogger("ray.serve")

TINY_SERVED_NAME = "lance-tiny-random"


@dataclass(frozen=True)
class ServedModel:
    path: str                   # local dir or hub id, handed to the stages
    name: str                   # the id /v1/models shows and clients may send as `model`
    source: str                 # where the choice came from, for the startup log
    tiny_random_weights: bool = False


def cache_root(env: Mapping[str, str] = os.environ) -> Path:
    return lance_serve_cache_dir(env)


def count_gpus() -> int:
    """GPUs of the Ray cluster when connected (the builder runs inside it under `serve deploy`),
    else of this machine."""
    import ray

    if ray.is_initialized():
        return int(ray.cluster_resources().get("GPU", 0))
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:   # no CUDA build / driver: a CPU machine
        return 0


TINY_VARIANTS = ("Lance_3B", "Lance_3B_Video")   # the tiny checkpoint serves every task


def _has_variants(target: Path) -> bool:
    return target.is_dir() and all((target / v).is_dir() for v in TINY_VARIANTS)


def ensure_tiny_checkpoint(target: Path) -> Path:
    """Create the tiny random checkpoint (both variants) at `target` unless it is already there.

    Built in a temporary sibling directory and renamed into place, so concurrent builders never
    see (or serve) a half-written checkpoint. An older tiny checkpoint without the video variant
    is replaced.
    """
    if _has_variants(target):
        return target
    try:
        from stages.lance.tiny import TinyCheckpointSpec, make_tiny_checkpoint
    except ImportError as e:
        raise RuntimeError(
            "no model was given and there is no GPU, so lance-serve would serve the tiny random "
            "checkpoint, but stages.lance.tiny.make_tiny_checkpoint is not available "
            f"({e}); set LANCE_MODEL or the app arg `model` to a checkpoint") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        make_tiny_checkpoint(tmp, TinyCheckpointSpec(variants=TINY_VARIANTS))
        if target.is_dir() and not _has_variants(target):   # an image-only one from before
            stale = Path(tempfile.mkdtemp(prefix=".tiny-old-", dir=target.parent))
            try:
                os.rename(target, stale / "tiny")
            except OSError:
                pass   # another builder moved it already
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _has_variants(target):
                raise
            shutil.rmtree(tmp)   # another builder finished first; use its checkpoint
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def choose_model(args_model: Optional[str], graph_model: Optional[str], num_gpus: int,
                 env: Mapping[str, str] = os.environ) -> ServedModel:
    for source, value in (("app args", args_model), ("LANCE_MODEL", env.get("LANCE_MODEL")),
                          ("stage graph", graph_model)):
        if value:
            return ServedModel(path=value, name=value, source=source)
    if num_gpus > 0:
        return ServedModel(path=HUB_REPO_ID, name=HUB_REPO_ID,
                           source=f"default ({num_gpus} GPUs)")
    path = ensure_tiny_checkpoint(cache_root(env) / "tiny")
    logger.warning("\n" + "!" * 88 + "\n!! No model given and no GPU: serving the TINY RANDOM-WEIGHTS "
                   "checkpoint at %s.\n!! Every image it makes is NOISE and every answer is "
                   "gibberish. Set LANCE_MODEL to serve Lance.\n" + "!" * 88, path)
    return ServedModel(path=str(path), name=TINY_SERVED_NAME, source="tiny (no GPU, no model)",
                       tiny_random_weights=True)
