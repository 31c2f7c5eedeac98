"The package layout the README's module map promises: stages in order, no circles, no shims, stand-ins as a leaf."
import ast
import subprocess
import sys
import textwrap
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import check_layout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_the_library_keeps_its_layout():
    assert check_layout.check() == []


def test_the_checker_finds_a_circle_an_upward_import_and_a_shim(tmp_path):
    pkg = tmp_path / "pc_clip"
    for stage in ("core", "world", "training"):
        (pkg / stage).mkdir(parents=True)
        (pkg / stage / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from pc_clip.core.b import g  # inside a function: still an arrow\n")
    (pkg / "core" / "b.py").write_text("from .a import f\n")
    (pkg / "world" / "w.py").write_text("from ..training.t import x\n\ndef __getattr__(name):\n    raise AttributeError(name)\n")
    (pkg / "training" / "t.py").write_text("x = 1\n")
    problems = check_layout.check(pkg)
    assert any(p.startswith("import circle: pc_clip.core.a <-> pc_clip.core.b") for p in problems), problems
    assert any("pc_clip.world.w imports pc_clip.training.t" in p for p in problems), problems
    assert any("pc_clip.world.w defines a module __getattr__" in p for p in problems), problems
    (pkg / "core" / "a.py").write_text("x = 2\n")
    (pkg / "world" / "w.py").write_text("from ..core.b import f\n")
    assert check_layout.check(pkg) == []


def test_the_evaluation_runner_does_not_load_the_stand_ins():
    code = textwrap.dedent("""
        import sys
        import pc_clip.evaluation.runner, pc_clip.training.plan, pc_clip.training.sweep, pc_clip.report.build
        print(sorted(m for m in sys.modules if m.startswith("pc_clip.smoke")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_no_module_defines_a_module_getattr():
    for p in (ROOT / "pc_clip").rglob("*.py"):
        tree = ast.parse(p.read_text())
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), p


MAX_NOTEBOOK_CODE_LINES = 600


def notebook_code_lines(path: Path) -> int:
    "Lines in the code cells of a notebook (markdown prose not counted)."
    import json
    cells = json.loads(path.read_text())["cells"]
    return sum(len("".join(c["source"]).splitlines()) for c in cells if c["cell_type"] == "code")


def test_no_library_notebook_is_over_600_code_lines():
    "A library notebook (every notebook under nbs/ but the experiments) reads as one story: split it past 600 code lines."
    notebooks = [p for p in (ROOT / "nbs").rglob("*.ipynb") if "experiments" not in p.relative_to(ROOT / "nbs").parts
                 and ".ipynb_checkpoints" not in p.parts]
    assert len(notebooks) > 40
    over = {str(p.relative_to(ROOT)): n for p in notebooks if (n := notebook_code_lines(p)) > MAX_NOTEBOOK_CODE_LINES}
    assert not over, over
