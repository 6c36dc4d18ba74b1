"""The import contract: the three layers import one way.

    stages/     the model core and the two stages       never imports serve_app or deploy
    serve_app/  the Ray Serve application               never imports deploy
    deploy/     the lance-serve CLI and k8s tooling     never imports torch, vLLM or Ray Serve, neither
                itself nor through a project module it imports when it is imported; a command
                may import the model core (stages/) inside the command

`violations(root)` reads the sources (it imports nothing) and names each import that breaks a rule,
with its file and line. `modules_loaded_by(code, root)` runs code in a fresh interpreter and says
which of the heavy packages it loaded, for what a static reading cannot see.
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("stages", "serve_app", "deploy")
NEVER_IMPORTS = {"stages": ("serve_app", "deploy"), "serve_app": ("deploy",)}
HEAVY = ("torch", "vllm", "ray.serve")
MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.\w+)+(:\w+)?$")     # "serve_app.k8s_cli", "pkg.mod:attr"
# (module, import) pairs the contract allows inside a function (never at import time), and why.
ALLOWED = {
    ("deploy.k8s_check", "ray.serve.schema"):
        "Ray's ServeDeploySchema (pydantic, with Ray's own validators) is the truth for serveConfigV2; "
        "imported only inside the check, never when deploy is imported or a manifest rendered",
}


@dataclass(frozen=True)
class Import:
    module: str             # the importing module
    target: str             # the imported module (dotted)
    line: int
    at_import_time: bool    # runs when the importing module is imported (not inside a function)


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def project_modules(root: Path) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            runs_on_import = not in_function
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - child.level + 1] + ([base] if base else []))
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                subs = [f"{base}.{a.name}" for a in child.names if f"{base}.{a.name}" in modules]
                targets = subs or [base]
            elif (isinstance(child, ast.Constant) and isinstance(child.value, str)
                  and MODULE_NAME.match(child.value) and child.value.split(".")[0] in PACKAGES):
                # a project module named for an import by name (importlib.import_module, a registry of
                # command modules, an import_path): an import all the same, run later
                targets, runs_on_import = [child.value.partition(":")[0]], False
            found.extend(Import(module, t, child.lineno, runs_on_import) for t in targets)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def _with_parents(name: str) -> list[str]:
    """Importing a.b.c runs a/__init__, a/b/__init__ and a/b/c."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def violations(root: Path) -> list[str]:
    root = Path(root)
    modules = project_modules(root)
    imports = {m: _imports(m, p, modules) for m, p in modules.items()}

    def where(imp: Import) -> str:
        return f"{modules[imp.module].relative_to(root)}:{imp.line}"

    problems = []
    for module, found in imports.items():
        layer = module.split(".")[0]
        for imp in found:
            for banned in NEVER_IMPORTS.get(layer, ()):
                if _under(imp.target, banned):
                    problems.append(f"{where(imp)}: {layer} imports {imp.target} ({layer} never imports {banned})")
            allowed = (module, imp.target) in ALLOWED and not imp.at_import_time
            if layer == "deploy" and not allowed:
                for heavy in HEAVY:
                    if _under(imp.target, heavy):
                        problems.append(f"{where(imp)}: deploy imports {imp.target} (deploy never imports {heavy})")

    # What importing each deploy module runs: its import-time imports, through the project's modules.
    for start in (m for m in modules if _under(m, "deploy")):
        chain = {start: [start]}
        todo = [start]
        reported = set()
        while todo:
            module = todo.pop()
            for imp in imports[module]:
                if not imp.at_import_time:
                    continue
                heavy = next((h for h in HEAVY if _under(imp.target, h)), None)
                if heavy and module != start and heavy not in reported:
                    reported.add(heavy)
                    problems.append(f"{modules[start].relative_to(root)}: importing {start} imports {heavy} "
                                    f"via {' -> '.join(chain[module])} ({where(imp)})")
                for name in _with_parents(imp.target):
                    if name in modules and name not in chain:
                        chain[name] = chain[module] + [name]
                        todo.append(name)
    return problems


def modules_loaded_by(code: str, root: Path, watch: tuple[str, ...] = HEAVY) -> list[str]:
    """Which of `watch` a fresh interpreter has loaded after running `code` with `root` first on its path."""
    probe = (f"{code}\nimport json, sys\n"
             f"print(json.dumps([m for m in {list(watch)!r} if m in sys.modules]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"probe failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    found = violations(Path(__file__).resolve().parents[1])
    print("\n".join(found) or "import contract holds")
    sys.exit(1 if found else 0)
