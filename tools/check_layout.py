#!/usr/bin/env python
"""Check the package layout that README's module map promises; exit 1 on any breach.

- no import circle between pc_clip modules, counting imports inside functions;
- a stage imports only itself and the stages below it (STAGES, lowest first); the entry-level modules (TOP:
  `preflight`, `kernels`, `reproduce`, `cli`, `compare`) sit on top, in that order;
- no module defines a module-level `__getattr__` (no re-export shims);
- no stage folder holds more than MAX_MODULES modules;
- only the orchestrating modules (CONFIG_MODULES) define top-level functions that take a `Config` (a parameter
  annotated `Config` or named cfg / cfg_or_root / cfg_or_path); everything below them takes explicit values.
Run: python tools/check_layout.py  (part of `make test`)."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

STAGES = ["core", "world", "data", "models", "differences", "evaluation", "training", "t2i", "report",
          "studies", "smoke"]
# entry-level modules above every stage, lowest first: the preflight and the kernels, the notebook runner
# on them, then the entry points (`pc-clip` and `python -m pc_clip.compare`); each may import any stage
# and the ones below it
TOP = {"preflight": len(STAGES), "kernels": len(STAGES), "reproduce": len(STAGES) + 1, "cli": len(STAGES) + 2,
       "compare": len(STAGES) + 2}
MAX_MODULES = 10
# the modules that orchestrate a stage and so may read the run's Config (a name ending in ".*": the whole
# package); every top-level entry module (pc_clip/<name>.py: cli, compare, ...) may too
CONFIG_MODULES = ("cli", "compare", "core.config", "core.run", "core.registry", "evaluation.runner",
                  "training.plan", "training.sweep", "t2i.study", "report.build", "studies.*", "smoke.*")
CONFIG_NAMES = {"cfg", "cfg_or_root", "cfg_or_path"}
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


def may_take_config(mod: str, allowed=CONFIG_MODULES) -> bool:
    """Whether module `mod` (pc_clip.x.y) orchestrates and so may take a Config: one of `allowed`, or an
    entry module (pc_clip.x)."""
    rel = mod.split(".", 1)[1] if "." in mod else mod
    entry = "." not in rel and rel not in STAGES  # a top-level entry module: cli, compare, ...
    return entry or any(rel == a or (a.endswith(".*") and rel.startswith(a[:-1])) for a in allowed)


def _is_config(arg: ast.arg) -> bool:
    if arg.arg in CONFIG_NAMES:
        return True
    ann = arg.annotation
    names = {n.id for n in ast.walk(ann) if isinstance(n, ast.Name)} if ann is not None else set()
    names |= {n.attr for n in ast.walk(ann) if isinstance(n, ast.Attribute)} if ann is not None else set()
    if isinstance(ann, ast.Constant) and isinstance(ann.value, str):  # a string annotation
        names |= set(re.findall(r"\w+", ann.value))
    return "Config" in names


def config_functions(path: Path) -> list[str]:
    "The top-level functions of the module at `path` with a parameter that takes a Config."
    out = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            if any(_is_config(x) for x in a.posonlyargs + a.args + a.kwonlyargs):
                out.append(node.name)
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
                problems.append(f"{n} imports {d}: a stage may import only the stages below it "
                                f"({' < '.join(STAGES)})")
    for n, p in names.items():
        tree = ast.parse(p.read_text())
        if any(isinstance(x, ast.FunctionDef) and x.name == "__getattr__" for x in tree.body):
            problems.append(f"{n} defines a module __getattr__ (a re-export shim): "
                            "import names from where they live")
    for n, p in sorted(names.items()):
        if not may_take_config(n):
            for f in config_functions(p):
                problems.append(f"{n}.{f} takes a Config: only the orchestrating modules "
                                f"({', '.join(CONFIG_MODULES)}) may; pass it explicit values (an adapter "
                                "such as core.config.embedding_options keeps the call one line)")
    for stage in STAGES:
        mods = [p for p in (pkg / stage).glob("*.py") if p.name != "__init__.py"]
        if len(mods) > MAX_MODULES:
            problems.append(f"pc_clip/{stage}/ holds {len(mods)} modules (at most {MAX_MODULES})")
    stray = [p.name for p in pkg.glob("*.py")
             if p.stem not in TOP and p.name not in ("__init__.py", "_modidx.py")]
    if stray:
        problems.append(f"modules outside any stage folder: {stray}")
    return problems


if __name__ == "__main__":
    problems = check(Path(sys.argv[1]) if len(sys.argv) > 1 else PKG)
    print("\n".join(problems) if problems
          else "layout ok: stages in order, no import circles, no shims, Config read at the edges")
    sys.exit(1 if problems else 0)
