"""No code runs when a file is loaded: enforced over the source tree, not promised in a README.

Unpickling runs whatever the file says (the reference loaded pickled whole models), and so do eval/exec of
text read from a file. The checker walks the syntax tree of every .py file in lora4diffusion/ and
benchmarks/ and fails on: importing pickle (or its relatives), ``torch.load`` without ``weights_only=True``,
any call with ``allow_pickle=True``, the builtins ``eval``/``exec``, ``yaml.load``, pandas' ``read_pickle``
and ``torch.jit.load``/``torch.package``. It is tested on snippets that break each rule, so a checker that
silently matches nothing would fail too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("lora4diffusion", "benchmarks")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal",
                  "torch.package"}


def _dotted(node: ast.AST) -> str:
    """``torch.jit.load`` for an Attribute chain, ``eval`` for a Name, '' otherwise."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def violations(source: str, filename: str = "<snippet>") -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in UNSAFE_MODULES or alias.name.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if module in UNSAFE_MODULES or module.split(".")[0] in UNSAFE_MODULES:
                found.append(f"{where}: from {module} import ...")
            if module == "torch" and any(a.name == "load" for a in node.names):  # would hide from the check
                found.append(f"{where}: from torch import load")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                found.append(f"{where}: {name}()")
            elif name == "torch.load" or name.endswith(".torch.load"):
                if not _is_true(keywords.get("weights_only")):
                    found.append(f"{where}: {name}() without weights_only=True")
            elif name in ("yaml.load", "yaml.unsafe_load") or name.endswith(("read_pickle", "jit.load")):
                found.append(f"{where}: {name}()")
            if _is_true(keywords.get("allow_pickle")):
                found.append(f"{where}: {name}(allow_pickle=True)")
    return found


@pytest.mark.parametrize("snippet", [
    "import pickle",
    "import pickle as p",
    "from pickle import loads",
    "import dill",
    "import joblib\njoblib.load('m.pkl')",
    "from torch.package import PackageImporter",
    "import torch\ntorch.load('m.pt')",
    "import torch\ntorch.load('m.pt', weights_only=False)",
    "import torch\ntorch.load('m.pt', map_location='cpu')",
    "import numpy as np\nnp.load('a.npz', allow_pickle=True)",
    "import numpy\nnumpy.load('a.npy', mmap_mode='r', allow_pickle=True)",
    "eval(open('cfg.txt').read())",
    "exec(Path('hook.py').read_text())",
    "import yaml\nyaml.load(open('c.yaml'))",
    "import pandas as pd\npd.read_pickle('x')",
    "import torch\ntorch.jit.load('m.pt')",
    "from torch import load\nload('m.pt', weights_only=True)",
])
def test_the_checker_catches_each_rule(snippet):
    assert violations(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('m.pt', weights_only=True)",
    "import numpy as np\nnp.load('a.npz', allow_pickle=False)",
    "model.eval()",
    "import json\njson.loads(text)",
    "from safetensors.torch import load_file\nload_file('m.safetensors')",
])
def test_the_checker_allows_safe_loading(snippet):
    assert violations(snippet) == []


def test_source_tree_never_runs_code_on_load():
    files = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 20  # the tree is really scanned
    found = [v for f in files for v in violations(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert found == []
