"""Where exported contexts go between vLLM's worker and the thinker replica, and how they expire.

Worker side (`make_sink`, used by the connector): `put(export_id, K, V)`, `fail(export_id, message)`,
`expire()`. Replica side (`ExportClaims`, `RegistryClaims`): `claim(export_id)` -> `ClaimedExport`,
`drop(export_id)`, `pending()`, `close()`.

`shm` sink (default): one safetensors file per export in a directory the replica creates under /dev/shm
(tmpfs: a memory copy), renamed into place when complete; a failed export leaves a `.err` file. The
replica reads it and puts it in Ray's object store (the replica owns the object). Files older than
`ttl_s` are deleted by the worker at each export step and by the replica at each claim, so an export
whose caller went away (cancelled request, crashed replica) does not outlive the TTL. Needs the worker
and the replica on one host (vLLM's "mp" executor; the Ray executor when its workers share the node).

`ray` sink: the worker is (or joins, `ray.init(address=...)`) a Ray process and puts (K, V) itself; the
ObjectRef is parked in the replica's `ExportRegistry` actor until claimed, and dropped after `ttl_s`
otherwise. No copy through the replica and no shared filesystem (the Ray executor across nodes); the
worker process owns the objects, so they live as long as the engine.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import KVExportError

EXPORT_PARAM = "lance_export"
DEFAULT_TTL_S = 120.0
_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_DONE, _FAILED, _ABANDONED = ".kv", ".err", ".abandoned"


def check_export_id(export_id: str) -> str:
    if not _SAFE_ID.match(export_id) or export_id.startswith("."):
        raise ValueError(f"export id {export_id!r} must be 1-200 characters of [A-Za-z0-9_.-]")
    return export_id


@dataclass
class ClaimedExport:
    kv: Any           # (K, V) tensors, or an ObjectRef to them (ray sink)
    num_tokens: int
    nbytes: int


def make_sink(extra: dict):
    kind = extra.get("sink", "shm")
    if kind == "shm":
        return SharedMemorySink(Path(extra["export_dir"]), float(extra.get("ttl_s", DEFAULT_TTL_S)))
    if kind == "ray":
        return RayObjectStoreSink(extra["ray_address"], extra["namespace"], extra["registry"])
    raise ValueError(f"unknown KV export sink {kind!r} (supported: shm, ray)")


def make_claims(sink: str, ttl_s: float = DEFAULT_TTL_S):
    if sink == "shm":
        return ExportClaims(ttl_s)
    if sink == "ray":
        return RegistryClaims(ttl_s)
    raise ValueError(f"unknown KV export sink {sink!r} (supported: shm, ray)")


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
        abandoned = self.directory / (export_id + _ABANDONED)
        if abandoned.exists():  # its caller went away while this step ran (see ExportClaims.drop)
            final.unlink(missing_ok=True)
            abandoned.unlink(missing_ok=True)

    def fail(self, export_id: str, message: str) -> None:
        (self.directory / (check_export_id(export_id) + _FAILED)).write_text(message)

    def expire(self) -> int:
        return _expire(self.directory, self.ttl_s)

    def close(self) -> None:
        return


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").partition("[")[2].rstrip("]") or "0"
    except OSError:
        return "0"


# lance-kv-<pid namespace>-<owner pid>-<random>: the owner is known, so a directory whose owner died
# (a killed replica never runs its close()) can be found and removed
_DIR_NAME = re.compile(r"^lance-kv-(\d+)-(\d+)-[a-z0-9_]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process
        return True
    return True


def remove_orphaned_dirs(base: Path) -> list[str]:
    """Delete the export directories in `base` whose owner process is gone (a replica that was
    killed, or crashed: its unclaimed exports would hold tmpfs memory until the next boot). Only
    directories of this pid namespace: a pid of another one says nothing here."""
    namespace, removed = _pid_namespace(), []
    for path in base.iterdir() if base.is_dir() else ():
        match = _DIR_NAME.match(path.name)
        if match and match[1] == namespace and not _pid_alive(int(match[2])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


class ExportClaims:
    """The replica's end of the `shm` sink: owns the directory, claims and drops exports."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, root: str | Path | None = None):
        base = Path(root) if root is not None else (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
        base = base if base is not None else Path(tempfile.gettempdir())
        self.orphans_removed = remove_orphaned_dirs(base)
        self.directory = Path(tempfile.mkdtemp(prefix=f"lance-kv-{_pid_namespace()}-{os.getpid()}-", dir=base))
        self.ttl_s = ttl_s

    def connector_config(self) -> dict:
        return {"sink": "shm", "export_dir": str(self.directory), "ttl_s": self.ttl_s}

    async def claim(self, export_id: str, timeout_s: float = 30.0) -> ClaimedExport:
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
        k, v = tensors["k"], tensors["v"]
        return ClaimedExport((k, v), k.shape[1], k.numel() * k.element_size() + v.numel() * v.element_size())

    def drop(self, export_id: str) -> None:
        """Forget an export (a cancelled request). Race-free with a step still writing it: the marker goes
        first, so either we see the file and delete it, or the writer sees the marker and deletes it."""
        (self.directory / (check_export_id(export_id) + _ABANDONED)).touch()
        for suffix in (_DONE, _FAILED):
            (self.directory / (export_id + suffix)).unlink(missing_ok=True)

    def pending(self) -> list[str]:
        """Exports written and not claimed yet (abandoned markers excluded)."""
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if not p.name.endswith(_ABANDONED))

    async def num_pending(self) -> int:
        return len(self.pending())

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# ray sink


