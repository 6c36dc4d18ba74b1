"""The layers import one way (tests/import_contract.py): stages never imports serve_app or deploy,
serve_app never imports deploy, and the deploy tooling renders and checks manifests without torch,
vLLM or the Ray Serve runtime. Each check is shown to fail on a tree that breaks it."""
from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from import_contract import modules_loaded_by, violations

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_tree_keeps_the_import_contract():
    assert violations(REPO_ROOT) == []


def test_rendering_a_manifest_imports_no_torch_vllm_or_ray_serve(tmp_path):
    out = tmp_path / "m.yaml"
    code = dedent(f"""
        from deploy import cli, k8s_check, k8s_cli, k8s_render
        cli.build_parser([]).format_help()
        assert cli.main(["k8s", "render", "--stage-graph", "multi_gpu", "--image", "r/lance:1", "-o", {str(out)!r}]) == 0
    """)
    assert modules_loaded_by(code, REPO_ROOT) == []
    assert out.read_text().startswith("# Rendered by: lance-serve k8s render --stage-graph multi_gpu")


@pytest.mark.slow
def test_checking_a_manifest_imports_no_torch_or_vllm(crd):
    # Ray Serve's config schema is loaded here (import_contract.ALLOWED says why); the Serve app is not.
    code = dedent(f"""
        from deploy import k8s_check
        assert k8s_check.check_file({str(REPO_ROOT / "k8s" / "multi_gpu.yaml")!r}, {str(crd)!r}) == []
    """)
    assert modules_loaded_by(code, REPO_ROOT, watch=("torch", "vllm", "serve_app.builder")) == []


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dedent(text))
    for package in ("stages", "serve_app", "deploy"):
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()
    return root


def test_the_checker_reports_every_kind_of_violation(tmp_path):
    root = _tree(tmp_path, {
        "stages/core.py": "from serve_app.builder import build_app\n",
        "stages/registry.py": "COMMAND_MODULES = ('deploy.k8s_cli',)\n",           # an import by name
        "serve_app/builder.py": "import torch\n",
        "serve_app/settings.py": "from . import builder\n",
        "serve_app/uses_deploy.py": "def f():\n    import deploy.render\n",
        "deploy/render.py": "from serve_app.settings import x\n",                  # torch, two modules away
        "deploy/check.py": "def check():\n    from vllm import LLM\n",             # inside a function too
        "deploy/commands.py": "def run():\n    from stages.core import x\n",       # allowed: the command's own
        "deploy/k8s_check.py": "from ray.serve.schema import ServeDeploySchema\n",  # allowed only lazily
    })
    found = "\n".join(violations(root))
    expected = [
        "stages/core.py:1: stages imports serve_app.builder (stages never imports serve_app)",
        "stages/registry.py:1: stages imports deploy.k8s_cli (stages never imports deploy)",
        "serve_app/uses_deploy.py:2: serve_app imports deploy.render (serve_app never imports deploy)",
        "deploy/render.py: importing deploy.render imports torch via deploy.render -> serve_app.settings -> "
        "serve_app.builder (serve_app/builder.py:1)",
        "deploy/check.py:2: deploy imports vllm (deploy never imports vllm)",
        "deploy/k8s_check.py:1: deploy imports ray.serve.schema (deploy never imports ray.serve)",
    ]
    for line in expected:
        assert line in found, f"{line!r} not reported:\n{found}"
    assert "commands.py" not in found and len(found.splitlines()) == len(expected)


@pytest.mark.slow
def test_the_runtime_probe_sees_a_heavy_import_the_source_hides(tmp_path):
    root = _tree(tmp_path, {"deploy/render.py": "import importlib\nimportlib.import_module('to' + 'rch')\n"})
    assert violations(root) == []                     # invisible to a static reading ...
    assert modules_loaded_by("import deploy.render", root) == ["torch"]   # ... not to the probe
