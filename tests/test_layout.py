"""The package layout the README's module map promises: stages in order, no circles, no shims, stand-ins as a
leaf."""
import ast
import subprocess
import sys
import textwrap

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import check_layout  # noqa: E402


def test_the_library_keeps_its_layout():
    assert check_layout.check() == []


def test_the_checker_finds_a_circle_an_upward_import_and_a_shim(tmp_path):
    pkg = tmp_path / "pc_clip"
    for stage in ("core", "world", "training"):
        (pkg / stage).mkdir(parents=True)
        (pkg / stage / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from pc_clip.core.b import g  # inside a function: "
                                       "still an arrow\n")
    (pkg / "core" / "b.py").write_text("from .a import f\n")
    (pkg / "world" / "w.py").write_text("from ..training.t import x\n\ndef __getattr__(name):\n    raise "
                                        "AttributeError(name)\n")
    (pkg / "training" / "t.py").write_text("x = 1\n")
    problems = check_layout.check(pkg)
    assert any(p.startswith("import circle: pc_clip.core.a <-> pc_clip.core.b") for p in problems), problems
    assert any("pc_clip.world.w imports pc_clip.training.t" in p for p in problems), problems
    assert any("pc_clip.world.w defines a module __getattr__" in p for p in problems), problems
    (pkg / "core" / "a.py").write_text("x = 2\n")
    (pkg / "world" / "w.py").write_text("from ..core.b import f\n")
    assert check_layout.check(pkg) == []


def test_the_checker_finds_a_config_below_the_orchestrating_modules(tmp_path):
    """A module outside the orchestrating ones with a top-level function taking a Config is named, with the
    function."""
    pkg = tmp_path / "pc_clip"
    for stage in ("core", "models", "evaluation"):
        (pkg / stage).mkdir(parents=True)
        (pkg / stage / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "config.py").write_text("class Config:\n    pass\n\n"
                                            "def validate_config(cfg: Config):\n    return []\n")
    (pkg / "models" / "embed.py").write_text(textwrap.dedent("""
        from ..core.config import Config

        def embed_texts(model, texts, cfg):  # by name
            return cfg.precision

        def load(folder, settings: "Config | None" = None):  # by annotation, as a string
            return folder

        def encode(model, texts, precision: str = "auto"):  # explicit values: fine
            def inner(cfg):  # not top level: fine
                return cfg
            return inner
    """))
    # allowed: evaluation.runner is an orchestrating module
    (pkg / "evaluation" / "runner.py").write_text("def run_zero_shot(cfg, models):\n    return []\n")
    problems = check_layout.check(pkg)
    named = sorted(p.split(" takes a Config")[0] for p in problems if " takes a Config" in p)
    assert named == ["pc_clip.models.embed.embed_texts", "pc_clip.models.embed.load"], problems
    assert check_layout.may_take_config("pc_clip.studies.noise_curve")
    assert not check_layout.may_take_config("pc_clip.models.clip")
    assert check_layout.may_take_config("pc_clip.reproduce")  # a top-level entry module
    (pkg / "models" / "embed.py").write_text("def embed_texts(model, texts, precision='auto'):\n"
                                             "    return precision\n")
    assert check_layout.check(pkg) == []
    checker = [sys.executable, str(REPO / "tools" / "check_layout.py"), str(pkg)]
    out = subprocess.run(checker, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    (pkg / "models" / "clip.py").write_text("def load_clip(cfg_or_root, name):\n    return name\n")
    out = subprocess.run(checker, capture_output=True, text=True)
    assert out.returncode == 1 and "pc_clip.models.clip.load_clip takes a Config" in out.stdout, out.stdout


def test_the_evaluation_runner_does_not_load_the_stand_ins():
    code = textwrap.dedent("""
        import sys
        import pc_clip.evaluation.runner, pc_clip.training.plan, pc_clip.training.sweep, pc_clip.report.build
        print(sorted(m for m in sys.modules if m.startswith("pc_clip.smoke")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_no_module_defines_a_module_getattr():
    for p in (REPO / "pc_clip").rglob("*.py"):
        tree = ast.parse(p.read_text())
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), p


MAX_NOTEBOOK_CODE_LINES = 600


def notebook_code_lines(path) -> int:
    """Source lines in the code cells of a notebook: neither blank nor only a comment (markdown prose and
    comments, which wrapping at 110 characters moves onto their own lines, are not counted)."""
    import json
    cells = json.loads(path.read_text())["cells"]
    lines = ("".join(c["source"]).splitlines() for c in cells if c["cell_type"] == "code")
    return sum(1 for cell in lines for line in cell if line.strip() and not line.strip().startswith("#"))


def test_no_library_notebook_is_over_600_code_lines():
    """A library notebook (every notebook under nbs/ but the experiments) reads as one story: split past 600
    lines."""
    notebooks = [p for p in (REPO / "nbs").rglob("*.ipynb")
                 if "experiments" not in p.relative_to(REPO / "nbs").parts
                 and ".ipynb_checkpoints" not in p.parts]
    assert len(notebooks) > 40
    over = {str(p.relative_to(REPO)): n for p in notebooks
            if (n := notebook_code_lines(p)) > MAX_NOTEBOOK_CODE_LINES}
    assert not over, over
