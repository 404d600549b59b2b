"""How readable is the house? Import cycles, in-function imports, the longest files and classes, and the lines
on the learner's reading path (docs/ARCHITECTURE.md), from the source alone (ast; runs nothing).

    python benchmarks/house.py                 # this checkout
    python benchmarks/house.py --root DIR      # another checkout (e.g. a `git worktree` of an older commit)

Upward imports are import-linter's job (the layers contract in pyproject.toml; tests/test_architecture.py).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

# The reading path of docs/ARCHITECTURE.md: tokenizer -> text encoder -> UNet -> diffusion -> VAE -> LoRA
# layer -> LoRA training (paths relative to the package).
READING_PATH = [
    "models/tokenizer.py", "models/text_encoder.py", "models/unet.py", "models/prompt_unet.py",
    "diffusion.py", "models/vae.py", "latents.py", "lora/method.py", "lora/lora.py", "lora/layers.py",
    "training/loop.py", "training/lora.py",
]


def modules(pkg: Path) -> dict[str, Path]:
    out = {}
    for f in sorted(pkg.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        parts = list(f.relative_to(pkg.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def own_imports(name: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported module of ours, at the top of the file?) for every import statement."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = set(tree.body)
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            if t in known and t != name:
                found.append((t, node in top))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def longest_classes(mods: dict[str, Path], n: int = 3) -> list[tuple[int, str]]:
    sizes = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                sizes.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(sizes, reverse=True)[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    args = ap.parse_args()
    pkg = Path(args.root) / "lora4diffusion"
    mods = modules(pkg)
    graph = {m: set() for m in mods}
    lazy = 0
    for name, path in mods.items():
        for target, at_top in own_imports(name, path, set(mods)):
            graph[name].add(target)
            lazy += not at_top
    lines = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in mods.items()}
    found = cycles(graph)
    print(f"modules: {len(mods)}, lines: {sum(lines.values())}")
    print(f"import cycles: {len(found)}" + "".join(f"\n  {len(c)}: {', '.join(c)}" for c in found))
    print(f"in-function imports of our own modules: {lazy}")
    longest = sorted(lines.items(), key=lambda x: -x[1])[:3]
    print("longest files: " + ", ".join(f"{m} {n}" for m, n in longest))
    print("longest classes: " + ", ".join(f"{c} {n}" for n, c in longest_classes(mods)))
    path = [(f, len((pkg / f).read_text(encoding="utf-8").splitlines())) for f in READING_PATH
            if (pkg / f).is_file()]
    print(f"reading path: {sum(n for _, n in path)} lines in {len(path)} files ("
          + ", ".join(f"{f} {n}" for f, n in path) + ")")


if __name__ == "__main__":
    main()