class RayObjectStoreSink:
    """Worker side: `ray.put` in the worker, the ref parked in the replica's registry actor."""

    def __init__(self, address: str, namespace: str, registry: str):
        import ray

        if not ray.is_initialized():  # an "mp" worker joins the replica's cluster; a Ray-executor worker is in it
            ray.init(address=address, namespace=namespace, log_to_driver=False, include_dashboard=False)
        self._ray = ray
        self._registry = ray.get_actor(registry, namespace=namespace)

    def put(self, export_id: str, k: torch.Tensor, v: torch.Tensor) -> None:
        k, v = k.contiguous().cpu(), v.contiguous().cpu()
        ref = self._ray.put((k, v))
        nbytes = k.numel() * k.element_size() + v.numel() * v.element_size()
        # Parked before the step returns, so the export exists when the caller sees the request's output.
        self._ray.get(self._registry.park.remote(check_export_id(export_id), [ref], k.shape[1], nbytes))

    def fail(self, export_id: str, message: str) -> None:
        self._ray.get(self._registry.fail.remote(export_id, message))

    def expire(self) -> int:
        return 0  # the registry expires what it holds

    def close(self) -> None:
        return


class ExportRegistry:
    """Ray actor holding exported ObjectRefs until claimed or expired (the replica owns it)."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._parked: dict[str, tuple[float, list | None, int, int, str | None]] = {}
        self._arrived: dict[str, asyncio.Event] = {}
        self._abandoned: dict[str, float] = {}  # dropped before they arrived: discard on arrival

    def _event(self, export_id: str) -> asyncio.Event:
        return self._arrived.setdefault(export_id, asyncio.Event())

    async def park(self, export_id: str, refs: list, num_tokens: int, nbytes: int) -> None:
        self._expire()
        if self._abandoned.pop(export_id, None) is not None:
            return  # its caller went away while the step ran: let the object go
        self._parked[export_id] = (time.monotonic(), refs, num_tokens, nbytes, None)
        self._event(export_id).set()

    async def fail(self, export_id: str, message: str) -> None:
        self._parked[export_id] = (time.monotonic(), None, 0, 0, message)
        self._event(export_id).set()

    async def claim(self, export_id: str, timeout_s: float) -> tuple[list | None, int, int, str | None]:
        try:
            await asyncio.wait_for(self._event(export_id).wait(), timeout_s)
        except asyncio.TimeoutError:
            self._arrived.pop(export_id, None)
            return None, 0, 0, f"KV export {export_id} did not arrive within {timeout_s} s"
        self._arrived.pop(export_id, None)
        _, refs, num_tokens, nbytes, error = self._parked.pop(export_id)
        return refs, num_tokens, nbytes, error

    async def drop(self, export_id: str) -> None:
        if self._parked.pop(export_id, None) is None:
            self._abandoned[export_id] = time.monotonic()
        self._arrived.pop(export_id, None)

    async def pending(self) -> list[str]:
        self._expire()
        return sorted(self._parked)

    def _expire(self) -> None:
        now = time.monotonic()
        for export_id in [e for e, p in self._parked.items() if now - p[0] > self.ttl_s]:
            del self._parked[export_id]  # its ObjectRef goes with it: Ray frees the object
        for export_id in [e for e, t in self._abandoned.items() if now - t > self.ttl_s]:
            del self._abandoned[export_id]


class RegistryClaims:
    """Replica side of the `ray` sink: creates the registry actor, claims refs from it."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S):
        import ray

        ctx = ray.get_runtime_context()
        self.namespace, self.address = ctx.namespace, ctx.gcs_address
        self.name = f"lance-kv-registry-{uuid.uuid4().hex[:12]}"
        self.ttl_s = ttl_s
        actor = ray.remote(num_cpus=0)(ExportRegistry)
        self.registry = actor.options(name=self.name, namespace=self.namespace).remote(ttl_s)
        ray.get(self.registry.pending.remote())  # up before any worker looks for it

    def connector_config(self) -> dict:
        return {"sink": "ray", "ray_address": self.address, "namespace": self.namespace, "registry": self.name,
                "ttl_s": self.ttl_s}

    async def claim(self, export_id: str, timeout_s: float = 30.0) -> ClaimedExport:
        refs, num_tokens, nbytes, error = await self.registry.claim.remote(export_id, timeout_s)
        if error is not None:
            raise KVExportError(error)
        return ClaimedExport(refs[0], num_tokens, nbytes)

    def drop(self, export_id: str) -> None:
        self.registry.drop.remote(export_id)

    def pending(self) -> list[str]:
        import ray

        return ray.get(self.registry.pending.remote())

    async def num_pending(self) -> int:
        return len(await self.registry.pending.remote())

    def close(self) -> None:
        import ray

        ray.kill(self.registry)
