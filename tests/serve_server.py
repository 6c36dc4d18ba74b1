"""One `serve run configs/lance_2stage.yaml` for the whole test session (a pytest plugin, loaded by
conftest.py): tests/test_serve_e2e.py and tests/test_serve_playground.py share it.

The README's command exactly, as a subprocess on a fresh local Ray cluster, with LANCE_MODEL unset
and HOME a temp dir, so that on a CPU machine the app creates the tiny random-weights checkpoint in
HOME's cache and serves it. The tests that use the `server` fixture are run one after another, and
the server is stopped right after the last of them (not at the end of the session), so that it does
not hold its cluster while other heavy tests run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = "configs/lance_2stage.yaml"
VENV_BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 600
SERVER_FIXTURE = "server"


@dataclass
class Server:
    base_url: str
    proc: subprocess.Popen
    log_path: Path
    home: Path
    startup_s: float
    ray_tmp: Path | None = None   # the server's private RAY_TMPDIR (tests that join its cluster)

    def ray_address(self) -> str:
        """The GCS address of the server's local Ray cluster (the one cluster in its temp dir)."""
        port_file = next((self.ray_tmp / "ray" / "session_latest").glob("gcs_server_port_*"))
        return f"127.0.0.1:{port_file.read_text().strip()}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _config_port() -> int:
    return int(yaml.safe_load((REPO_ROOT / SERVE_CONFIG).read_text())["http_options"]["port"])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops `serve run` (it shuts Serve down, and its local Ray cluster with it);
    then the process group it leads, if anything is left. Idempotent."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            pass
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return   # nothing left of the group
        os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def _stop_and_free_port(proc: subprocess.Popen, port: int) -> None:
    _stop(proc)
    deadline = time.monotonic() + 30
    while _port_in_use(port) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _port_in_use(port), f"port {port} still open after `serve run` was stopped"


_running: list[tuple[subprocess.Popen, int]] = []


@contextlib.contextmanager
def serve_run(config: str | Path, home: Path, port: int, extra_env: dict | None = None):
    """`serve run <config>` as a subprocess on a fresh local Ray cluster in a private temp dir, with
    HOME=`home` and LANCE_MODEL unset (the tiny checkpoint is made in HOME's cache); yields the
    Server once /health answers 200 and stops it (and frees `port`) on exit."""
    log_path = home / "serve_run.log"
    ray_tmp = Path(tempfile.mkdtemp(prefix="lss", dir="/tmp"))   # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items()
           if k not in ("LANCE_MODEL", "LANCE_SERVE_CACHE_DIR", "XDG_CACHE_HOME", "RAY_ADDRESS")}
    env.update(HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_TMPDIR=str(ray_tmp),                          # its own: tests can find its GCS
               RAY_ADDRESS="local",                              # a fresh cluster, never another's
               RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION="0.05",  # small object store
               **(extra_env or {}))
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(["serve", "run", str(config)], cwd=REPO_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`serve run {config}` exited ({proc.returncode}):\n"
                            + log_path.read_text(errors="replace")[-6000:])
            if time.monotonic() - start > STARTUP_TIMEOUT_S:
                pytest.fail(f"not healthy after {STARTUP_TIMEOUT_S}s:\n"
                            + log_path.read_text(errors="replace")[-6000:])
            try:
                if httpx.get(f"{base_url}/health", timeout=15).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        yield Server(base_url, proc, log_path, home, time.monotonic() - start, ray_tmp)
    finally:
        _stop_and_free_port(proc, port)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# how long a test waits for one request to the shared server (the tiny model on 2 CPU cores)
REQUEST_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def http(server: Server):
    """Plain HTTP to the shared server."""
    with httpx.Client(base_url=server.base_url, timeout=REQUEST_TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    """OpenAI's SDK on the shared server, without its retries (a failure is the test's)."""
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S,
                         max_retries=0)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    port = _config_port()
    if _port_in_use(port):
        pytest.fail(f"port {port} ({SERVE_CONFIG} http_options.port) is already in use; "
                    "stop whatever listens there")
    # exactly the README's command (`make serve` runs it too)
    with serve_run(SERVE_CONFIG, tmp_path_factory.mktemp("home"), port) as running:
        _running.append((running.proc, port))   # stopped early by pytest_runtest_teardown below
        try:
            yield running
        finally:
            _running.remove((running.proc, port))


def _uses_server(item) -> bool:
    return SERVER_FIXTURE in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    """The tests that use the server run one after another, where the first of them was."""
    users = [item for item in items if _uses_server(item)]
    if not users:
        return
    first = items.index(users[0])
    others = [item for item in items if not _uses_server(item)]
    items[:] = others[:first] + users + others[first:]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Stop the server after the last test that uses it (its fixture teardown then finds it gone)."""
    if _running and _uses_server(item) and (nextitem is None or not _uses_server(nextitem)):
        for proc, port in list(_running):
            _stop_and_free_port(proc, port)
