"""Shared test fixtures: the golden data (tiny checkpoint + upstream outputs) and its comparison rule, and
an event loop per module for the tests that run vLLM in-process."""
from __future__ import annotations

import asyncio
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_MARK = re.compile(r"^pytestmark = pytest\.mark\.(\w+)", re.M)


def pytest_ignore_collect(collection_path: Path, config):
    """With `-m "not heavy"` (make test-fast), a module marked heavy as a whole is not even imported:
    importing vLLM and Ray Serve alone takes seconds on 2 cores."""
    markexpr = config.getoption("markexpr") or ""
    if collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        marks = MODULE_MARK.findall(collection_path.read_text())
        if any(f"not {mark}" in markexpr for mark in marks):
            return True
    return None


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """$LANCE_GOLDEN_DIR, default <repo>/../shared/golden; missing goldens fail the run (never skip)."""
    path = Path(os.environ.get("LANCE_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))
    if not (path / "cases").is_dir():
        pytest.fail(f"golden data not found at {path} (set LANCE_GOLDEN_DIR)")
    return path


@pytest.fixture(scope="session")
def crd() -> Path:
    """The KubeRay RayService CRD: $LANCE_KUBERAY_CRD, default <repo>/../shared/kuberay/ray.io_rayservices.yaml;
    missing fails."""
    path = Path(os.environ.get("LANCE_KUBERAY_CRD",
                               REPO_ROOT.parent / "shared" / "kuberay" / "ray.io_rayservices.yaml"))
    if not path.is_file():
        pytest.fail(f"RayService CRD not found at {path} (set LANCE_KUBERAY_CRD)")
    return path


@pytest.fixture(scope="session")
def tiny_ckpt_dir(golden_dir: Path) -> Path:
    return golden_dir / "tiny_ckpt"


@pytest.fixture(scope="session")
def golden(golden_dir: Path):
    """golden(case) -> dict of the case's tensors (cases/<case>/tensors.safetensors), cached."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def load(case: str) -> dict[str, torch.Tensor]:
        if case not in cache:
            path = golden_dir / "cases" / case / "tensors.safetensors"
            if not path.is_file():
                pytest.fail(f"golden case {case!r} missing: {path}")
            cache[case] = load_file(str(path))
        return cache[case]

    return load


@pytest.fixture(scope="session")
def assert_golden(golden_dir: Path):
    """assert_golden(actual, expected, name): the goldens' own compare.py rule (default tolerance:
    max_abs <= 1e-5 + 1e-4 * max|golden|; ints exact; uint8 images +-1; leading singleton dims ignored)."""
    spec = importlib.util.spec_from_file_location("lance_golden_compare", golden_dir / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)

    def check(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor", atol=1e-5, rtol=1e-4) -> None:
        status, message = compare.compare_one(expected.detach().cpu().numpy(), actual.detach().cpu().numpy(),
                                               atol, rtol)
        assert status == "PASS", f"{name}: {message}"

    return check


# One `serve run` for the session, shared by the end-to-end and browser tests (tests/serve_server.py).
pytest_plugins = ["serve_server"]


@pytest.fixture(scope="module")
def loop():
    """An event loop per test module: vLLM's AsyncLLM binds to the loop of its first request."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()
