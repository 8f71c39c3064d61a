"""Packaging rules: one version number, the front-end extension found by Jupyter, example notebooks committed
without outputs, and every third-party module the code imports declared in pyproject.toml."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import sys
import tomllib
from pathlib import Path

import jupyter_swarm

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_version_number() -> None:
    version = PYPROJECT["project"]["version"]
    for package_json in ("labextension/package.json", "jupyter_swarm/labextension/package.json"):
        assert json.loads((ROOT / package_json).read_text())["version"] == version, \
            f"{package_json} must carry pyproject.toml's version {version} (rebuild the extension after a bump)"
    assert jupyter_swarm.__version__ == version, "reinstall (pip install -e .) after changing the version"


def test_jupyter_finds_the_prebuilt_extension() -> None:
    [paths] = jupyter_swarm._jupyter_labextension_paths()
    built = Path(jupyter_swarm.__file__).parent / paths["src"]
    assert json.loads((built / "package.json").read_text())["name"] == paths["dest"]
    assert list((built / "static").glob("remoteEntry.*.js"))
    shared = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["shared-data"]
    assert shared["jupyter_swarm/labextension"] == f"share/jupyter/labextensions/{paths['dest']}"


def test_example_notebooks_are_committed_without_outputs() -> None:
    """The rule for examples/: no outputs, no execution counts (the tests and readers run them)."""
    notebooks = sorted((ROOT / "examples").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in cells), \
            f"{path.name} has outputs: clear them (jupyter nbconvert --clear-output --inplace {path.name})"


def _declared_distributions() -> set[str]:
    project = PYPROJECT["project"]
    requirements = [*project["dependencies"], *[r for extra in project["optional-dependencies"].values()
                                                for r in extra]]
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def _imported_modules(folder: Path) -> set[str]:
    modules = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def test_every_imported_package_is_declared() -> None:
    declared = _declared_distributions() | {"jupyter-swarm"}
    providers = importlib.metadata.packages_distributions()
    ours = {"jupyter_swarm", "jupyter_swarm_server", "tests", "bench", "timeline_hooks", "profile_hooks",
            "latency_proxy", "bench_inference", "profile_summary", "bench_quant", "bench_latency"}  # our own modules (bench/ imports its neighbours)
    undeclared = {}
    for folder in ("jupyter_swarm", "server", "bench"):
        for module in _imported_modules(ROOT / folder) - ours - set(sys.stdlib_module_names):
            dists = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
            if not dists & declared:
                undeclared[module] = sorted(dists)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
