"""Where exported contexts go between vLLM's worker and the thinker replica, and how they expire.

Worker side (`make_sink`, used by the connector): `put(export_id, K, V)`, `fail(export_id, message)`,
`expire()`. Replica side (`ExportClaims`): `claim(export_id)` -> (K, V), `drop(export_id)`.

`shm` sink: one safetensors file per export in a directory the replica creates under /dev/shm (tmpfs,
so the copy is a memory copy), renamed into place when complete; a failed export leaves a `.err` file.
Files older than `ttl_s` are deleted by the worker at each export step and by the replica at each claim,
so an export whose caller went away (cancelled request, crashed replica) does not outlive the TTL.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import KVExportError

EXPORT_PARAM = "lance_export"
DEFAULT_TTL_S = 120.0
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_DONE, _FAILED = ".kv", ".err"


def check_export_id(export_id: str) -> str:
    if not _SAFE_ID.match(export_id) or export_id.startswith("."):
        raise ValueError(f"export id {export_id!r} must be 1-200 characters of [A-Za-z0-9_.-]")
    return export_id


def make_sink(extra: dict):
    kind = extra.get("sink", "shm")
    if kind == "shm":
        return SharedMemorySink(Path(extra["export_dir"]), float(extra.get("ttl_s", DEFAULT_TTL_S)))
    raise ValueError(f"unknown KV export sink {kind!r} (supported: shm)")


def _expire(directory: Path, ttl_s: float) -> int:
    """Delete exports (complete, failed or half-written) older than `ttl_s`; returns how many."""
    now, removed = time.time(), 0
    for path in directory.iterdir() if directory.is_dir() else ():
        try:
            if now - path.stat().st_mtime > ttl_s:
                path.unlink()
                removed += 1
        except FileNotFoundError:  # claimed meanwhile
            pass
    return removed


class SharedMemorySink:
    def __init__(self, directory: Path, ttl_s: float = DEFAULT_TTL_S):
        self.directory, self.ttl_s = directory, ttl_s
        directory.mkdir(parents=True, exist_ok=True)

    def put(self, export_id: str, k: torch.Tensor, v: torch.Tensor) -> None:
        final = self.directory / (check_export_id(export_id) + _DONE)
        with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".", suffix=".tmp", delete=False) as f:
            tmp = f.name
        save_file({"k": k.contiguous().cpu(), "v": v.contiguous().cpu()}, tmp)
        os.replace(tmp, final)  # readiness: the name appears only when the file is complete

    def fail(self, export_id: str, message: str) -> None:
        (self.directory / (check_export_id(export_id) + _FAILED)).write_text(message)

    def expire(self) -> int:
        return _expire(self.directory, self.ttl_s)

    def close(self) -> None:
        return


class ExportClaims:
    """The replica's end of the `shm` sink: owns the directory, claims and drops exports."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, root: str | Path | None = None):
        base = Path(root) if root is not None else (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
        self.directory = Path(tempfile.mkdtemp(prefix="lance-kv-", dir=base))
        self.ttl_s = ttl_s

    def connector_config(self) -> dict:
        return {"sink": "shm", "export_dir": str(self.directory), "ttl_s": self.ttl_s}

    async def claim(self, export_id: str, timeout_s: float = 30.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for the export to be complete, load it and delete the file."""
        done = self.directory / (check_export_id(export_id) + _DONE)
        failed = self.directory / (export_id + _FAILED)
        deadline = time.monotonic() + timeout_s
        delay = 0.001
        while not done.exists():
            if failed.exists():
                message = failed.read_text()
                failed.unlink(missing_ok=True)
                raise KVExportError(f"KV export {export_id} failed in the engine: {message}")
            if time.monotonic() > deadline:
                raise KVExportError(f"KV export {export_id} did not arrive within {timeout_s} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        tensors = load_file(done)
        done.unlink(missing_ok=True)
        _expire(self.directory, self.ttl_s)
        return tensors["k"], tensors["v"]

    def drop(self, export_id: str) -> None:
        """Forget an export (a cancelled request): remove whatever the engine wrote for it."""
        for suffix in (_DONE, _FAILED):
            (self.directory / (check_export_id(export_id) + suffix)).unlink(missing_ok=True)

    def pending(self) -> list[str]:
        return sorted(p.name for p in self.directory.iterdir()) if self.directory.is_dir() else []

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
