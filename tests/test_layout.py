"""The package layout's rules: imports only go down, and each stage's surface is lazy."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Rank of each layer: a module may import its own sub-package or a lower rank, never a peer.
LAYERS = {
    "stores": 0,
    "pipeline": 1,  # the shared top-level modules: defaults, errors, home, plots, terminal, threads
    "pipeline.embed": 2,
    "pipeline.augment": 2,
    "pipeline.heads": 3,
    "pipeline.evaluation": 4,
    "pipeline.finetune": 4,  # end to end: models and images of embed, heads, augmentations
    "benchmarks": 5,
    "flows": 6,
}
STAGES = (
    "pipeline.embed",
    "pipeline.augment",
    "pipeline.heads",
    "pipeline.evaluation",
    "pipeline.finetune",
)


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "pipeline" and len(parts) > 1 and f"pipeline.{parts[1]}" in LAYERS:
        return f"pipeline.{parts[1]}"
    return parts[0]


def _imports(path: Path) -> list[str]:
    """Every absolute first-party module ``path`` imports (lazy imports inside functions too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return [m for m in out if m.split(".")[0] in {"stores", "pipeline", "benchmarks", "flows"}]


def test_imports_only_go_down():
    upward = []
    for top in ("stores", "pipeline", "benchmarks", "flows"):
        for path in sorted((ROOT / top).rglob("*.py")):
            me = _layer(".".join(path.relative_to(ROOT).with_suffix("").parts))
            for target in _imports(path):
                other = _layer(target)
                if other != me and LAYERS[other] >= LAYERS[me]:
                    upward.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("package", STAGES)
def test_every_public_name_resolves_to_its_module(package):
    pkg = importlib.import_module(package)
    assert pkg.__all__ and sorted(pkg.__all__) == pkg.__all__ == dir(pkg)
    modules = {p.stem for p in (ROOT / package.replace(".", "/")).glob("*.py")}
    # importing sub-module m sets attribute m on the package: an export named m would vanish
    assert not modules & set(pkg.__all__), modules & set(pkg.__all__)
    for name in pkg.__all__:
        value = getattr(pkg, name)
        assert getattr(value, "__module__", "").startswith(package), (name, value)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pkg.nope  # noqa: B018


def test_a_stage_module_imports_only_what_it_needs():
    code = (
        "import sys, pipeline.heads.bank, pipeline.augment.carrot\n"
        "print(sorted(m for m in ('sklearn', 'timm', 'zarr', 'prefect', 'pipeline.heads.baseline',"
        " 'pipeline.embed.backbone') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_the_command_line_starts_without_torch_timm_or_prefect():
    """`carrot server status`, `--help` and a command forwarded to the warm runner pay for
    argument parsing only; the heavy libraries load where a command runs."""
    code = (
        "import sys, flows.cli\n"
        "flows.cli.build_parser()\n"
        "print(sorted(m for m in ('torch', 'timm', 'prefect', 'zarr', 'sklearn', 'dask')"
        " if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
