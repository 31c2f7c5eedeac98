#!/usr/bin/env python
"""Check the package layout that README's module map promises; exit 1 on any breach.

- no import circle between pc_clip modules, counting imports inside functions;
- a stage imports only itself and the stages below it (STAGES, lowest first); the entry-level modules (TOP:
  `preflight`, `kernels`, `reproduce`, `cli`, `compare`) sit on top, in that order;
- no module defines a module-level `__getattr__` (no re-export shims);
- no stage folder holds more than MAX_MODULES modules.
Run: python tools/check_layout.py  (part of `make test`)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

STAGES = ["core", "world", "data", "models", "differences", "evaluation", "training", "t2i", "report", "studies",
          "smoke"]
# entry-level modules above every stage, lowest first: the preflight and the kernels, the notebook runner on them,
# then the entry points (`pc-clip` and `python -m pc_clip.compare`); each may import any stage and the ones below it
TOP = {"preflight": len(STAGES), "kernels": len(STAGES), "reproduce": len(STAGES) + 1, "cli": len(STAGES) + 2,
       "compare": len(STAGES) + 2}
MAX_MODULES = 10
PKG = Path(__file__).resolve().parents[1] / "pc_clip"


def module_name(path: Path, pkg: Path = PKG) -> str:
    rel = path.relative_to(pkg.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    "Every pc_clip module `path` imports, at any depth of the code (inside functions too)."
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != "pc_clip":
                found.add(t)
    found.discard(name)
    return found


def stage_rank(mod: str) -> int | None:
    parts = mod.split(".")
    if len(parts) < 2:
        return None
    if parts[1] in TOP:
        return TOP[parts[1]]
    return STAGES.index(parts[1]) if parts[1] in STAGES else None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    "Strongly connected components with more than one module (Tarjan), each a circle of imports."
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w); low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def check(pkg: Path = PKG) -> list[str]:
    files = sorted(p for p in pkg.rglob("*.py") if p.name != "_modidx.py")
    names = {module_name(p, pkg): p for p in files}
    known = set(names)
    graph = {n: {m for m in imported_modules(p, n, known) if not names[m].name == "__init__.py" or m in known}
             for n, p in names.items()}
    problems = []
    for comp in find_cycles(graph):
        problems.append("import circle: " + " <-> ".join(comp))
    for n, deps in sorted(graph.items()):
        r = stage_rank(n)
        if r is None:
            continue
        for d in sorted(deps):
            rd = stage_rank(d)
            if rd is not None and rd > r:
                problems.append(f"{n} imports {d}: a stage may import only the stages below it ({' < '.join(STAGES)})")
    for n, p in names.items():
        tree = ast.parse(p.read_text())
        if any(isinstance(x, ast.FunctionDef) and x.name == "__getattr__" for x in tree.body):
            problems.append(f"{n} defines a module __getattr__ (a re-export shim): import names from where they live")
    for stage in STAGES:
        mods = [p for p in (pkg / stage).glob("*.py") if p.name != "__init__.py"]
        if len(mods) > MAX_MODULES:
            problems.append(f"pc_clip/{stage}/ holds {len(mods)} modules (at most {MAX_MODULES})")
    stray = [p.name for p in pkg.glob("*.py") if p.stem not in TOP and p.name not in ("__init__.py", "_modidx.py")]
    if stray:
        problems.append(f"modules outside any stage folder: {stray}")
    return problems


if __name__ == "__main__":
    problems = check(Path(sys.argv[1]) if len(sys.argv) > 1 else PKG)
    print("\n".join(problems) if problems else "layout ok: stages in order, no import circles, no shims")
    sys.exit(1 if problems else 0)
